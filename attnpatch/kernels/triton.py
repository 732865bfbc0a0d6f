"""``triton`` placeholder until the Triton kernel lands in this file."""
from __future__ import annotations

from .base import Kernel


class Triton(Kernel):
    name = "triton"

    def why_not(self, q, k, v, plan, mask=None):
        return "not built yet"
