"""The one-line verbs: ``patch`` and ``unpatch``."""
from __future__ import annotations

import torch

from . import kernels
from .core import check_method
from .handle import Counters, Handle, handle_of
from .kernels.base import block_sparse_why_not
from .methods.base import Dense, Method
from .patchers import patch_object
from .plan import Plan


def _plan_free(method) -> bool:
    """True when ``method`` never makes a plan: every call is plain dense attention."""
    return type(method).plan is Method.plan and type(method).head_plans is Method.head_plans


def check_backend(method, backend: str) -> None:
    """Raise at patch time when the named backend can never run ``method``'s plans (rather than
    at the first forward): a block-sparse kernel given a method whose plans are all dense."""
    kernel = kernels.get(backend)  # unknown names raise here, listing the available ones
    if not _plan_free(method):
        return  # plans depend on the call: select() says at run time what a kernel cannot do
    probe = torch.zeros(1, 1, 16, 64)  # (B, H, S, D)
    reason = kernel.why_not(probe, probe, probe, Plan())
    if reason is not None and reason == block_sparse_why_not(probe, probe, probe, Plan(), None):
        raise ValueError(f"backend {backend!r} can never run {method!r}: it runs block-sparse plans only, and every plan "
                         f"of {type(method).__name__} is plain dense attention ({reason}); leave backend unset "
                         "(attnpatch picks a capable kernel) or use backend='sdpa'")


def patch(obj, method, *, backend: str | None = None, layers=None) -> Handle:
    """Route the attention of ``obj`` (a diffusers pipeline or model, or a transformers model)
    through ``method``. ``layers`` picks attention layers by index or module-name pattern;
    ``backend`` forces a kernel. Patching a patched object replaces its patch. The returned
    ``Handle`` undoes it (``with attnpatch.patch(...):`` scopes it) and counts the calls
    (``handle.stats()``, ``handle.summary()``)."""
    check_method(method)
    if backend is not None:
        check_backend(method, backend)
    old = handle_of(obj)
    if old is not None:
        old.remove()
    counters = Counters(repr(method), warn=not isinstance(method, Dense))
    modules, undo = patch_object(obj, method, backend, layers, counters)
    return Handle(obj, method, backend, modules, undo, counters)


def unpatch(obj) -> None:
    """Restore ``obj`` exactly as it was before ``patch``. Raises if it is not patched."""
    handle = handle_of(obj)
    if handle is None:
        raise ValueError(f"this {type(obj).__name__} is not patched by attnpatch")
    handle.remove()
