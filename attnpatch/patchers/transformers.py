"""transformers patcher: an ``AttentionInterface`` entry plus an ``AttentionMaskInterface``
entry under one name, selected with ``model.set_attn_implementation``.

The attention function receives ``(B, Hq, Sq, D)`` / ``(B, Hkv, Skv, D)`` after RoPE and the
cache update. The mask entry is transformers' own SDPA mask builder: a boolean
``(B, 1, Sq, Skv)`` mask, or None when the call is plainly causal (upper-left aligned, the
``is_causal`` convention) or a single decode query without padding.
"""
from __future__ import annotations

import functools

import torch

from .. import core
from ..handle import SharesMethod
from ..methods.base import Dense
from ..site import Site
from . import SUPPORTED, layers as layer_sel

NAME = "attnpatch"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_DENSE = Dense()
_registered = False


class _Layer(SharesMethod):  # a deep copy of the model shares the method (see attnpatch.handle)
    def __init__(self, method, backend, name, family, counters=None):
        self.method, self.backend, self.name, self.family = method, backend, name, family
        self.counters = counters  # the patch's attnpatch.handle.Counters


def _site(module, Sq: int, Skv: int, attention_mask, kwargs, layer: "_Layer | None") -> Site:
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # key index of query 0: the cache before this call, except under the is_causal
    # convention (no mask, Sq > 1) where SDPA aligns causality to the upper left
    q_offset = Skv - Sq if (attention_mask is not None or Sq == 1) else 0
    shift = None
    pos = kwargs.get("position_ids")
    if pos is not None and pos.dim() == 2:
        # (B,) absolute position minus key index of the last query: -left padding, or what a
        # rolling cache has dropped
        shift = pos[:, -1] - (q_offset + Sq - 1)
        shift = shift if bool(shift.any()) else None
    return Site(causal=causal, layer=int(getattr(module, "layer_idx", 0) or 0), name=layer.name if layer else "",
                kind="self", family=layer.family if layer else "", q_offset=q_offset, kv_shift=shift, decode=Sq == 1)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``(out (B, Sq, Hq, D), None)``."""
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("attnpatch does not support learned attention sinks or position biases yet")
    layer = getattr(module, "_attnpatch", None)
    site = _site(module, query.shape[2], key.shape[2], attention_mask, kwargs, layer)
    method, backend = (layer.method, layer.backend) if layer else (_DENSE, None)
    if layer is not None and layer.counters is not None:
        layer.counters.route()
    out = core.run(query, key, value, method, site, backend=backend, mask=attention_mask, scale=scaling,
                   softcap=kwargs.get("softcap"))  # (B, Hq, Sq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def patch_model(model, method, backend, layers, counters=None):
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise TypeError(f"attnpatch does not support {type(model).__name__} (model_type {family!r}); supported: {SUPPORTED}")
    _register()
    if hasattr(method, "bind_model"):
        method.bind_model(model)  # e.g. a calibration profile checks it was made for this model
    entries = [(m.layer_idx, name, m) for name, m in model.named_modules()
               if getattr(m, "layer_idx", None) is not None and hasattr(m, "q_proj")]
    chosen = layer_sel.select([(l, n) for l, n, _ in entries], layers)
    orig_impl = config._attn_implementation
    undo, names = [], []
    for _, name, m in entries:
        if name in chosen:
            m._attnpatch = _Layer(method, backend, name, family, counters)
            undo.append(functools.partial(delattr, m, "_attnpatch"))  # partials, not closures: deepcopy maps m
            names.append(name)
    model.set_attn_implementation(NAME)
    undo.insert(0, functools.partial(model.set_attn_implementation, orig_impl))
    if getattr(method, "evict", False):
        undo += _install_eviction(model, method)
    return names, undo


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)
               if torch.is_tensor(t))


def _install_eviction(model, method):
    """After every forward, trim the KV cache to the first ``sink`` and the last ``window - 1``
    keys (the next query makes ``window``); the method then knows every key left is visible."""
    def pre(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            method.evicted = False  # a new sequence
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("SinkWindow(evict=True) needs an unpadded batch (left padding would keep pad slots as the sink)")

    def post(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        keep = method.sink + method.window - 1
        if cache is None or cache.get_seq_length() <= keep:
            return
        before = _cache_bytes(cache)
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t[:, :, :method.sink], t[:, :, t.shape[2] - (method.window - 1):]], 2))
        method.evicted = True
        method.memory = dict(before=before, after=_cache_bytes(cache))

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    return [h1.remove, h2.remove, lambda: setattr(method, "evicted", False)]
