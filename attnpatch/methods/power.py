"""``Power``: PowerAttention (2025). Causal; query i sees key j iff i - j < ``local`` or i - j is
a power of two, so d layers reach 2^d tokens back; the first ``sink`` tokens stay visible."""
from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..site import Site
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

    def plan(self, q, k, site: Site) -> Plan:
        if not site.causal:
            raise ValueError("Power is causal (LLM) attention; for image / video models use Neighborhood or Radial")
        local, sink, off, shift = self.local, self.sink, site.q_offset, site.kv_shift

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            power = (d > 0) & ((d & (d - 1)) == 0)
            pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute position: left padding is negative
            return ((d < local) | power | ((pos < sink) & (pos >= 0))) & (d >= 0)

        return Plan(mask_mod=mask_mod, name=repr(self))


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(Power(local=3, sink=1), Site(causal=True), 24))
