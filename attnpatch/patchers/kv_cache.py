"""A method's KV-cache policy (``Method.kv_policy()``, e.g. ``SinkWindow(evict=True)``'s
``SinkEviction``) as a transformers cache layer.

``PolicyLayer`` is a ``DynamicLayer`` whose held keys / values follow the policy: ``update``
returns every key this forward may use (what it held plus the new ones) and then keeps what the
policy retains. Positions stay absolute the way transformers' own ``DynamicSlidingWindowLayer``
keeps them: ``get_seq_length`` counts the tokens seen (so the model numbers new tokens and
builds RoPE correctly), and ``get_mask_sizes`` places the held keys just before the queries (a
causal mask is the same under that shift). ``KVCache`` is one patch's policy on one model: it
puts a ``PolicyLayer`` in place of each chosen full-attention layer of every cache the model is
called with, refuses caches it cannot apply to, and tells the attention calls whose keys came
from an evicting policy's layer (their slots are not positions: the patcher describes them in slot
coordinates, where the method's mask is exact). A policy that keeps some KV heads of a layer whole
(``policy.split(layer)``: StreamingHeads' retrieval heads) gets a per-head cache there: ``keys`` /
``values`` hold the whole KV heads at their positions, ``stream`` the trimmed ones' slots, and the
attention call is told both parts (``KVCache.split_of``), which it runs as two calls. A policy may also keep data of its own beside each
layer's keys (``policy.observe(layer, state, keys)`` after every update; Quest's page bounds), which
whatever reorders or cuts the keys (beam search, crop, reset) clears.
"""
from __future__ import annotations

import copy
import threading
import weakref

import torch
from transformers.cache_utils import DynamicLayer


class PolicyLayer(DynamicLayer):
    """One layer's cache under a retention policy (see the module docstring)."""

    def __init__(self, kv: "KVCache", layer_idx: int):
        super().__init__()
        self.kv, self.layer_idx = kv, layer_idx
        self.cumulative_length = 0  # tokens seen; reset() zeroes it
        self.state: dict = {}  # what the policy keeps beside this layer's keys (Quest's page bounds)
        self.stream = None  # a split layer's trimmed KV heads: (keys, values) (B, H_stream, slots, D)

    @classmethod
    def adopt(cls, layer: DynamicLayer, kv: "KVCache", layer_idx: int) -> "PolicyLayer":
        """A policy layer holding what a plain ``DynamicLayer`` holds (positions 0..n-1); the
        policy applies from its next update."""
        new = cls(kv, layer_idx)
        new.__dict__.update({k: v for k, v in layer.__dict__.items() if k in ("keys", "values", "is_initialized", "device")})
        new.cumulative_length = layer.get_seq_length()
        heads = new._heads(new.keys) if new.is_initialized and new.keys.dim() == 4 else None
        if heads is not None:  # whole KV heads stay at their positions, the others keep their sink + window
            full, stream = heads
            new.stream = kv.policy.retain(new.keys.index_select(1, stream), new.values.index_select(1, stream))
            new.keys, new.values = new.keys.index_select(1, full), new.values.index_select(1, full)
        return new

    def _heads(self, keys) -> tuple | None:
        """(KV heads kept whole, KV heads trimmed) as index tensors where the policy splits this layer, else None."""
        split = getattr(self.kv.policy, "split", None)
        full = split(self.layer_idx) if split is not None else None
        if not full:
            return None
        H = self.kv.kv_heads
        if H is not None and keys.shape[1] != H:
            raise ValueError(f"{self.kv.owner} keeps KV heads {list(full)} of layer {self.layer_idx} whole and trims the "
                             f"others, but this cache holds {keys.shape[1]} of the model's {H} KV heads (tensor "
                             "parallelism): use evict=False")
        got = self.__dict__.get("_head_idx")
        if got is None or got[0].device != keys.device:
            rest = [h for h in range(keys.shape[1]) if h not in full]
            got = self._head_idx = tuple(torch.tensor(x, dtype=torch.long, device=keys.device) for x in (full, rest))
        return got

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        policy = self.kv.policy
        heads = self._heads(key_states)
        if heads is not None:
            return self._update_split(key_states, value_states, *heads)
        if policy.evicts:
            keys = torch.cat([self.keys, key_states], dim=-2)  # (B, H_kv, held + new, D)
            values = torch.cat([self.values, value_states], dim=-2)
        else:
            keys, values = self._append(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys, self.values = policy.retain(keys, values)
        policy.observe(self.layer_idx, self.state, keys)
        token_bytes = sum(t[..., :1, :].numel() * t.element_size() for t in (key_states, value_states))
        policy.record(self.layer_idx, self.cumulative_length, self.keys.shape[-2], token_bytes)
        if policy.evicts:  # slots are not positions: the patcher describes such calls in slot coordinates
            self.kv.note(self.layer_idx, keys)
        return keys, values

    def _update_split(self, key_states, value_states, full, stream):
        """A split layer's update: the whole KV heads grow in place, the others are trimmed after this forward;
        returns the whole heads' keys / values and notes both parts for this forward's attention call."""
        policy, new = self.kv.policy, key_states.shape[-2]
        sk, sv = key_states.index_select(1, stream), value_states.index_select(1, stream)
        if self.stream is not None:
            sk, sv = torch.cat([self.stream[0], sk], 2), torch.cat([self.stream[1], sv], 2)
        keys, values = self._append(key_states.index_select(1, full), value_states.index_select(1, full))
        self.cumulative_length += new
        self.keys, self.values = keys, values
        self.stream = policy.retain(sk, sv)
        self.kv.note_split(self.layer_idx, keys, (sk, sv, full, stream))
        token_bytes = sum(t[..., :1, :].numel() * t.element_size() for t in (key_states, value_states))
        held = (len(full) * keys.shape[-2] + len(stream) * self.stream[0].shape[-2]) / key_states.shape[1]
        policy.record(self.layer_idx, self.cumulative_length, held, token_bytes)
        return keys, values

    def held(self) -> tuple:
        """The tensors this layer holds (a split layer's trimmed heads too), for memory accounting."""
        return tuple(t for t in (self.keys, self.values, *(self.stream or ())) if torch.is_tensor(t))

    def _append(self, key_states, value_states):
        """Keys / values with the new ones appended, as views of buffers with room to grow: a cache that
        keeps every key (KeepAll, Quest) then costs O(new tokens) per update, not the O(length) copy of
        DynamicLayer's cat. Buffers are re-seated whenever the held keys are not a
        prefix of them (reordered, cropped then regrown elsewhere, adopted) or full (grown by 1/4)."""
        held = self.keys if self.keys.dim() == 4 else None  # lazy_initialization leaves an empty 1-D tensor
        n, new = (0 if held is None else held.shape[-2]), key_states.shape[-2]
        bufs = self.__dict__.get("_bufs")
        if bufs is None or held is None or bufs[0].shape[-2] < n + new or held.data_ptr() != bufs[0].data_ptr() \
                or held.stride() != bufs[0].stride() or bufs[0].shape[:2] != key_states.shape[:2] \
                or bufs[0].dtype != key_states.dtype or bufs[0].device != key_states.device:
            # the first fill (a prefill) exactly: a cache that never decodes holds what DynamicLayer holds; room
            # comes with the first append after it (one copy, then a quarter more: below cat's 2x per step)
            cap = n + new + (max(256, (n + new) // 4) if held is not None else 0)
            bufs = tuple(t.new_empty(*t.shape[:-2], cap, t.shape[-1]) for t in (key_states, value_states))
            if held is not None:
                bufs[0][..., :n, :], bufs[1][..., :n, :] = held, self.values
            self._bufs = bufs
        bufs[0][..., n:n + new, :], bufs[1][..., n:n + new, :] = key_states, value_states
        return bufs[0][..., :n + new, :], bufs[1][..., :n + new, :]  # (B, H_kv, n + new, D) views

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, self.cumulative_length - held

    # whatever reorders or cuts the keys invalidates the policy's data beside them (rebuilt at the next update)
    # (a split layer's trimmed heads follow the same batch operations)
    def reset(self) -> None:
        self.state.clear()
        self.stream = None
        super().reset()

    def reorder_cache(self, beam_idx) -> None:
        self.state.clear()
        super().reorder_cache(beam_idx)
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices) -> None:
        self.state.clear()
        super().batch_select_indices(indices)
        self._batch(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state.clear()
        super().batch_repeat_interleave(repeats)
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _batch(self, fn) -> None:
        if self.stream is not None:
            self.stream = tuple(fn(t) for t in self.stream)

    def crop(self, tokens_to_remove: int) -> None:
        if self.stream is not None:
            raise ValueError(f"{self.kv.owner}: layer {self.layer_idx}'s cache is split per KV head (retrieval heads whole, "
                             "the others trimmed) and cannot be cropped (assisted / speculative generation): use evict=False")
        self.state.clear()
        held = self.keys.shape[-2] if self.is_initialized else 0
        super().crop(tokens_to_remove)  # refuses a positive count
        self.cumulative_length -= held - (self.keys.shape[-2] if self.is_initialized else 0)

    def __deepcopy__(self, memo):  # a copied cache keeps its patch's policy (it has locks, not data)
        memo.setdefault(id(self.kv), self.kv)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def _cache_of(kwargs):
    """The KV cache of a forward's kwargs (transformers 5.24 renamed past_key_values to cache)."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


class KVCache:
    """One patch's KV-cache policy on one model (see the module docstring). A forward pre-hook
    installs the policy on the cache the forward is given (a cache exists only once ``generate``
    or the caller made it; one the model makes itself gets it from its next forward)."""

    def __init__(self, policy, layers, owner: str = "", heads: tuple | None = None):
        """``heads``: the model's (query heads, KV heads), told to a policy that keeps some heads whole."""
        if heads is not None and hasattr(policy, "bind"):
            policy.bind(*heads)
        self.kv_heads = None if heads is None else heads[1]
        applies = getattr(policy, "applies", None)  # a policy may leave some layers whole (StreamingHeads)
        self.policy, self.local = policy, threading.local()
        self.layers = {i for i in layers if applies is None or applies(i)}
        self.owner = owner or repr(policy)  # the method, for error messages

    def __deepcopy__(self, memo):  # a deep copy of the model applies a fresh policy of its own
        new = KVCache(copy.deepcopy(self.policy, memo), self.layers, self.owner)
        new.kv_heads = self.kv_heads
        memo[id(self)] = new
        return new

    def install(self, model) -> list:
        hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)
        return [hook.remove]

    def note(self, layer_idx: int, keys: torch.Tensor) -> None:
        """Record, for this thread, the keys a policy layer just handed to ``layer_idx``."""
        notes = self.local.__dict__.setdefault("notes", {})
        notes[layer_idx] = weakref.ref(keys)

    def in_slots(self, layer_idx: int, key: torch.Tensor) -> bool:
        """Whether ``key`` (of the attention call running now) came from a policy layer."""
        ref = self.local.__dict__.get("notes", {}).get(layer_idx)
        return ref is not None and ref() is key

    def note_split(self, layer_idx: int, keys: torch.Tensor, parts: tuple) -> None:
        """Record, for this thread, a split layer's update: the whole heads' ``keys`` it returned and
        ``parts`` = (trimmed heads' keys, values (before trimming), whole KV heads, trimmed KV heads)."""
        self.local.__dict__.setdefault("splits", {})[layer_idx] = (weakref.ref(keys), parts)

    def split_of(self, layer_idx: int, key: torch.Tensor) -> tuple | None:
        """The ``parts`` of ``note_split`` when ``key`` (of the attention call running now) came from a split layer."""
        got = self.local.__dict__.get("splits", {}).get(layer_idx)
        return got[1] if got is not None and got[0]() is key else None

    def _pre(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if self.policy.evicts and mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(f"{self.owner} needs an unpadded batch (left padding would keep pad slots as the sink): "
                             "generate one sequence at a time, or use evict=False")
        cache = _cache_of(kwargs)
        if cache is not None:
            self.apply(cache)

    def apply(self, cache) -> None:
        """Put a policy layer in place of each chosen full-attention layer of ``cache``; rolling
        (sliding-window) layers already bound themselves and stay as they are."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            return
        if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # a lazily grown DynamicCache
            while len(layers) <= max(self.layers, default=-1):
                i = len(layers)
                layers.append(PolicyLayer(self, i) if i in self.layers else DynamicLayer())
        for i in sorted(self.layers):
            layer = layers[i] if i < len(layers) else None
            if layer is None or getattr(layer, "is_sliding", False) or (isinstance(layer, PolicyLayer) and layer.kv is self):
                continue
            if type(layer) is not DynamicLayer and not isinstance(layer, PolicyLayer):
                if getattr(self.policy, "optional", False):  # the method is the same without it (KeepAll)
                    continue
                raise ValueError(f"{self.owner} keeps its KV policy in the default DynamicCache; layer {i} of this cache is a "
                                 f"{type(layer).__name__}: generate without cache_implementation=... / a custom "
                                 "cache" + (", or use evict=False" if self.policy.evicts else ""))
            layers[i] = PolicyLayer.adopt(layer, self, i)
