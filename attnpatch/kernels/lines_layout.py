"""The planning half of the ``lines`` kernel (kernels/lines.py): which key ranges each query block covers,
which columns fall outside them, how many scores a plan keeps and how heads are grouped. Pure index
arithmetic on ``Plan.lines``, cached on it; the cost model (kernels/cost.py) reads the same layouts."""
from __future__ import annotations

import math

import torch

# query rows per call: fewer cost more calls, more compute more of each block's triangle. Measured on the
# 2-core CPU (VerticalSlash, 9 heads, D=64, 1 thread, interleaved with stock): 64 and 128 within noise at
# 1024-4096 tokens (64 a little ahead), 32 ~1.5x slower; splitting a call's heads to keep its bias in cache
# did not help
BLOCK = 64
# bias bytes one fused call may take (heads of a range split, gathered-column rows chunked): a whole
# block's bias for 32 heads at 64K tokens would be 0.5 GB, the gathered columns' several GB
# a call's fixed work (bias views, copies, slicing: ~20 small ops) in scores of a fused call, when choosing
# how to group heads: on SmolLM2's real layer-1 q, k at 8K (1 thread, interleaved, per call / stock SDPA)
# per-query-head groups (this at 16384) ran 1.03-1.57x, per-KV-head groups (65536) 0.84-0.86x, all heads 1.11-1.26x
CALL_SCORES = 65536


def layout(lines, Sq: int, Skv: int, off: int, T: int = BLOCK) -> dict:
    """What a call computes (cached on ``lines``): ``ranges[blk]`` = key ranges [lo, hi) of query block blk
    (``area``: their scores per head), ``free`` (n_blk, B, H, nc) the columns ``cols`` a block's rows reach
    outside its ranges (None: none; ``vertical``: their scores), and the fused ``calls``."""
    key = ("layout", Sq, Skv, off, T)
    if key in lines.cache:
        return lines.cache[key]
    d = lines.diags[lines.diags >= 0].unique()  # sorted offsets used by any row / head
    if d.numel():
        cut = ((d[1:] - d[:-1]) > T).nonzero().flatten()  # a gap over a block: a separate key range
        a = torch.cat([d[:1], d[cut + 1]]).tolist()
        b = torch.cat([d[cut], d[-1:]]).tolist()
    else:
        a = b = []
    n_blk = -(-Sq // T)
    ranges, area, whole = [], 0, True
    for blk in range(n_blk):
        i0 = blk * T
        p0, p1 = i0 + off, min(i0 + T, Sq) - 1 + off  # positions of the block's first and last rows
        rs = [(max(0, p0 - hi_off), min(Skv, p1 + 1 - lo_off)) for lo_off, hi_off in zip(a, b)]
        rs = [(lo, hi) for lo, hi in rs if lo < hi]
        whole = whole and rs == [(0, min(Skv, p1 + 1))]
        area += (p1 - p0 + 1) * sum(hi - lo for lo, hi in rs)
        ranges.append(rs)
    out = dict(ranges=ranges, area=area, calls=sum(map(bool, ranges)), clusters=len(a), cols=None, free=None, vertical=0)
    if not whole:  # else every block's one range holds all keys up to its last row: no column is outside
        covered = torch.zeros(n_blk, Skv, dtype=torch.bool)
        for blk, rs in enumerate(ranges):
            for lo, hi in rs:
                covered[blk, lo:hi] = True
        out["cols"], out["free"] = _free_columns(lines.cols, covered, Sq, off, T)
        out["vertical"] = int(out["free"].sum()) * T  # computed scores, about (columns x block rows)
        out["calls"] += bool(out["vertical"])
    lines.cache[key] = out
    return out


def kept(lines, Sq: int, off: int) -> torch.Tensor:
    """(B, H) number of (row, key) scores ``lines`` keeps for Sq rows at positions off .. off + Sq - 1 (keys
    up to each row's position), without the mask: per column the rows at or after it, per diagonal the rows
    at or past its offset, less the pairs (column c, offset d) with c + d a row's position (counted twice)."""
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


def _free_columns(cols, covered, Sq: int, off: int, T: int):
    """(the columns sorted, repeats as -1 (B, H, nc); (n_blk, B, H, nc) True where a block's rows see a column
    (some row's position reaches it) that none of the block's ranges holds)."""
    cols = cols.sort(-1).values
    cols[..., 1:].masked_fill_(cols[..., 1:] == cols[..., :-1], -1)  # a repeated column counts once
    j = cols.clamp(min=0)
    last = torch.arange(1, covered.shape[0] + 1).mul_(T).clamp_(max=Sq).add_(off - 1)  # each block's last position
    return cols, (~covered)[:, j.cpu()].to(cols.device) & (cols >= 0) & (j <= last.to(cols.device).view(-1, 1, 1, 1))


def groups(lines, G: int, Sq: int, Skv: int, off: int, T: int = BLOCK) -> list:
    """``lines`` as the head groups a call runs (cached), each with key ranges from its own heads' diagonals
    only: all heads at once, one group per KV head (real SmolLM2 heads at 32K: half the area of the union
    over all heads) or one per query head (a third less again, but no KV range shared across a GQA group):
    the one with the least work, ``CALL_SCORES`` per call plus the scores it computes."""
    key = ("groups", G, Sq, Skv, off, T)
    if key not in lines.cache:
        H = lines.cols.shape[1]
        best, cost = None, math.inf
        for n in sorted({1, G, H}):
            r = H // n
            subs = [lines] if n == 1 else [type(lines)(lines.cols[:, g * r:(g + 1) * r], lines.diags[:, g * r:(g + 1) * r])
                                           for g in range(n)]
            lays = [layout(sub, Sq, Skv, off, T) for sub in subs]
            c = sum(lay["area"] * r + lay["vertical"] + CALL_SCORES * lay["calls"] for lay in lays)
            if c < cost:
                best, cost = subs, c
        lines.cache[key] = best
    return lines.cache[key]
