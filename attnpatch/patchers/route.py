"""Interception of diffusers' attention primitive, scoped to processor calls.

Processors call attention through a name in their own module: new-style ones through
``dispatch_attention_fn`` on ``(B, S, H, D)``, legacy ones through ``F.scaled_dot_product_attention``
on ``(B, H, S, D)``. While any patch is active, those module globals are replaced by routers
that send the call to attnpatch *only inside a wrapped processor* (a contextvar says which);
every other caller reaches the original function unchanged. The last unpatch restores them.
"""
from __future__ import annotations

import contextvars
import functools
import sys
import types

import torch.nn.functional as F

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("attnpatch_call", default=None)
_INSTALLED: dict[str, list] = {}  # module name -> [refcount, undo callables]


def _route(q, k, v, attn_mask, dropout_p, is_causal, scale):
    """attnpatch's result on (B, H, S, D), or None when the call is not ours to change."""
    call = _ACTIVE.get()
    if call is None or dropout_p:
        return None
    return call.run(q, k, v, mask=attn_mask, scale=scale, causal=is_causal)


def _make_dispatch(orig):
    @functools.wraps(orig)
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if parallel_config is None:
            # (B, S, H, D) -> (B, H, S, D) for the kernels, and back
            out = _route(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         attn_mask, dropout_p, is_causal, scale)
            if out is not None:
                return out.transpose(1, 2)
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                    parallel_config=parallel_config)

    return dispatch_attention_fn


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


def install(modname: str):
    """Route the attention primitive of processor module ``modname``; returns its undo."""
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
        entry = _INSTALLED[modname]
        entry[0] -= 1
        if entry[0] == 0:
            for u in reversed(entry[1]):
                u()
            del _INSTALLED[modname]

    return uninstall


class _Wrapped:
    """A processor that marks its calls as attnpatch's and otherwise is the original."""

    def __init__(self, inner, call):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_call", call)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):  # e.g. set_attention_backend() reaches the original
        setattr(self._inner, name, value)


@functools.lru_cache(maxsize=None)
def _wrapper_class(inner_cls: type) -> type:
    # diffusers passes a processor only the kwargs named in its __call__ signature, so the
    # wrapper's __call__ carries the original's signature (functools.wraps sets __wrapped__).
    @functools.wraps(inner_cls.__call__)
    def __call__(self, attn, *args, **kwargs):
        token = _ACTIVE.set(self._call)
        self._call.enter()
        try:
            return self._inner(attn, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return type(f"AttnPatched{inner_cls.__name__}", (_Wrapped,), {"__call__": __call__})


def wrap(processor, call):
    return _wrapper_class(type(processor))(processor, call)
