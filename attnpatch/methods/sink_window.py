"""``SinkWindow``: causal A-shape attention (StreamingLLM; When Attention Sink Emerges).

Query at absolute position i sees key j iff j <= i and (j < sink or i - j < window): the
first ``sink`` tokens plus the last ``window`` tokens, the query itself included. Positions are
absolute (``Site.kv_shift``): under left padding the sink is the first *real* tokens, and a
rolling cache that has dropped them keeps no sink.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..site import Site
from .base import Method, check_int


@dataclass
class SinkWindow(Method):
    """Causal: the first ``sink`` tokens plus the last ``window`` tokens (A-shape)."""

    source = "StreamingLLM; When Attention Sink Emerges (Gu et al. 2025); MInference A-shape"

    sink: int = 4
    window: int = 2048

    def __post_init__(self):
        check_int("SinkWindow", "sink", self.sink, 0)
        check_int("SinkWindow", "window", self.window, 1)

    def plan(self, q, k, site: Site) -> Plan:
        if not site.causal:
            raise ValueError(
                f"SinkWindow is causal (LLM) attention but {site.name or 'this site'} is not causal; "
                "for image / video models use a locality method such as Neighborhood"
            )
        sink, window, offset, shift = self.sink, self.window, site.q_offset, site.kv_shift

        def mask_mod(b, h, q_idx, kv_idx):
            kv_pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute key position
            sunk = (kv_pos < sink) & (kv_pos >= 0)  # negative positions are left padding
            return sunk | (q_idx + offset - kv_idx < window)

        return Plan(mask_mod=mask_mod, name=f"SinkWindow(sink={sink}, window={window})")


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(SinkWindow(sink=2, window=4), Site(causal=True), 16))
