"""``VerticalSlash``: MInference's vertical-slash pattern for LLM prefill. From the last
``last_q`` queries, per batch row and head, estimate the most attended key columns (verticals)
and diagonals (slashes, by offset i - j); every query then sees those, the first ``sink`` keys
and its last ``window`` keys (causal). Decode calls (one query) stay dense, as in MInference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan
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

    def __post_init__(self):
        for name, example in (("verticals", 256), ("slashes", 256), ("last_q", 64), ("window", 64)):
            setattr(self, name, check_int("VerticalSlash", name, getattr(self, name), 1, example=example))
        self.sink = check_int("VerticalSlash", "sink", self.sink, 0, example=4)

    def estimate(self, q, k, off: int):
        """(verticals (B, H, Skv), slashes (B, H, Skv)) boolean keep tables."""
        B, H, Sq, D = q.shape
        Skv = k.shape[2]
        L = min(self.last_q, Sq)
        qs = q[:, :, -L:].float()
        kk = k.repeat_interleave(H // k.shape[1], 1).float()
        pos = torch.arange(Sq - L, Sq, device=q.device)[:, None] + off  # absolute positions of those queries
        j = torch.arange(Skv, device=q.device)[None, :]
        p = torch.softmax((qs @ kk.transpose(-1, -2) * D**-0.5).masked_fill(j > pos, float("-inf")), -1)  # (B, H, L, Skv)
        vert = p.sum(2)  # (B, H, Skv)
        diag = (pos - j).clamp(0, Skv - 1).expand(L, Skv)  # offset of each (query, key) pair
        slash = torch.zeros(B, H, Skv, device=q.device).index_add_(2, diag.flatten(), p.flatten(2))[..., :Skv]
        keep_v = torch.zeros(B, H, Skv, dtype=torch.bool, device=q.device)
        keep_v.scatter_(2, vert.topk(min(self.verticals, Skv), -1).indices, True)
        keep_s = torch.zeros_like(keep_v)
        keep_s.scatter_(2, slash.topk(min(self.slashes, Skv), -1).indices, True)
        return keep_v, keep_s

    def plan(self, q, k, site: Site) -> Plan | None:
        if not site.causal:
            raise ValueError("VerticalSlash is causal (LLM prefill) attention")
        if q.shape[2] == 1:
            return None  # decode: dense, as MInference
        off, sink, window, Skv, shift = site.q_offset, self.sink, self.window, k.shape[2], site.kv_shift
        keep_v, keep_s = self.estimate(q, k, off)

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            slash = keep_s[b, h, d.clamp(0, Skv - 1)]
            pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute position: left padding is negative
            return (keep_v[b, h, kv_idx] | slash | ((pos < sink) & (pos >= 0)) | (d < window)) & (d >= 0)

        return Plan(mask_mod=mask_mod, name=repr(self))


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
