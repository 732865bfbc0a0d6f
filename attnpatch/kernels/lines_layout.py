"""The planning half of the ``lines`` kernel (kernels/lines.py): which key ranges each query block covers,
which columns fall outside them, how many scores a plan keeps and how heads are grouped. Pure index
arithmetic on ``Plan.lines``, cached on it; the cost model (kernels/cost.py) reads the same layouts."""
from __future__ import annotations

import math

import numpy as np
import torch

# query rows per call: fewer cost more calls, more compute more of each block's triangle. Measured on the
# 2-core CPU (VerticalSlash, 9 heads, D=64, 1 thread, interleaved with stock): 64 and 128 within noise at
# 1024-4096 tokens (64 a little ahead), 32 ~1.5x slower; splitting a call's heads to keep its bias in cache
# did not help
BLOCK = 64
# exact diagonals on calls of at least LONG_ROWS queries on a CPU: bigger blocks (LONG_BLOCK[threads > 1]), since a
# block's fixed work (a call, a bias view and a key copy per range) is serial while its scores split over the
# threads. Measured (VerticalSlash(512, 512, window=512) on SmolLM2's real layer-0 / layer-1 q, k, per call against
# stock, interleaved, 12-03): 2 threads 256 best at 2K-32K (16K: 0.43 / 0.57 at 64, 0.35 / 0.48 at 128, 0.32 / 0.41
# at 256; 32K 0.58 -> 0.31), 1 thread 128 (16K 0.37, 0.30, 0.33; 4K 1.59, 1.36, 1.49); at 1K 64 is as fast or
# faster; Power(local=512) alike at every size (one range per block: it keeps BLOCK). From 4K: at 2K the gain is
# smaller and the cost model (which counts a range's scores, not its fixed work) ranked lines behind tiles for
# Power(local=16)
LONG_ROWS = 4096
LONG_BLOCK = (128, 256)
# bias bytes one fused call may take (heads of a range split, gathered-column rows chunked): a whole
# block's bias for 32 heads at 64K tokens would be 0.5 GB, the gathered columns' several GB
# a call's fixed work (bias views, copies, slicing: ~20 small ops) in scores of a fused call, when choosing
# how to group heads: on SmolLM2's real layer-1 q, k at 8K (1 thread, interleaved, per call / stock SDPA)
# per-query-head groups (this at 16384) ran 1.03-1.57x, per-KV-head groups (65536) 0.84-0.86x, all heads 1.11-1.26x
CALL_SCORES = 65536
# one diagonal run elementwise (``layout``'s "apart": a shifted row-wise product for its scores, one axpy of the
# shifted values, merged by the LSE) costs about this many keys per row of a fused call. A cluster of n offsets
# spanning offsets a .. b costs a block call b - a + BLOCK keys per row; it runs elementwise when
# n * DIAG_KEYS is less. Measured (Power(local=512)'s far powers of two, 9 / 3 heads of 64, against the kernel
# without them): 8K 1 thread 3 diagonals 0.12 s in blocks, 0.03 s elementwise; 32K 2 threads 5 diagonals
# 0.40 s, 0.22 s (the products are memory-bound: they gain less from the second thread)
DIAG_KEYS = 32


def why_not(q, plan, mask) -> str | None:
    """What no line kernel (``lines``, ``lines_native``) runs: no line structure, a non-causal plan, an external mask,
    a ``score_mod``, line tables of another (B, H_q)."""
    lines = plan.lines
    if lines is None:
        return "plan has no line structure (Plan.lines)"
    if not plan.causal:
        return "a line structure is causal"
    if mask is not None:
        return "an external attention mask (e.g. padding) is not supported"
    if plan.score_mod is not None:
        return "plan.score_mod is not supported"
    if tuple(lines.cols.shape[:2]) != tuple(q.shape[:2]) or tuple(lines.diags.shape[:2]) != tuple(q.shape[:2]):
        return f"line tables {tuple(lines.cols.shape[:2])} do not match (B, H_q) = {tuple(q.shape[:2])}"
    return None


def block_rows(lines, Sq: int, device, base: int = BLOCK) -> int:
    """Query rows per block of a call of Sq queries: the diagonals' own block (block-granular ``lines``), else
    ``base`` (``BLOCK``), or on a CPU from LONG_ROWS queries LONG_BLOCK by thread count where blocks would hold
    several ranges (one cluster of offsets, as Power's window, only gains keys per row from a bigger block)."""
    if lines.block:
        return min(lines.block, Sq)
    if torch.device(device).type == "cpu" and Sq >= LONG_ROWS and len(_clusters(lines, base)[0]) > 1:
        return min(LONG_BLOCK[torch.get_num_threads() > 1], Sq)
    return min(base, Sq)


def _clusters(lines, T: int) -> tuple:
    """(a, b, apart) of ``lines``' offsets at block size T (cached): clusters [a, b] (gaps over T split) that run
    as block ranges (int64 arrays), and the offsets of sparse clusters (``DIAG_KEYS``) that run apart. In numpy:
    this index arithmetic runs up to 1 + G + H times a call (``groups``) on arrays of a few hundred offsets, where a
    torch op's fixed cost (5-130 us: a batched searchsorted the most) made ``groups`` ~9 ms of a 36 ms 1K call."""
    key = ("clusters", T)
    if key not in lines.cache:
        d = np.sort(lines.diags.cpu().numpy(), axis=None)
        d = d[(d >= 0) & np.append(True, d[1:] != d[:-1])]  # sorted distinct offsets used by any row / head
        cut = np.flatnonzero(np.diff(d) > T)  # a gap over a block: a separate key range
        a, b = np.concatenate([d[:1], d[cut + 1]]), np.concatenate([d[cut], d[-1:]])  # clusters [a, b], ascending
        apart = []  # offsets of sparse clusters (far, isolated diagonals: Power's powers of two), run elementwise
        if not lines.block and len(d):  # block-granular diagonals keep whole ranges: always block calls
            n_in = np.searchsorted(d, b, "right") - np.searchsorted(d, a)  # offsets per cluster
            line = n_in * DIAG_KEYS < b - a + T
            if line.any():
                apart = d[line[np.searchsorted(a, d, "right") - 1]].tolist()
                a, b = a[~line], b[~line]
        lines.cache[key] = (a, b, apart)
    return lines.cache[key]


def layout(lines, Sq: int, Skv: int, off: int, T: int = BLOCK) -> dict:
    """What a call computes (cached on ``lines``): ``bounds`` = (lo, hi, ok) (n_blk, clusters), the key range [lo, hi)
    of each query block and offset cluster, ok where it is not empty (``block_ranges``: as lists per block; ``area``:
    their scores per head), ``apart`` the offsets of sparse clusters (``DIAG_KEYS``) that run elementwise instead,
    over every row at once (``diagonal``: their scores per head), ``free`` (n_blk, B, H, nc) the columns ``cols`` a
    block's rows reach outside its ranges (None: none; ``vertical``: their scores; ``inside``: per block whether some
    column (or padding, as key 0) lies in its ranges, None where every block's range holds all its keys), and the
    fused ``calls``. Array arithmetic (numpy, see ``_clusters``) over (blocks x offset clusters): a data-dependent plan lays out every call, ``groups`` up to 1 + G + H times
    (a Python loop per block and range took 0.18 s of a 1 s VerticalSlash call at 8K)."""
    key = ("layout", Sq, Skv, off, T)
    if key in lines.cache:
        return lines.cache[key]
    out = dict(_ranges(lines, Sq, Skv, off, T))
    if not out.pop("whole"):
        lo, hi, _ = out["bounds"]
        out["cols"], out["free"], out["inside"] = _free_columns(lines.cols, lo, torch.maximum(lo, hi), Sq, off, T)
        out["vertical"] = int(out["free"].sum()) * T  # computed scores, about (columns x block rows)
        out["calls"] += bool(out["vertical"])
    lines.cache[key] = out
    return out


def _ranges(lines, Sq: int, Skv: int, off: int, T: int) -> dict:
    """``layout`` without the columns (cached): the block ranges, their area and calls, the diagonals run apart,
    and ``whole`` (every block's one range holds all keys up to its last row: no column lies outside any)."""
    key = ("ranges", Sq, Skv, off, T)
    if key in lines.cache:
        return lines.cache[key]
    a, b, apart = _clusters(lines, T)
    n_blk = -(-Sq // T)
    i0 = np.arange(n_blk, dtype=np.int64) * T
    p0, p1 = i0 + off, np.minimum(i0 + T, Sq) - 1 + off  # positions of each block's first and last rows
    lo, hi = np.maximum(p0[:, None] - b, 0), np.minimum(p1[:, None] + 1 - a, Skv)  # (n_blk, clusters)
    ok = lo < hi
    n_ok = ok.sum(1)
    whole = bool(((n_ok == 1) & ((lo * ok).sum(1) == 0) & ((hi * ok).sum(1) == np.minimum(p1 + 1, Skv))).all())
    area = int(((p1 - p0 + 1)[:, None] * np.maximum(hi - lo, 0)).sum())
    # the elementwise diagonals' scores: offset o reaches rows at positions o .. o + Skv - 1
    diagonal = sum(max(0, min(Sq, Skv + o - off) - max(0, o - off)) for o in apart)
    lo, hi, ok = torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(ok)
    out = dict(bounds=(lo, hi, ok), area=area, calls=int((n_ok > 0).sum()), clusters=len(a), cols=None, free=None,
               inside=None, vertical=0, apart=apart, diagonal=diagonal, whole=whole)
    lines.cache[key] = out
    return out


def block_ranges(lay: dict) -> list:
    """``block_ranges(lay)[blk]``: the key ranges [lo, hi) of query block blk, in offset-cluster order, as Python ints for the
    kernel's slicing; built once, for the head grouping a call runs (``groups`` lays out 1 + G + H candidates)."""
    if "ranges" not in lay:
        lay["ranges"] = [[(x, y) for x, y, keep in zip(*row) if keep] for row in zip(*(t.tolist() for t in lay["bounds"]))]
    return lay["ranges"]


def kept(lines, Sq: int, off: int) -> torch.Tensor:
    """(B, H) number of (row, key) scores ``lines`` keeps for Sq rows at positions off .. off + Sq - 1 (keys
    up to each row's position), without the mask: per column the rows at or after it, per diagonal the rows
    at or past its offset, less the pairs (column c, offset d) with c + d a row's position (counted twice).
    Block-granular diagonals (``lines.block``): from each head's own layout over the keys the rows can see."""
    if lines.block:
        return _kept_blocks(lines, Sq, off, off + Sq)
    P = off + Sq  # one past the last row's position

    def distinct(x):  # sorted, repeats and padding (-1) moved past every real value
        x = x.sort(-1).values
        x[..., 1:].masked_fill_(x[..., 1:] == x[..., :-1], -1)
        return x.masked_fill(x < 0, 1 << 62).sort(-1).values

    c, d = distinct(lines.cols.clone()), distinct(lines.diags.clone())
    rows = lambda x: (P - x.clamp(min=off)).clamp(min=0).masked_fill(x >= 1 << 62, 0)  # noqa: E731
    lo = torch.searchsorted(d, (off - c).clamp(min=0).contiguous())  # offsets d with off <= c + d <= P - 1
    hi = torch.searchsorted(d, (P - c).contiguous())
    pairs = ((hi - lo).clamp(min=0) * (c < P)).sum(-1)
    return rows(c).sum(-1) + rows(d).sum(-1) - pairs


def _kept_blocks(lines, Sq: int, off: int, Skv: int) -> torch.Tensor:
    """``kept`` of block-granular diagonals: per (batch row, head), the scores of its own key ranges up to each
    row's position (a range [lo, hi) gives row p min(hi, p + 1) - lo) plus its free columns' rows at or past them;
    a shorter last block (its merged ranges may hold gaps) by its definition, key by key."""
    B, H = lines.cols.shape[:2]
    T = min(lines.block, Sq)
    full = Sq // T
    out = torch.zeros(B, H, dtype=torch.long)
    p = torch.arange(full * T).view(full, T) + off  # full blocks' rows' positions
    for b in range(B):
        for h in range(H):
            sub = type(lines)(lines.cols[b:b + 1, h:h + 1], lines.diags[b:b + 1, h:h + 1], lines.block)
            lay = layout(sub, Sq, Skv, off, T)
            lo, hi, ok = (x[:full] for x in lay["bounds"])
            n = int(((torch.minimum(hi[:, :, None], p[:, None] + 1) - lo[:, :, None]).clamp(min=0) * ok[:, :, None]).sum())
            if lay["free"] is not None:
                j = lay["cols"][0, 0].clamp(min=0)  # (nc,)
                n += int(((p[:, None, :] >= j[None, :, None]).sum(-1) * lay["free"][:full, 0, 0]).sum())
            if full * T < Sq:  # the last block: any kept offset in [first - j, last - j], or a column
                d = lines.diags[b, h][lines.diags[b, h] >= 0]
                j = torch.arange(Skv)
                first, last = full * T + off, Sq - 1 + off
                hit = ((j[:, None] >= first - d) & (j[:, None] <= last - d)).any(1) | torch.isin(j, lines.cols[b, h])
                n += int(((torch.arange(first, last + 1)[:, None] >= j) & hit).sum())
            out[b, h] = n
    return out


def _free_columns(cols, lo, hi, Sq: int, off: int, T: int):
    """(the columns sorted, repeats as -1 (B, H, nc); (n_blk, B, H, nc) True where a block's rows see a column
    (some row's position reaches it) that none of the block's ranges [lo, hi) (n_blk, clusters; disjoint, empty
    ones with lo == hi) holds): per block, the ranges starting at or before a column less those ending there;
    per block whether any column of any head (padding counted as key 0) lies in its ranges)."""
    cols = cols.sort(-1).values
    cols[..., 1:].masked_fill_(cols[..., 1:] == cols[..., :-1], -1)  # a repeated column counts once
    j = cols.clamp(min=0)
    uj, inv = np.unique(j.cpu().numpy().ravel(), return_inverse=True)  # membership per distinct column, not per slot
    n_blk, big = lo.shape[0], max(int(hi.max()) if hi.numel() else 0, int(uj[-1])) + 1
    # every block's ranges in one sorted array (block x shifted past the previous block's values): one searchsorted
    # per bound for all blocks, counting the ranges starting at or before a column less those ending there
    shift = np.arange(n_blk, dtype=np.int64)[:, None] * big
    at = (uj[None, :] + shift).ravel()
    count = lambda x: np.searchsorted((np.sort(x.numpy(), 1) + shift).ravel(), at, "right")  # noqa: E731
    covered = torch.from_numpy((count(lo) > count(hi)).reshape(n_blk, -1))
    last = torch.arange(1, n_blk + 1).mul_(T).clamp_(max=Sq).add_(off - 1)  # each block's last position
    free = (~covered)[:, torch.from_numpy(inv.reshape(-1))].view(n_blk, *j.shape).to(cols.device)
    return cols, free & (cols >= 0) & (j <= last.to(cols.device).view(-1, 1, 1, 1)), covered.any(1).tolist()


def groups(lines, G: int, Sq: int, Skv: int, off: int, T: int = BLOCK) -> list:
    """``lines`` as the head groups a call runs (cached), each with key ranges from its own heads' diagonals
    only: all heads at once, one group per KV head (real SmolLM2 heads at 32K: half the area of the union
    over all heads) or one per query head (a third less again, but no KV range shared across a GQA group):
    the one with the least work, ``CALL_SCORES`` per call plus the scores it computes."""
    key = ("groups", G, Sq, Skv, off, T)
    if key not in lines.cache:
        H = lines.cols.shape[1]
        best, cost = None, math.inf
        for n in sorted({1, G, H}):  # equal costs: the fewest groups (the first to reach a cost keeps it)
            r = H // n
            subs = [lines] if n == 1 else [type(lines)(lines.cols[:, g * r:(g + 1) * r], lines.diags[:, g * r:(g + 1) * r],
                                                       lines.block) for g in range(n)]
            # a bound from the ranges alone (the columns outside them only add), summed group by group until it
            # reaches the best cost so far: the whole layouts (free columns: ~15 small ops each) and most of the
            # groups of a candidate that cannot win are never laid out (32 heads: 41 layouts a call before)
            low = 0
            for sub in subs:
                low += _cost(_ranges(sub, Sq, Skv, off, T), r)
                if low >= cost:
                    break
            if low >= cost:
                continue
            c = sum(_cost(layout(sub, Sq, Skv, off, T), r) for sub in subs)
            if c < cost:
                best, cost = subs, c
        lines.cache[key] = best
    return lines.cache[key]


def _cost(lay: dict, r: int) -> int:
    """``groups``' measure of a group's work: its scores (``r`` query heads over its ranges, the diagonals run apart
    and the free columns) plus ``CALL_SCORES`` per call."""
    return (lay["area"] + DIAG_KEYS * lay["diagonal"]) * r + lay["vertical"] + CALL_SCORES * lay["calls"]
