"""The kernel registry. ``select`` runs the capable kernel with the lowest ``priority`` for
the plan on the device at hand (ties: registry order).

A kernel that cannot run a call says why (``why_not``); ``select`` falls back to the next one
and logs the reason (``ATTNPATCH_LOG=debug``). A named backend that cannot run raises.
"""
from __future__ import annotations

from .._log import debug_once
from .base import Kernel, check_qkv
from .reference import Reference
from .flex import Flex
from .sdpa import SDPA
from .tiles import Tiles
from .triton import Triton

_REGISTRY: list[Kernel] = [SDPA(), Triton(), Tiles(), Flex(), Reference()]


def register(kernel: Kernel, *, before: str | None = None) -> Kernel:
    """Add ``kernel`` to the registry (replacing one of the same name), ahead of ``before``
    or, by default, ahead of ``reference`` (the oracle stays last)."""
    if not getattr(kernel, "name", None):
        raise ValueError("a kernel needs a non-empty .name")
    _REGISTRY[:] = [k for k in _REGISTRY if k.name != kernel.name]
    target = before or "reference"
    idx = next((i for i, k in enumerate(_REGISTRY) if k.name == target), len(_REGISTRY))
    _REGISTRY.insert(idx, kernel)
    return kernel


def names() -> list[str]:
    """Kernel names in registry order."""
    return [k.name for k in _REGISTRY]


def get(name: str) -> Kernel:
    for k in _REGISTRY:
        if k.name == name:
            return k
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(names())}")


def release_buffers() -> int:
    """Free the buffers kernels keep between calls in the calling thread (``tiles`` keeps its
    tile-order copies of q, k, v and its last outputs, a few times the size of one layer's q);
    returns the bytes released. The next call allocates them again."""
    return sum(k.release() for k in _REGISTRY)


def select(q, k, v, plan, *, mask=None, backend: str | None = None) -> Kernel:
    """The first kernel (or the named ``backend``) able to run ``plan`` on these tensors."""
    if backend is not None:
        kernel = get(backend)
        reason = kernel.why_not(q, k, v, plan, mask)
        if reason:
            raise RuntimeError(f"backend {backend!r} cannot run plan {plan.name!r}: {reason}")
        return kernel
    reasons = []
    for kernel in sorted(_REGISTRY, key=lambda kern: kern.priority(q, plan)):
        reason = kernel.why_not(q, k, v, plan, mask)
        if reason is None:
            if reasons:
                debug_once(f"plan {plan.name!r} on {tuple(q.shape)}: using {kernel.name} ({'; '.join(reasons)})")
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    raise RuntimeError(f"no kernel can run plan {plan.name!r} on q {tuple(q.shape)}: " + "; ".join(reasons))


__all__ = ["Kernel", "check_qkv", "register", "names", "get", "select"]
