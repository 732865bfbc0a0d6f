"""The ``attnpatch`` command line.

    attnpatch compare   stock attention vs method settings on one model: report folder with
                        tables, image grids, a speed-vs-quality plot, mask pictures, index.html
    attnpatch generate  one generation with a method (images, videos, text); --compare adds stock
    attnpatch bench     the benchmark scripts (kernels, pipelines, llm, fixtures, guidance)
    attnpatch methods   every method with its parameters, defaults and source
    attnpatch demo      patch every supported model family (tiny embedded models) and check it

Exit codes: 0 success, 1 failure (or interrupted), 2 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from .methods.base import Method

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _methods(args) -> int:
    from . import methods

    for name in ["Dense", *methods._FILES]:
        if name == "Sparse":
            continue
        cls = getattr(methods, name)
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                           if f.init and not f.name.startswith("_") and f.name != "profile")
        print(f"{name}({params})")
        print(f"    {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(f"    source: {getattr(cls, 'source', '-')}")
    return EXIT_OK


def _demo(args) -> int:
    from .pipelines.demo import demo

    return demo(args.seed)


def _out_dir(args, root: str, name: str, what: list[str]) -> Path:
    """--out, or a folder under ``root`` named for the model and the settings (a digest of every
    argument that changes the outputs), so a second command with other settings gets its own
    folder; checked before the model loads."""
    from .pipelines.runner import UsageError

    if args.out:
        path = Path(args.out)
    else:
        keys = ("method", "set", "methods", "grid", "prompt", "seed", "steps", "height", "width", "frames",
                "max_new_tokens", "dtype", "device", "compare")
        digest = hashlib.sha1(json.dumps([getattr(args, k, None) for k in keys]).encode()).hexdigest()[:6]
        path = Path(root) / f"{_slug(name)}_{_slug('+'.join(what))[:40]}_{digest}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not args.force:
        raise UsageError(f"{path} exists and is not empty (a run with the same settings); pass --force to overwrite it, "
                         "or --out DIR for another folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(args) -> str:
    """Everything about the model that can be checked without loading it: --device, --dtype,
    --model. Returns the model's name for the output folder."""
    from .pipelines import runner

    runner.check_device(args.device)
    return runner.resolve(args.model).name


def _summary(handle, prefix: str = "") -> dict | None:
    """Print the patch's one-line counters (calls routed through the method, calls handed back
    and why); return its stats for the report."""
    if not hasattr(handle, "summary"):  # Handle.summary() lands with the lifecycle work
        return None
    print(prefix + handle.summary())
    return handle.stats()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:80]


def _run_kw(args) -> dict:
    return dict(steps=args.steps, height=args.height, width=args.width, num_frames=getattr(args, "frames", None),
                max_new_tokens=args.max_new_tokens)


def _generate(args) -> int:
    from . import api
    from .pipelines import report, runner

    method = runner.parse_method(args.method, args.set)
    out = _out_dir(args, "attnpatch-out", _prepare(args), [type(method).__name__])
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    kw = _run_kw(args)
    stock = None
    if args.compare:
        runner.run(loaded, prompts[:1], args.seed, **{**kw, "steps": 1} if loaded.kind == "diffusion" else {**kw, "max_new_tokens": 2})
        stock, t_stock = runner.run(loaded, prompts, args.seed, **kw)
    with api.patch(loaded.obj, method) as handle:
        result, t = runner.run(loaded, prompts, args.seed, **kw)
        _summary(handle)
    _save(loaded, result, prompts, out / "patched", args)
    print(f"{method}: {t:.2f} s for {len(prompts)} prompt(s)")
    if stock is not None:
        _save(loaded, stock, prompts, out / "stock", args)
        q = report.quality_of(loaded.kind, result, stock)
        qs = ", ".join(f"{k.upper() if k != 'agreement' else 'token agreement'} {v:.3f}" for k, v in q.items())
        print(f"stock attention: {t_stock:.2f} s; speedup {t_stock / t:.2f}x; vs stock: {qs}")
    print(f"outputs in {out}")
    return EXIT_OK


def _save(loaded, result, prompts, stem: Path, args) -> None:
    from .pipelines import report

    if loaded.kind == "diffusion":
        report.save_output(result, stem, args.video_format)
    else:
        texts = loaded.tokenizer.batch_decode(result, skip_special_tokens=True)
        stem.with_suffix(".txt").write_text("\n\n".join(f"## {p}\n{t}" for p, t in zip(prompts, texts)) + "\n")
        for p, t in zip(prompts, texts):
            print(f"[{stem.name}] {p!r} -> {t.strip()!r}")


def _expand(specs: str, grids: list[str]) -> list:
    """Method instances: every spec, crossed with every --grid KEY=V1,V2 that it has a parameter for."""
    from .pipelines import runner

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


def _compare(args) -> int:
    from tqdm.auto import tqdm

    from . import api
    from .pipelines import report, runner
    from .pipelines.probe import Recall

    methods = _expand(args.methods, args.grid)
    out = _out_dir(args, "attnpatch-report", _prepare(args), list(dict.fromkeys(type(m).__name__ for m in methods)))
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    (out / "masks").mkdir(exist_ok=True)
    kw = _run_kw(args)
    quality = "psnr" if loaded.kind == "diffusion" else "agreement"
    runner.run(loaded, prompts[:1], args.seed, **{**kw, "steps": 1} if loaded.kind == "diffusion" else {**kw, "max_new_tokens": 2})
    ref, t_ref = runner.run(loaded, prompts, args.seed, **kw)
    _save(loaded, ref, prompts, out / "stock", args)
    rows = [dict(setting="stock attention", seconds=t_ref, speedup=1.0, density=1.0, recall=1.0, **report.quality_of(loaded.kind, ref, ref))]
    shown = [("stock attention", ref)]
    images, status = {}, "complete"
    try:
        for i, m in enumerate(tqdm(methods, desc="settings", disable=args.quiet)):
            label = str(m) + (f" + dense_steps={m.dense_steps}" if hasattr(m, "dense_steps") else "")
            try:
                with api.patch(loaded.obj, m) as handle:
                    result, t = runner.run(loaded, prompts, args.seed, **kw)
                    stats = _summary(handle, f"setting {i + 1}: ")
                probe = _MaskProbe(Recall(inner=m))
                with api.patch(loaded.obj, probe):
                    runner.run(loaded, prompts[:1], args.seed, **kw)
            except (ValueError, RuntimeError, TypeError) as e:
                rows.append(dict(setting=label, error=str(e).splitlines()[0]))
                print(f"{label}: failed: {rows[-1]['error']}", file=sys.stderr)
                continue
            s = probe.inner.summary()
            rows.append(dict(setting=label, seconds=t, speedup=t_ref / t, density=s["density"], recall=s["recall"],
                             **report.quality_of(loaded.kind, result, ref), **({"patch": stats} if stats is not None else {})))
            _save(loaded, result, prompts, out / f"setting{i + 1}", args)
            if probe.first is not None:
                report.mask_picture(*probe.first, out / "masks" / f"setting{i + 1}.png")
                images[f"mask of setting {i + 1}: {label}"] = f"masks/setting{i + 1}.png"
            shown.append((label, result))
    except KeyboardInterrupt:
        status = f"interrupted after {len(rows) - 1} of {len(methods)} settings"
        print(status, file=sys.stderr)
    if loaded.kind == "diffusion":
        report.grid(shown, out / "grid.png")
        images = {"outputs (rows: settings)": "grid.png", **images}
    report.scatter(rows, quality, out / "scatter.png")
    images = {"speed vs quality": "scatter.png", **images}
    note = (f"{len(prompts)} prompt(s), seed {args.seed}, device {args.device}, {args.dtype}; times are whole generations "
            f"measured in this process after a warm-up; quality vs stock attention with the same seed; {status}.")
    report.write(out, dict(model=args.model, prompts=prompts, status=status, note=note), rows, loaded.kind, images)
    print(f"report: {out / 'report.md'} (open {out / 'index.html'})")
    return EXIT_OK if status == "complete" else EXIT_FAIL


class _MaskProbe(Method):
    """Wraps a probe method; keeps the first self / joint call's (plan, site, S) for a picture."""

    def __init__(self, inner):
        self.inner, self.first = inner, None

    def head_plans(self, q, k, site):
        groups = self.inner.head_plans(q, k, site)
        plan = groups[0][1]
        if self.first is None and site.kind != "cross" and q.shape[2] == k.shape[2] and plan is not None:
            self.first = (plan, site, q.shape[2])
        return groups

    def reset(self):
        self.inner.reset()


def _bench(args) -> int:
    import runpy

    from .pipelines.runner import UsageError

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    script = root / f"{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmark scripts live in the source checkout (git clone the repo)")
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return EXIT_OK


def _common(p, kind: str) -> None:
    p.add_argument("--model", required=True, help="builtin:NAME (builtin:flux-shapes, builtin:wan-shapes, builtin:smollm2), "
                                                   "a hub id or a local folder (diffusers pipeline or transformers model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for more); default: the model's own examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, help="denoising steps (diffusion)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video frames (video pipelines)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="LLM generation length")
    p.add_argument("--video-format", choices=["gif", "png", "mp4"], default="gif")
    p.add_argument("--out", help=f"output folder (default: deterministic under ./attnpatch-{kind})")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnpatch", description="Training-free attention patches for diffusers and transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate with a method; --compare also runs stock attention")
    _common(gen, "out")
    gen.add_argument("--method", required=True, help="e.g. SlidingTile or 'SlidingTile(tile=4, window=(1, 3))'")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (repeatable)")
    gen.add_argument("--compare", action="store_true", help="also run stock attention: time, speedup, quality")
    gen.set_defaults(func=_generate)
    cmp_ = sub.add_parser("compare", help="stock vs several method settings: a report folder with index.html")
    _common(cmp_, "report")
    cmp_.add_argument("--methods", required=True, help="comma-separated, e.g. 'Neighborhood(window=7, tile=4),TopKBlocks'")
    cmp_.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="expand every method with KEY over values")
    cmp_.set_defaults(func=_compare)
    bench = sub.add_parser("bench", help="run a benchmark script (source checkout)")
    bench.add_argument("which", choices=["kernels", "pipelines", "llm", "fixtures", "guidance"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script, e.g. --quick")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="patch every supported family on tiny embedded models and compare with stock")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    sub.add_parser("methods", help="list methods, parameters, defaults and sources").set_defaults(func=_methods)
    args = parser.parse_args(argv)
    from .pipelines.runner import UsageError

    try:
        return args.func(args)
    except UsageError as e:
        print(f"attnpatch {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
