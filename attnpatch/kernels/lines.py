"""``lines``: exact attention for a plan of whole key columns and diagonals (``Plan.lines``: VerticalSlash,
sink + window patterns) that never builds the (S_q, S_kv) mask.

Query rows run in blocks of ``BLOCK``. The diagonals' offsets (the union over batch rows and heads) are
clustered (gaps under a block merged): for a query block, a cluster of offsets [a, b] covers one contiguous
key range, one fused SDPA call with an additive bias of that block's rows only. The bias is the diagonal
table read through a strided view (offset p_i - j along a row and a column), OR the column table (max of
0 / -inf), plus the causal triangle where a range reaches the block's diagonal; keys are reversed once so
that view has positive strides. Columns that fall in none of a block's ranges (far verticals) run as one
more call over the gathered columns for all rows. Parts merge exactly by their log-sum-exp. Every key is
in exactly one part of a row, so nothing is counted twice.

Measured on the 2-core CPU (1 thread, VerticalSlash on random q, k, v, benchmarks/percall.py): at 1024
tokens the call costs 1.17-1.31x stock causal SDPA, against 3.4-4.5x with the materialised (S, S) mask. On
random inputs the offsets spread over the whole causal triangle (one range per block), so the kernel computes
what stock does plus its bias: the fused kernel runs ~20 % slower with one, the bias build adds ~6 %. Real
heads, whose slashes sit near the diagonal, give short ranges and gathered verticals instead.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from ..ops.lse import merge, sdpa_lse
from ..plan import Plan, fold_q_scale
from .base import Kernel, core_step_why_not, needs_grad

# query rows per call: fewer cost more calls, more compute more of each block's triangle. Measured on the
# 2-core CPU (VerticalSlash, 9 heads, D=64, 1 thread, interleaved with stock): 64 and 128 within noise at
# 1024-4096 tokens (64 a little ahead), 32 ~1.5x slower; splitting a call's heads to keep its bias in cache
# did not help
BLOCK = 64
# bias bytes one fused call may take (heads of a range split, gathered-column rows chunked): a whole
# block's bias for 32 heads at 64K tokens would be 0.5 GB, the gathered columns' several GB
MAX_BIAS_BYTES = 32 << 20
NEG = float("-inf")


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
    out = dict(ranges=ranges, area=area, calls=sum(map(len, ranges)), clusters=len(a), cols=None, free=None, vertical=0)
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


def _free_columns(cols, covered, Sq: int, off: int, T: int):
    """(the columns sorted, repeats as -1 (B, H, nc); (n_blk, B, H, nc) True where a block's rows see a column
    (some row's position reaches it) that none of the block's ranges holds)."""
    cols = cols.sort(-1).values
    cols[..., 1:].masked_fill_(cols[..., 1:] == cols[..., :-1], -1)  # a repeated column counts once
    j = cols.clamp(min=0)
    last = torch.arange(1, covered.shape[0] + 1).mul_(T).clamp_(max=Sq).add_(off - 1)  # each block's last position
    return cols, (~covered)[:, j.cpu()].to(cols.device) & (cols >= 0) & (j <= last.to(cols.device).view(-1, 1, 1, 1))


def _tables(lines, Skv: int, L: int, T: int, dtype, device):
    """(diag table (B, H, L + 1): 0 at offset + T for every diagonal, else -inf (negative offsets: causal);
    reversed column table (B, H, Skv + 1): 0 at Skv - 1 - j for every column j). Padding (-1) writes
    to the last slot, which no view reads."""
    cols, diags = lines.cols.to(device), lines.diags.to(device)
    B, H = cols.shape[:2]
    tab = torch.full((B, H, L + 1), NEG, dtype=dtype, device=device)
    tab.scatter_(2, torch.where(diags >= 0, diags + T, L), 0.0)
    colf = torch.full((B, H, Skv + 1), NEG, dtype=dtype, device=device)
    colf.scatter_(2, torch.where(cols >= 0, Skv - 1 - cols, Skv), 0.0)
    return tab, colf


_LOCAL = threading.local()


def _scratch(name: str, shape, dtype, device) -> torch.Tensor:
    """An uninitialised contiguous tensor, carved from a buffer kept per thread and per ``name``: a fresh
    multi-MB tensor per call is served by mmap and page-faults on every write (the bias build ran 2.5x slower)."""
    n = math.prod(shape)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = bufs[name] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _range_part(q, kr, vr, tab, colf, blk: tuple, lo: int, hi: int, scale, diag0: bool, dst: tuple) -> None:
    """Query rows [i0, i0 + Tb) over keys [lo, hi) (reversed: kr rows Skv - hi .. Skv - lo) into ``dst`` =
    (out (B, H, Tb, Dv), lse (B, H, Tb)), whole KV heads per call under ``MAX_BIAS_BYTES``; ``blk`` =
    (i0, Tb, off, T); ``diag0``: every row and head keeps offset 0 (its own position)."""
    (i0, Tb, off, T), (o_dst, l_dst) = blk, dst
    B, H = q.shape[:2]
    Skv, span, L1 = kr.shape[2], hi - lo, tab.shape[2]
    r = H // kr.shape[1]
    g = min(H, max(1, MAX_BIAS_BYTES // (B * r * Tb * span * tab.element_size())) * r)  # query heads per call
    c = hi - 1 - (i0 + off)  # keys past row t's position: reversed columns s < c - t (columns only)
    check = not diag0 or hi != i0 + off + Tb or lo > i0 + off  # else every row keeps its own position
    for h0 in range(0, H, g):
        h1 = min(H, h0 + g)
        # reversed key s is j = hi - 1 - s: offset p_i - j = (i0 + off - hi + 1) + t + s, stored at + T
        diag = tab.as_strided((B, h1 - h0, Tb, span), (H * L1, L1, 1, 1),
                              tab.storage_offset() + h0 * L1 + i0 + off - hi + 1 + T)
        bias = _scratch("bias", (B, h1 - h0, Tb, span), tab.dtype, tab.device)  # contiguous: the kernel copies others
        torch.maximum(diag, colf[:, h0:h1, None, Skv - hi:Skv - lo], out=bias)  # (B, g, Tb, span)
        if c > 0:
            bias[..., :c].add_(_triangle(Tb, c, bias.dtype, q.device))  # an additive table: 3x a masked_fill's speed
        kv = slice(h0 // r, h1 // r)
        out, lse = sdpa_lse(q[:, h0:h1, i0:i0 + Tb], kr[:, kv, Skv - hi:Skv - lo], vr[:, kv, Skv - hi:Skv - lo], bias,
                            scale)
        if check:
            dead = bias.amax(-1) == NEG  # (B, g, Tb) rows with no key here: weight 0 in the merge, no NaN
            out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, NEG)
        o_dst[:, h0:h1] = out
        l_dst[:, h0:h1] = lse


def _block(q, kr, vr, tab, colf, blk: tuple, ranges: list, scale, diag0: bool, dst: tuple) -> None:
    """One query block over its key ranges into ``dst`` (out, lse): written in place by a single range,
    else merged from one part per range."""
    if len(ranges) == 1:
        _range_part(q, kr, vr, tab, colf, blk, *ranges[0], scale, diag0, dst)
        return
    parts = []
    for lo, hi in ranges:
        parts.append((torch.empty_like(dst[0]), torch.empty_like(dst[1])))
        _range_part(q, kr, vr, tab, colf, blk, lo, hi, scale, diag0, parts[-1])
    if parts:
        dst[0].copy_(merge(parts))
        dst[1].copy_(torch.stack([p[1] for p in parts]).logsumexp(0))


@functools.lru_cache(maxsize=16)
def _triangle(Tb: int, c: int, dtype, device) -> torch.Tensor:
    """(Tb, c) additive: -inf where reversed key s is past row t's position (t + s < c), else 0."""
    t, s = torch.arange(Tb, device=device), torch.arange(c, device=device)
    return torch.zeros(Tb, c, dtype=dtype, device=device).masked_fill_(t[:, None] + s[None, :] < c, NEG)


def _vertical_part(q, kr, vr, lay, off: int, T: int, scale, dst: tuple) -> None:
    """Merge the columns outside each row's block ranges into ``dst`` = (out, lse) (B, H, Sq, ...), in
    chunks of whole blocks whose bias stays under ``MAX_BIAS_BYTES``."""
    cols, free = lay["cols"].to(q.device), lay["free"].to(q.device)  # (B, H, nc), (n_blk, B, H, nc)
    B, H, nc = cols.shape
    Sq, Skv = q.shape[2], kr.shape[2]
    j = cols.clamp(min=0)
    fb = torch.zeros(free.shape, dtype=q.dtype, device=q.device).masked_fill_(~free, NEG).permute(1, 2, 0, 3)
    first = torch.arange(free.shape[0], device=q.device).mul_(T).add_(off).view(-1, 1, 1, 1)  # blocks' first positions
    by_row = bool((free & (j > first)).any())  # a column past a block's first row (no offset 0 there): causal by row
    r = H // kr.shape[1]
    bi = torch.arange(B, device=q.device).view(B, 1, 1)
    hk = (torch.arange(H, device=q.device) // r).view(1, H, 1)
    kc, vc = kr[bi, hk, Skv - 1 - j], vr[bi, hk, Skv - 1 - j]  # (B, H, nc, D): the columns' keys
    rows = max(1, MAX_BIAS_BYTES // (B * H * T * nc * q.element_size())) * T
    for r0 in range(0, Sq, rows):
        r1, b0 = min(Sq, r0 + rows), r0 // T
        n, full = r1 - r0, (r1 - r0) // T
        bias = _scratch("vbias", (B, H, n, nc), q.dtype, q.device)  # a block's rows share its columns: one write
        bias[:, :, :full * T].view(B, H, full, T, nc).copy_(fb[:, :, b0:b0 + full, None])
        bias[:, :, full * T:] = fb[:, :, b0 + full:b0 + full + 1]  # the last, shorter block
        if by_row:
            bias.masked_fill_(j[:, :, None, :] > torch.arange(off + r0, off + r1, device=q.device)[:, None], NEG)
            dead = (bias == NEG).all(-1)  # (B, H, n)
        else:
            dead = (fb[:, :, b0:b0 + full + 1] == NEG).all(-1).repeat_interleave(T, -1)[..., :n]
        out, lse = sdpa_lse(q[:, :, r0:r1], kc, vc, bias, scale)
        part = (out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, NEG))
        dst[0][:, :, r0:r1] = merge([(dst[0][:, :, r0:r1], dst[1][:, :, r0:r1]), part])


class Lines(Kernel):
    name = "lines"

    def release(self) -> int:
        bufs = _LOCAL.__dict__.pop("bufs", {})
        return sum(b.numel() * b.element_size() for b in bufs.values())

    def why_not(self, q, k, v, plan, mask=None):
        lines = plan.lines
        if lines is None:
            return "plan has no line structure (Plan.lines)"
        if not plan.causal:
            return "a line structure is causal"
        if mask is not None:
            return "an external attention mask (e.g. padding) is not supported"
        if plan.score_mod is not None:
            return "plan.score_mod is not supported"
        if needs_grad(q, k, v):
            return "no backward: the fused SDPA calls give no gradient through their LSE"
        if tuple(lines.cols.shape[:2]) != tuple(q.shape[:2]) or tuple(lines.diags.shape[:2]) != tuple(q.shape[:2]):
            return f"line tables {tuple(lines.cols.shape[:2])} do not match (B, H_q) = {tuple(q.shape[:2])}"
        return core_step_why_not(plan)

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)  # parts merge in float32
        B, H, Sq, D = q.shape
        Skv, off, T = k.shape[2], plan.q_offset, min(BLOCK, q.shape[2])
        if H != k.shape[1] and (q.device.type != "cpu" or v.shape[3] != D):  # only the CPU flash kernel takes GQA
            k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
        q = q.to(work)
        rev = torch.arange(Skv - 1, -1, -1, device=q.device)
        kr = torch.index_select(k.to(work), 2, rev, out=_scratch("k", k.shape, work, q.device))  # (B, H_kv, Skv, D),
        vr = torch.index_select(v.to(work), 2, rev, out=_scratch("v", v.shape, work, q.device))  # keys reversed
        lay = layout(plan.lines, Sq, Skv, off, T)
        tab, colf = _tables(plan.lines, Skv, max(Skv, off + Sq) + T, T, work, q.device)
        diag0 = bool(tab[..., T].eq(0).all())  # every row and head keeps offset 0 (its own position)
        out = torch.empty(B, H, Sq, v.shape[3], dtype=work, device=q.device)  # rows no part writes: zeroed below
        lse = torch.full((B, H, Sq), NEG, dtype=work, device=q.device)
        for blk, rs in enumerate(lay["ranges"]):
            i0 = blk * T
            Tb = min(T, Sq - i0)
            dst = (out[:, :, i0:i0 + Tb], lse[:, :, i0:i0 + Tb])
            _block(q, kr, vr, tab, colf, (i0, Tb, off, T), rs, scale, diag0, dst)
        dead = lse == NEG  # (B, H, Sq) rows that keep no key so far (a fused kernel may leave NaN)
        if bool(dead.any()):
            out.masked_fill_(dead[..., None], 0.0)
        if lay["vertical"]:
            _vertical_part(q, kr, vr, lay, off, T, scale, (out, lse))
        return out.to(dtype)
