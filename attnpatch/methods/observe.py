"""``Observed``: run a method unchanged while callbacks watch its plans.

The one wrapper for measuring a method in place (mask recall, block density, the mask of the
first call): it forwards the whole ``Method`` protocol to the inner method, so a patcher treats
``Observed(m, ...)`` exactly as ``m`` (PAG still gets its guidance wrapper, SinkWindow(evict=True)
still evicts), and after every ``head_plans`` call it calls each watcher with
``(q, k, site, groups)``, ``groups`` the ``[(heads, Plan | None)]`` the call runs::

    densities = []
    def watch(q, k, site, groups):
        densities.extend(1.0 if p is None or p.blocks is None else p.blocks.density() for _, p in groups)
    with ap.patch(model, Observed(ap.TopKBlocks(keep=0.1), watch)):
        model(**inputs)
"""
from __future__ import annotations

from typing import Callable

from ..site import Site
from .base import Method

Watcher = Callable[..., None]  # watcher(q, k, site, groups) -> None


class Observed(Method):
    """``inner`` with ``watchers`` called after each of its ``head_plans`` calls."""

    def __init__(self, inner: Method, *watchers: Watcher):
        if not isinstance(inner, Method):
            raise TypeError(f"Observed(inner=...) needs an attnpatch Method instance, got {type(inner).__name__}; "
                            "e.g. Observed(attnpatch.SinkWindow(), watcher)")
        for w in watchers:
            if not callable(w):
                raise TypeError(f"Observed watchers are callables watcher(q, k, site, groups), got {type(w).__name__}")
        self.inner, self.watchers = inner, watchers

    # --- the Method protocol, forwarded -------------------------------------------------------
    @property
    def llm(self) -> bool:
        return self.inner.llm

    @property
    def guidance(self) -> bool:
        return self.inner.guidance

    @property
    def needs_roles(self) -> bool:
        return self.inner.needs_roles

    @property
    def rows_coupled(self) -> bool:
        return self.inner.rows_coupled

    def bind_model(self, model) -> None:
        self.inner.bind_model(model)

    def kv_policy(self):
        return self.inner.kv_policy()

    def guides(self, step):
        return self.inner.guides(step)

    def guidance_weight(self) -> float:
        return self.inner.guidance_weight()

    def plan(self, q, k, site: Site):
        return self.inner.plan(q, k, site)

    def head_plans(self, q, k, site: Site) -> list:
        groups = self.inner.head_plans(q, k, site)
        for watch in self.watchers:
            watch(q, k, site, groups)
        return groups

    def reset(self) -> None:
        self.inner.reset()

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr: str):
        """The inner method's own parameters (e.g. ``dense_steps`` for a report label) read through
        the wrapper; only called for names not found here (the protocol is forwarded above)."""
        if attr.startswith("__") or attr in ("inner", "watchers"):  # copy / pickle probes, half-built objects
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __eq__(self, other) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return repr(self.inner)
