"""The score arithmetic of ``SinkCalibration`` (methods/sink_calibration.py): scores of chosen query
rows recomputed exactly as the kernel saw them (``_Call``), the detection rows and their per-shape
constants, and the row log-sum-exps the correction needs when the kernel returned none."""
from __future__ import annotations

from functools import lru_cache

import torch

from ..ops.bias import scores
from ..plan import DIRECT_MAX

_EXP_FLOOR = -87.0  # exp(-87) ~ 1.6e-38: the smallest normal float32 is 1.2e-38
_EXP2_FLOOR = -125.0  # 2^-125 ~ 2.4e-38, the same floor for exp2
_LOG2E = 1.4426950408889634  # exp(x) = 2^(x log2(e))


def sample(Sq: int, R: int | None, device):
    """(rows, the same as a tensor) that detection reads: R rows evenly spaced from the last one back,
    Sq - 1 - floor(r Sq / R) for r < R, ascending; (None, None) for every row (R None or Sq <= R)."""
    if R is None or Sq <= R:
        return None, None
    return _sampled(Sq, R, device)


@lru_cache(maxsize=64)
def _sampled(Sq: int, R: int, device):
    rows = [Sq - 1 - (r * Sq) // R for r in range(R - 1, -1, -1)]
    return rows, torch.tensor(rows, device=device)


def plain_col(q, k, call: "_Call", lse, rows, idx, first: int):
    """(B, h, Skv) column scores (mean over the detection rows of p_ij n_i) of a call without a mask
    (every detection row sees a key), from the kernel's row LSE, in four passes over the detection
    rows' scores: a matmul; in place, p_ij w_i = exp(s_ij - lse_i + log w_i) (w_i = n_i / rows) with
    hidden keys, the ``first`` keys and scores below the floor raised to the floor by one clamp
    against a bound cached per shape; a sum over the rows. The weights ride in the exponent: a
    matmul of floored probabilities (1.6e-38) with weights below 1 makes subnormal products (slow).
    The exponent is in base 2 (log2(e) rides in the matmul's scale): the CPU's exp2 runs 2.6x faster
    than its exp (0.9 vs 2.3 ns a float32 element on the 2-core machine), the largest of these passes.
    A long causal call's rows run in two groups, the earlier half against the keys it can see only
    (a quarter of the scores fewer)."""
    B, h, Sq, D = q.shape
    hk, Skv = k.shape[1], k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    C, rep = Sq if rows is None else len(rows), h // hk
    lo, hi, logw = _geometry(Sq, Skv, call.off if call.causal else None, None if rows is None else C, first, q.device, work)
    qc = (q if idx is None else q.index_select(2, idx)).to(work).reshape(B * hk, rep, C, D)
    r = (lse if idx is None else lse.index_select(2, idx)).to(work).mul(_LOG2E).sub_(logw).reshape(B * hk, rep, C, 1)
    kt = k.to(work).reshape(B * hk, Skv, D).transpose(1, 2)
    half = C // 2
    # the last row of the first half and the keys it sees: worth a second group when it skips enough keys
    K1 = min(Skv, (half - 1 if rows is None else rows[half - 1]) + call.off + 1) if call.causal and half else Skv
    groups = [(0, C, Skv)] if Skv < 1024 or K1 > 0.75 * Skv else [(half, C, Skv), (0, half, K1)]  # the full width first
    col = None
    for a, b, K in groups:
        # s_ij - lse_i + log w_i in one op: the scale and the row terms ride in the matmul (few ops: small calls pay per op)
        qg, rg = (qc, r) if (a, b) == (0, C) else (qc[:, :, a:b], r[:, :, a:b])
        sc = torch.baddbmm(rg.reshape(B * hk, rep * (b - a), 1), qg.reshape(B * hk, rep * (b - a), D), kt[..., :K],
                           beta=-1, alpha=call.scale * _LOG2E).view(B, h, b - a, K)
        # 2^-125 stays far below every sum's resolution (a column's score against the threshold): the floor hides
        part = (sc.clamp_(lo, hi[a:b, :K]) if hi is not None else sc.clamp_min_(_EXP2_FLOOR)).exp2_().sum(-2)
        if col is None:
            col = part
        else:
            col[..., :K] += part
    return col


def _geometry(Sq: int, Skv: int, off: int | None, R: int | None, first: int, device, dtype):
    """(floor, bound (C, Skv): +inf where the detection row sees the key, the floor where it is hidden
    (off None: not causal) or among the ``first`` keys, or None where nothing is; log row weights (C,):
    log2(n_i / rows)) of a call without a mask, in base 2 (plain_col's exp2). Cached per shape when small:
    a repeated call builds nothing."""
    small = (R or Sq) * Skv <= 1 << 20
    return (_geometry_cached if small else _geometry_build)(Sq, Skv, off, R, first, device, dtype)


def _geometry_build(Sq, Skv, off, R, first, device, dtype):
    rows = torch.tensor(sample(Sq, R, device)[0], device=device) if R is not None else torch.arange(Sq, device=device)
    j = torch.arange(Skv, device=device)
    n, hidden = torch.full(rows.shape, Skv, device=device), (j < first).expand(len(rows), Skv)
    if off is not None:
        n, hidden = (rows + off + 1).clamp(0, Skv), hidden | (j > rows[:, None] + off)
    hi = None
    if bool(hidden.any()):
        hi = torch.full(hidden.shape, float("inf"), device=device, dtype=dtype).masked_fill_(hidden, _EXP2_FLOOR)
    return torch.tensor(_EXP2_FLOOR, device=device, dtype=dtype), hi, (n.to(dtype) / (n > 0).sum().clamp_min(1)).log2()


_geometry_cached = lru_cache(maxsize=32)(_geometry_build)


@lru_cache(maxsize=32)
def bounds(Skv: int, first: int, threshold: float, dtype, device) -> torch.Tensor:
    """(Skv,) ``threshold``, +inf on the first ``first`` keys (never sinks): a column is a sink where its score
    is above its bound, one compare (a small call pays per op)."""
    return torch.full((Skv,), threshold, dtype=dtype, device=device).index_fill_(
        0, torch.arange(min(first, Skv), device=device), float("inf"))


def small_ok(q, k, site) -> bool:
    """Whether a call takes ``small_call``'s one-pass path (``Plan.direct``): at most ``DIRECT_MAX`` scores, no
    left padding, every row seeing a key, no autograd through q / k."""
    return site.kv_shift is None and q.shape[1] * q.shape[2] * k.shape[2] <= DIRECT_MAX \
        and not (site.causal and site.q_offset < 0) and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))


def small_call(q, k, off: int, causal: bool, R: int | None):
    """(probabilities (B, H, Sq, Skv), column scores (B, H, Skv): the mean over the detection rows (``sample``:
    R of them, every row for None) of p_ij n_i) of a small call without a mask or soft cap at the default
    scale, every row seeing a key (off >= 0): one score pass gives the detection and the output.
    k may hold fewer (GQA) heads than q."""
    p = torch.softmax(scores(q, k, off if causal else None), -1)
    return p, (_row_weights(q.shape[2], k.shape[2], off if causal else None, R, p.dtype, q.device) @ p).squeeze(-2)


@lru_cache(maxsize=16)
def _row_weights(Sq: int, Skv: int, off, R, dtype, device):
    """(1, Sq): n_i / C for the C detection rows (``sample``), 0 for the others; n_i the keys row i sees
    (every row sees one: off >= 0)."""
    n = torch.full((Sq,), Skv, device=device) if off is None else (torch.arange(Sq, device=device) + off + 1).clamp(max=Skv)
    rows = sample(Sq, R, device)[1]
    if rows is None:
        return (n.to(dtype) / Sq).view(1, Sq)
    return torch.zeros(Sq, dtype=dtype, device=device).index_copy_(0, rows, n[rows].to(dtype) / len(rows)).view(1, Sq)


def masked_lse(sc):
    """(B, h, C) LSE of scores (B, h, C, K); rows that see no key (-inf everywhere) get 0, no NaN in the backward."""
    dead = ~(sc > float("-inf")).any(-1, keepdim=True)
    return sc.masked_fill(dead, 0.0).logsumexp(-1, keepdim=True).masked_fill(dead, 0.0).squeeze(-1)


def row_lse(q, k, call: "_Call"):
    """(B, h, Sq) LSE of every row over the keys it sees (0 for none), recomputed (autograd flows through it)."""
    B, h, Sq, _ = q.shape
    Skv, grad = k.shape[2], torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    out = []
    for s, e in chunks(Sq, B * h * Skv, call.causal):
        K = min(Skv, e + call.off) if call.causal else Skv
        out.append(masked_lse(call.logits(q[:, :, s:e], k[:, :, :K], s, grad=grad)) if K > 0
                   else q.new_zeros(B, h, e - s, dtype=torch.promote_types(q.dtype, torch.float32)))
    return torch.cat(out, 2)


def gather_rows(x, kv_head, idx):
    """(B, h, m, D): rows ``idx`` (B, h, m) of x (B, hk, S, D), head hh reading KV head ``kv_head[hh]``."""
    B, hk, S, D = x.shape
    h, m = idx.shape[1], idx.shape[2]
    lin = (kv_head.view(1, h, 1) * S + idx).reshape(B, h * m, 1).expand(-1, -1, D)
    return x.reshape(B, hk * S, D).gather(1, lin).view(B, h, m, D)


def chunks(Sq: int, per_row: int, causal: bool):
    """(start, end) query chunks: at most 2**24 scores each (64 MB in float32) and 1024 rows; a causal
    prefill in at least four, so the later chunks' score matmuls skip the keys no row of theirs sees."""
    rows = max(1, min(1024, (1 << 24) // max(per_row, 1)))
    if causal and Sq >= 256:
        rows = min(rows, -(-Sq // 4))
    return [(s, min(s + rows, Sq)) for s in range(0, Sq, rows)]


class _Call:
    """What one attention call's kernel saw, to recompute its scores: query offset, causality,
    key positions, the call's mask, scale and soft-capping (heads: the calibrated ones; None: all)."""

    def __init__(self, off, causal, shift, mask, scale, softcap, heads=None):
        self.off, self.causal, self.shift, self.scale, self.softcap, self.heads = off, causal, shift, scale, softcap, heads
        self.all_heads = heads is None
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, Sq|1, Skv|1)
            if heads is not None and mask.shape[1] > 1:
                mask = mask[:, heads.to(mask.device)]
        self.mask = mask

    def logits(self, q, k, row0: int, cols=None, grad: bool = True, rows=None) -> torch.Tensor:
        """Scores (B, h, C, K) of query rows row0.. (``rows``: these ascending row indices, row0 the first)
        against k, float32 or wider, -inf where hidden;
        ``cols`` (B, h, K): the key indices k holds (default: the first K keys, in order). k may
        hold fewer (GQA) heads than q: each serves its group of query heads without a copy. ``grad``
        False: the score tensor is rewritten in place (no autograd graph needs its steps)."""
        work = torch.promote_types(q.dtype, torch.float32)
        B, h, C, D = q.shape
        hk, K = k.shape[1], k.shape[2]
        # without autograd the scale (over the soft cap) rides on the smaller of q (C x D) and the scores (C x K)
        fold = 1.0 if grad else self.scale / (self.softcap or 1.0)
        qw = q.to(work) * fold if fold != 1.0 and D <= K else q.to(work)
        if hk != h:
            s = (qw.reshape(B, hk, h // hk * C, D) @ k.to(work).transpose(-1, -2)).view(B, h, C, K)
        else:
            s = qw @ k.to(work).transpose(-1, -2)
        if grad:  # out of place: autograd keeps what each step's backward reads
            return self._hide(s * self.scale if not self.softcap else self.softcap * torch.tanh(s * self.scale / self.softcap),
                              row0, cols, work, inplace=False, rows=rows)
        if fold != 1.0 and D > K:
            s.mul_(fold)
        if self.softcap:
            s.tanh_().mul_(self.softcap)
        return self._hide(s, row0, cols, work, inplace=True, rows=rows)

    def _positions(self, row0: int, C: int, rows, device) -> torch.Tensor:
        """(C,) the absolute positions of query rows row0..row0 + C - 1, or of ``rows``."""
        return torch.arange(row0 + self.off, row0 + self.off + C, device=device) if rows is None else rows + self.off

    def _hide(self, s, row0: int, cols, work, inplace: bool, rows=None) -> torch.Tensor:
        """Scores s (B, h, C, K) with causality and the call's mask applied (-inf where hidden)."""
        C, K = s.shape[2], s.shape[3]
        fill = (lambda x, m: x.masked_fill_(m, float("-inf"))) if inplace else (lambda x, m: x.masked_fill(m, float("-inf")))
        j = torch.arange(K, device=s.device) if cols is None else cols[:, :, None, :]  # (K) / (B, h, 1, K)
        if self.causal:
            pos = self._positions(row0, C, rows, s.device)
            if inplace and cols is None:  # keys in order: only those past the chunk's first position can be hidden
                lo = max(row0 + self.off + 1, 0)
                if lo < K:
                    s[..., lo:].masked_fill_(j[lo:] > pos[:, None], float("-inf"))
            else:
                s = fill(s, j > pos[:, None])
        if self.mask is not None:
            m = self.mask if self.mask.shape[2] == 1 else self.mask[:, :, row0:row0 + C] if rows is None else \
                self.mask.index_select(2, rows)  # (B|1, h|1, C|1, Skv|1)
            if cols is not None and m.shape[-1] > 1:
                m = m.expand(cols.shape[0], cols.shape[1], m.shape[2], m.shape[3]).gather(
                    3, cols[:, :, None, :].expand(-1, -1, m.shape[2], -1))
            elif m.shape[-1] > 1:
                m = m[..., :K]
            if m.dtype == torch.bool:
                s = fill(s, ~m)
            else:
                s = s.add_(m.to(work)) if inplace else s + m.to(work)
        return s

    def seen(self, s, row0: int, Skv: int, rows=None) -> torch.Tensor:
        """(B|1, h|1, C) number of keys each query row sees, from its scores ``s`` (before they are
        exponentiated) or, without a mask, from causality alone."""
        C = s.shape[2]
        if self.mask is not None:
            return (s > float("-inf")).sum(-1)
        if not self.causal:
            return torch.full((1, 1, C), Skv, device=s.device)
        return (self._positions(row0, C, rows, s.device) + 1).clamp_(0, Skv).view(1, 1, C)


def key_mass(q, k, call: "_Call", rows) -> torch.Tensor:
    """(B, h, Skv) mean attention probability of query rows ``rows`` (ascending (R,) tensor of row indices)
    on each key, as the kernel saw them (causality, mask, scale, soft cap); rows that see no key count 0."""
    sc = call.logits(q.index_select(2, rows), k, int(rows[0]), grad=False, rows=rows)  # (B, h, R, Skv)
    mx = sc.amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)  # rows that see no key: exp(-inf) = 0 below
    p = sc.sub_(mx).exp_()
    return (p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)).mean(2)
