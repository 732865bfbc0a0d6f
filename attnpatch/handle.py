"""``Handle``: the undo stack of one patch, also a context manager."""
from __future__ import annotations

import weakref
from typing import Callable

_HANDLES: "weakref.WeakKeyDictionary[object, Handle]" = weakref.WeakKeyDictionary()


class Handle:
    """Returned by ``attnpatch.patch``. ``remove()`` (or leaving a ``with`` block, or
    ``attnpatch.unpatch(obj)``) restores processors, hooks and ``attn_implementation``."""

    def __init__(self, obj, method, backend, modules: list[str], undo: list[Callable[[], None]]):
        self.obj = obj
        self.method = method
        self.backend = backend
        self.modules = modules  # names of the attention modules now routed through attnpatch
        self._undo = undo
        _HANDLES[obj] = self

    @property
    def active(self) -> bool:
        return _HANDLES.get(self.obj) is self

    def remove(self) -> None:
        """Undo the patch; later calls are no-ops."""
        while self._undo:
            self._undo.pop()()
        if _HANDLES.get(self.obj) is self:
            del _HANDLES[self.obj]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<attnpatch.Handle {self.method} on {type(self.obj).__name__}: {len(self.modules)} modules, {state}>"


def handle_of(obj) -> Handle | None:
    return _HANDLES.get(obj)
