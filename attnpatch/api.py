"""The one-line verbs: ``patch`` and ``unpatch``."""
from __future__ import annotations

from . import kernels
from .core import check_method
from .handle import Handle, handle_of
from .patchers import patch_object


def patch(obj, method, *, backend: str | None = None, layers=None) -> Handle:
    """Route the attention of ``obj`` (a diffusers pipeline or model, or a transformers model)
    through ``method``. ``layers`` picks attention layers by index or module-name pattern;
    ``backend`` forces a kernel. Patching a patched object replaces its patch. The returned
    ``Handle`` undoes it (``with attnpatch.patch(...):`` scopes it)."""
    check_method(method)
    if backend is not None:
        kernels.get(backend)  # unknown names raise here, listing the available ones
    old = handle_of(obj)
    if old is not None:
        old.remove()
    modules, undo = patch_object(obj, method, backend, layers)
    return Handle(obj, method, backend, modules, undo)


def unpatch(obj) -> None:
    """Restore ``obj`` exactly as it was before ``patch``. Raises if it is not patched."""
    handle = handle_of(obj)
    if handle is None:
        raise ValueError(f"this {type(obj).__name__} is not patched by attnpatch")
    handle.remove()
