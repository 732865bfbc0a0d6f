"""What ``attnpatch compare`` and ``generate`` run: the method settings from ``--methods`` x
``--grid``, one setting's run (timed, its patch counters printed, its mask pictured), outputs saved."""
from __future__ import annotations

import sys
from pathlib import Path

from .. import api
from . import report, runner
from ..methods.observe import Observed
from ..methods.probe import Recall


def run_kw(args) -> dict:
    return dict(steps=args.steps, height=args.height, width=args.width, num_frames=getattr(args, "frames", None),
                max_new_tokens=args.max_new_tokens)


def summary(handle, prefix: str = "") -> dict:
    """Print the patch's one-line counters (calls routed through the method, calls handed back
    and why); return its stats for the report."""
    print(prefix + handle.summary())
    return handle.stats()


def warm(loaded, prompts, seed: int, kw: dict) -> None:
    """One short untimed run, so first-call costs stay out of the timings."""
    runner.run(loaded, prompts[:1], seed, **{**kw, "steps": 1} if loaded.kind == "diffusion" else {**kw, "max_new_tokens": 2})


def save(loaded, result, prompts, stem: Path, args) -> None:
    if loaded.kind == "diffusion":
        report.save_output(result, stem, args.video_format)
    else:
        texts = loaded.tokenizer.batch_decode(result, skip_special_tokens=True)
        stem.with_suffix(".txt").write_text("\n\n".join(f"## {p}\n{t}" for p, t in zip(prompts, texts)) + "\n")
        for p, t in zip(prompts, texts):
            print(f"[{stem.name}] {p!r} -> {t.strip()!r}")


def expand(specs: str, grids: list[str]) -> list:
    """Method instances: every spec, crossed with every --grid KEY=V1,V2 that it has a parameter for."""
    pairs = []
    for g in grids:
        key, eq, values = g.partition("=")
        if not eq or not key.strip() or not values:
            raise runner.UsageError(f"--grid {g!r}: expected KEY=V1,V2,...")
        pairs.append((key.strip(), runner.split_top(values)))
    methods, params = [], {}
    for spec in runner.split_top(specs):
        base = runner.parse_method(spec)
        names = runner.parameters(type(base))
        params[type(base).__name__] = names
        settings = [[]]
        for key, values in pairs:
            if key in names:
                settings = [s + [f"{key}={x}"] for s in settings for x in values]
        methods += [runner.parse_method(spec, s) for s in settings]
    if not methods:
        raise runner.UsageError("--methods is empty")
    for key, _ in pairs:
        if not any(key in names for names in params.values()):
            have = "; ".join(f"{m}: {', '.join(n)}" for m, n in params.items())
            raise runner.UsageError(f"--grid {key}=...: no method in --methods has a parameter {key!r} ({have})")
    return methods


def setting(loaded, m, i: int, prompts, args, out: Path, ref, t_ref: float, images: dict):
    """One method setting: timed run, counters, mask probe, outputs saved; (report row, output)."""
    label = str(m) + (f" + dense_steps={m.dense_steps}" if hasattr(m, "dense_steps") else "")
    kw = run_kw(args)
    try:
        with api.patch(loaded.obj, m) as handle:
            result, t = runner.run(loaded, prompts, args.seed, **kw)
            stats = summary(handle, f"setting {i + 1}: ")
        recall, first = Recall(), FirstMask()
        with api.patch(loaded.obj, Observed(m, recall, first)):
            runner.run(loaded, prompts[:1], args.seed, **kw)
    except (ValueError, RuntimeError, TypeError) as e:
        print(f"{label}: failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return dict(setting=label, error=str(e).splitlines()[0]), None
    s = recall.summary()
    row = dict(setting=label, seconds=t, speedup=t_ref / t, density=s["density"], recall=s["recall"],
               **report.quality_of(loaded.kind, result, ref), patch=stats)
    save(loaded, result, prompts, out / f"setting{i + 1}", args)
    if first.first is not None:
        report.mask_picture(*first.first, out / "masks" / f"setting{i + 1}.png")
        images[f"mask of setting {i + 1}: {label}"] = f"masks/setting{i + 1}.png"
    return row, result


class FirstMask:
    """A watcher for ``Observed``: keeps the first self / joint call's (plan, site, S) for a picture."""

    def __init__(self):
        self.first = None

    def __call__(self, q, k, site, groups) -> None:
        plan = groups[0][1]
        if self.first is None and site.kind != "cross" and q.shape[2] == k.shape[2] and plan is not None:
            self.first = (plan, site, q.shape[2])
