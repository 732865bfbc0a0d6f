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

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _methods(args) -> int:
    from .. import methods

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
    from .demo import demo

    return demo(args.seed)


def _out_dir(args, root: str, name: str, what: list[str]) -> Path:
    """--out, or a folder under ``root`` named for the model and the settings (a digest of every
    argument that changes the outputs), so a second command with other settings gets its own
    folder; checked before the model loads."""
    from .runner import UsageError

    if args.out:
        path = Path(args.out)
    else:
        keys = ("method", "set", "methods", "grid", "prompt", "seed", "steps", "height", "width", "frames",
                "max_new_tokens", "dtype", "device", "compare")
        digest = hashlib.sha1(json.dumps([getattr(args, k, None) for k in keys]).encode()).hexdigest()[:6]
        path = Path(root) / f"{_slug(name)}_{_slug('+'.join(what))[:40]}_{digest}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not args.force:
        why = "" if args.out else " (a run with the same settings)"
        raise UsageError(f"{path} exists and is not empty{why}; pass --force to overwrite it, or --out DIR for another folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(args, methods: list) -> str:
    """Everything about the model that can be checked without loading it: --device, --model,
    and methods that cannot run on it. Returns the model's name for the output folder."""
    from . import runner

    runner.check_device(args.device)
    src = runner.resolve(args.model)
    visual = sorted({type(m).__name__ for m in methods if not m.llm})
    if src.is_pipe is False and visual:
        from ..patchers.transformers import LLM_METHODS

        raise runner.UsageError(f"{', '.join(visual)}: image / video method(s), which cannot run on the language model "
                                f"{args.model}; for LLMs use {LLM_METHODS}")
    return src.name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:80]


def _generate(args) -> int:
    from .. import api
    from . import compare, report, runner

    method = runner.parse_method(args.method, args.set)
    out = _out_dir(args, "attnpatch-out", _prepare(args, [method]), [type(method).__name__])
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    kw = compare.run_kw(args)
    stock = None
    if args.compare:
        compare.warm(loaded, prompts, args.seed, kw)
        stock, t_stock = runner.run(loaded, prompts, args.seed, **kw)
    try:
        handle = api.patch(loaded.obj, method)
    except (TypeError, ValueError) as e:  # what only the loaded model tells: a family or method it cannot take
        raise runner.UsageError(f"cannot patch {args.model} with {method}: {str(e).splitlines()[0]}") from None
    with handle:
        result, t = runner.run(loaded, prompts, args.seed, **kw)
        compare.summary(handle)
    compare.save(loaded, result, prompts, out / "patched", args)
    print(f"{method}: {t:.2f} s for {len(prompts)} prompt(s)")
    if stock is not None:
        compare.save(loaded, stock, prompts, out / "stock", args)
        q = report.quality_of(loaded.kind, result, stock)
        qs = ", ".join(f"{k.upper() if k != 'agreement' else 'token agreement'} {v:.3f}" for k, v in q.items())
        print(f"stock attention: {t_stock:.2f} s; speedup {t_stock / t:.2f}x; vs stock: {qs}")
    print(f"outputs in {out}")
    return EXIT_OK


def _compare(args) -> int:
    from tqdm.auto import tqdm

    from . import compare, report, runner

    methods = compare.expand(args.methods, args.grid)
    out = _out_dir(args, "attnpatch-report", _prepare(args, methods), list(dict.fromkeys(type(m).__name__ for m in methods)))
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    (out / "masks").mkdir(exist_ok=True)
    compare.warm(loaded, prompts, args.seed, compare.run_kw(args))
    ref, t_ref = runner.run(loaded, prompts, args.seed, **compare.run_kw(args))
    compare.save(loaded, ref, prompts, out / "stock", args)
    rows = [dict(setting="stock attention", seconds=t_ref, speedup=1.0, density=1.0, recall=1.0, **report.quality_of(loaded.kind, ref, ref))]
    shown, images, status = [("stock attention", ref)], {}, "complete"
    try:
        for i, m in enumerate(tqdm(methods, desc="settings", disable=args.quiet)):
            row, result = compare.setting(loaded, m, i, prompts, args, out, ref, t_ref, images)
            rows.append(row)
            if result is not None:
                shown.append((row["setting"], result))
    except KeyboardInterrupt:
        status = f"interrupted after {len(rows) - 1} of {len(methods)} settings"
        print(status, file=sys.stderr)
    if loaded.kind == "diffusion":
        report.grid(shown, out / "grid.png")
        images = {"outputs (rows: settings)": "grid.png", **images}
    report.scatter(rows, "psnr" if loaded.kind == "diffusion" else "agreement", out / "scatter.png")
    images = {"speed vs quality": "scatter.png", **images}
    note = (f"{len(prompts)} prompt(s), seed {args.seed}, device {args.device}, {args.dtype}; times are whole generations "
            f"measured in this process after a warm-up; quality vs stock attention with the same seed; {status}.")
    report.write(out, dict(model=args.model, prompts=prompts, status=status, note=note), rows, loaded.kind, images)
    print(f"report: {out / 'report.md'} (open {out / 'index.html'})")
    return EXIT_OK if status == "complete" else EXIT_FAIL


def _bench(args) -> int:
    import runpy

    from .runner import UsageError

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / f"{args.which}.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmark scripts live in the source checkout (git clone the repo)")
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return EXIT_OK


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into exit code 2 with this message)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _common(p, kind: str) -> None:
    p.add_argument("--model", required=True, help="builtin:NAME (builtin:flux-shapes, builtin:wan-shapes, builtin:smollm2), "
                                                   "a hub id or a local folder (diffusers pipeline or transformers model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for more); default: the model's own examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=_positive, help="denoising steps (diffusion)")
    p.add_argument("--height", type=_positive)
    p.add_argument("--width", type=_positive)
    p.add_argument("--frames", type=_positive, help="video frames (video pipelines)")
    p.add_argument("--max-new-tokens", type=_positive, default=48, help="LLM generation length")
    p.add_argument("--video-format", choices=["gif", "png"], default="gif", help="videos as animated GIFs or PNG frames")
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
    from .runner import UsageError

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
