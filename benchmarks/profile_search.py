"""Searched per-head profiles vs one uniform parameter at equal density, on a trained fixture.

The uniform setting (``--uniform``) is measured first; its mean density (over layers, heads and the
calibration run's calls) is the budget of the search (attnpatch.tools.profile_search) over
``--values``, on the calibration captions. Both then run on held-out captions with the method's
default schedule: recall of the dense attention mass and density (attnpatch.tools.capture), PSNR /
SSIM against stock attention with the same seed, and the fixture's pixel judge.

    python benchmarks/profile_search.py --model builtin:flux-shapes --values 3,5,7,9,11,13 --uniform 7
    python benchmarks/profile_search.py --model builtin:wan-shapes --values "(1,3,3),(3,3,3),(3,5,5),(5,5,5),(5,7,7),(5,8,8)" --uniform "(3,5,5)"
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

import attnpatch as ap  # noqa: E402
from attnpatch.cli import report, runner  # noqa: E402
from attnpatch.tools.capture import capture  # noqa: E402
from attnpatch.tools.profile_search import measure, search  # noqa: E402
from attnpatch.tools.quality import psnr, ssim  # noqa: E402

CAPTIONS = {  # calibration / held-out captions (the fixtures' vocabulary)
    "flux-shapes": (["a large red circle at the top left", "a small blue square at the bottom right",
                     "a large green triangle in the center", "a small yellow circle on the left"],
                    ["a large blue circle at the top right", "a small red triangle at the bottom left",
                     "a large yellow square in the center", "a small green square on the right"]),
    "wan-shapes": (["a large red square moving right", "a large green circle moving up"],
                   ["a large blue circle moving down", "a large yellow square moving left"]),
}


def _summary(cap) -> dict:
    s = cap.summary()
    mean = lambda k: sum(x for v in s.values() for x in v[k]) / sum(len(v[k]) for v in s.values())  # noqa: E731
    return dict(recall=mean("recall"), density=mean("density"))


def held_out(loaded, name: str, methods: dict, prompts, seed: int, steps) -> list[dict]:
    """Per setting: recall / density on the held-out captions, PSNR / SSIM vs stock, judged accuracy."""
    go = lambda obj: runner.run(loaded, prompts, seed, steps=steps)  # noqa: E731
    stock, _ = go(loaded.obj)
    judge = report.judge_for(name, prompts)
    rows = [dict(setting="stock attention", recall=1.0, density=1.0, psnr=float("inf"), ssim=1.0,
                 judged=judge(stock) if judge else None)]
    for label, m in methods.items():
        cap = capture(loaded.obj, go, method=m, stats=False)
        with ap.patch(loaded.obj, m):
            out, _ = go(loaded.obj)
        rows.append(dict(setting=label, **_summary(cap), psnr=psnr(out, stock), ssim=ssim(out, stock),
                         judged=judge(out) if judge else None))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:flux-shapes", choices=["builtin:flux-shapes", "builtin:wan-shapes"])
    p.add_argument("--method", default="Neighborhood")
    p.add_argument("--param", default="window")
    p.add_argument("--values", required=True, help="candidate values, comma-separated Python literals")
    p.add_argument("--uniform", required=True, help="the uniform value whose density is the budget")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "analysis")
    a = p.parse_args(argv)
    name = a.model.split(":", 1)[1]
    loaded = runner.load(a.model)
    loaded.obj.set_progress_bar_config(disable=True)
    values = list(ast.literal_eval(f"[{a.values}]"))
    uniform = ast.literal_eval(a.uniform)
    method = runner.parse_method(a.method)
    calib, test = CAPTIONS[name]
    go = lambda obj: runner.run(loaded, calib, a.seed, steps=a.steps)  # noqa: E731
    m = measure(loaded.obj, go, method, a.param, [uniform])
    budget = m["density"].mean().item()
    a.out.mkdir(parents=True, exist_ok=True)
    prof = a.out / f"profile_{name}.safetensors"
    res = search(loaded.obj, go, method, a.param, values, budget, out=prof)
    base = dict(dense_steps=method.dense_steps, dense_layers=method.dense_layers)
    settings = {f"{a.method}({a.param}={uniform!r}) uniform": type(method)(**{a.param: uniform}, **base),
                f"{a.method}(profile=searched)": type(method)(profile=str(prof), **base)}
    rows = held_out(loaded, name, settings, test, a.seed, a.steps)
    chosen = res["tables"][a.param]
    flat = chosen.reshape(chosen.shape[0] * chosen.shape[1], -1)  # (cells, axes or 1)
    counts = {repr(v): int((flat == torch.tensor(v).reshape(1, -1)).all(-1).sum()) for v in values}
    write(a, name, budget, res, rows, counts, machine())


def write(a, name, budget, res, rows, counts, mach) -> None:
    md = [f"# Searched per-head profile vs uniform at equal density: {a.model}", "",
          f"{a.method} `{a.param}` per (layer, head) from {a.values}, searched on {len(CAPTIONS[name][0])} calibration "
          f"captions with the budget = the mean density of the uniform `{a.param}={a.uniform}` ({budget:.4f}); on those "
          f"captions the search keeps recall {res['recall']:.4f} at density {res['density']:.4f} "
          f"(uniform: {res['uniform']['recall'] if res['uniform'] else float('nan'):.4f}). Chosen values (cells): {counts}.",
          "", f"Held-out captions ({len(CAPTIONS[name][1])}), seed {a.seed}, default schedule of the method; machine "
          f"{mach.get('cpu', '')}. Command: `python benchmarks/profile_search.py --model {a.model} --values \"{a.values}\" "
          f"--uniform \"{a.uniform}\"`", "", "| setting | recall | density | PSNR dB | SSIM | judged |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if abs(v) < 100 else str(v)  # noqa: E731
    md += [f"| {r['setting']} | " + " | ".join(fmt(r[k]) for k in ("recall", "density", "psnr", "ssim", "judged")) + " |"
           for r in rows]
    (a.out / f"profile_{name}.md").write_text("\n".join(md) + "\n")
    (a.out / f"profile_{name}.json").write_text(json.dumps(dict(rows=rows, budget=budget, counts=counts, machine=mach,
                                                                searched=dict(recall=res["recall"], density=res["density"]),
                                                                uniform=res["uniform"]), indent=1, default=str))
    print("\n".join(md))


if __name__ == "__main__":
    main()
