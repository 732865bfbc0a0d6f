"""``SinkCalibration``: ACT, the attention calibration technique of "Unveiling and Harnessing
Hidden Attention Sinks" (Yu et al. 2024). In the chosen heads, key columns other than the first
``first`` tokens whose attention exceeds ``threshold`` times uniform (averaged over the call's
queries: the column mean of p_ij * n_i, n_i = keys query i sees) are sinks that waste attention;
their attention is scaled by ``beta`` and the rows renormalised, which equals adding log(beta) to
their scores. Computed exactly from the kernel's output and two log-sum-exps, all keys and the
(few) sink keys, so no S x S bias is materialised. Detection and both partitions see what the
kernel saw: the call's mask (padding), causality, soft-capping and scale; keys the mask hides are
never sinks, rows that see no key are left as the kernel made them, and under left padding
(``Site.kv_shift``) the ``first`` tokens are the first real ones.

Heads come from a calibration run (``attnpatch.tools.calibrate``) saved as a safetensors
profile; ``bind_model`` checks the profile against the patched model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Plan
from ..site import Site
from .base import Method, check_int, check_number

PROFILE_KIND = "act-heads"


def load_profile(path) -> tuple[dict, dict]:
    """({layer: [heads]}, metadata) of a SinkCalibration profile (``attnpatch.tools.calibrate``)."""
    from ..checks import read_safetensors

    expected = (f"a SinkCalibration profile: a safetensors file with metadata kind={PROFILE_KIND!r} and a tensor "
                "'heads' (n, 2) of (layer, head) pairs")
    how = "write one with python -m attnpatch.tools.calibrate --out PATH (or pass heads=[(layer, head), ...])"
    tensors, meta = read_safetensors(path, f"SinkCalibration(heads={path!r})", expected, how)
    if meta.get("kind") != PROFILE_KIND or "heads" not in tensors:
        found = f"a {meta['kind']} profile" if "kind" in meta else f"a {meta['method']} profile" if "method" in meta \
            else "no attnpatch metadata"
        raise ValueError(f"{path} is not a SinkCalibration profile (found: {found}); expected {expected}; {how}")
    pairs = tensors["heads"]
    if pairs.is_floating_point() or pairs.numel() % 2 or (pairs < 0).any():
        raise ValueError(f"{path}: tensor 'heads' must hold integer (layer, head) pairs >= 0, got {pairs.dtype} "
                         f"{tuple(pairs.shape)}; {how}")
    heads: dict[int, list[int]] = {}
    for l, h in pairs.reshape(-1, 2).tolist():
        heads.setdefault(int(l), []).append(int(h))
    L, H = (int(meta[k]) if str(meta.get(k, "")).isdigit() else None for k in ("num_layers", "num_heads"))
    if (L is not None and max(heads, default=-1) >= L) or (H is not None and max(map(max, heads.values()), default=-1) >= H):
        raise ValueError(f"{path}: its heads {heads} name layers / heads beyond the {L} layers x {H} heads its metadata "
                         f"says the model has; the file is damaged or edited: {how}")
    return heads, meta


@dataclass
class SinkCalibration(Method):
    """Scale the attention of detected non-initial sink tokens by ``beta`` in chosen heads."""

    source = "Unveiling and Harnessing Hidden Attention Sinks (ACT, Yu et al. 2024)"

    heads: object = None  # None: every head; [(layer, head), ...]; {layer: [heads]}; or a profile path
    threshold: float = 5.0
    beta: float = 0.4
    first: int = 1  # the initial tokens are never calibrated
    max_sinks: int = 16  # at most this many sink columns per (row, head), the strongest
    _heads: dict | None = field(default=None, init=False, repr=False)
    _meta: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        check_number("SinkCalibration", "beta", self.beta, low=0, high=1, low_open=True, example=0.4)
        check_number("SinkCalibration", "threshold", self.threshold, low=0, low_open=True, example=5.0)
        check_int("SinkCalibration", "first", self.first, 0)
        check_int("SinkCalibration", "max_sinks", self.max_sinks, 1)
        if self.heads is None:
            self._heads = None
        elif isinstance(self.heads, dict):
            self._heads = {}
            for l, hs in self.heads.items():
                if isinstance(hs, (str, bytes)) or not hasattr(hs, "__iter__"):
                    raise ValueError(f"SinkCalibration(heads={self.heads!r}): each layer maps to a list of heads; "
                                     "e.g. SinkCalibration(heads={3: [0, 5]})")
                self._heads[check_int("SinkCalibration", "heads", l, 0, example={3: [0]})] = [
                    check_int("SinkCalibration", "heads", h, 0, example={3: [0]}) for h in hs]
        elif isinstance(self.heads, (list, tuple)):
            self._heads = {}
            for pair in self.heads:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(f"SinkCalibration(heads={self.heads!r}): heads must be (layer, head) pairs; "
                                     "e.g. SinkCalibration(heads=[(3, 0), (3, 5)])")
                l, h = (check_int("SinkCalibration", "heads", x, 0, example=[(3, 0)]) for x in pair)
                self._heads.setdefault(l, []).append(h)
        else:
            self._heads, self._meta = load_profile(self.heads)

    def bind_model(self, model) -> None:
        """Check a profile against the model it is patched into (clear error on a mismatch)."""
        cfg = model.config
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        if self._meta:
            want = (int(self._meta.get("num_layers", L)), int(self._meta.get("num_heads", H)))
            if want != (L, H) or self._meta.get("model_type", cfg.model_type) != cfg.model_type:
                raise ValueError(f"SinkCalibration profile {self.heads} is for a {self._meta.get('model_type')} model with "
                                 f"{want[0]} layers x {want[1]} heads, not this {cfg.model_type} with {L} x {H}; "
                                 "calibrate this model with python -m attnpatch.tools.calibrate")
        for l, hs in (self._heads or {}).items():
            if not 0 <= l < L or any(not 0 <= h < H for h in hs):
                raise ValueError(f"SinkCalibration(heads=...) names layer {l} heads {hs}; the model has {L} layers x {H} heads")

    def heads_at(self, layer: int, H: int) -> list[int]:
        return list(range(H)) if self._heads is None else self._heads.get(layer, [])

    @torch.no_grad()
    def sinks(self, q, k, off: int, causal: bool, *, mask=None, scale=None, softcap=None, kv_shift=None) -> torch.Tensor:
        """(B, h, Skv) boolean sink columns of heads q (B, h, Sq, D) / k (B, h, Skv, D); ``mask``
        is the call's boolean (True = keep) or additive mask for these heads, broadcastable to
        (B, h, Sq, Skv)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return self._scan(q, k, _Call(off, causal, kv_shift, mask, scale, softcap))[0]

    def _scan(self, q, k, call: "_Call"):
        """(sink columns (B, h, Skv), lse (B, h, Sq) of every row over all the keys it sees; 0 for
        rows that see none). A column's score: mean over the rows that see a key of p_ij * n_i.
        One score matmul per query chunk, exponentiated in place against its row's LSE, then the
        n-weighted column sum as one more matmul; causal chunks stop at their last visible key.
        k may hold fewer (GQA) heads than q."""
        B, h, Sq, _ = q.shape
        Skv = k.shape[2]
        col = torch.zeros(B, h, Skv, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
        live = torch.zeros(B, h, 1, device=q.device, dtype=col.dtype)
        lses = []
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        for s, e in _chunks(Sq, B * h * Skv, call.causal):  # query chunks bound the memory of the scores
            K = min(Skv, e + call.off) if call.causal else Skv  # keys past the chunk's last position: hidden
            if K <= 0:
                lses.append(torch.zeros(B, h, e - s, device=q.device, dtype=col.dtype))
                continue
            sc = call.logits(q[:, :, s:e], k[:, :, :K], s, grad=grad)  # (B, h, C, K), -inf where hidden
            n = call.seen(sc, s, Skv)  # (B|1, h|1, C) keys each row sees
            if grad:  # the LSE feeds the calibrated output: out of place, rows that see no key masked first (no NaN)
                dead = ~(sc > float("-inf")).any(-1, keepdim=True)
                lses.append(sc.masked_fill(dead, 0.0).logsumexp(-1, keepdim=True).masked_fill(dead, 0.0).squeeze(-1))
                sc = sc.detach().clone()
            mx = sc.amax(-1, keepdim=True)  # the LSE as max + log(sum exp): no temporary, one exp pass
            mx.masked_fill_(mx == float("-inf"), 0.0)  # rows that see no key: their exp is 0 everywhere
            # in place; hidden scores (-inf) and any below -87 are raised to -87 first: exp of -inf or of a value whose
            # exp is subnormal takes the CPU's slow path (4-170x); exp(-87) = 1.6e-38 is below the float32 resolution
            # of every sum it enters (Z >= 1, and a column's score against the threshold)
            p = sc.sub_(mx).clamp_min_(_EXP_FLOOR).exp_()
            z = p.sum(-1)  # (B, h, C)
            if not grad:
                lses.append(torch.where(n > 0, mx.squeeze(-1) + z.log(), 0.0))  # rows that see no key: 0
            wt = n.to(p.dtype) / z.clamp_min(torch.finfo(p.dtype).tiny)  # n_i / Z_i: p_ij * n_i = exp(s_ij - max_i) * that
            col[..., :K] += (wt[:, :, None, :] @ p).squeeze(2)  # attention relative to uniform, summed over the rows
            live += (n > 0).sum(-1, keepdim=True).expand(B, h, 1)
        j = torch.arange(Skv, device=q.device)
        pos = j if call.shift is None else j + call.shift.to(q.device)[:, None]  # (Skv) or (B, Skv): absolute
        early = (pos < self.first).view(-1, 1, Skv)  # the first real tokens are never calibrated
        score = (col / live.clamp_min(1)).masked_fill(early, 0.0)
        top = score.topk(min(self.max_sinks, Skv), -1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, top.indices, top.values > self.threshold)
        return keep, torch.cat(lses, 2)

    def _calibrate(self, out, q, k, v, call: "_Call"):
        """Heads ``call.heads`` of ``out`` (the kernel's result) with sink attention scaled by beta:
        (N - (1 - beta) N_s) / (Z - (1 - beta) Z_s) = (out - w o_s) / (1 - w), w = (1 - beta) Z_s / Z."""
        rep = q.shape[1] // k.shape[1]
        if call.all_heads:  # every head: q as it is, k / v shared by their query heads (no repeated copies)
            qh, kh, vh, kv_head = q, k, v, torch.arange(q.shape[1], device=q.device) // rep
        else:
            kv_head = call.heads // rep
            qh, kh, vh = q[:, call.heads], k[:, kv_head], v[:, kv_head]  # (B, h, S, D)
            kv_head = torch.arange(len(call.heads), device=q.device)
        sink, lse_all = self._scan(qh, kh, call)  # (B, h, Skv), (B, h, Sq)
        if not sink.any():
            return out
        m = int(sink.sum(-1).max())
        idx = sink.float().topk(m, -1).indices  # (B, h, m): sink columns first, then non-sinks to skip
        ks, vs = _rows(kh, kv_head, idx), _rows(vh, kv_head, idx)  # (B, h, m, D): each head's sink keys / values
        sc = call.logits(qh, ks, 0, idx)  # (B, h, Sq, m): the sink columns' own scores, mask and causality
        sc = sc.masked_fill(~sink.gather(2, idx)[:, :, None, :], float("-inf"))
        dead = ~(sc > float("-inf")).any(-1, keepdim=True)  # rows that see no sink: w = 0
        lse_s = sc.masked_fill(dead, 0.0).logsumexp(-1, keepdim=True)
        o_s = torch.exp(sc - lse_s).masked_fill(dead, 0.0) @ vs.to(sc.dtype)  # (B, h, Sq, Dv)
        w = (1 - self.beta) * torch.exp(lse_s.squeeze(-1) - lse_all).masked_fill(dead.squeeze(-1), 0.0)
        base = (out if call.all_heads else out[:, call.heads]).to(sc.dtype)
        cal = (base - w[..., None] * o_s) / (1 - w[..., None])
        if call.all_heads:
            return cal.to(out.dtype)
        out = out.clone()
        out[:, call.heads] = cal.to(out.dtype)
        return out

    def plan(self, q, k, site: Site) -> Plan | None:
        heads = self.heads_at(site.layer, q.shape[1])
        if not heads:
            return None
        hidx = None if heads == list(range(q.shape[1])) else torch.tensor(heads, device=q.device)

        def output(out, q, k, v, scale, mask=None, softcap=None):  # core passes the call's mask and softcap
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return self._calibrate(out, q, k, v, _Call(site.q_offset, site.causal, site.kv_shift, mask, scale, softcap, hidx))

        return Plan(output=output, name=repr(self))


_EXP_FLOOR = -87.0  # exp(-87) ~ 1.6e-38: the smallest normal float32 is 1.2e-38


def _rows(x, kv_head, idx):
    """(B, h, m, D): rows ``idx`` (B, h, m) of x (B, hk, S, D), head hh reading KV head ``kv_head[hh]``."""
    B, hk, S, D = x.shape
    h, m = idx.shape[1], idx.shape[2]
    lin = (kv_head.view(1, h, 1) * S + idx).reshape(B, h * m, 1).expand(-1, -1, D)
    return x.reshape(B, hk * S, D).gather(1, lin).view(B, h, m, D)


def _chunks(Sq: int, per_row: int, causal: bool):
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

    def logits(self, q, k, row0: int, cols=None, grad: bool = True) -> torch.Tensor:
        """Scores (B, h, C, K) of query rows row0.. against k, float32 or wider, -inf where hidden;
        ``cols`` (B, h, K): the key indices k holds (default: the first K keys, in order). k may
        hold fewer (GQA) heads than q: each serves its group of query heads without a copy. ``grad``
        False: the score tensor is rewritten in place (no autograd graph needs its steps)."""
        work = torch.promote_types(q.dtype, torch.float32)
        B, h, C, D = q.shape
        hk, K = k.shape[1], k.shape[2]
        # without autograd the scale (over the soft cap) rides on q: C x D multiplies instead of C x K
        fold = 1.0 if grad else self.scale / (self.softcap or 1.0)
        qw = q.to(work) * fold if fold != 1.0 else q.to(work)
        if hk != h:
            s = (qw.reshape(B, hk, h // hk * C, D) @ k.to(work).transpose(-1, -2)).view(B, h, C, K)
        else:
            s = qw @ k.to(work).transpose(-1, -2)
        if grad:  # out of place: autograd keeps what each step's backward reads
            return self._hide(s * self.scale if not self.softcap else self.softcap * torch.tanh(s * self.scale / self.softcap),
                              row0, cols, work, inplace=False)
        if self.softcap:
            s.tanh_().mul_(self.softcap)
        return self._hide(s, row0, cols, work, inplace=True)

    def _hide(self, s, row0: int, cols, work, inplace: bool) -> torch.Tensor:
        """Scores s (B, h, C, K) with causality and the call's mask applied (-inf where hidden)."""
        C, K = s.shape[2], s.shape[3]
        fill = (lambda x, m: x.masked_fill_(m, float("-inf"))) if inplace else (lambda x, m: x.masked_fill(m, float("-inf")))
        j = torch.arange(K, device=s.device) if cols is None else cols[:, :, None, :]  # (K) / (B, h, 1, K)
        if self.causal:
            rows = torch.arange(row0 + self.off, row0 + self.off + C, device=s.device)
            if inplace and cols is None:  # keys in order: only those past the chunk's first position can be hidden
                lo = max(row0 + self.off + 1, 0)
                if lo < K:
                    s[..., lo:].masked_fill_(j[lo:] > rows[:, None], float("-inf"))
            else:
                s = fill(s, j > rows[:, None])
        if self.mask is not None:
            m = self.mask[:, :, row0:row0 + C] if self.mask.shape[2] > 1 else self.mask  # (B|1, h|1, C|1, Skv|1)
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

    def seen(self, s, row0: int, Skv: int) -> torch.Tensor:
        """(B|1, h|1, C) number of keys each query row sees, from its scores ``s`` (before they are
        exponentiated) or, without a mask, from causality alone."""
        C = s.shape[2]
        if self.mask is not None:
            return (s > float("-inf")).sum(-1)
        if not self.causal:
            return torch.full((1, 1, C), Skv, device=s.device)
        return (torch.arange(row0 + self.off + 1, row0 + self.off + 1 + C, device=s.device).clamp(0, Skv)).view(1, 1, C)
