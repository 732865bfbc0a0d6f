"""``attnpatch analyze``: capture a model's attention on a few prompts and write a report folder:
capture.safetensors (the per layer / head accumulators, ``attnpatch.tools.capture``), one
recall_<i>.safetensors per ``--methods`` entry, figures, report.md / report.json and index.html.

    attnpatch analyze --model builtin:smollm2 --length 1024
    attnpatch analyze --model builtin:wan-shapes --methods 'Radial,SlidingTile(tile=(1, 4, 4), window=(3, 1, 1))'

LLMs run one forward per prompt (prefill, no generation): ``--prompt`` texts, or by default
``--prompts`` passages of ``--length`` tokens of English prose. Pipelines run their own generation
(every denoising step is captured). The cost is reported as a multiple of a plain (unpatched) run.
"""
from __future__ import annotations

import time

import torch

EXAMPLE = "attnpatch analyze --model builtin:smollm2 --length 1024 --methods 'SinkWindow(sink=4, window=256)'"


def add_parser(sub, common, positive) -> None:
    p = sub.add_parser("analyze", help="capture attention statistics per layer / head: a report with heatmaps and "
                                       "decay curves, and the recall of methods' plans")
    common(p, "analysis")
    p.add_argument("--methods", default="", help="comma-separated methods whose plans' recall of the dense attention "
                                                  "mass is measured, e.g. 'SinkWindow(window=256),VerticalSlash'")
    p.add_argument("--length", type=positive, default=1024, help="LLM: tokens per default prompt (passages of prose)")
    p.add_argument("--prompts", type=positive, default=2, help="LLM: number of default passages")
    p.add_argument("--rows", type=positive, help="query rows per attention call at most (whole chunks, evenly "
                                                 "spaced); default: every row")
    p.add_argument("--chunk-mb", type=positive, default=64, help="memory of one chunk of attention probabilities")
    p.set_defaults(func=analyze)


def passages(tok, n: int, length: int) -> list[list[int]]:
    """``n`` token-id lists of ``length`` tokens of prose (the essay ruler's haystack), distinct starts."""
    from ..tools import ruler

    sents, out = ruler._essay(), []
    for i in range(n):
        ids, j = [], (i * 97) % len(sents)
        while len(ids) < length:
            ids += tok(" " + sents[j % len(sents)], add_special_tokens=False)["input_ids"]
            j += 1
        out.append(ids[:length])
    return out


def runner_for(loaded, args, prompts):
    """(go(obj) -> None, what it runs in words)."""
    from . import compare, runner

    if loaded.kind == "diffusion":
        kw = compare.run_kw(args)

        def go(obj):
            runner.run(loaded, prompts, args.seed, **kw)

        return go, f"{len(prompts)} prompt(s), seed {args.seed}, every denoising step"
    tok = loaded.tokenizer
    ids = ([tok(p, return_tensors="pt")["input_ids"][0].tolist() for p in args.prompt] if args.prompt
           else passages(tok, args.prompts, args.length))

    @torch.no_grad()
    def go(model):
        for x in ids:
            model(torch.tensor([x], device=model.device))

        return None

    return go, f"{len(ids)} forward(s) of {', '.join(str(len(x)) for x in ids)} tokens (prefill)"


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def analyze(args) -> int:
    from . import EXIT_OK, _out_dir, _prepare, runner
    from ..tools import analysis_report
    from ..tools.capture import capture

    methods = [runner.parse_method(s) for s in runner.split_top(args.methods)] if args.methods else []
    what = ["analyze", f"{args.prompts}x{args.length}", *([f"rows{args.rows}"] if args.rows else []),
            *(type(m).__name__ for m in methods)]  # in the default folder's name: other settings, another folder
    out = _out_dir(args, "attnpatch-analysis", _prepare(args, methods), what)
    loaded = runner.load(args.model, args.device, args.dtype)
    if args.quiet and hasattr(loaded.obj, "set_progress_bar_config"):
        loaded.obj.set_progress_bar_config(disable=True)
    prompts = args.prompt or loaded.prompts
    go, what = runner_for(loaded, args, prompts)
    go(loaded.obj)  # warm-up: first-call costs out of the plain timing
    _, plain = _timed(go, loaded.obj)
    kw = dict(rows=args.rows, chunk_bytes=args.chunk_mb << 20)
    cap, seconds = _timed(capture, loaded.obj, go, **kw)
    print(f"capture: {len(cap.layers)} layers, {cap.calls} attention calls, {seconds:.1f} s = {seconds / plain:.1f}x "
          f"a plain run ({plain:.1f} s)")
    recalls, costs = {}, []
    for i, m in enumerate(methods):
        recalls[str(m)], t = _timed(capture, loaded.obj, go, method=m, stats=False, **kw)
        recalls[str(m)].save(out / f"recall_{i}.safetensors", method=str(m))
        costs.append(f"{m}: {t / plain:.1f}x")
        s = recalls[str(m)].summary()
        print(f"{m}: recall {_mean(s, 'recall'):.3f} at density {_mean(s, 'density'):.3f}")
    note = (f"{args.model}, {what}, {args.device}, {args.dtype}. Statistics from the queries and keys each attention "
            f"call sees (self / joint calls; cross-attention skipped), softmax with head_dim^-0.5, computed in chunks "
            f"of query rows" + (f" ({args.rows} rows per call at most)" if args.rows else " (every row)") +
            f". Cost: capture {seconds:.1f} s = {seconds / plain:.1f}x a plain run of {plain:.1f} s"
            + (f"; recall passes {', '.join(costs)}" if costs else "") + ".")
    meta = dict(model=args.model, prompts=prompts if loaded.kind == "diffusion" or args.prompt else what, note=note,
                plain_seconds=plain, capture_seconds=seconds, cost_multiple=seconds / plain)
    cap.save(out / "capture.safetensors", **meta)
    analysis_report.write(out, cap, recalls, meta)
    print(f"report: {out / 'report.md'} (open {out / 'index.html'})")
    return EXIT_OK


def _mean(summary: dict, key: str) -> float:
    xs = [x for v in summary.values() for x in v[key]]
    return sum(xs) / max(1, len(xs))
