"""``lines``: exact attention for a plan of whole key columns and diagonals (``Plan.lines``: VerticalSlash,
Power, sink + window patterns) that never builds the (S_q, S_kv) mask.

Heads run in groups (``groups``: all at once, one KV head's query heads, or one query head, whichever
computes least counting a call's fixed work), query rows in blocks (``lines_layout.block_rows``: ``BLOCK``,
larger on long CPU calls). A group's diagonal offsets (the union over its batch rows and heads) are clustered
(gaps under a block merged): for a query block, a cluster of offsets [a, b] covers one contiguous key range; a block's ranges are copied side by side (one
range: a view) and run as ONE fused SDPA call with an additive bias of that block's rows only, so no
per-block merge. The bias is the diagonal table read through a strided view per range (offset p_i - j
along a row and a column), OR the column table (max of 0 / -inf), plus the causal triangle where a range
reaches the block's diagonal; keys are reversed once so that view has positive strides. Columns that fall
in none of a block's ranges (far verticals, Power's sink) run as one more call over the gathered columns
for all rows, merged in place by the log-sum-exp. Sparse offset clusters (``lines_layout.DIAG_KEYS``: an
isolated diagonal would cost a block of keys per row for one kept key, as Power's far powers of two) are left
out of the ranges and run apart, for all rows at once: a row-wise product of q with k shifted by the offset,
an axpy of v shifted by it, merged by the log-sum-exp. Every key is in exactly one part of a row.

Measured on the 2-core CPU (1 thread, 9 / 3 heads of 64, per call against stock causal SDPA in the same
process): Power(local=512) at 8K 0.25-0.40x (was 0.37-0.58x with a merge per block; tiles' plan stats alone
took 9 s at 4K); VerticalSlash(512, 512, window=512) on SmolLM2's real layer-1 q, k at 8K ~0.8-1.3x (the
machine's load), computing 0.29-0.46 of the causal triangle for a kept 0.16: a scattered slash costs a block
of keys per row. On random q, k the slashes spread over every offset (one range per block), so the kernel
computes what stock does plus its bias (1024 tokens: 1.17-1.31x, against 3.4-4.5x with the (S, S) mask).
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from ..ops.bias import additive
from ..ops.lse import merge_into, sdpa_lse
from ..plan import Plan, fold_q_scale
from .base import Kernel, core_step_why_not, needs_grad
from .lines_apart import diagonal_part
from .lines_layout import BLOCK, block_ranges, block_rows, groups, kept, layout  # noqa: F401  (kept, layout: re-exported for callers)
from .lines_layout import why_not as line_why_not

MAX_BIAS_BYTES = 32 << 20
NEG = float("-inf")
# query blocks per call over the gathered columns: a chunk computes only the columns free in one of its
# blocks (all rows x all columns was ~0.12 of the causal triangle at 8K with 512 verticals, most of them
# inside the blocks' own ranges)
COLUMN_BLOCKS = 8


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


def _block(q, kr, vr, tab, colf, blk: tuple, ranges: list, scale, diag0: bool, dst: tuple, grain: int = 1,
           memo: dict | None = None) -> None:
    """Query rows [i0, i0 + Tb) over their key ranges [lo, hi) into ``dst`` = (out (B, H, Tb, Dv), lse (B, H, Tb)):
    one fused call per group of whole KV heads under ``MAX_BIAS_BYTES``. One range runs on a view of the
    reversed keys (kr rows Skv - hi .. Skv - lo); several are copied side by side first, so a block is one
    call with no LSE merge (merging a block's parts cost ~30 % of a Power call at 8K, the copy a few %).
    ``blk`` = (i0, Tb, off, T); ``diag0``: every row and head keeps offset 0 (its own position). ``grain``: 1
    for exact diagonals (row t reads the table at its own offset); 0 for block-granular ones, whose ``tab`` is
    dilated over the block's rows (every row reads row 0's offsets); -1 for block-granular ones of a single
    head, whose ranges hold only kept keys (no table read: the bias is the causal triangle alone). ``memo``: a dict
    where no column lies in the block's ranges: its bias is then a function of the ranges' places relative to the
    block's first row (the table is read by offset), built once per such geometry and reused (Power: every block
    past the first ones)."""
    (i0, Tb, off, T), (o_dst, l_dst) = blk, dst
    if not ranges:
        return  # no key in any range: the caller zeroes rows left at lse -inf
    B, H = q.shape[:2]
    Skv = kr.shape[2]
    r = H // kr.shape[1]
    p0 = i0 + off  # position of the block's first row
    if len(ranges) == 1:
        lo, hi = ranges[0]
        kg, vg = kr[:, :, Skv - hi:Skv - lo], vr[:, :, Skv - hi:Skv - lo]
    else:  # one slice copy per range (an index tensor built per block and index_select cost 2-3x more)
        n = sum(hi - lo for lo, hi in ranges)
        kg = _scratch("kg", (*kr.shape[:2], n, kr.shape[3]), kr.dtype, q.device)
        vg = _scratch("vg", (*vr.shape[:2], n, vr.shape[3]), vr.dtype, q.device)
        c0 = 0
        for lo, hi in ranges:
            kg[:, :, c0:c0 + hi - lo] = kr[:, :, Skv - hi:Skv - lo]
            vg[:, :, c0:c0 + hi - lo] = vr[:, :, Skv - hi:Skv - lo]
            c0 += hi - lo
    n = kg.shape[2]
    # some row may keep no key here unless offset 0 is kept everywhere and a range holds every row's own position
    check = not (diag0 and any(lo <= p0 and hi == p0 + Tb for lo, hi in ranges))
    g = min(H, max(1, MAX_BIAS_BYTES // (B * r * Tb * n * tab.element_size())) * r)  # query heads per call
    for h0 in range(0, H, g):
        h1 = min(H, h0 + g)
        key = None if memo is None else (Tb, grain, h0, h1, tuple((lo - p0, hi - p0) for lo, hi in ranges))
        got = None if key is None else memo.get(key)
        if got is None:
            store = key is not None and len(memo) < 8  # at most 8 biases kept per group call
            got = _bias(tab, colf, (p0, Tb, T), ranges, (h0, h1, n), grain, check, fresh=store)
            if store:
                memo[key] = got
        bias, dead = got
        kv = slice(h0 // r, h1 // r)
        out, lse = sdpa_lse(q[:, h0:h1, i0:i0 + Tb], kg[:, kv], vg[:, kv], bias, scale)
        if check:  # rows with no key here: zero, not NaN
            out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, NEG)
        o_dst[:, h0:h1] = out
        l_dst[:, h0:h1] = lse


def _bias(tab, colf, geo: tuple, ranges: list, heads: tuple, grain: int, check: bool, fresh: bool):
    """(the additive bias (B, h1 - h0, Tb, n) of a block's ranges for heads h0 .. h1, the rows that keep no key
    (B, h, Tb) or None unless ``check``): per range a strided view of the diagonal table OR the column table,
    plus the causal triangle where the range reaches the block's diagonal (see ``_block``). ``fresh``: a new
    tensor (kept for reuse), else the per-thread scratch buffer."""
    (p0, Tb, T), (h0, h1, n) = geo, heads
    B, H, L1 = tab.shape[0], tab.shape[1], tab.shape[2]
    Skv = colf.shape[2] - 1
    shape = (B, h1 - h0, Tb, n)  # contiguous: the kernel copies others
    bias = torch.empty(shape, dtype=tab.dtype, device=tab.device) if fresh else _scratch("bias", shape, tab.dtype, tab.device)
    if grain < 0:
        bias.zero_()
    c0 = 0  # a strided view and one maximum per range (one index_select gather of the table ran 3x slower)
    for lo, hi in ranges:
        span = hi - lo
        if grain >= 0:  # reversed key s is j = hi - 1 - s: offset p_i - j = (p0 - hi + 1) + t + s, stored at + T
            diag = tab.as_strided((B, h1 - h0, Tb, span), (H * L1, L1, grain, 1),
                                  tab.storage_offset() + h0 * L1 + p0 - hi + 1 + T)
            torch.maximum(diag, colf[:, h0:h1, None, Skv - hi:Skv - lo], out=bias[..., c0:c0 + span])
        c = hi - 1 - p0  # keys past row t's position: reversed columns s < c - t (c <= span: lo <= p0)
        if c > 0:
            bias[..., c0:c0 + c].add_(_triangle(Tb, c, bias.dtype, bias.device))  # additive: 3x a masked_fill's speed
        c0 += span
    return bias, (bias.amax(-1) == NEG if check else None)


def _dilate(tab: torch.Tensor, Tb: int) -> torch.Tensor:
    """The diagonal table with index x kept (0) where any of x .. x + Tb - 1 is; the padding slot stays -inf."""
    t = tab.clone()
    t[..., -1] = NEG  # the slot padding (-1) writes to: no view may read it through the dilation
    return torch.nn.functional.max_pool1d(torch.nn.functional.pad(t, (0, Tb - 1), value=NEG), Tb, 1)


@functools.lru_cache(maxsize=16)
def _triangle(Tb: int, c: int, dtype, device) -> torch.Tensor:
    """(Tb, c) additive: -inf where reversed key s is past row t's position (t + s < c), else 0."""
    t, s = torch.arange(Tb, device=device), torch.arange(c, device=device)
    return torch.zeros(Tb, c, dtype=dtype, device=device).masked_fill_(t[:, None] + s[None, :] < c, NEG)


def _vertical_part(q, kr, vr, lay, off: int, T: int, scale, dst: tuple) -> None:
    """Merge the columns outside each row's block ranges into ``dst`` = (out, lse) (B, H, Sq, ...), in
    chunks of up to ``COLUMN_BLOCKS`` whole blocks whose bias stays under ``MAX_BIAS_BYTES``, each over the
    columns free in one of its blocks only."""
    cols, free = lay["cols"].to(q.device), lay["free"].to(q.device)  # (B, H, nc), (n_blk, B, H, nc)
    B, H, nc = cols.shape
    Sq, Skv = q.shape[2], kr.shape[2]
    j = cols.clamp(min=0)
    fb = additive(free, q.dtype).permute(1, 2, 0, 3)
    first = torch.arange(free.shape[0], device=q.device).mul_(T).add_(off).view(-1, 1, 1, 1)  # blocks' first positions
    by_row = bool((free & (j > first)).any())  # a column past a block's first row (no offset 0 there): causal by row
    r = H // kr.shape[1]
    bi = torch.arange(B, device=q.device).view(B, 1, 1)
    hk = (torch.arange(H, device=q.device) // r).view(1, H, 1)
    kc, vc = kr[bi, hk, Skv - 1 - j], vr[bi, hk, Skv - 1 - j]  # (B, H, nc, D): the columns' keys
    rows = min(max(1, MAX_BIAS_BYTES // (B * H * T * nc * q.element_size())), COLUMN_BLOCKS) * T
    for r0 in range(0, Sq, rows):
        r1, b0 = min(Sq, r0 + rows), r0 // T
        n, full = r1 - r0, (r1 - r0) // T
        used = free[b0:b0 + full + 1].flatten(0, 2).any(0)  # (nc,) column slots free in some block of the chunk
        if not bool(used.any()):
            continue
        idx = used.nonzero().flatten()  # only those: far blocks' columns sit in their ranges near the diagonal
        fc, jc, kcc, vcc = fb[..., idx], j[..., idx], kc[:, :, idx], vc[:, :, idx]
        bias = _scratch("vbias", (B, H, n, idx.numel()), q.dtype, q.device)  # a block's rows share its columns
        bias[:, :, :full * T].view(B, H, full, T, idx.numel()).copy_(fc[:, :, b0:b0 + full, None])
        bias[:, :, full * T:] = fc[:, :, b0 + full:b0 + full + 1]  # the last, shorter block
        if by_row:
            bias.masked_fill_(jc[:, :, None, :] > torch.arange(off + r0, off + r1, device=q.device)[:, None], NEG)
            dead = (bias == NEG).all(-1)  # (B, H, n)
        else:
            dead = (fc[:, :, b0:b0 + full + 1] == NEG).all(-1).repeat_interleave(T, -1)[..., :n]
        out, lse = sdpa_lse(q[:, :, r0:r1], kcc, vcc, bias, scale)
        if bool(dead.any()):  # rows with no column here: a fused kernel may leave NaN
            out.masked_fill_(dead[..., None], 0.0)
        merge_into(dst[0][:, :, r0:r1], dst[1][:, :, r0:r1], out, lse.masked_fill(dead, NEG))


def _run_group(q, kv: tuple, lines, shape: tuple, scale, dst: tuple) -> None:
    """Query heads q (B, r, Sq, D) of their KV heads (``kv`` = (k, v, kr, vr): in key order and reversed,
    (B, G, Skv, D)) under ``lines`` into ``dst`` = (out, lse) views: block by block over their key ranges, then
    the far columns and the diagonals run apart merged in."""
    (off, T), (out, lse), (k, v, kr, vr) = shape, dst, kv
    Sq, Skv = q.shape[2], kr.shape[2]
    lay = layout(lines, Sq, Skv, off, T)
    tab, colf = _tables(lines, Skv, max(Skv, off + Sq) + T, T, q.dtype, q.device)
    diag0 = bool(tab[..., T].eq(0).all())  # every row and head keeps offset 0 (its own position)
    # block-granular diagonals: one head's ranges hold only kept keys; several heads read a table dilated over
    # the block's rows (offset o kept for all of them when any of o .. o + Tb - 1 is)
    grain = (-1 if lines.cols.shape[:2] == (1, 1) else 0) if lines.block else 1
    dilated, memo, inside = {}, {}, lay["inside"]  # memo: biases of blocks with no column in their ranges, by geometry
    for blk, rs in enumerate(block_ranges(lay)):
        i0 = blk * T
        Tb = min(T, Sq - i0)
        gr = 0 if grain < 0 and Tb < T else grain  # a shorter last block's merged ranges may hold gaps: read the table
        if gr == 0 and Tb not in dilated:
            dilated[Tb] = _dilate(tab, Tb)
        _block(q, kr, vr, dilated[Tb] if gr == 0 else tab, colf, (i0, Tb, off, T), rs, scale, diag0,
               (out[:, :, i0:i0 + Tb], lse[:, :, i0:i0 + Tb]), gr, None if inside is None or inside[blk] else memo)
    dead = lse == NEG  # (B, r, Sq) rows that keep no key so far (a fused kernel may leave NaN)
    if bool(dead.any()):
        out.masked_fill_(dead[..., None], 0.0)
    if lay["vertical"]:
        _vertical_part(q, kr, vr, lay, off, T, scale, (out, lse))
    if lay["apart"]:
        diagonal_part(q, (k, v), (lines, tab), lay["apart"], (off, T), scale, (out, lse),
                      lambda shape: _scratch("dprod", shape, q.dtype, q.device))


class Lines(Kernel):
    name = "lines"

    def release(self) -> int:
        bufs = _LOCAL.__dict__.pop("bufs", {})
        return sum(b.numel() * b.element_size() for b in bufs.values())

    def why_not(self, q, k, v, plan, mask=None):
        why = line_why_not(q, plan, mask)
        if why:
            return why
        if needs_grad(q, k, v):
            return "no backward: the fused SDPA calls give no gradient through their LSE"
        return core_step_why_not(plan)

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dtype, work = q.dtype, torch.promote_types(q.dtype, torch.float32)  # parts merge in float32
        B, H, Sq, D = q.shape
        Skv, off, T = k.shape[2], plan.q_offset, block_rows(plan.lines, Sq, q.device, BLOCK)
        if H != k.shape[1] and (q.device.type != "cpu" or v.shape[3] != D):  # only the CPU flash kernel takes GQA
            k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
        q, k, v = q.to(work), k.to(work), v.to(work)
        rev = torch.arange(Skv - 1, -1, -1, device=q.device)
        kr = torch.index_select(k, 2, rev, out=_scratch("k", k.shape, work, q.device))  # (B, H_kv, Skv, D),
        vr = torch.index_select(v, 2, rev, out=_scratch("v", v.shape, work, q.device))  # keys reversed
        out = torch.empty(B, H, Sq, v.shape[3], dtype=work, device=q.device)  # rows no part writes: zeroed below
        lse = torch.full((B, H, Sq), NEG, dtype=work, device=q.device)
        subs = groups(plan.lines, kr.shape[1], Sq, Skv, off, T)
        r, rep = H // len(subs), H // kr.shape[1]  # query heads per group, per KV head
        for g, sub in enumerate(subs):  # all heads at once, one KV head's query heads or one query head at a time
            hs, kv = slice(g * r, (g + 1) * r), slice(g * r // rep, ((g + 1) * r - 1) // rep + 1)
            _run_group(q[:, hs], (k[:, kv], v[:, kv], kr[:, kv], vr[:, kv]), sub, (off, T), scale, (out[:, hs], lse[:, hs]))
        return out.to(dtype)
