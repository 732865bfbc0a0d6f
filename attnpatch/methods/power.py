"""``Power``: PowerAttention (2025). Causal; query i sees key j iff i - j < ``local`` or i - j is
a power of two, so d layers reach 2^d tokens back; the first ``sink`` tokens stay visible."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import causal_states, default_tiles, from_states, overlap
from ..plan import Plan
from ..site import Site
from ._grid import Memo
from .base import Method, check_int


@dataclass
class Power(Method):
    """Local window plus keys at power-of-two distances (causal)."""

    source = "PowerAttention: Exponentially Scaling of Receptive Fields (2025)"

    local: int = 64
    sink: int = 4

    def __post_init__(self):
        self.local = check_int("Power", "local", self.local, 1, example=64)
        self.sink = check_int("Power", "sink", self.sink, 0, example=4)
        self._plans = Memo()

    def plan(self, q, k, site: Site) -> Plan:
        if not site.causal:
            raise ValueError("Power is causal (LLM) attention; for image / video models use Neighborhood or Radial")
        if site.kv_shift is not None or q is None:
            return self._plan(site)
        # without kv_shift the plan depends only on these: one Plan object per key, for every layer and
        # step, so kernels' caches keyed on its mask_mod (sdpa's materialised mask) hit
        S = q.shape[2]
        prefill = S == k.shape[2] and site.q_offset == 0  # a causal block structure lets tiles skip the future
        key = (self.local, self.sink, site.q_offset, S if prefill else None, str(q.device))
        return self._plans.get(key, lambda: self._plan(site, S if prefill else None))

    def blocks(self, S: int):
        """Causal block structure of a prefill of S tokens (the executor's default 1-D tile); None
        when one block would hold everything."""
        block = default_tiles((S,), (None,))[0]
        if S <= block:
            return None
        bounds = torch.cat([torch.arange(0, S, block), torch.tensor([S])])
        local, sink = self.local, self.sink
        powers = 2 ** torch.arange(max(1, (S - 1).bit_length()))  # distances 1, 2, 4, ... < S

        def count(rows, a, b):  # kept keys of row i in each block [a, b)
            r = rows[:, None]
            w_lo, s_hi = (r - local + 1).clamp_min(0), torch.clamp(r + 1, max=sink)
            near = overlap(w_lo, r + 1, a, b) + overlap(torch.zeros_like(r), s_hi, a, b) \
                - overlap(w_lo, torch.minimum(s_hi, r + 1), a, b)  # local window and sink, counted once
            j = r - powers[None, :]  # (R, P) keys at power-of-two distances
            far = (j >= 0) & (powers[None, :] >= local) & (j >= sink)  # those not in the window or the sink
            blk = torch.bucketize(j.clamp_min(0), b, right=True)
            return near.index_put_((torch.nonzero(far)[:, 0], blk[far]), torch.ones(()).long().expand(int(far.sum())),
                                   accumulate=True)

        return from_states(causal_states(count, bounds), bounds, None, causal=True)

    def _plan(self, site: Site, prefill: int | None = None) -> Plan:
        local, sink, off, shift = self.local, self.sink, site.q_offset, site.kv_shift

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            power = (d > 0) & ((d & (d - 1)) == 0)
            pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute position: left padding is negative
            return ((d < local) | power | ((pos < sink) & (pos >= 0))) & (d >= 0)

        blocks = self.blocks(prefill) if prefill and shift is None else None
        return Plan(mask_mod=mask_mod, blocks=blocks, name=repr(self), static=shift is None)


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(Power(local=3, sink=1), Site(causal=True), 24))
