"""What ``attnpatch compare`` and ``generate`` run: the settings from ``--methods`` x ``--grid``,
``--caches`` and their combinations, timed interleaved with stock attention over ``--repeats``
(speedups per repeat, median and spread), their counters printed, masks pictured, outputs saved."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .. import api
from ..tools import timing
from . import caches, refine_setting, report, runner
from .setting import Setting  # noqa: F401  (compare.Setting: the row type, re-exported)
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
    return [m for ms in _expand(runner.split_top(specs), grids) for m in ms]


def _expand(specs: list[str], grids: list[str]) -> list[list]:
    """Per method spec, its instances crossed with the --grid values it has a parameter for."""
    pairs = []
    for g in grids:
        key, eq, values = g.partition("=")
        if not eq or not key.strip() or not values:
            raise runner.UsageError(f"--grid {g!r}: expected KEY=V1,V2,...")
        pairs.append((key.strip(), runner.split_top(values)))
    out, params = [], {}
    for spec in specs:
        base = runner.parse_method(spec)
        names = runner.parameters(type(base))
        params[type(base).__name__] = names
        settings = [[]]
        for key, values in pairs:
            if key in names:
                settings = [s + [f"{key}={x}"] for s in settings for x in values]
        out.append([runner.parse_method(spec, s) for s in settings])
    for key, _ in pairs:
        if not any(key in names for names in params.values()):
            have = "; ".join(f"{m}: {', '.join(n)}" for m, n in params.items())
            raise runner.UsageError(f"--grid {key}=...: no method in --methods has a parameter {key!r} ({have})")
    return out


def settings(methods: str, grids: list[str], cache_specs: str = "", combine: bool = False) -> list[Setting]:
    """The settings to compare: each --methods entry (``Method(...)``, ``Cache(...)`` or both joined
    by ``+``) x --grid, each --caches entry alone, and with --combine every method x every cache."""
    specs = runner.split_top(methods or "")
    joined = [_split_plus(spec) for spec in specs]
    expanded = iter(_expand([m for m, _ in joined if m is not None], grids))
    out = []
    for m, c in joined:
        out += [Setting(x, c) for x in next(expanded)] if m is not None else [Setting(None, c)]
    alone = [caches.parse(c) for c in runner.split_top(cache_specs or "")
             if len(runner.split_top(c, "+")) == 1 or _no_plus(c)]
    out += [Setting(None, c) for c in alone]
    if combine:
        if not alone or not any(s.kind == "method" for s in out):
            raise runner.UsageError("--combine runs every method in --methods with every cache in --caches; give both")
        out += [Setting(s.method, c) for c in alone for s in list(out) if s.kind == "method"]
    if not out:
        raise runner.UsageError("nothing to compare: give --methods and / or --caches")
    return out


def _no_plus(spec: str) -> bool:
    raise runner.UsageError(f"--caches {spec!r}: one cache per entry; join a method and a cache with '+' in --methods")


def _split_plus(spec: str) -> tuple[str | None, caches.Cache | None]:
    """``"Neighborhood(window=7)+FirstBlockCache(threshold=0.2)"`` -> (method spec, Cache)."""
    parts = runner.split_top(spec, "+")
    cs = [caches.parse(p) for p in parts if caches.is_cache(p)]
    ms = [p for p in parts if not caches.is_cache(p)]
    for p in ms:
        try:
            runner.parse_method(p)
        except runner.UsageError as e:
            if not str(e).startswith("unknown method"):
                raise
            raise runner.UsageError(f"{e}; or a diffusers cache: {', '.join(caches.available())}") from None
    if len(ms) > 1 or len(cs) > 1:
        raise runner.UsageError(f"{spec!r}: a setting joins at most one method and one cache with '+'")
    return (ms[0] if ms else None), (cs[0] if cs else None)


def measure(sets: list[Setting], run_one, repeats: int, times: dict, outputs: dict | None = None,
            errors: dict | None = None) -> tuple[dict, dict]:
    """Stock (key "0") and every setting (key str(i + 1)) run ``repeats`` times, interleaved and
    in rotating order (``tools.timing.interleave``); ``run_one(key, setting, first)`` -> (output,
    seconds). Returns (each key's first output: the quality run, {key: error} of settings that
    failed); ``times`` (and ``outputs`` / ``errors`` if given) are filled in place, so an
    interrupt keeps what was measured."""
    outputs, errors, every = {} if outputs is None else outputs, {} if errors is None else errors, [Setting(), *sets]

    def runner_for(key: str, s: Setting):
        def go():
            try:
                out, t = run_one(key, s, key not in outputs)
            except (ValueError, RuntimeError, TypeError) as e:
                if s.kind == "stock":
                    raise
                errors[key] = str(e).strip().splitlines()[0]
                print(f"{s.label}: failed: {errors[key]}", file=sys.stderr)
                return None
            outputs.setdefault(key, out)
            return t
        return go

    timing.interleave({str(i): runner_for(str(i), s) for i, s in enumerate(every)}, repeats, times)
    return outputs, errors


def probe(loaded, m, i: int, prompts, args, out: Path, images: dict) -> dict:
    """A method's density and recall (one untimed run through its probe) and its mask picture."""
    recall, first = Recall(), FirstMask()
    with api.patch(loaded.obj, Observed(m, recall, first)):
        runner.run(loaded, prompts[:1], args.seed, **run_kw(args))
    s = recall.summary()
    if first.first is not None:
        report.mask_picture(*first.first, out / "masks" / f"setting{i + 1}.png")
        images[f"mask of setting {i + 1}: {m}"] = f"masks/setting{i + 1}.png"
    return dict(density=s["density"], recall=s["recall"])


def run_all(loaded, sets: list[Setting], prompts, args, out: Path) -> tuple[list[dict], list, dict, str]:
    """Every setting next to stock attention: (report rows, outputs shown, images, status)."""
    kw, stats, times = run_kw(args), {}, {}
    warm(loaded, prompts, args.seed, kw)
    for m in {str(s.method): s.method for s in sets if s.method is not None}.values():
        with contextlib.suppress(ValueError, RuntimeError, TypeError), api.patch(loaded.obj, m):
            warm(loaded, prompts, args.seed, kw)  # first-call costs (plans, compiles) out of repeat 0
    refine_setting.warm(loaded, sets, prompts, args.seed, kw)

    def run_one(key: str, s: Setting, first: bool):
        if first and s.cache is not None:
            caches.prepare(loaded, s.cache, lambda cfg: _calibration_run(loaded, cfg, prompts, args.seed, kw))
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(api.patch(loaded.obj, s.method)) if s.method is not None else None
            stack.enter_context(caches.enabled(loaded.obj, s.cache))
            result, t = (s.refine.run if s.refine is not None else runner.run)(loaded, prompts, args.seed, **kw)
            if first and handle is not None:
                stats[key] = summary(handle, f"setting {key}: ")
        return result, t

    from tqdm.auto import tqdm

    status, outputs, errors = "complete", {}, {}
    bar = tqdm(total=args.repeats * (len(sets) + 1), desc="timed runs (stock and settings in turn)", disable=args.quiet)

    def counted(*a):
        try:
            return run_one(*a)
        finally:
            bar.update()

    try:
        measure(sets, counted, args.repeats, times, outputs, errors)
    except KeyboardInterrupt:  # a report of what was measured
        status = f"interrupted after {sum(map(len, times.values()))} timed runs of {args.repeats * (len(sets) + 1)}"
        print(status, file=sys.stderr)
    bar.close()
    return _rows(loaded, sets, prompts, args, out, outputs, errors, times, stats) + (status,)


def against_stock(loaded, method, prompts, args, out: Path) -> bool:
    """``generate --compare``: stock and ``method`` in turn over ``--repeats`` as in ``run_all``;
    outputs saved, time, speedup (median, min-max) and quality printed. False if the method failed."""
    kw = run_kw(args)
    warm(loaded, prompts, args.seed, kw)
    with api.patch(loaded.obj, method):
        warm(loaded, prompts, args.seed, kw)

    def run_one(key, s, first):
        if s.method is None:
            return runner.run(loaded, prompts, args.seed, **kw)
        with api.patch(loaded.obj, s.method) as handle:
            res = runner.run(loaded, prompts, args.seed, **kw)
            if first:
                summary(handle)
        return res

    times = {}
    outputs, errors = measure([Setting(method)], run_one, args.repeats, times)
    if errors:
        return False
    stock, result, sp = outputs["0"], outputs["1"], timing.speedups(times, "0")
    save(loaded, result, prompts, out / "patched", args)
    save(loaded, stock, prompts, out / "stock", args)
    print(f"{method}: {sp['1']['seconds']:.2f} s for {len(prompts)} prompt(s) (median of {sp['1']['n']} runs)")
    q = report.quality_of(loaded.kind, result, stock)
    qs = ", ".join(f"{k.upper() if k != 'agreement' else 'token agreement'} {v:.3f}" for k, v in q.items())
    m = sp["1"]
    spread = f" ({m['min']:.2f}-{m['max']:.2f}x over {m['n']} repeats)" if m["n"] > 1 else ""
    print(f"stock attention: {sp['0']['seconds']:.2f} s; speedup {m['median']:.2f}x{spread}; vs stock: {qs}")
    return True


def _calibration_run(loaded, cfg, prompts, seed: int, kw: dict) -> None:
    loaded.obj.transformer.enable_cache(cfg)
    try:
        runner.run(loaded, prompts[:1], seed, **kw)
    finally:
        loaded.obj.transformer.disable_cache()


def _rows(loaded, sets, prompts, args, out, outputs, errors, times, stats):
    """Report rows (stock first) with the speedup median / min / max over the repeats, quality
    vs stock's output, density / recall of each method; outputs saved, masks pictured."""
    ref = outputs.get("0")
    if ref is None:
        return [], [], {}
    save(loaded, ref, prompts, out / "stock", args)
    speed, judge = timing.speedups(times, "0"), report.judge_for(loaded.name, prompts)
    rows, shown, images, probed = [], [("stock attention", ref)], {}, {}
    for i, s in enumerate([Setting(), *sets]):
        key = str(i)
        if key in errors or key not in outputs:
            rows.append(dict(setting=s.label, kind=s.kind, error=errors.get(key, "not run (interrupted)")))
            continue
        sp = speed[key]
        row = dict(setting=s.label, kind=s.kind, seconds=sp["seconds"], speedup=sp["median"], speedup_min=sp["min"],
                   speedup_max=sp["max"], repeats=sp["n"], density=1.0 if i == 0 else None, recall=1.0 if i == 0 else None)
        if s.method is not None:
            name = str(s.method)
            if name not in probed:
                try:
                    probed[name] = probe(loaded, s.method, i - 1, prompts, args, out, images)
                except (ValueError, RuntimeError, TypeError) as e:  # the run itself worked: keep its row
                    print(f"{s.label}: no density / recall: {str(e).strip().splitlines()[0]}", file=sys.stderr)
                    probed[name] = {}
            row.update(probed[name])
        row.update(report.quality_of(loaded.kind, outputs[key], ref, judge))
        if key in stats:
            row["patch"] = stats[key]
        rows.append(row)
        if i:
            save(loaded, outputs[key], prompts, out / f"setting{i}", args)
            shown.append((s.label, outputs[key]))
    return rows, shown, images


class FirstMask:
    """A watcher for ``Observed``: keeps the first self / joint call's (plan, site, S) for a picture."""

    def __init__(self):
        self.first = None

    def __call__(self, q, k, site, groups) -> None:
        plan = groups[0][1]
        if self.first is None and site.kind != "cross" and q.shape[2] == k.shape[2] and plan is not None:
            self.first = (plan, site, q.shape[2])
