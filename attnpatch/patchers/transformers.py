"""transformers patcher: an ``AttentionInterface`` entry plus an ``AttentionMaskInterface``
entry under one name, selected with ``model.set_attn_implementation``.

The attention function receives ``(B, Hq, Sq, D)`` / ``(B, Hkv, Skv, D)`` after RoPE and the
cache update. The mask entry is transformers' own SDPA mask builder: a boolean
``(B, 1, Sq, Skv)`` mask, or None when the call is plainly causal (upper-left aligned, the
``is_causal`` convention) or a single decode query without padding.
"""
from __future__ import annotations

import functools
import threading

import torch

from .. import core
from .._log import warning
from ..handle import SharesMethod, handle_of, pop_attr
from ..methods.base import Dense
from ..site import Site
from . import SUPPORTED, layers as layer_sel

NAME = "attnpatch"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_DENSE = Dense()
_registered = False


class _Layer(SharesMethod):  # a deep copy of the model shares the method (see attnpatch.handle)
    def __init__(self, method, backend, name, family, eviction=None, counters=None):
        self.method, self.backend, self.name, self.family = method, backend, name, family
        self.eviction = eviction  # the model's _Eviction under SinkWindow(evict=True), else None
        self.counters = counters  # the patch's attnpatch.handle.Counters


def _site(module, Sq: int, Skv: int, attention_mask, kwargs, layer: "_Layer | None") -> Site:
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # key index of query 0: the cache before this call, except under the is_causal
    # convention (no mask, Sq > 1) where SDPA aligns causality to the upper left
    q_offset = Skv - Sq if (attention_mask is not None or Sq == 1) else 0
    idx = int(getattr(module, "layer_idx", 0) or 0)
    shift = None
    pos = kwargs.get("position_ids")
    # a cache that SinkWindow(evict=True) trimmed holds [sink keys | a run ending at the query]: no
    # single shift maps its slots to positions, so its calls are described in slot coordinates
    trimmed = layer is not None and layer.eviction is not None and layer.eviction.trimmed(idx)
    if pos is not None and pos.dim() == 2 and not trimmed:
        # (B,) absolute position minus key index of the last query: -left padding, or what a
        # rolling cache has dropped
        shift = pos[:, -1] - (q_offset + Sq - 1)
        shift = shift if bool(shift.any()) else None
    return Site(causal=causal, layer=idx, name=layer.name if layer else "",
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


LLM_METHODS = "SinkWindow, Power, VerticalSlash, TopKBlocks, Temperature, EntropyScale, SinkCalibration or Dense"


def _check_method(method, model) -> None:
    """Methods that need a visual token grid or a denoiser's batch roles (class attribute
    ``llm = False``) cannot run in a causal decoder: refuse them now, not at the first forward."""
    if not method.llm:
        raise TypeError(f"{type(method).__name__} is an image / video (diffusion) method and cannot run in the causal "
                        f"decoder {type(model).__name__}: it needs a visual token grid or a denoiser's guidance batch; "
                        f"for LLMs use {LLM_METHODS}")


def patch_model(model, method, backend, layers, counters=None):
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise TypeError(f"attnpatch does not support {type(model).__name__} (model_type {family!r}); supported: {SUPPORTED}")
    _check_method(method, model)
    _register()
    method.bind_model(model)  # e.g. a calibration profile checks it was made for this model
    entries = [(m.layer_idx, name, m) for name, m in model.named_modules()
               if getattr(m, "layer_idx", None) is not None and hasattr(m, "q_proj")]
    chosen = layer_sel.select([(l, n) for l, n, _ in entries], layers)
    eviction = _Eviction(method, [l for l, n, _ in entries if n in chosen]) if getattr(method, "evict", False) else None
    if eviction is not None and len(chosen) < len(entries):
        raise ValueError(f"{method}: evict=True trims the KV cache of every layer (the model sizes its masks from one "
                         "cache length), so it needs every layer patched; drop layers=... or use evict=False")
    orig_impl = config._attn_implementation
    undo, names = [], []
    for _, name, m in entries:
        if name in chosen:
            m._attnpatch = _Layer(method, backend, name, family, eviction, counters)
            undo.append(functools.partial(delattr, m, "_attnpatch"))  # partials, not closures: deepcopy maps m
            names.append(name)
    model.set_attn_implementation(NAME)
    undo.insert(0, functools.partial(model.set_attn_implementation, orig_impl))
    if eviction is not None:
        undo += eviction.install(model)
    model.set_attn_implementation = _SwitchUnpatches(model)
    undo.append(functools.partial(pop_attr, model, "set_attn_implementation"))
    return names, undo


class _SwitchUnpatches:
    """``model.set_attn_implementation`` while patched. attnpatch runs as the model's attention
    implementation, so choosing another one ends the patch: it is removed first (loudly), and the
    handle says so, instead of the model running stock attention under an "active" handle."""

    def __init__(self, model):
        self.model = model  # an object, not a closure: deepcopy maps it onto the copy

    def __call__(self, *args, **kwargs):
        handle = handle_of(self.model)
        if handle is not None:
            warning(f"set_attn_implementation on a model patched with {handle.method!r}: the patch is removed "
                    "first (attnpatch is the model's attention implementation); call attnpatch.patch again to re-apply")
            handle.remove()
        return type(self.model).set_attn_implementation(self.model, *args, **kwargs)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)
               if torch.is_tensor(t))


def _cache_of(kwargs):
    """The KV cache of a forward's kwargs or output (transformers 5.24 renamed past_key_values to cache)."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


class _Eviction:
    """SinkWindow(evict=True) on one model: after every forward, trim each patched full-attention
    layer's cache to the first ``sink`` and the last ``window - 1`` keys (the next query makes
    ``window``); rolling (sliding-window) caches already bound themselves and stay as they are.

    State lives where it belongs, so threads and models sharing the method never meet: what a
    cache holds is recorded on the cache (``_attnpatch_trimmed``: the trimmed layers;
    ``_attnpatch_seen``: tokens it has absorbed), and the forward hooks hand the current cache's
    trimmed layers to this thread's attention calls through a thread-local."""

    def __init__(self, method, layers):
        self.method, self.layers, self.local = method, set(layers), threading.local()
        self.memory = None  # {"before", "after"} bytes of this model's latest trimmed cache

    def __deepcopy__(self, memo):  # a deep copy of the model trims its own caches; the method is shared
        new = _Eviction(self.method, self.layers)
        memo[id(self)] = new
        return new

    def trimmed(self, layer_idx: int) -> bool:
        return layer_idx in getattr(self.local, "layers", ())

    def install(self, model) -> list:
        h1 = model.register_forward_pre_hook(self._pre, with_kwargs=True)
        h2 = model.register_forward_hook(self._post, with_kwargs=True)
        return [h1.remove, h2.remove]

    def _pre(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("SinkWindow(evict=True) needs an unpadded batch (left padding would keep pad slots as the sink)")
        cache = _cache_of(kwargs)
        self._check_cache(cache)
        self.local.layers = getattr(cache, "_attnpatch_trimmed", frozenset())
        if self.local.layers and kwargs.get("position_ids") is None:
            # transformers numbers new tokens from the cache length, which eviction shortened
            x = kwargs.get("input_ids", args[0] if args else None)
            x = kwargs.get("inputs_embeds") if x is None else x
            kwargs["position_ids"] = torch.arange(x.shape[1], device=x.device)[None] + cache._attnpatch_seen
            return args, kwargs
        return None

    def _check_cache(self, cache) -> None:
        """Only the default dynamic cache can be trimmed by replacing its tensors (a static cache's
        size is fixed, a quantised one keeps more state than its keys and values)."""
        from transformers.cache_utils import DynamicLayer

        for i, layer in enumerate(getattr(cache, "layers", ())):
            if i in self.layers and type(layer) is not DynamicLayer and not getattr(layer, "is_sliding", False):
                raise ValueError(f"SinkWindow(evict=True) trims the default DynamicCache; layer {i} of this cache is a "
                                 f"{type(layer).__name__}: generate without cache_implementation=... / a custom cache, "
                                 "or use evict=False")

    def _post(self, module, args, kwargs, output):
        self.local.layers = frozenset()
        cache = _cache_of(output)
        keep, sink, window = self.method.sink + self.method.window - 1, self.method.sink, self.method.window
        idx = [i for i in sorted(self.layers) if cache is not None and i < len(getattr(cache, "layers", ()))
               and not getattr(cache.layers[i], "is_sliding", False) and torch.is_tensor(cache.layers[i].keys)]
        layers = [cache.layers[i] for i in idx]
        if not layers or layers[0].keys.shape[2] <= keep:
            return
        # positions absorbed so far: one past the last position this forward used
        seen = int(kwargs["position_ids"].max()) + 1 if kwargs.get("position_ids") is not None else layers[0].keys.shape[2]
        before = _cache_bytes(cache)
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)  # (B, H_kv, S, D)
                setattr(layer, name, torch.cat([t[:, :, :sink], t[:, :, t.shape[2] - (window - 1):]], 2))
        cache._attnpatch_trimmed = frozenset(idx)
        cache._attnpatch_seen = seen
        self.memory = self.method.memory = dict(before=before, after=_cache_bytes(cache))
