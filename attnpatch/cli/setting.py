"""``Setting``: what one row of a compare report runs (its own module: compare and the
coarse-to-fine rows both build them, and neither imports the other for it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.base import Method
from . import caches


@dataclass
class Setting:
    """What one row of the report runs: stock attention, a method, a diffusers cache, or both."""
    method: Method | None = None
    cache: caches.Cache | None = None
    refine: object = None  # a refine_setting.Refine: the coarse-to-fine pipeline (--refine-from)

    @property
    def label(self) -> str:
        c2f = [self.refine.label] if self.refine is not None else []
        if self.method is None and self.cache is None:
            return " + ".join(["stock attention", *c2f])
        m = self.method
        parts = [] if m is None else [str(m) + (f" + dense_steps={m.dense_steps}" if hasattr(m, "dense_steps") else "")]
        return " + ".join(parts + ([str(self.cache)] if self.cache is not None else []) + c2f)

    @property
    def kind(self) -> str:
        kind = {(False, False): "stock", (True, False): "method", (False, True): "cache", (True, True): "method + cache"}[
            (self.method is not None, self.cache is not None)]
        return kind if self.refine is None else f"{kind} + coarse-to-fine"
