"""transformers patcher: an ``AttentionInterface`` entry plus an ``AttentionMaskInterface``
entry under one name, selected with ``model.set_attn_implementation``.

The attention function receives ``(B, Hq, Sq, D)`` / ``(B, Hkv, Skv, D)`` after RoPE and the
cache update. The mask entry is transformers' own SDPA mask builder: a boolean
``(B, 1, Sq, Skv)`` mask, or None when the call is plainly causal (upper-left aligned, the
``is_causal`` convention) or a single decode query without padding.
"""
from __future__ import annotations

import functools
import inspect

import torch

from .. import core
from .._log import warning
from ..handle import SharesMethod, handle_of, pop_attr
from ..methods.base import Dense, KeepAll
from ..site import Site
from . import SUPPORTED, layers as layer_sel
from .route import eager

NAME = "attnpatch"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_DENSE = Dense()
_registered = False


class _Layer(SharesMethod):  # a deep copy of the model shares the method (see attnpatch.handle)
    def __init__(self, method, backend, name, family, kv, counters=None):
        self.method, self.backend, self.name, self.family = method, backend, name, family
        self.kv = kv  # the patch's kv_cache.KVCache (the method's KV-cache policy, KeepAll by default)
        self.counters = counters  # the patch's attnpatch.handle.Counters
        self.heads: dict = {}  # query heads of a call -> (the model's index of each, the model's head count)


def _site(module, key, Sq: int, attention_mask, kwargs, layer: "_Layer | None", H: int = 0) -> Site:
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # key index of query 0: the cache before this call, except under the is_causal
    # convention (no mask, Sq > 1) where SDPA aligns causality to the upper left
    Skv = key.shape[2]
    q_offset = Skv - Sq if (attention_mask is not None or Sq == 1) else 0
    idx = int(getattr(module, "layer_idx", 0) or 0)
    shift = None
    pos = kwargs.get("position_ids")
    # keys from a KV-policy cache layer (SinkWindow(evict=True): [sink keys | a run ending at the
    # query]) are slots no single shift maps to positions: such calls are described in slot coordinates
    slots = layer is not None and layer.kv.in_slots(idx, key)
    if pos is not None and pos.dim() == 2 and not slots:
        # (B,) absolute position minus key index of the last query: -left padding, or what a
        # rolling cache has dropped
        shift = pos[:, -1] - (q_offset + Sq - 1)
        shift = shift if bool(shift.any()) else None
    heads, total, head_sum = _model_heads(module, H, layer) if layer is not None else (None, None, None)
    return Site.trusted(causal=causal, layer=idx, name=layer.name if layer else "",
                kind="self", family=layer.family if layer else "", q_offset=q_offset, kv_shift=shift, decode=Sq == 1,
                heads=heads, num_heads=total, head_sum=head_sum)


def _visible(module, key, value, mask, Sq: int, kwargs) -> tuple:
    """(keys, values, mask) without the slots after the last key the last query can see: views, no copy.
    Why: transformers' StaticCache (``cache_implementation="static"``, what torch.compile users run) hands
    every call all its slots, keys at their cache positions and empty slots after them. Methods read a
    call's keys as ending at its last query (``q_offset = Skv - Sq``); over the empty slots a decode query
    sat at the last slot and SinkWindow's window / Power's distances missed the real keys. The last key
    seen: from the mask (one element read when the keys do end at the query), or, for a causal call
    without one (upper-left aligned: query i sees keys <= i), key Sq - 1."""
    Skv = key.shape[2]
    if Skv <= Sq:
        return key, value, mask
    if mask is None:
        is_causal = kwargs.get("is_causal")
        if Sq == 1 or not bool(getattr(module, "is_causal", True) if is_causal is None else is_causal):
            return key, value, mask
        end = Sq
    else:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != Skv or bool(mask[..., -1, -1].any()):
            return key, value, mask
        seen = mask[..., -1, :].reshape(-1, Skv).any(0)  # keys some row's last query sees
        if not bool(seen.any()):
            return key, value, mask
        end = int(seen.nonzero().max()) + 1
        mask = mask[..., :end]
    return key[:, :, :end], value[:, :, :end], mask


def _model_heads(module, H: int, layer: "_Layer") -> tuple:
    """(the model's index of each of the call's ``H`` query heads, the model's head count, a sum over the
    ranks sharing the heads), or Nones when the call holds every head. Under tensor parallelism
    (``tp_plan="auto"``: q/k/v_proj colwise) a rank's call holds the heads of its rows of ``q_proj``;
    per-head profiles and head lists name the model's heads, so the Site says which ones, and estimates
    averaged over heads (TopKBlocks) sum over the TP group (cached per layer: the split never changes)."""
    got = layer.heads.get(H)
    if got is None:
        got = layer.heads.setdefault(H, _shard_heads(module, H))
    return got


def _shard_heads(module, H: int) -> tuple:
    total = getattr(getattr(module, "config", None), "num_attention_heads", H)
    if H == total:
        return None, None, None
    weight = getattr(getattr(module, "q_proj", None), "weight", None)
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):  # fewer heads than the config says, and no shard to say which: refuse
        raise RuntimeError(f"attnpatch: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) attends with "
                           f"{H} of the model's {total} heads, but its q_proj is not a tensor-parallel DTensor, so "
                           "which heads it holds is unknown (per-head parameters would index the wrong heads)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    # colwise sharding: this rank's rows of q_proj, i.e. query heads [first, first + H) (torch.chunk order)
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    D = weight.shape[0] // total
    if shape[0] != H * D or offset[0] % D:
        raise RuntimeError(f"attnpatch: {type(module).__name__} holds q_proj rows [{offset[0]}, {offset[0] + shape[0]}) "
                           f"of {weight.shape[0]}, which are not the {H} whole heads of {D} rows its call attends with")
    first = offset[0] // D
    dims = [i for i, p in enumerate(weight.placements) if p.is_shard(0)]
    if len(dims) != 1:
        raise RuntimeError(f"attnpatch: q_proj of {type(module).__name__} is split over mesh dims {dims} of "
                           f"{weight.device_mesh}; attnpatch runs tensor parallelism over one mesh dimension")
    import torch.distributed as dist

    head_sum = functools.partial(dist.all_reduce, group=weight.device_mesh.get_group(dims[0]))
    return tuple(range(first, first + H)), total, head_sum


@eager  # under torch.compile: plans come from Python state dynamo cannot trace (see route.eager)
def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``(out (B, Sq, Hq, D), None)``."""
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("attnpatch does not support learned attention sinks or position biases yet")
    layer = getattr(module, "_attnpatch", None)
    if layer is None or not layer.kv.policy.evicts:  # an evicting policy refuses a static cache
        key, value, attention_mask = _visible(module, key, value, attention_mask, query.shape[2], kwargs)
    site = _site(module, key, query.shape[2], attention_mask, kwargs, layer, query.shape[1])
    if attention_mask is not None and layer is not None and layer.kv.policy.evicts \
            and attention_mask.shape[-1] != key.shape[2]:
        # transformers sizes one mask for all full-attention layers from the first one's cache; under a policy that
        # trims some layers only (StreamingHeads) the others hold more keys. The policy refuses padded batches, so
        # the mask says causality only, which the site already does (q_offset): drop it
        attention_mask = None
    method, backend = (layer.method, layer.backend) if layer else (_DENSE, None)
    if layer is not None and layer.counters is not None:
        layer.counters.route()
    split = layer.kv.split_of(site.layer, key) if layer is not None else None
    if split is not None:
        out = _split_call(query, key, value, split, method, backend, site, scaling, kwargs.get("softcap"))
        return out.transpose(1, 2).contiguous(), None
    out = core.run(query, key, value, method, site, backend=backend, mask=attention_mask, scale=scaling,
                   softcap=kwargs.get("softcap"))  # (B, Hq, Sq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, D)


def _split_call(query, key, value, split, method, backend, site: Site, scaling, softcap):
    """A layer whose cache is split per KV head (kv_cache.PolicyLayer): the query heads of the whole KV heads
    attend to ``key`` / ``value`` at their positions, the others to the trimmed heads' slots ([sink | a run
    ending at the query], where the method's mask is exact); each call's Site names its heads in the model's
    numbering, so the method gives every head its own plan. No mask: the policy refuses padded batches."""
    sk, sv, full, stream = split
    B, H, Sq, _ = query.shape
    rep = H // (len(full) + len(stream))
    out = query.new_empty(B, H, Sq, value.shape[-1])
    for kv, k, v in ((full, key, value), (stream, sk, sv)):
        heads = (kv[:, None] * rep + torch.arange(rep, device=kv.device)).flatten()
        part = Site.trusted(causal=True, layer=site.layer, name=site.name, kind="self", family=site.family,
                            q_offset=k.shape[2] - Sq, decode=Sq == 1, heads=tuple(heads.tolist()), num_heads=H)
        out.index_copy_(1, heads, core.run(query.index_select(1, heads), k, v, method, part, backend=backend,
                                           scale=scaling, softcap=softcap))
    return out


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


LLM_METHODS = "SinkWindow, Power, VerticalSlash, TopKBlocks, HyperAttention, Temperature, EntropyScale, SinkCalibration or Dense"


def _check_method(method, model) -> None:
    """Methods that need a visual token grid or a denoiser's batch roles (class attribute
    ``llm = False``) cannot run in a causal decoder: refuse them now, not at the first forward."""
    if not method.llm:
        raise TypeError(f"{method.name} is an image / video (diffusion) method and cannot run in the causal "
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
    H = getattr(config, "num_attention_heads", None)
    heads = (H, getattr(config, "num_key_value_heads", None) or H) if H else None
    kv = _kv_cache(method, [l for l, n, _ in entries if n in chosen], len(chosen) < len(entries), counters, heads)
    orig_impl = config._attn_implementation
    undo, names = [], []
    for _, name, m in entries:
        if name in chosen:
            m._attnpatch = _Layer(method, backend, name, family, kv, counters)
            undo.append(functools.partial(delattr, m, "_attnpatch"))  # partials, not closures: deepcopy maps m
            names.append(name)
    model.set_attn_implementation(NAME)
    undo.insert(0, functools.partial(model.set_attn_implementation, orig_impl))
    undo += kv.install(model)
    model.set_attn_implementation = _SwitchUnpatches(model)
    undo.append(functools.partial(pop_attr, model, "set_attn_implementation"))
    return names, undo


def _kv_cache(method, layers: list[int], subset: bool, counters, heads=None):
    """The method's KV-cache policy (``Method.kv_policy()``, by default ``KeepAll``) as this patch's ``KVCache``;
    its statistics are reported by the patch's counters (``Handle.stats()["kv_cache"]``)."""
    policy = method.kv_policy() or KeepAll()  # every key, appended in place (no whole-cache copy per token)
    if subset and not getattr(policy, "optional", False):  # KeepAll keeps every key: any layers
        if not policy.evicts:  # Quest: its page tables sit beside every layer's cache
            raise ValueError(f"{method}: its KV-cache policy covers every layer, so it needs every layer patched; drop "
                             "layers=... and keep layers dense with the method's dense_layers=...")
        raise ValueError(f"{method}: its KV-cache policy trims the cache of every layer (the model sizes its masks from "
                         "one cache length), so it needs every layer patched; drop layers=... or use evict=False")
    from .kv_cache import KVCache

    if counters is not None:
        counters.kv = policy
    return KVCache(policy, layers, repr(method), heads)


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


def cache_name(model) -> str:
    """The forward keyword of a model's KV cache: ``cache`` where the installed transformers has it
    (5.24 deprecates ``past_key_values``, removal planned for 5.40), else ``past_key_values`` (5.20-5.23)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned, under either name (``cache`` read first: reading
    ``past_key_values`` of a 5.24 output logs a deprecation)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def _cache_bytes(cache) -> int:
    held = lambda layer: layer.held() if hasattr(layer, "held") else (layer.keys, layer.values)  # noqa: E731
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", []) for t in held(layer) if torch.is_tensor(t))
