"""``lines_native``: the ``lines`` plan (``Plan.lines``: VerticalSlash, Power) computing each kept score once, in C
(``lines_native.c``, built on first use by ``kernels/native.py``) on x86-64 CPUs with AVX2 + FMA.

Why a compiled kernel: with torch ops the smallest unit of work is a fused SDPA call over a block of 64-256 query
rows, so every scattered diagonal costs a block of keys per row (kernels/lines.py: VerticalSlash(512, 512) on
SmolLM2's real layer at 8K computes 0.40 of the causal triangle for a kept 0.16, and stayed at 0.62-0.73 of its
Amdahl bound over three sessions of tuning). Here a run of kept offsets costs 7 extra keys per row (blocks of 8 rows),
and a lone offset (or a sparse run of them) one key per row, so the kernel computes ~1.1x the kept scores. Measured on
the 2-core AMD EPYC (real SmolLM2 layer-1 q, k, v at 8K, 9 / 3 heads, per call): 0.33-0.37x stock causal SDPA at 1
and 2 threads, against 0.65-0.85x for ``lines`` (measured before the lone-offset path, which took its time to 0.77-0.87x).

Python prepares per head the runs of kept offsets (gaps under the row block merged), the offset table and the
gathered column keys / values; the C code runs the work items (head, 256 rows) from a shared counter on
``torch.get_num_threads()`` threads (ctypes releases the GIL). float32 inside; other dtypes are cast (float64 is
declined: it would lose digits)."""
from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..plan import Plan, fold_q_scale
from . import native
from .base import Kernel, core_step_why_not, needs_grad
from .lines_layout import why_not as line_why_not

ROWS = 8  # the C kernel's rows per block (R): runs of offsets closer than this share a key range
ITEM_ROWS = 256  # query rows per work item
# a run whose kept offsets n and key range (width + ROWS - 1 per row) satisfy DIAG_COST * n < width + ROWS - 1 is scored
# one key per row per offset (pairwise products: q and k rows both loaded, ~DIAG_COST x a range score's time)
DIAG_COST = 1.5


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v", "kc", "vc", "out")]
                + [(n, ctypes.c_int) for n in ("BH", "rep", "Sq", "Skv", "D", "Dv", "off")]
                + [("scale", ctypes.c_float), ("ldc", ctypes.c_int64)]
                + [(n, ctypes.c_void_p) for n in ("run_ptr", "run_a", "run_b", "run_full", "col_ptr", "cols", "diag_ptr",
                                                  "diags", "offbits")]
                + [("ldb", ctypes.c_int)]
                + [("rows_per_item", ctypes.c_int), ("lds", ctypes.c_int), ("counter", ctypes.c_void_p),
                   ("scratch", ctypes.c_void_p), ("scratch_per_thread", ctypes.c_int64)]
                + [("T", ctypes.c_int), ("tail0", ctypes.c_int)]
                + [(n, ctypes.c_void_p) for n in ("tail_ptr", "tail_a", "tail_b")])


THREAD_WORK = 150_000  # bounding scores per further thread (see run; at 2 threads 256-token calls of ~0.1 M ran 5-20 % slower)
_POOL: list = [None, 0]  # (executor, its workers)
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL[1] != n:
            if _POOL[0] is not None:
                _POOL[0].shutdown(wait=False)
            _POOL[:] = [ThreadPoolExecutor(n, thread_name_prefix="attnpatch-native"), n]
        return _POOL[0]


def block_runs(lines, Sq: int, Skv: int) -> dict:
    """Block-granular diagonals (``lines.block``) for a call of Sq rows, per (batch row, query head) flattened: the runs
    [a, b] of kept offsets merged across gaps up to the block's length T (so a block's range [P_first - b, P_last - a]
    holds no hole: any T consecutive offsets of a gap hold a kept one; and two runs' ranges stay disjoint), as CSR; again
    merged at the length of a shorter last block for its rows (``tail``). Cached on ``lines``."""
    T = min(lines.block, Sq)
    key = ("native-blocks", Sq, Skv, T)
    if key in lines.cache:
        return lines.cache[key]
    B, H = lines.cols.shape[:2]
    dg = lines.diags.reshape(B * H, -1).cpu().numpy()
    offsets = [np.unique(x[(x >= 0) & (x < Skv)]) for x in dg]  # per head, for both merges below
    last = Sq % T

    def runs(gap):
        ra, rb, rp, width = [], [], [0], 0
        for d in offsets:
            cut = np.flatnonzero(np.diff(d) > gap)
            a, b = np.concatenate([d[:1], d[cut + 1]]), np.concatenate([d[cut], d[-1:]])
            ra.append(a), rb.append(b), rp.append(rp[-1] + len(a))
            width = max(width, int((b - a + gap).sum()))  # a range's keys: b - a + the block's rows
        i32 = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int32))  # noqa: E731
        return i32(ra), i32(rb), i32([rp]), width, max(map(len, ra))

    out = dict(zip(("run_a", "run_b", "run_ptr", "width", "max_runs"), runs(T)))
    tail = runs(last) if last else (out["run_a"], out["run_b"], out["run_ptr"], 0, 0)
    out.update(tail_a=tail[0], tail_b=tail[1], tail_ptr=tail[2], width=max(out["width"], tail[3]),
               max_runs=max(out["max_runs"], tail[4]), T=T, tail0=Sq - last)
    lines.cache[key] = out
    return out


def layout(lines, Skv: int) -> dict:
    """Per (batch row, query head), flattened: the runs [a, b] of kept offsets below Skv (ascending; two runs less than
    ``ROWS`` apart merged, so a block's key ranges stay disjoint), whether each run keeps every offset in it, the
    offsets of the sparse runs scored one key per row instead (``DIAG_COST``), the offset table as bits (BH, Skv / 8
    + 2 bytes) and the distinct columns below Skv (ascending). Cached on ``lines``."""
    key = ("native", Skv, DIAG_COST)
    if key in lines.cache:
        return lines.cache[key]
    B, H = lines.cols.shape[:2]
    dg, cs = lines.diags.reshape(B * H, -1).cpu().numpy(), lines.cols.reshape(B * H, -1).cpu().numpy()
    om = np.zeros((B * H, Skv), dtype=np.uint8)
    ra, rb, full, cols, rp, cp, dgs, dp = [], [], [], [], [0], [0], [], [0]
    for bh in range(B * H):
        d = np.unique(dg[bh][(dg[bh] >= 0) & (dg[bh] < Skv)])
        om[bh, d] = 1
        if lines.block:  # block-granular: the runs depend on the call's rows (block_runs), no offset runs alone
            d = d[:0]
        cut = np.flatnonzero(np.diff(d) >= ROWS)  # offsets ROWS or more apart: separate key ranges
        a, b = np.concatenate([d[:1], d[cut + 1]]), np.concatenate([d[cut], d[-1:]])
        n_in = np.diff(np.concatenate([[0], cut + 1, [len(d)]])) if len(d) else np.zeros(0, np.int64)
        lone = DIAG_COST * n_in < b - a + ROWS  # cheaper one key per row per offset than as a key range
        dgs.append(d[np.repeat(lone, n_in)]), dp.append(dp[-1] + len(dgs[-1]))
        a, b, n_in = a[~lone], b[~lone], n_in[~lone]
        ra.append(a), rb.append(b), full.append(n_in == b - a + 1), rp.append(rp[-1] + len(a))
        c = np.unique(cs[bh][(cs[bh] >= 0) & (cs[bh] < Skv)])
        cols.append(c), cp.append(cp[-1] + len(c))
    i32 = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int32))  # noqa: E731
    per_head = np.diff(cp)
    col_head = np.repeat(np.arange(B * H), per_head)  # each column's (batch row, query head) and its slot there
    col_slot = np.arange(cp[-1]) - np.repeat(cp[:-1], per_head)
    out = dict(run_a=i32(ra), run_b=i32(rb), run_full=torch.from_numpy(np.concatenate(full).astype(np.uint8)),
               run_ptr=i32([rp]), cols=i32(cols), col_ptr=i32([cp]),
               diags=i32(dgs), diag_ptr=i32([dp]),
               offbits=torch.from_numpy(np.pad(np.packbits(om, axis=1, bitorder="little"), ((0, 0), (0, 2)))),
               col_head=torch.from_numpy(col_head), col_slot=torch.from_numpy(col_slot),
               max_runs=max(len(a) for a in ra), max_cols=max(len(c) for c in cols),
               width=max(int((b - a + ROWS).sum()) + len(g) for a, b, g in zip(ra, rb, dgs)))  # a block's widest score row
    lines.cache[key] = out
    return out


def computed(lines, Sq: int, off: int, Skv: int) -> float:
    """Scores the kernel computes for Sq rows at positions off .., averaged over (batch row, query head): per block of
    ``ROWS`` rows each run's key range (block-granular: its T-block's), one key per row for each lone offset, and the
    columns up to the block's last row (what ``lines_native.c`` scores)."""
    lay = layout(lines, Skv)
    i0 = np.arange(0, Sq, ROWS)
    p0 = i0 + off
    pl = np.minimum(p0 + ROWS, off + Sq) - 1
    rows = pl - p0 + 1
    rp, cp, dp = lay["run_ptr"].numpy(), lay["col_ptr"].numpy(), lay["diag_ptr"].numpy()
    a, b, cols = lay["run_a"].numpy().astype(np.int64), lay["run_b"].numpy().astype(np.int64), lay["cols"].numpy()
    lone = lay["diags"].numpy()
    if lines.block:  # each block's rows over their T-block's ranges [P0 - b, P1 - a], cut at the block's last row
        br = block_runs(lines, Sq, Skv)
        T, tail = br["T"], i0 >= br["tail0"]
        P0 = i0 // T * T + off
        P1 = np.minimum(i0 // T * T + T, Sq) - 1 + off
    total = 0
    for h in range(len(rp) - 1):
        if lines.block:
            for sel, (ptr, ra, rb) in ((~tail, ("run_ptr", "run_a", "run_b")), (tail, ("tail_ptr", "tail_a", "tail_b"))):
                r0, r1 = br[ptr][h].item(), br[ptr][h + 1].item()
                ah, bh = br[ra][r0:r1].numpy().astype(np.int64), br[rb][r0:r1].numpy().astype(np.int64)
                hi = np.minimum(P1[sel, None] - ah, pl[sel, None]) + 1
                width = np.maximum(hi - np.maximum(P0[sel, None] - bh, 0), 0)
                total += int((rows[sel, None] * width).sum())
        else:
            ah, bh = a[rp[h]:rp[h + 1]], b[rp[h]:rp[h + 1]]
            width = (pl[:, None] - ah + 1) - np.maximum(p0[:, None] - bh, 0)  # (blocks, runs): the block's key range
            total += int((rows[:, None] * np.where(ah <= pl[:, None], width, 0)).sum())
        total += int((rows * np.searchsorted(cols[cp[h]:cp[h + 1]], pl, "right")).sum())
        total += int((rows * np.searchsorted(lone[dp[h]:dp[h + 1]], pl, "right")).sum())
    return total / (len(rp) - 1)


class LinesNative(Kernel):
    name = "lines_native"

    def why_not(self, q, k, v, plan, mask=None):
        why = line_why_not(q, plan, mask)
        if why:
            return why
        if q.device.type != "cpu":
            return "a CPU kernel"
        T = min(plan.lines.block, q.shape[2])
        if T and T < q.shape[2] and T % ROWS:
            return f"block-granular diagonals in blocks of {plan.lines.block} rows (not a multiple of {ROWS}) run on the lines kernel"
        if needs_grad(q, k, v):
            return "no backward"
        if q.dtype == torch.float64:
            return "computes in float32 (float64 would lose digits)"
        D, Dv = q.shape[-1], v.shape[-1]
        if D % 32 or D > 256 or Dv % 64 or Dv > 1024:
            return f"head dims D = {D} (needs a multiple of 32, <= 256), Dv = {Dv} (a multiple of 64) not built"
        if plan.q_offset + q.shape[2] > k.shape[2]:
            return "queries past the last key"
        why = core_step_why_not(plan)
        if why:
            return why
        return native.library("lines_native")[1]

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        lib = native.library("lines_native")[0]
        q, scale, plan = fold_q_scale(q, scale, plan)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        B, H, Sq, D = q.shape
        G, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731  (a view when already float32, contiguous)
        qf, kf, vf = f32(q), f32(k), f32(v)
        lay = layout(plan.lines, Skv)
        # block-granular diagonals: their runs (the layout above then has none) and blocks
        runs = block_runs(plan.lines, Sq, Skv) if plan.lines.block else dict(lay, T=0, tail0=Sq, tail_a=lay["run_a"],
                                                                             tail_b=lay["run_b"], tail_ptr=lay["run_ptr"])
        # the columns' keys and values gathered per query head: (BH, ldc, D), (BH, ldc, Dv)
        ldc = max(1, lay["max_cols"])
        cols = lay["cols"].long()
        kc, vc = torch.zeros(B * H, ldc, D), torch.zeros(B * H, ldc, Dv)
        if cols.numel():
            head, slot = lay["col_head"], lay["col_slot"]
            kv = (head // H) * G + (head % H) // (H // G)  # its KV head, flattened over the batch
            kc[head, slot] = kf.reshape(B * G, Skv, D)[kv, cols]
            vc[head, slot] = vf.reshape(B * G, Skv, Dv)[kv, cols]
        out = torch.empty(B, H, Sq, Dv, dtype=torch.float32)
        # a further thread pays its hand-off (~0.1-0.3 ms on the 2-core CPU) only on enough scores: rows x the widest
        # block's keys bounds them
        width = runs["width"]  # block-granular: the layout's own is 0 (no offset runs or lone offsets there)
        work = B * H * Sq * (width + ldc)
        threads = max(1, min(torch.get_num_threads(), B * H * -(-Sq // ITEM_ROWS), 1 + work // THREAD_WORK))
        lds = width + ldc + 16  # a block's scores: every key range (runs plus ROWS - 1) and the columns, + a tail
        per = ROWS * lds + 2 * runs["max_runs"] + 16  # then its ranges' bounds (int32)
        scratch = torch.empty(threads * per, dtype=torch.float32)
        counter = (ctypes.c_int * 1)(0)
        p = lambda t: t.data_ptr()  # noqa: E731
        args = _Args(p(qf), p(kf), p(vf), p(kc), p(vc), p(out), B * H, H // G, Sq, Skv, D, Dv, plan.q_offset, float(scale),
                     ldc, p(runs["run_ptr"]), p(runs["run_a"]), p(runs["run_b"]), p(lay["run_full"]), p(lay["col_ptr"]),
                     p(lay["cols"]), p(lay["diag_ptr"]), p(lay["diags"]),
                     p(lay["offbits"]), lay["offbits"].shape[1], ITEM_ROWS, lds, ctypes.addressof(counter), p(scratch), per,
                     runs["T"], runs["tail0"], p(runs["tail_ptr"]), p(runs["tail_a"]), p(runs["tail_b"]))
        ref = ctypes.byref(args)
        if threads == 1:
            lib.run(ref, 0)
        else:  # every thread takes work items until none is left (ctypes drops the GIL during the call)
            list(_pool(threads).map(lambda t: lib.run(ref, t), range(threads)))
        return out.to(q.dtype)
