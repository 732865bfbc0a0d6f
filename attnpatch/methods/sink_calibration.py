"""``SinkCalibration``: ACT, the attention calibration technique of "Unveiling and Harnessing
Hidden Attention Sinks" (Yu et al. 2024). In the chosen heads, key columns other than the first
``first`` tokens whose attention exceeds ``threshold`` times uniform (averaged over the call's
queries: the column mean of p_ij * n_i, n_i = keys query i sees) are sinks that waste attention;
their attention is scaled by ``beta`` and the rows renormalised, which equals adding log(beta) to
their scores. Computed exactly from the kernel's output and two log-sum-exps, all keys and the
(few) sink keys, so no S x S bias is materialised; the all-keys one comes with the kernel's output
where the kernel returns it (plain dense calls: attnpatch.core passes it as the output step's ``lse``).
Detection and both partitions see what the kernel saw: the call's mask (padding), causality,
soft-capping and scale; keys the mask hides are never sinks, rows that see no key are left as the
kernel made them, and under left padding (``Site.kv_shift``) the ``first`` tokens are the first real ones.

Detection reads ``detect_rows`` query rows (default 64), evenly spaced from the last one back (row
Sq - 1 - floor(r Sq / R) for r < R: the last row, which sees every key of a causal call, always among
them): a column's score is its mean of p_ij * n_i over those rows. The exact mean over every row (the
paper's; ``detect_rows=None``, and any call of at most ``detect_rows`` queries) re-reads all S x S
scores, which costs at least 60 % of an SDPA call on top of it; the sampled rows cost R x S. A sink
is a column far above uniform in most rows (threshold 5), so evenly spaced rows see it too.

Heads come from a calibration run (``attnpatch.tools.calibrate``) saved as a safetensors
profile; ``bind_model`` checks the profile against the patched model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Plan, probs_direct, with_direct
from ..site import Site
from ._sink_scores import _EXP_FLOOR, _Call, bounds as _bounds, chunks as _chunks, gather_rows, masked_lse, plain_col, row_lse, sample, \
    small_call, small_ok
from .base import Method, call_heads, check_int, check_number

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
    rows_coupled = True  # sinks come from column statistics over the call's query rows

    heads: object = None  # None: every head; [(layer, head), ...]; {layer: [heads]}; or a profile path
    threshold: float = 5.0
    beta: float = 0.4
    first: int = 1  # the initial tokens are never calibrated
    max_sinks: int = 16  # at most this many sink columns per (row, head), the strongest
    detect_rows: int | None = 64  # query rows whose attention detects the sinks; None: every row (the paper's mean)
    _heads: dict | None = field(default=None, init=False, repr=False)
    _meta: dict = field(default_factory=dict, init=False, repr=False)
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (layer, H, site) -> (id, Plan)

    def __post_init__(self):
        check_number("SinkCalibration", "beta", self.beta, low=0, high=1, low_open=True, example=0.4)
        check_number("SinkCalibration", "threshold", self.threshold, low=0, low_open=True, example=5.0)
        check_int("SinkCalibration", "first", self.first, 0)
        check_int("SinkCalibration", "max_sinks", self.max_sinks, 1)
        if self.detect_rows is not None:
            check_int("SinkCalibration", "detect_rows", self.detect_rows, 1, example=64)
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

    def _scan(self, q, k, call: _Call, lse=None):
        """(sink columns, lse) of ``_detect``."""
        keep, _, lse = self._detect(q, k, call, lse)
        return keep, lse

    def _detect(self, q, k, call: _Call, lse=None):
        """(sink columns (B, h, Skv), the most sink columns of any head, lse (B, h, Sq) of every row over all
        the keys it sees, 0 for rows that see none; ``lse`` itself when given (the kernel's); None when only
        detection rows were read).
        A column's score: mean over the detection rows that see a key of p_ij * n_i."""
        B, h, Sq, _ = q.shape
        rows, idx = sample(Sq, self.detect_rows, q.device)  # None: every row
        C = Sq if rows is None else len(rows)
        if lse is not None and call.mask is None and call.shift is None and (not call.causal or call.off >= 0) \
                and B * h * C * k.shape[2] <= 1 << 24:  # the common call: four passes over the detection rows' scores
            return (*self._pick(plain_col(q, k, call, lse, rows, idx, self.first), call, first_hidden=True), lse)
        col, lse = self._columns(q, k, call, lse, rows, idx)
        return (*self._pick(col, call), lse)

    def _columns(self, q, k, call: _Call, lse, rows, idx):
        """(column scores (B, h, Skv), lse as ``_detect`` returns it) in query chunks: one score matmul per
        chunk, exponentiated in place against its row's LSE, then the n-weighted column sum; causal chunks
        stop at their last visible key. k may hold fewer (GQA) heads than q."""
        B, h, Sq, _ = q.shape
        Skv, C = k.shape[2], Sq if rows is None else len(rows)
        col = torch.zeros(B, h, Skv, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
        live = torch.zeros(B, h, 1, device=q.device, dtype=col.dtype)
        lses = [] if rows is None and lse is None else None  # the full pass also gives every row's LSE
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if grad and lses is None:  # detection alone: no graph (its result is boolean)
            q, k, grad = q.detach(), k.detach(), False
        for s, e in _chunks(C, B * h * Skv, call.causal):  # chunks bound the scores' memory
            first, last, at = (s, e - 1, None) if rows is None else (rows[s], rows[e - 1], idx[s:e])
            K = min(Skv, last + 1 + call.off) if call.causal else Skv  # keys past the chunk's last position: hidden
            if K <= 0:
                if lses is not None:
                    lses.append(torch.zeros(B, h, e - s, device=q.device, dtype=col.dtype))
                continue
            sc = call.logits(q[:, :, s:e] if at is None else q.index_select(2, at), k[:, :, :K], first, grad=grad, rows=at)
            n = call.seen(sc, first, Skv, rows=at)  # (B|1, h|1, C) keys each row sees; sc: (B, h, C, K), -inf where hidden
            if grad:  # the LSE feeds the calibrated output: out of place, rows that see no key masked first (no NaN)
                lses.append(masked_lse(sc))
                sc = sc.detach().clone()
            if lse is not None:  # the kernel's LSE (rows that see no key: any finite value), log n_i in the exponent
                lr = (lse[:, :, s:e] if at is None else lse.index_select(2, at)).nan_to_num(0.0, 0.0, 0.0)
                p = sc.sub_((lr - n.to(sc.dtype).log()).unsqueeze(-1)).clamp_min_(_EXP_FLOOR).exp_()
                col[..., :K] += p.sum(-2)  # p_ij n_i summed over the rows (no subnormal products: see plain_col)
            else:
                mx = sc.amax(-1, keepdim=True)  # the LSE as max + log(sum exp): no temporary, one exp pass
                mx.masked_fill_(mx == float("-inf"), 0.0)  # rows that see no key: their exp is 0 everywhere
                # in place; hidden scores (-inf) and any below -87 are raised to -87 first: exp of -inf or of a value
                # whose exp is subnormal takes the CPU's slow path (4-170x); exp(-87) = 1.6e-38 is below the float32
                # resolution of every sum it enters (Z >= 1, and a column's score against the threshold)
                p = sc.sub_(mx).clamp_min_(_EXP_FLOOR).exp_()
                z = p.sum(-1)  # (B, h, C)
                if lses is not None and not grad:
                    lses.append(torch.where(n > 0, mx.squeeze(-1) + z.log(), 0.0))  # rows that see no key: 0
                wt = n.to(p.dtype) / z.clamp_min(torch.finfo(p.dtype).tiny)  # n_i / Z_i: p_ij n_i = exp(s_ij - max_i) * that
                col[..., :K] += (wt[:, :, None, :] @ p).squeeze(2)  # attention relative to uniform, summed over the rows
            live += (n > 0).sum(-1, keepdim=True).expand(B, h, 1)
        return col.div_(live.clamp_min_(1)), lse if lses is None else torch.cat(lses, 2)

    def _pick(self, score, call: _Call, first_hidden: bool = False):
        """((B, h, Skv) boolean: the columns scoring above the threshold, at most max_sinks (the strongest),
        never the first real tokens (already scored ~0 when ``first_hidden``); the most of any head)."""
        Skv = score.shape[-1]
        if first_hidden or not self.first:
            keep = score > self.threshold
        elif call.shift is None:  # one compare against a per-column bound, +inf on the first keys (a small call pays per op)
            keep = score > _bounds(Skv, self.first, self.threshold, score.dtype, score.device)
        else:
            pos = torch.arange(Skv, device=score.device) + call.shift.to(score.device)[:, None]  # (B, Skv): absolute
            score.masked_fill_((pos < self.first).view(-1, 1, Skv), 0.0)
            keep = score > self.threshold
        m = int(keep.sum(-1).max())
        if m > self.max_sinks:
            if not first_hidden and self.first and call.shift is None:
                score[..., :self.first] = 0.0  # never among the strongest: the first keys are not sinks
            top = score.topk(self.max_sinks, -1)  # with at most max_sinks above the threshold, keep is already these
            keep, m = torch.zeros_like(keep).scatter_(2, top.indices, top.values > self.threshold), self.max_sinks
        return keep, m

    def _calibrate(self, out, q, k, v, call: _Call, lse=None):
        """Heads ``call.heads`` of ``out`` (the kernel's result) with sink attention scaled by beta:
        (N - (1 - beta) N_s) / (Z - (1 - beta) Z_s) = (out - w o_s) / (1 - w), w = (1 - beta) Z_s / Z.
        ``lse``: (B, H, Sq) the kernel's row LSE, if it returned one (else recomputed, when a sink is found)."""
        rep = q.shape[1] // k.shape[1]
        if call.all_heads:  # every head: q as it is, k / v shared by their query heads (no repeated copies)
            qh, kh, vh = q, k, v
        else:
            kv_head = call.heads // rep
            qh, kh, vh = q[:, call.heads], k[:, kv_head], v[:, kv_head]  # (B, h, S, D)
            lse, rep = None if lse is None else lse[:, call.heads], 1
        sink, m, lse_all = self._detect(qh, kh, call, lse)  # (B, h, Skv), the most of any head, (B, h, Sq) or None
        if m == 0:
            return out
        if lse_all is None:  # detection read sampled rows only, and the kernel gave no LSE: every row's, recomputed
            lse_all = row_lse(qh, kh, call)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, out))
        base = (out if call.all_heads else out[:, call.heads]).to(torch.promote_types(q.dtype, torch.float32))
        cal = self._correct(base, qh, kh, vh, sink, m, lse_all, call, rep, grad)
        if call.all_heads:
            return cal.to(out.dtype)
        out = out.clone()
        out[:, call.heads] = cal.to(out.dtype)
        return out

    def _correct(self, base, qh, kh, vh, sink, m, lse_all, call: _Call, rep: int, grad: bool):
        """``base`` (B, h, Sq, Dv), the kernel's output of these heads, with the attention of the sink columns
        ``sink`` (B, h, Skv) scaled by beta: (base - w o_s) / (1 - w), w = (1 - beta) Z_s / Z (lse_all: log Z)."""
        idx = sink.float().topk(m, -1).indices  # (B, h, m): sink columns first, then non-sinks to skip
        kv_head = torch.arange(qh.shape[1], device=qh.device) // rep  # the head of kh / vh each head of qh reads
        ks, vs = gather_rows(kh, kv_head, idx), gather_rows(vh, kv_head, idx)  # (B, h, m, D): each head's sink keys / values
        sc = call.logits(qh, ks, 0, idx, grad=grad)  # (B, h, Sq, m): the sink columns' own scores, mask and causality
        sc = sc.masked_fill(~sink.gather(2, idx)[:, :, None, :], float("-inf"))
        if m == 1:  # one sink column: o_s is its value row, log Z_s its score; no (B, h, Sq, Dv) temporary
            e, o_s = sc.squeeze(-1) - lse_all, vs.to(sc.dtype)  # rows that see no sink: -inf
        else:
            mx = sc.detach().amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)  # rows that see no sink: 0 (cancels anyway)
            ex = torch.exp(sc - mx)
            z = ex.sum(-1, keepdim=True)  # Z_s / exp(mx); 0 for rows that see no sink
            zc = z.clamp_min(torch.finfo(z.dtype).tiny)
            o_s = (ex / zc) @ vs.to(sc.dtype)  # (B, h, Sq, Dv); rows that see no sink: 0
            # log(Z_s / Z); rows that see no sink: -inf (w = 0), through log(0) only without autograd (its backward is NaN)
            e = (mx + (zc.log().masked_fill(z == 0, float("-inf")) if grad else z.log())).squeeze(-1) - lse_all
        # w below 1e-30 changes nothing a float holds, and its products would be subnormal (the CPU's slow path)
        w = (1 - self.beta) * torch.exp(e.masked_fill(e < -69.0, float("-inf")))
        # (base - w o_s) / (1 - w) = base + w / (1 - w) (base - o_s): one fused pass, without autograd in place (a
        # fresh multi-MB tensor costs its page faults on CPU; base is the kernel's own output or a copy)
        return torch.lerp(base, o_s, (w / (w - 1))[..., None], out=None if grad else base)

    def plan(self, q, k, site: Site) -> Plan | None:
        # one Plan per (layer, heads, site geometry), returned again on every call: core and the kernels then
        # reuse what they derive from it (the bare plan, the kernel choice) instead of rebuilding it per call
        key = (site.layer, q.shape[1], site.heads, site.q_offset, site.causal, q.device)
        got = self._plans.get(key) if site.kv_shift is None else None
        if got is not None and got[0] == id(self):  # a copy of this method (deepcopy) holds plans bound to the original
            return self._small(got[1], q, k, site)
        # heads=[(layer, head)] name the model's heads; under tensor / context parallelism the call holds a subset
        heads = call_heads(site, q.shape[1], self.heads_at(site.layer, site.model_heads(q.shape[1])[1]))
        plan = self._plan(q.shape[1], heads, site.q_offset, site.causal, site.kv_shift, q.device)
        if site.kv_shift is None:  # a per-batch shift tensor is not a key: such plans are built per call
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[key] = (id(self), plan)
        return self._small(plan, q, k, site)

    def _small(self, plan: Plan | None, q, k, site: Site) -> Plan | None:
        """``plan`` with ``Plan.direct`` for a small call (``_sink_scores.small_ok``: at most ``DIRECT_MAX``
        scores, no left padding, every row seeing a key): one score pass over every row gives the probabilities,
        the detection rows' column scores and the calibrated output (core runs it when the call has no mask, soft
        cap or other scale; else the kernel and the output step, as for any call). Without it such a call paid the kernel, a second pass
        over the detection rows' scores (every row, up to ``detect_rows`` queries) and the correction (2-3x stock
        at 64 tokens); above ``DIRECT_MAX`` a score pass over every row costs more than the flash kernel (3x at 256)."""
        if plan is None or not small_ok(q, k, site):
            return plan
        B, H = q.shape[:2]
        heads = call_heads(site, H, self.heads_at(site.layer, site.model_heads(H)[1]))
        p, col = small_call(q, k, site.q_offset, site.causal, self.detect_rows)
        hidx = None if heads == list(range(H)) else torch.tensor(heads, device=q.device)
        call = _Call(site.q_offset, site.causal, None, None, q.shape[-1] ** -0.5, None, hidx)
        sink, m = self._pick(col if hidx is None else col[:, hidx], call)
        if m:  # sink columns' probabilities times beta, rows renormalised: the same as log(beta) on their scores
            scaled = torch.where(sink, self.beta, 1.0).to(p.dtype)  # (B, h, Skv)
            if hidx is not None:
                scaled = torch.ones(B, H, p.shape[-1], dtype=p.dtype, device=p.device).index_copy_(1, hidx, scaled)
            p = p * scaled[:, :, None, :]
            p = p / p.sum(-1, keepdim=True)
        return with_direct(plan, probs_direct(p, k.shape[1], q.dtype))

    def _plan(self, H, heads, q_offset, causal, kv_shift, device) -> Plan | None:
        if not heads:
            return None
        hidx = None if heads == list(range(H)) else torch.tensor(heads, device=device)

        def output(out, q, k, v, scale, mask=None, softcap=None, lse=None):  # core passes the call's mask, softcap, LSE
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return self._calibrate(out, q, k, v, _Call(q_offset, causal, kv_shift, mask, scale, softcap, hidx), lse)

        return Plan(output=output, name=repr(self))
