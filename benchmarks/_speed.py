"""Per-call speed of a patched attention call vs stock SDPA, shared by ``percall.py`` and ``curves.py``.

A *case* is one attention shape as a model produces it (heads, head dim, token layout, the Site a
patcher builds); ``methods_for`` gives the parameters a user would pick at that size; ``measure``
times the patched call (``attnpatch.core.run``, automatic kernel choice, exactly the patchers' path)
interleaved with ``F.scaled_dot_product_attention`` on the same tensors, one ratio per repeat.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch import core, kernels
from attnpatch.kernels import tune
from attnpatch.tools.timing import _sync

ROW_S = 8.0  # a row whose calls would take longer than this gets fewer repeats (never under 2)
SLOW = 1.1  # a patched call above this multiple of stock is flagged (issue 18: "never slower than stock")
TINY_S, MANY = 0.2, 40  # rows whose calls are this fast get up to MANY repeats (at least TINY_S of timing)
STEP = dict(step=10, steps=20, timestep=0.5)  # mid-generation: past any dense_steps, the sparse path runs


@dataclass(frozen=True)
class Case:
    """One attention shape: ``family`` names the heads (smollm2, llama8b, flux, fixture, wan)."""

    family: str
    H: int
    Hkv: int
    D: int
    grid: tuple = ()  # visual grid (2-D / 3-D); empty for a 1-D LLM call
    text: int = 0  # joint text tokens (FLUX puts them first)
    S1: int = 0  # 1-D length (LLM prefill, causal)

    @property
    def dims(self) -> str:
        return "1-D" if not self.grid else f"{len(self.grid)}-D"

    @property
    def S(self) -> int:
        return self.S1 or self.text + math.prod(self.grid)

    @property
    def shape(self) -> str:
        return str(self.S1) if not self.grid else (f"{self.text}+" if self.text else "") + "x".join(map(str, self.grid))

    def site(self) -> ap.Site:
        if not self.grid:  # a transformers LLM prefill, as the transformers patcher describes it
            return ap.Site(causal=True, layer=0, family="llama", kind="self")
        kind = "joint" if self.text else "self"
        return ap.Site(grid=self.grid, text_len=self.text, text_first=True, kind=kind, family=self.family, layer=0, **STEP)


HEADS = {  # family: (H, H_kv, D, dims)
    "smollm2": (9, 3, 64, 1), "llama8b": (32, 8, 128, 1),  # Llama-style GQA heads
    "flux": (24, 24, 128, 2), "fixture": (4, 4, 24, 2),  # FLUX (512 text tokens) and the FLUX fixture (16)
    "wan": (12, 12, 128, 3),  # Wan 2.1 self-attention
}
LADDER_1D = [64, 256, 1024, 4096, 16384, 65536]
LADDER_2D = [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256)]
LADDER_3D = [(1, 8, 8), (4, 8, 8), (4, 16, 16), (4, 32, 32), (16, 32, 32), (16, 64, 64)]


def case(family: str, size) -> Case:
    """``size``: an int length (1-D) or a grid tuple."""
    H, Hkv, D, dims = HEADS[family]
    if dims == 1:
        return Case(family, H, Hkv, D, S1=int(size))
    return Case(family, H, Hkv, D, grid=tuple(size), text={"flux": 512, "fixture": 16}.get(family, 0))


def _odd(x: float, lo: int = 3) -> int:
    n = max(lo, int(x))
    return n if n % 2 else n + 1


def methods_for(c: Case) -> list[ap.Method]:
    """Every sparse and calibrated method that applies to ``c``, with the parameters a user would pick
    at this size (about a quarter of the keys kept where there is a knob; defaults elsewhere). Guidance
    methods (PAG, SharedAttention) add work by design and are left out; tests/test_speed_tools.py checks
    that every other public method appears in some layout."""
    S = c.S
    calibrated = [ap.Temperature(tau=0.9), ap.EntropyScale(train_len=max(16, S // 4)), ap.SinkCalibration(),
                  ap.SinkRedistribution()]  # magnets detected per call, as SinkCalibration's sinks
    if not c.grid:
        w = min(4096, max(16, S // 4))
        return [ap.SinkWindow(sink=4, window=w), ap.TopKBlocks(keep=0.25), ap.Power(local=min(512, max(16, S // 16))),
                ap.VerticalSlash(verticals=min(1024, max(16, S // 16)), slashes=min(1024, max(16, S // 16)),
                                 window=min(1024, max(16, S // 16))),
                ap.Quest(budget=max(32, S // 4)),  # prefill is dense by definition; decode: benchmarks/decode.py
                # one KV group of the call's layer full, the rest sink + window: a mixed layer (SmolLM2's profile
                # has 7 of 30 layers mixed, the others all-streaming: benchmarks/duo.py)
                ap.StreamingHeads([(0, h) for h in range(c.H // c.Hkv)], sink=4, window=w),
                # sortLSH blocks + samples; exact (dense) at min_len or below, so the recursion runs from 256 tokens
                ap.HyperAttention(block=64, samples=64, min_len=256),
                *calibrated]
    side = c.grid[-1]
    tile = 8 if side <= 32 else 16
    inward = ap.InwardWindow(train_grid=max(4, side // 2))  # generating at twice the training side
    if len(c.grid) == 2:
        sparse = [ap.Neighborhood(window=_odd(side / 4)), ap.SlidingTile(tile=min(tile, side), window=3), inward,
                  ap.TopKBlocks(keep=0.25)]
    else:
        T = c.grid[0]
        sparse = [ap.Neighborhood(window=(_odd(T / 2, 1), _odd(side / 4), _odd(side / 4))),
                  ap.SlidingTile(tile=(1, min(tile, side), min(tile, side)), window=(_odd(T / 2, 1), 3, 3)),
                  inward, ap.Radial(tile=min(tile, side)), ap.TopKBlocks(keep=0.25)]
    return sparse + calibrated


def tensors(c: Case, device="cpu", dtype=torch.float32, heads: int | None = None):
    """q (1, H, S, D), k / v (1, H_kv, S, D); ``heads`` narrows H (and H_kv with it) to fit a budget."""
    H, Hkv = c.H, c.Hkv
    if heads is not None and heads < H:
        Hkv = max(1, heads * Hkv // H)
        H = Hkv * (c.H // c.Hkv)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, c.S, c.D, generator=g).to(device, dtype)
    k, v = (torch.randn(1, Hkv, c.S, c.D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v


def dense_flops(c: Case, heads: int | None = None) -> float:
    """Score + value FLOPs of the stock call (causal computes about half)."""
    return 4.0 * c.S ** 2 * c.D * (heads or c.H) * (0.5 if not c.grid else 1.0)


def fit_heads(c: Case, flops_per_s: float, max_call_s: float | None) -> int | None:
    """Heads to time so that one stock call fits ``max_call_s`` (attention cost is linear in heads, so the
    ratio per head is unchanged); None: all heads; 0: even one KV group does not fit (skip the size)."""
    if max_call_s is None or dense_flops(c) / flops_per_s <= max_call_s:
        return None
    group = c.H // c.Hkv
    heads = int(max_call_s * flops_per_s / dense_flops(c, 1)) // group * group
    return heads if heads >= group else 0


def sdpa_rate(device="cpu", dtype=torch.float32) -> float:
    """FLOP/s of one stock SDPA call here (sets the size caps)."""
    c = case("fixture", (32, 32))
    c = replace(c, H=4, Hkv=4, D=128)
    q, k, v = tensors(c, device, dtype)
    F.scaled_dot_product_attention(q, k, v)
    best = math.inf
    for _ in range(3):
        _sync()
        t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        _sync()
        best = min(best, time.perf_counter() - t)
    return dense_flops(c) / best


def stock_fn(c: Case, q, k, v):
    if not c.grid:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return lambda: F.scaled_dot_product_attention(q, k, v)


@contextlib.contextmanager
def recording():
    """Names of the kernels ``kernels.select`` picks while inside (core.run looks it up on the module)."""
    seen: list[str] = []
    orig = kernels.select

    def select(*a, **kw):
        kernel = orig(*a, **kw)
        seen.append(kernel.name)
        return kernel

    kernels.select = select
    core.REMEMBER[0] = False  # a remembered call skips select: the recorded calls take the whole path
    try:
        yield seen
    finally:
        kernels.select = orig
        core.REMEMBER[0] = True


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per-repeat wall times of every fn, run in turn within each repeat, the order reversed every other
    repeat (a, b, b, a, ...): a shared machine's slow spells hit both alike and neither always goes first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {n: [] for n in fns}
    for i in range(reps):
        for n, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            times[n].append(time.perf_counter() - t)
    return times


def measure(c: Case, method: ap.Method, reps: int, device="cpu", dtype=torch.float32, heads=None, tensors_=None,
            row_s: float | None = None) -> dict:
    """One row: stock and patched time (median ms), ratio patched / stock per repeat (median, min, max),
    the kernels selected, and ``slow`` when the median ratio exceeds ``SLOW``. ``row_s`` bounds the row's
    time: fewer repeats (never under 2) when one stock + patched pair would not fit ``reps`` times."""
    q, k, v = tensors_ or tensors(c, device, dtype, heads)
    site, stock = c.site(), stock_fn(c, q, k, v)
    method.reset()
    fns = {"stock": stock, "patched": lambda: core.run(q, k, v, method, site)}
    with recording() as seen:  # the first call builds plans and chooses kernels: not counted
        fns["patched"]()
    settle(fns["patched"])
    with recording() as seen:  # the kernels the timed calls run
        fns["patched"]()
    names = sorted(set(seen))
    warm = interleaved(fns, 1, 0)  # one warm pair: what a repeat costs
    pair = warm["stock"][0] + warm["patched"][0]
    reps = max(reps, min(MANY, int(TINY_S / pair)))  # tiny calls: more repeats, their ratios are noisier
    if row_s is not None:
        reps = max(2, min(reps, int(row_s / pair)))
    t = interleaved(fns, reps, 0)
    ratios = [p / s for p, s in zip(t["patched"], t["stock"])]
    r = statistics.median(ratios)
    return dict(family=c.family, dims=c.dims, shape=c.shape, tokens=c.S, heads=q.shape[1], head_dim=c.D,
                method=label(method), name=type(method).__name__, kernel="+".join(names) or "direct",  # no kernel: Plan.direct
                stock_ms=1e3 * statistics.median(t["stock"]), patched_ms=1e3 * statistics.median(t["patched"]),
                ratio=r, ratio_min=min(ratios), ratio_max=max(ratios), speedup=1 / r, slow=r > SLOW, reps=reps)


def settle(fn, most: int = 40) -> int:
    """Calls of ``fn`` until one runs only final kernel choices (kernels/tune.py measures a static plan's
    candidates on its first calls, as the first steps of a pipeline do); the calls made."""
    for n in range(1, most + 1):
        before = tune.UNSETTLED[0]
        fn()
        if tune.UNSETTLED[0] == before:
            return n
    return most


def label(m: ap.Method) -> str:
    """``Name(field=value, ...)`` with only the fields that differ from their defaults (short table cells)."""
    parts = []
    for f in dataclasses.fields(m):
        if not f.init or not f.repr:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        value = getattr(m, f.name)
        if not (isinstance(value, type(default)) and value == default):
            parts.append(f"{f.name}={value!r}")
    return f"{type(m).__name__}({', '.join(parts)})"


def overhead(reps: int = 200, device="cpu", dtype=torch.float32) -> list[dict]:
    """attnpatch's Python path at a trivial kernel cost: ``Dense()`` through core.run minus stock SDPA
    at 64 tokens (H=9, D=64), non-causal and causal, in microseconds (median of per-repeat differences)."""
    rows = []
    for name, c in (("self, 64 tokens", case("fixture", (8, 8))), ("causal, 64 tokens", case("smollm2", 64))):
        c = replace(c, H=9, Hkv=9 if c.grid else 3, D=64, text=0)
        q, k, v = tensors(c, device, dtype)
        site, dense = c.site(), ap.Dense()
        t = interleaved({"stock": stock_fn(c, q, k, v), "patched": lambda: core.run(q, k, v, dense, site)}, reps, 5)
        diffs = [p - s for p, s in zip(t["patched"], t["stock"])]
        dec = statistics.quantiles(diffs, n=10)  # deciles: min / max of a loaded machine say nothing
        rows.append(dict(call=name, stock_us=1e6 * statistics.median(t["stock"]),
                         patched_us=1e6 * statistics.median(t["patched"]), overhead_us=1e6 * statistics.median(diffs),
                         overhead_p10_us=1e6 * dec[0], overhead_p90_us=1e6 * dec[-1]))
    return rows


def crossover(points: list[tuple[int, float]]) -> float | None:
    """Tokens where speedup first rises through 1.0 (log-linear interpolation between measured sizes);
    None when it never does; the first size when it is above 1.0 from the start."""
    pts = sorted(points)
    if pts and pts[0][1] >= 1.0:
        return float(pts[0][0])
    for (s0, y0), (s1, y1) in zip(pts, pts[1:]):
        if y0 < 1.0 <= y1:
            f = (1.0 - y0) / (y1 - y0)
            return float(math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0))))
    return None


def sweep(cases, a, dtype, rate: float, deadline: float, data: dict, save, where: str = ""):
    """Every method at every ``(family, Case)`` of ``cases`` (in order), the way percall.py and curves.py
    both run them: a size whose stock call cannot fit ``a.max_call_s`` even with one KV group, or that
    comes after ``deadline``, is listed in ``data["skipped"]`` (``where`` says e.g. " at 2 thread(s)");
    a method that raises (CUDA out of memory at 64K) is listed and the sweep goes on. Yields each row as
    measured and calls ``save()`` after every size, so a run cut short keeps what it measured."""
    for fam, c in cases:
        heads = fit_heads(c, rate, a.max_call_s)
        if heads == 0 or time.monotonic() > deadline:
            why = "time budget spent" if heads != 0 else f"stock call > {a.max_call_s} s even with one KV group"
            data["skipped"].append(f"{fam} {c.shape} ({c.S} tokens){where}: {why}")
            continue
        qkv = tensors(c, a.device, dtype, heads)
        only = getattr(a, "methods", None)  # --methods: a subset by class name (a partial run)
        for m in methods_for(c):
            if only and type(m).__name__ not in only:
                continue
            try:
                yield measure(c, m, a.reps, a.device, dtype, tensors_=qkv, row_s=getattr(a, "row_s", None) or ROW_S)
            except (RuntimeError, MemoryError) as e:  # e.g. CUDA out of memory at 64K: record it, go on
                data["skipped"].append(f"{fam} {c.shape} {label(m)}{where}: {type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:200]}")
                torch.cuda.empty_cache() if a.device == "cuda" else None
        qkv = None
        save()
