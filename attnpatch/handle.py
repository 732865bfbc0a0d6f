"""``Handle``: the undo stack of one patch, also a context manager, and its call counters.

A handle lives on the object it patched (``obj._attnpatch_handle``), so ``copy.deepcopy`` of a
patched model copies it with the model: the copy is patched with the same method, counts its own
calls and is undone by ``unpatch(copy)`` without touching the original (and the other way round).
For that, every undo step and every hook is an object or a bound method, never a closure:
``deepcopy`` maps the modules they reference onto the copy's.
"""
from __future__ import annotations

import copy
import threading
from collections import Counter
from typing import Callable

from ._log import warning

ATTR = "_attnpatch_handle"


class SharesMethod:
    """Deep copies share ``self.method`` instead of copying it: a copied patched model uses the
    same method object as the original, as two models patched with one method do (methods keep
    caches and locks that are not the model's to copy)."""

    def __deepcopy__(self, memo):
        memo.setdefault(id(self.method), self.method)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


class Counters:
    """Calls of one patch, counted from any thread: routed through the method, handed back to
    stock attention (and why: each new reason is logged once at WARNING unless the method is
    dense), and not applicable (calls the patcher declines, e.g. text-only attention, and why).
    ``kv``: the KV-cache policy a patcher applies for the method (``Method.kv_policy()``, the transformers
    patcher's default ``KeepAll``), whose ``stats()`` join the snapshot as ``"kv_cache"``; None without one."""

    def __init__(self, label: str = "", warn: bool = True):
        self.label, self.warn = label, warn
        self._lock = threading.Lock()
        self.routed = 0
        self.handed_back: Counter = Counter()
        self.skipped: Counter = Counter()
        self.kv = None

    def route(self) -> None:
        with self._lock:
            self.routed += 1

    def hand_back(self, reason: str, where: str = "") -> None:
        with self._lock:
            new = reason not in self.handed_back
            self.handed_back[reason] += 1
        if new and self.warn:
            at = f" (first at {where})" if where else ""
            warning(f"{self.label} handed a call back to stock attention{at}: {reason}; "
                           "counted in handle.stats()")

    def skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = {"routed": self.routed, "handed_back": dict(self.handed_back), "skipped": dict(self.skipped)}
        if self.kv is not None:
            out["kv_cache"] = self.kv.stats()
        return out

    def __deepcopy__(self, memo):  # a copied model counts its own calls (and its own cache) from zero
        new = Counters(self.label, self.warn)
        memo[id(self)] = new
        new.kv = copy.deepcopy(self.kv, memo)
        return new


def _reasons(counts: dict) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), key=lambda rn: -rn[1]))


class Handle:
    """Returned by ``attnpatch.patch``. ``remove()`` (or leaving a ``with`` block, or
    ``attnpatch.unpatch(obj)``) restores processors, hooks and ``attn_implementation``.
    ``stats()`` / ``summary()`` say how many calls went through the method and which did not."""

    def __init__(self, obj, method, backend, modules: list[str], undo: list[Callable[[], None]],
                 counters: Counters | None = None):
        self.obj = obj
        self.method = method
        self.backend = backend
        self.modules = modules  # names of the attention modules now routed through attnpatch
        self._undo = undo
        self._counters = counters if counters is not None else Counters(repr(method))
        obj.__dict__[ATTR] = self

    @property
    def active(self) -> bool:
        return self.obj.__dict__.get(ATTR) is self

    def remove(self) -> None:
        """Undo the patch; later calls are no-ops."""
        while self._undo:
            self._undo.pop()()
        if self.active:
            del self.obj.__dict__[ATTR]

    def stats(self) -> dict:
        """``{"routed": n, "handed_back": {reason: n}, "skipped": {reason: n}}`` since ``patch``:
        attention calls computed by the method, calls handed back to stock attention (e.g.
        ``dropout_p > 0``, context parallelism, an unsupported processor) and calls the method does
        not apply to (e.g. text-only attention). A transformers patch (every method has a KV-cache
        policy there, by default ``KeepAll``; ``SinkWindow(evict=True)`` evicts) adds ``"kv_cache":
        {"evicted": tokens, "before": bytes, "after": bytes}``: what the latest cache's policed layers
        dropped, would hold, and hold."""
        return self._counters.snapshot()

    def summary(self) -> str:
        """The counters as one line, e.g. ``attnpatch: 120 calls through Radial(...), 8 handed
        back to stock attention (dropout_p > 0: 8)``."""
        s = self.stats()
        line = f"attnpatch: {s['routed']} calls through {self.method!r}"
        back, skip = s["handed_back"], s["skipped"]
        if back:
            line += f", {sum(back.values())} handed back to stock attention ({_reasons(back)})"
        if skip:
            line += f", {sum(skip.values())} not applicable ({_reasons(skip)})"
        return line

    def __deepcopy__(self, memo):
        """The handle of a deep copy of the patched object (see the module docstring)."""
        new = object.__new__(Handle)
        memo[id(self)] = new
        memo.setdefault(id(self.method), self.method)
        new.method, new.backend, new.modules = self.method, self.backend, list(self.modules)
        new.obj = copy.deepcopy(self.obj, memo)
        new._counters = copy.deepcopy(self._counters, memo)
        new._undo = copy.deepcopy(self._undo, memo)
        return new

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<attnpatch.Handle {self.method} on {type(self.obj).__name__}: {len(self.modules)} modules, {state}>"


def handle_of(obj) -> Handle | None:
    handle = getattr(obj, "__dict__", {}).get(ATTR)
    # a shallow copy (copy.copy) carries the original's handle: that one is not the copy's to undo
    return handle if isinstance(handle, Handle) and handle.obj is obj else None


def pop_attr(obj, name: str) -> None:
    """Undo step: drop an instance attribute that shadowed a class attribute (e.g. ``forward``)."""
    obj.__dict__.pop(name, None)
