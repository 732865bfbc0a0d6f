"""The ``attnpatch`` command line.

    attnpatch compare   stock attention vs method settings on one model: report folder with
                        tables, image grids, a speed-vs-quality plot, mask pictures, index.html
    attnpatch generate  one generation with a method (images, videos, text); --compare adds stock
    attnpatch bench     the benchmark scripts (kernels, pipelines, llm, fixtures, guidance)
    attnpatch methods   every method with its parameters, defaults and source
    attnpatch demo      patch every supported model family (tiny embedded models) and check it
    attnpatch analyze   capture attention per layer / head (entropy, sinks, decay, recall): a report folder

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
        extra = [[k, getattr(args, k)] for k in ("caches", "combine", "refine_from", "refine_strength", "parallel")
                 if getattr(args, k, None)]  # only when set: old digests stay
        digest = hashlib.sha1(json.dumps([getattr(args, k, None) for k in keys] + extra).encode()).hexdigest()[:6]
        path = Path(root) / f"{_slug(name)}_{_slug('+'.join(what))[:40]}_{digest}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not args.force:
        why = "" if args.out else " (a run with the same settings)"
        raise UsageError(f"{path} exists and is not empty{why}; pass --force to overwrite it, or --out DIR for another folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(args, methods: list, caches: bool = False) -> str:
    """Everything about the model that can be checked without loading it: --device, --model,
    and methods (or diffusers caches) that cannot run on it. Returns the model's name for the output folder."""
    from . import runner

    runner.check_device(args.device)
    src = runner.resolve(args.model)
    if src.is_pipe is False and caches:
        raise runner.UsageError(f"diffusers' caches run on diffusion pipelines; {args.model} is a language model")
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
    from . import compare, refine_setting, runner

    if args.parallel:  # one generation over torchrun's processes: attnpatch/cli/parallel_cli.py
        from .parallel_cli import generate

        return generate(args)
    method = runner.parse_method(args.method, args.set)
    refine = refine_setting.check(args)  # --refine-from: checked before anything loads
    out = _out_dir(args, "attnpatch-out", _prepare(args, [method]), [type(method).__name__])
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    kw = compare.run_kw(args)
    try:
        api.patch(loaded.obj, method).remove()
    except (TypeError, ValueError) as e:  # what only the loaded model tells: a family or method it cannot take
        raise runner.UsageError(f"cannot patch {args.model} with {method}: {str(e).splitlines()[0]}") from None
    if not args.compare:
        with api.patch(loaded.obj, method) as handle:
            result, t = (refine.run if refine is not None else runner.run)(loaded, prompts, args.seed, **kw)
            compare.summary(handle)
        compare.save(loaded, result, prompts, out / "patched", args)
        print(f"{method}: {t:.2f} s for {len(prompts)} prompt(s)")
    elif not compare.against_stock(loaded, method, prompts, args, out):
        return EXIT_FAIL
    print(f"outputs in {out}")
    return EXIT_OK


def _compare(args) -> int:
    from . import compare, refine_setting, report, runner

    sets = compare.settings(args.methods, args.grid, args.caches, args.combine)
    refine = refine_setting.check(args)  # --refine-from: checked before anything loads
    methods = [s.method for s in sets if s.method is not None]
    what = list(dict.fromkeys(type(s.method).__name__ if s.method is not None else s.cache.name for s in sets))
    out = _out_dir(args, "attnpatch-report", _prepare(args, methods, caches=any(s.cache for s in sets)), what)
    loaded = runner.load(args.model, args.device, args.dtype)
    prompts = args.prompt or loaded.prompts
    (out / "masks").mkdir(exist_ok=True)
    rows, shown, images, status = compare.run_all(loaded, refine_setting.expand(sets, refine), prompts, args, out)
    quality, head = "psnr" if loaded.kind == "diffusion" else "agreement", ""
    if refine is not None and rows:  # quality from the pixels (PSNR vs a near-blank stock image means nothing)
        head, quality = refine_setting.finish(loaded, rows, shown, prompts, args)
    if loaded.kind == "diffusion" and shown:
        report.grid(shown, out / "grid.png")
        images = {"outputs (rows: settings)": "grid.png", **images}
    report.scatter(rows, quality, out / "scatter.png")
    images = {"speed vs quality": "scatter.png", **images}
    statement = " ".join(filter(None, [head, report.statement(rows, quality) if rows else ""]))
    for r in rows:
        if "error" not in r:
            sp = f" ({report.spread(r)}x over {r['repeats']} repeats)" if report.spread(r) else ""
            print(f"{r['setting']}: {r['seconds']:.2f} s, speedup {r['speedup']:.2f}x{sp}, {quality} {r[quality]:.3f}")
    print(statement)
    note = (f"{len(prompts)} prompt(s), seed {args.seed}, device {args.device}, {args.dtype}; times are whole generations "
            f"measured in this process after a warm-up, stock and every setting in turn within each of {args.repeats} "
            "repeat(s) (order rotating); speedup = stock's time / the setting's in the same repeat, median and min-max "
            f"over the repeats; quality vs stock attention with the same seed (the first repeat's outputs); {status}."
            + (f" {refine_setting.NOTE}" if head else ""))
    meta = dict(model=args.model, prompts=prompts, status=status, note=note, statement=statement,
                frontier=[r["setting"] for r in report.frontier(rows, quality)])
    report.write(out, meta, rows, loaded.kind, images)
    print(f"report: {out / 'report.md'} (open {out / 'index.html'})")
    return EXIT_OK if status == "complete" else EXIT_FAIL


BENCH_SCRIPTS = {"kernels": "kernel_speed"}  # `attnpatch bench NAME` -> benchmarks/SCRIPT.py where the two differ


def _bench(args) -> int:
    import runpy

    from .runner import UsageError

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    # the kernel table's script is not named kernels.py: run with benchmarks/ first on sys.path, it would replace the
    # 'kernels' package that transformers imports
    script = root / f"{BENCH_SCRIPTS.get(args.which, args.which)}.py"
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
    gen.add_argument("--repeats", type=_positive, default=3, help="with --compare: timed runs of stock and the method, "
                                                                   "interleaved (speedup: median and min-max of the ratios)")
    from . import refine_setting  # --refine-from, --refine-strength

    refine_setting.add_arguments(gen)
    from .parallel_cli import add_arguments as parallel_arguments  # --parallel ulysses=N

    parallel_arguments(gen)
    gen.set_defaults(func=_generate)
    cmp_ = sub.add_parser("compare", help="stock vs several method settings: a report folder with index.html")
    _common(cmp_, "report")
    cmp_.add_argument("--methods", default="", help="comma-separated, e.g. 'Neighborhood(window=7, tile=4),TopKBlocks'; "
                                                      "'Method(...)+Cache(...)' runs a method and a diffusers cache together")
    cmp_.add_argument("--caches", default="", help="diffusers caches as settings, e.g. 'FirstBlockCache(threshold=0.2),"
                                                     "TaylorSeerCache,MagCache(threshold=0.06)'")
    cmp_.add_argument("--combine", action="store_true", help="also run every method with every cache")
    cmp_.add_argument("--repeats", type=_positive, default=3, help="timed runs of stock and every setting, interleaved "
                                                                    "(speedup: median and min-max of the per-repeat ratios)")
    cmp_.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="expand every method with KEY over values")
    refine_setting.add_arguments(cmp_)
    cmp_.set_defaults(func=_compare)
    bench = sub.add_parser("bench", help="run a benchmark script (source checkout)")
    bench.add_argument("which", choices=["kernels", "pipelines", "llm", "fixtures", "guidance"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script, e.g. --quick")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="patch every supported family on tiny embedded models and compare with stock")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    sub.add_parser("methods", help="list methods, parameters, defaults and sources").set_defaults(func=_methods)
    from .analyze import add_parser as analyze_parser  # attnpatch analyze: attention capture report

    analyze_parser(sub, _common, _positive)
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
