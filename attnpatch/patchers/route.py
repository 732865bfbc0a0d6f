"""Interception of diffusers' attention primitive, scoped to attention-module calls.

Processors call attention through a name in their own module: new-style ones through
``dispatch_attention_fn`` on ``(B, S, H, D)``, legacy ones through ``F.scaled_dot_product_attention``
on ``(B, H, S, D)``. While any patch is active, those module globals are replaced by routers
that send the call to attnpatch *only inside a patched attention module's forward* (a contextvar
holds the current ``Frame``); every other caller reaches the original function unchanged. The
last unpatch restores them.

The processors themselves are never replaced: diffusers rebuilds, inspects and swaps them
(``load_ip_adapter`` calls ``processor.__class__()``, ``fuse_qkv_projections`` and
``set_attn_processor`` install new ones, IP-adapter processors are ``nn.Module``s holding weights),
so the patcher marks calls with hooks on the attention modules instead.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import threading
import types

import torch
import torch.nn.functional as F

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("attnpatch_frame", default=None)
_INSTALLED: dict[str, list] = {}  # module name -> [refcount, undo callables]
_LOCK = threading.Lock()
PRIMITIVES = ("dispatch_attention_fn", "scaled_dot_product_attention")


class Frame:
    """One patched attention module's forward in progress (per thread: a contextvar holds it)."""

    __slots__ = ("call", "row", "token")

    def __init__(self, call):
        self.call, self.row, self.token = call, 0, None


def enter(call) -> Frame:
    frame = Frame(call)
    frame.token = _ACTIVE.set(frame)
    return frame


def leave(call) -> None:
    frame = _ACTIVE.get()
    if frame is not None and frame.call is call:
        _ACTIVE.reset(frame.token)


def eager(fn):
    """``fn``, run eagerly under torch.compile (one graph break per call). attnpatch's attention builds
    its plans from Python state (the step, the grid, data-dependent block choices, cached kernel
    choices) that dynamo would otherwise trace into dozens of fragments, guard on per step, or fail
    on (data-dependent sizes). Outside compile this costs one ``is_compiling`` check (~0.1 us, where
    ``torch.compiler.disable`` alone costs ~0.7 us a call)."""
    off = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return (off if torch.compiler.is_compiling() else fn)(*args, **kwargs)

    return wrapper


@eager
def _route(q, k, v, attn_mask, dropout_p, is_causal, scale):
    """attnpatch's result on (B, H, S, D), or None when the call goes to the original function."""
    frame = _ACTIVE.get()
    if frame is None:
        return None  # not inside a patched attention module: not ours
    if dropout_p:
        frame.call.hand_back("dropout_p > 0")
        return None
    return frame.call.run(frame, q, k, v, mask=attn_mask, scale=scale, causal=is_causal)


def _make_dispatch(orig):
    @functools.wraps(orig)
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        out = _parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config) \
            if parallel_config is not None and not dropout_p else None
        if out is not None:
            return out
        # (B, S, H, D) -> (B, H, S, D) for the kernels, and back
        out = _route(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                     attn_mask, dropout_p, is_causal, scale)
        if out is not None:
            return out.transpose(1, 2)
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                    parallel_config=parallel_config)

    return dispatch_attention_fn


@eager
def _parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
    """diffusers' context parallelism: the method inside its Ulysses attention, or None: not ours."""
    frame = _ACTIVE.get()
    if frame is None:
        return None
    from .parallel import run

    return run(frame.call, frame, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config)


class _Functional(types.ModuleType):
    """Stands in for ``torch.nn.functional`` inside a processor module; only SDPA differs."""

    def __init__(self):
        super().__init__("torch.nn.functional")

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        out = _route(query, key, value, attn_mask, dropout_p, is_causal, scale)
        if out is not None:
            return out
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


_FUNCTIONAL = _Functional()


def interceptable(modname: str) -> bool:
    if modname in _INSTALLED:
        return True
    mod = sys.modules.get(modname)
    return mod is not None and (hasattr(mod, "dispatch_attention_fn") or getattr(mod, "F", None) is F)


def _names(code) -> set:
    """Global and attribute names a code object (and the functions nested in it) uses."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def _class_names(cls: type) -> set:
    """Names used by the functions a processor class defines (``__call__`` and its helpers)."""
    names = set()
    for c in cls.__mro__:
        if c.__module__.startswith(("builtins", "torch.")):
            continue  # object, nn.Module: not the processor's own code
        for f in vars(c).values():
            f = inspect.unwrap(getattr(f, "__func__", f))  # staticmethod / classmethod / decorated
            if isinstance(getattr(f, "__code__", None), types.CodeType):
                names |= _names(f.__code__)
    return names


@functools.lru_cache(maxsize=None)
def unsupported(cls: type) -> str | None:
    """Why attnpatch cannot route the attention of processors of class ``cls``, or None."""
    where = f"processor {cls.__name__} ({cls.__module__})"
    if not interceptable(cls.__module__):
        return f"{where} does not call attention through dispatch_attention_fn or F.scaled_dot_product_attention"
    if not _class_names(cls) & set(PRIMITIVES):
        return f"{where} computes attention itself (neither dispatch_attention_fn nor F.scaled_dot_product_attention)"
    return None


def install(modname: str):
    """Route the attention primitive of processor module ``modname``; returns its undo."""
    with _LOCK:
        if modname not in _INSTALLED:
            mod = sys.modules[modname]
            undo = []
            if hasattr(mod, "dispatch_attention_fn"):
                orig = mod.dispatch_attention_fn
                mod.dispatch_attention_fn = _make_dispatch(orig)
                undo.append(lambda: setattr(mod, "dispatch_attention_fn", orig))
            if getattr(mod, "F", None) is F:
                mod.F = _FUNCTIONAL
                undo.append(lambda: setattr(mod, "F", F))
            _INSTALLED[modname] = [0, undo]
        _INSTALLED[modname][0] += 1

    def uninstall():
        with _LOCK:
            entry = _INSTALLED[modname]
            entry[0] -= 1
            if entry[0] == 0:
                for u in reversed(entry[1]):
                    u()
                del _INSTALLED[modname]

    return uninstall


class Routes:
    """The processor modules one patch routes, each holding one reference on that module's
    routers. Modules are added when a processor of a new module first runs (one installed by
    ``set_attn_processor`` or an adapter loader after the patch). A deep copy of a patched model
    takes references of its own, so unpatching either model leaves the other one routed."""

    def __init__(self, modnames=()):
        self._lock = threading.Lock()
        self._undo: dict = {}
        for m in modnames:
            self.add(m)

    def add(self, modname: str) -> None:
        if modname in self._undo:
            return
        with self._lock:
            if modname not in self._undo:
                self._undo[modname] = install(modname)

    def __call__(self) -> None:  # the undo step: release every reference
        with self._lock:
            undo, self._undo = self._undo, {}
        for u in undo.values():
            u()

    def __deepcopy__(self, memo):
        new = Routes(list(self._undo))
        memo[id(self)] = new
        return new
