"""``SinkCalibration``: ACT, the attention calibration technique of "Unveiling and Harnessing
Hidden Attention Sinks" (Yu et al. 2024). In the chosen heads, key columns other than the first
``first`` tokens whose attention exceeds ``threshold`` times uniform (averaged over the call's
queries: the column mean of p_ij * n_i, n_i = keys query i sees) are sinks that waste attention;
their attention is scaled by ``beta`` and the rows renormalised, which equals adding log(beta) to
their scores. Computed exactly by merging two softmax partitions by their log-sum-exp: all keys,
and the (few) sink keys, so no S x S bias is materialised.

Heads come from a calibration run (``attnpatch.pipelines.calibrate``) saved as a safetensors
profile; ``bind_model`` checks the profile against the patched model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.lse import sdpa_lse_math
from ..plan import Plan
from ..site import Site
from .base import Method

PROFILE_KIND = "act-heads"


def load_profile(path) -> tuple[dict, dict]:
    """({layer: [heads]}, metadata) of a SinkCalibration profile (``attnpatch.pipelines.calibrate``)."""
    from ..checks import read_safetensors

    expected = (f"a SinkCalibration profile: a safetensors file with metadata kind={PROFILE_KIND!r} and a tensor "
                "'heads' (n, 2) of (layer, head) pairs")
    how = "write one with python -m attnpatch.pipelines.calibrate --out PATH (or pass heads=[(layer, head), ...])"
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
        if not 0 < self.beta <= 1:
            raise ValueError(f"SinkCalibration(beta={self.beta!r}) must be in (0, 1]")
        if self.threshold <= 0:
            raise ValueError(f"SinkCalibration(threshold={self.threshold!r}) must be positive")
        if self.heads is None or isinstance(self.heads, dict):
            self._heads = self.heads
        elif isinstance(self.heads, (list, tuple)):
            self._heads = {}
            for l, h in self.heads:
                self._heads.setdefault(int(l), []).append(int(h))
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
                                 "calibrate this model with python -m attnpatch.pipelines.calibrate")
        for l, hs in (self._heads or {}).items():
            if not 0 <= l < L or any(not 0 <= h < H for h in hs):
                raise ValueError(f"SinkCalibration(heads=...) names layer {l} heads {hs}; the model has {L} layers x {H} heads")

    def heads_at(self, layer: int, H: int) -> list[int]:
        return list(range(H)) if self._heads is None else self._heads.get(layer, [])

    @torch.no_grad()
    def sinks(self, q, k, off: int, causal: bool) -> torch.Tensor:
        """(B, h, Skv) boolean sink columns of heads q (B, h, Sq, D) / k (B, h, Skv, D)."""
        B, h, Sq, D = q.shape
        Skv = k.shape[2]
        col = torch.zeros(B, h, Skv, device=q.device)
        j = torch.arange(Skv, device=q.device)
        for s in range(0, Sq, 1024):  # query chunks bound the memory of the probabilities
            i = torch.arange(s, min(s + 1024, Sq), device=q.device)[:, None] + off
            sc = q[:, :, s:s + 1024].float() @ k.float().transpose(-1, -2) * D**-0.5
            if causal:
                sc = sc.masked_fill(j[None, :] > i, float("-inf"))
            n = (i + 1).clamp_max(Skv) if causal else torch.full_like(i, Skv)
            col += (torch.softmax(sc, -1) * n).sum(2)  # attention relative to uniform, summed over queries
        score = (col / Sq).masked_fill(j < self.first, 0.0)
        top = score.topk(min(self.max_sinks, Skv), -1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, top.indices, top.values > self.threshold)
        return keep

    def plan(self, q, k, site: Site) -> Plan | None:
        B, H, Sq, D = q.shape
        heads = self.heads_at(site.layer, H)
        if not heads:
            return None
        off, causal = site.q_offset, site.causal
        hidx = torch.tensor(heads, device=q.device)

        def output(out, q, k, v, scale):
            rep = q.shape[1] // k.shape[1]
            qh = q[:, hidx]
            kh, vh = k.repeat_interleave(rep, 1)[:, hidx], v.repeat_interleave(rep, 1)[:, hidx]
            sink = self.sinks(qh, kh, off, causal)  # (B, h, Skv)
            if not sink.any():
                return out
            m = int(sink.sum(-1).max())
            idx = sink.float().topk(m, -1).indices  # (B, h, m): sink columns first, padding after
            valid = sink.gather(2, idx)
            ks = kh.gather(2, idx[..., None].expand(-1, -1, -1, D))
            vs = vh.gather(2, idx[..., None].expand(-1, -1, -1, vh.shape[-1]))
            i = torch.arange(Sq, device=q.device)[:, None] + off
            keep = valid[:, :, None, :] & ((idx[:, :, None, :] <= i) if causal else True)  # (B, h, Sq, m)
            bias = torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
            full_bias = torch.zeros(1, 1, Sq, kh.shape[2], device=q.device)
            if causal:
                full_bias = full_bias.masked_fill(torch.arange(kh.shape[2], device=q.device) > i, float("-inf"))
            o_all, lse_all = sdpa_lse_math(qh, kh, vh, full_bias, scale)
            o_s, lse_s = sdpa_lse_math(qh, ks, vs, bias, scale)
            # softmax with sink weights beta: (N_all - (1 - beta) N_s) / (Z_all - (1 - beta) Z_s)
            w_s = (1 - self.beta) * torch.exp(lse_s - lse_all).nan_to_num(0.0)  # Z_s / Z_all
            num = o_all.float() - w_s[..., None] * o_s.float()
            cal = (num / (1 - w_s)[..., None]).to(out.dtype)
            out = out.clone()
            out[:, hidx] = cal
            return out

        return Plan(output=output, name=repr(self))
