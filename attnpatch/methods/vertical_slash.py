"""``VerticalSlash``: MInference's vertical-slash pattern for LLM prefill. From the last
``last_q`` queries, per batch row and head, estimate the most attended key columns (verticals)
and diagonals (slashes, by offset i - j); every query then sees those, the first ``sink`` keys
and its last ``window`` keys (causal). Decode calls (one query) stay dense, as in MInference.
``block``: the granularity of MInference's GPU kernel instead of exact diagonals: queries go in blocks of
``block`` positions and each sees every key that one of the picked diagonals (or the window's) reaches in some
row of its block (the block's key ranges, as the kernel's block offsets), so the sparse kernel computes no
score it then masks; columns stay exact.
The plan carries the pattern twice: a mask_mod (every kernel, the goldens) and ``Plan.lines`` (columns +
diagonals), which the ``lines`` kernel runs without building the (S_q, S_kv) mask."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops.bias import scores
from ..plan import DIRECT_MAX, Lines, Plan, index_grids, probs_direct
from ..site import Site
from .base import Method, check_int


@dataclass
class VerticalSlash(Method):
    """Top columns and diagonals estimated from the last queries (prefill)."""

    source = "MInference 1.0 (Jiang et al. 2024)"

    verticals: int = 256
    slashes: int = 256
    last_q: int = 64
    sink: int = 4
    window: int = 64
    block: int | None = None  # None: exact diagonals (the paper's pattern); positions per block of block-granular ones

    def __post_init__(self):
        for name, example in (("verticals", 256), ("slashes", 256), ("last_q", 64), ("window", 64)):
            setattr(self, name, check_int("VerticalSlash", name, getattr(self, name), 1, example=example))
        self.sink = check_int("VerticalSlash", "sink", self.sink, 0, example=4)
        if self.block is not None:
            self.block = check_int("VerticalSlash", "block", self.block, 1, example=64,
                                   expected="None (exact diagonals) or an integer >= 1 (positions per query block)")

    def estimate(self, q, k, off: int):
        """(verticals (B, H, Skv), slashes (B, H, Skv)) boolean keep tables."""
        return self._top(q, k, off)[:2]

    def _top(self, q, k, off: int, shift=None):
        """(keep_v, keep_s, top columns (B, H, nv), top offsets (B, H, ns)): the tables and their indices.
        ``shift`` (B,): key j of row b holds position j + shift[b] (left padding): pad keys take no share of
        the estimate's softmax and pad query rows add nothing, so a padded row estimates what it does alone."""
        B, H, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        L = min(self.last_q, Sq)
        work = torch.promote_types(q.dtype, torch.float32)
        qs = (q[:, :, -L:].to(work) * D**-0.5).reshape(B, Hkv, H // Hkv * L, D)  # GQA: a KV head's query heads
        p = (qs @ k.to(work).transpose(-1, -2)).view(B, H, L, Skv)  # scaled on q: L*D products, not L*Skv
        pos0 = Sq - L + off  # absolute position of the first of those queries
        if pos0 + 1 < Skv:  # causal: keys after a query's position (only the last columns have any)
            p[..., pos0 + 1:].add_(_future(L, Skv - pos0 - 1, work, q.device))  # additive: 3x a masked_fill
        if shift is not None:
            pad = torch.arange(Skv, device=q.device) + shift.to(q.device).view(-1, 1) < 0  # (B, Skv)
            p.masked_fill_(pad[:, None, None, :], float("-inf"))
        p = torch.softmax(p, -1)  # (B, H, L, Skv)
        if shift is not None:  # pad query rows see only pad keys: NaN rows, counted as nothing
            p = p.nan_to_num_(0.0)
        return self._pick(p, pos0)

    def _pick(self, p, pos0: int):
        """(keep_v, keep_s, top_v, top_s) from the estimate's probabilities p (B, H, L, Skv), row 0 at pos0."""
        Skv = p.shape[-1]
        top_v = p.sum(2).topk(min(self.verticals, Skv), -1).indices  # (B, H, nv) most attended columns
        top_s = _diagonal_sums(p, pos0).topk(min(self.slashes, Skv), -1).indices  # (B, H, ns) offsets p - j
        keep_v = torch.zeros(p.shape[0], p.shape[1], Skv, dtype=torch.bool, device=p.device).scatter_(2, top_v, True)
        keep_s = torch.zeros_like(keep_v).scatter_(2, top_s, True)
        return keep_v, keep_s, top_v, top_s

    def _top_whole(self, q, k):
        """``_top`` of a prefill whose estimate reads every query (Sq <= last_q, no cache, no padding): the same
        tables and indices, plus the scaled causal scores (B, H, S, S) and their softmax, the scores from one
        baddbmm with the causal bias (a 64-token call pays per op)."""
        sc = scores(q, k, 0)
        p = torch.softmax(sc, -1)
        return (*self._pick(p, 0), sc, p)

    def plan(self, q, k, site: Site) -> Plan | None:
        if not site.causal:
            raise ValueError("VerticalSlash is causal (LLM prefill) attention")
        if q.shape[2] == 1:
            return None  # decode: dense, as MInference
        B, H, Sq, _ = q.shape
        off, Skv, shift = site.q_offset, k.shape[2], site.kv_shift
        if max(self.verticals, self.slashes) >= Skv or self.window >= off + Sq:
            return None  # every column, every offset or the window keeps all causal keys: exact, no estimate
        # a small prefill whose estimate reads every query: its scores are the call's, so the output comes
        # from them (a masked softmax and one matmul) instead of a kernel pass after ~40 small ops of mask work
        whole = Sq <= self.last_q and off == 0 and Skv == Sq and shift is None and H * Sq * Skv <= DIRECT_MAX
        keep_v, keep_s, top_v, top_s, *raw = self._top_whole(q, k) if whole else self._top(q, k, off, shift)
        full = []  # the whole (B, H, Sq, Skv) mask, built on first use by index arithmetic

        T = self.block or 0
        if T:  # kept offsets below each index (block-granular diagonals: any kept offset in a row range)
            below = torch.nn.functional.pad(keep_s.cumsum(-1), (1, 0))  # (B, H, Skv + 1)

        def table():
            if not full:
                full.append(_keep_table(keep_v, keep_s, Sq, off, self.sink, self.window, shift) if not T else
                            keep(*index_grids(B, H, Sq, Skv, q.device)))
            return full[0]

        def mask_mod(b, h, q_idx, kv_idx):
            if _whole(b, B) and _whole(h, H) and _whole(q_idx, Sq) and _whole(kv_idx, Skv):
                return table()  # the grid every dense kernel asks for: built once
            return keep(b, h, q_idx, kv_idx)

        def keep(b, h, q_idx, kv_idx):  # the pattern, element by element
            d = q_idx + off - kv_idx
            if T:  # blocks of positions (a padded row's as the row alone's); some kept offset in [first - j, last - j]
                start = q_idx - torch.remainder(q_idx + off + (shift[b] if shift is not None else 0), T)
                d0, d1 = start.clamp(min=0) + off - kv_idx, (start + T).clamp(max=Sq) - 1 + off - kv_idx
                slash = below[b, h, (d1 + 1).clamp(0, Skv)] > below[b, h, d0.clamp(0, Skv)]
                near = d0 < self.window
            else:
                slash, near = keep_s[b, h, d.clamp(0, Skv - 1)], d < self.window
            pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute position: left padding is negative
            return (keep_v[b, h, kv_idx] | slash | ((pos < self.sink) & (pos >= 0)) | near) & (d >= 0)

        direct = None
        if whole:
            (sc, p), base = raw, _local(Sq, self.window, self.sink, q.device)

            def direct(v):
                if T:
                    keep = table()
                else:  # keep_s[i - j] through a strided view with the rows reversed (positive strides), flipped back
                    # once: a gather of the same table cost 2-4x more on a 64-token call
                    buf = torch.zeros(B, H, 2 * Sq, dtype=torch.bool, device=sc.device)
                    buf[..., :Sq] = keep_s.flip(-1)  # buf[r + j] = keep_s[i - j] for the reversed row r = Sq - 1 - i
                    rev = buf.as_strided((B, H, Sq, Skv), (H * 2 * Sq, 2 * Sq, 1, 1), buf.storage_offset())
                    keep = torch.logical_or(rev, keep_v[:, :, None, :]).flip(2) | base  # future keys: 0 in p
                # the softmax over the kept keys is the estimate's probabilities renormalised over them (3 cheap ops
                # instead of a masked score tensor and a second softmax); where a row's kept mass is tiny (its
                # largest scores all dropped) its renormalised probabilities would lose digits: the masked softmax
                w = p * keep
                z = w.sum(-1, keepdim=True)
                if float(z.detach().amin()) < 1e-6:
                    w = torch.softmax(torch.where(keep, sc, float("-inf")), -1)
                else:  # in place without autograd (the division's backward reads w as it was)
                    w = w / z if w.requires_grad else w.div_(z)
                return probs_direct(w, k.shape[1], q.dtype)(v)

        return Plan(mask_mod=mask_mod, name=repr(self), lines=self._lines(top_v, top_s, Sq, off, Skv, shift),
                    direct=direct)

    def _lines(self, top_v, top_s, Sq: int, off: int, Skv: int, shift) -> Lines | None:
        """The same pattern as columns (the top columns and each batch row's sink keys) and diagonals (the
        top offsets and the window's 0 .. window - 1), repeats allowed; None when queries reach past the
        last key (mask_mod clamps their offsets to the table) and for blocks of positions that do not start at
        the call's first row (a chunk at an offset or a left-padded row not on a block boundary: the lines
        kernel blocks the call's rows from row 0; the other kernels run the mask_mod)."""
        if off + Sq > Skv:
            return None
        if self.block and (off % self.block if shift is None else bool(((shift + off) % self.block).any())):
            return None
        B, H, _ = top_v.shape
        dev = top_v.device
        sink, window = _fixed_lines(B, H, min(self.sink, Skv), min(self.window, Skv), dev)  # cached: a small call pays per op
        if shift is not None:  # key j holds position j + shift[b]: the sink keys move right by the padding
            sink = sink - shift.to(dev).view(-1, 1, 1)
            sink = sink.masked_fill((sink < 0) | (sink >= Skv), -1)
        return Lines(torch.cat([top_v, sink.expand(B, H, -1)], -1), torch.cat([top_s, window], -1),  # + sink cols, window diags
                     self.block or 0)


@functools.lru_cache(maxsize=16)
def _fixed_lines(B: int, H: int, sink: int, window: int, device):
    """(sink columns (B, 1, sink): positions 0 .. sink - 1, window diagonals (B, H, window): offsets 0 .. window - 1)."""
    return torch.arange(sink, device=device).expand(B, 1, -1), torch.arange(window, device=device).expand(B, H, -1)


@functools.lru_cache(maxsize=16)
def _local(S: int, window: int, sink: int, device):
    """(S, S) boolean: key j within the window of query i or a sink key (causality aside), for S queries on S keys."""
    d = torch.arange(S, device=device)[:, None] - torch.arange(S, device=device)
    return (d < window) | (torch.arange(S, device=device) < sink)


# _diagonal_sums: a padded copy above this many bytes runs row by row instead (one add per estimate row). Measured
# on the 2-core CPU, 9 heads, 64 rows, 1 thread, inside whole VerticalSlash calls: 256 tokens padded 4.3 ms a call
# vs 4.6 by rows, 1K within noise (36.5 / 35.8), 8K on SmolLM2's layer 1 the padded copy alone 38 ms (a fresh
# 19 MB buffer per call: page faults and a zero fill) against ~2 ms by rows
_PAD_MAX_BYTES = 4 << 20


@functools.lru_cache(maxsize=16)
def _future(L: int, n: int, dtype, device) -> torch.Tensor:
    """(L, n) additive: -inf where key pos0 + 1 + c lies after query pos0 + i (c >= i), else 0."""
    i, c = torch.arange(L, device=device)[:, None], torch.arange(n, device=device)
    return torch.zeros(L, n, dtype=dtype, device=device).masked_fill_(c >= i, float("-inf"))


def _whole(idx: torch.Tensor, n: int) -> bool:
    """True when ``idx`` is the full index range 0..n-1 along its one non-unit axis (what
    ``plan.index_grids`` gives a kernel that materialises the whole mask)."""
    return idx.numel() == n and idx.dim() == 4 and (n == 1 or idx.shape.count(n) == 1) and \
        bool(idx.reshape(-1)[0] == 0) and bool(idx.reshape(-1)[-1] == n - 1) and \
        (n < 3 or torch.equal(idx.reshape(-1), torch.arange(n, device=idx.device)))


def _diagonal_sums(p: torch.Tensor, pos0: int) -> torch.Tensor:
    """(B, H, Skv) sums of p (B, H, L, Skv) along each offset o = pos_i - j (row i at absolute position
    pos0 + i; keys j > pos_i hold 0), as one strided view: row i shifted right by s_i = Skv - 1 - pos_i
    puts offset o at column Skv - 1 - o of every row."""
    B, H, L, Skv = p.shape
    s0 = Skv - 1 - pos0
    if s0 - (L - 1) < 0:  # queries past the last key (offsets beyond the keys clamp to Skv - 1): by index
        diag = (pos0 + torch.arange(L, device=p.device)[:, None] - torch.arange(Skv, device=p.device)).clamp(0, Skv - 1)
        return torch.zeros(B, H, Skv, device=p.device, dtype=p.dtype).index_add_(2, diag.flatten(), p.flatten(2))
    W = s0 + Skv + L  # row i at columns [s0, s0 + Skv); read from column s0 - s_i = i onwards
    if B * H * L * W * p.element_size() > _PAD_MAX_BYTES:
        # a large padded copy is a fresh multi-MB buffer each call (page faults and a zero fill: 38 ms of an 8K
        # estimate on the 2-core CPU); row by row, reversed position c = Skv - 1 - o gets row i's key c - s_i
        rev = torch.zeros(B, H, Skv, device=p.device, dtype=p.dtype)
        for i in range(L):
            s = s0 - i  # s_i = Skv - 1 - pos_i >= 0 here
            rev[..., s:].add_(p[:, :, i, :Skv - s])
        return rev.flip(-1)
    buf = torch.nn.functional.pad(p, (s0, L))  # one op: the copy and its zero padding (sliced fills cost 25 % more)
    view = buf.as_strided((B, H, L, Skv), (H * L * W, L * W, W + 1, 1), buf.storage_offset())
    return view.sum(2).flip(-1)


def _keep_table(keep_v, keep_s, Sq: int, off: int, sink: int, window: int, shift) -> torch.Tensor:
    """(B, H, Sq, Skv) boolean mask: verticals, slashes (keep_s[i + off - j], a strided view of the
    reversed table), sink keys and the local window, causal; by index arithmetic, no per-element gather."""
    B, H, Skv = keep_v.shape
    dev = keep_v.device
    c = Skv - off - Sq  # row Sq - 1 - r reads the reversed table from c + r: offset d = i + off - j
    lo = max(-c, 0)  # d >= Skv (queries past the keys) would read before the table: clamp to Skv - 1
    W = max(c, 0) + lo + Sq + Skv
    buf = torch.zeros(B, H, W, dtype=torch.bool, device=dev)
    buf[..., lo:lo + Skv] = keep_s.flip(-1)
    if lo:
        buf[..., :lo] = keep_s[..., -1:]
    rev = buf.as_strided((B, H, Sq, Skv), (H * W, W, 1, 1), buf.storage_offset() + max(c, 0))  # rows reversed
    keep = torch.logical_or(rev, keep_v[:, :, None, :])  # (B, H, Sq, Skv), rows still reversed
    i = torch.arange(Sq - 1, -1, -1, device=dev)[:, None] + off  # absolute position of each reversed row
    j = torch.arange(Skv, device=dev)[None, :]
    pos = j[None] if shift is None else j[None] + shift.to(dev).view(-1, 1, 1)  # (B|1, 1, Skv): absolute positions
    first = (pos < sink) & (pos >= 0)  # left padding: the first real keys
    keep |= ((j > i - window) | first)[:, None]  # the local window and the sink keys, (B|1, 1, Sq, Skv)
    keep &= j <= i  # causal
    return keep.flip(2)

if __name__ == "__main__":
    from ..plan import materialise_mask

    torch.manual_seed(0)
    S = 32
    q, k = torch.randn(1, 1, S, 8), torch.randn(1, 1, S, 8)
    k[:, :, 7] = 12 * q[:, :, -8:].mean(2)  # a key the last queries all like: a vertical
    m = VerticalSlash(verticals=2, slashes=2, last_q=8, sink=1, window=2)
    keep = materialise_mask(m.plan(q, k, Site(causal=True)).with_site(True, 0), 1, 1, S, S, "cpu")[0, 0]
    print(f"{m} on random q, k (key 7 boosted):")
    print("\n".join("".join("#" if x else "." for x in row.tolist()) for row in keep))
