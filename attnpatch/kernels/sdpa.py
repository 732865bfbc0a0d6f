"""``sdpa``: PyTorch's dense ``scaled_dot_product_attention``, with a plan's mask_mod and
causality materialised as a mask when they cannot be expressed as ``is_causal``.

Masks of static plans (``Plan.static``, or causality alone) are cached per (mask_mod, causal,
q_offset, shape, device, dtype) in ``MASKS``, a bounded LRU shared by all threads: every call after
the first pays only the SDPA call, not the mask_mod's dozen tensor ops. Without a model mask the
cache holds the additive float form (0 / -inf in q's dtype), which the CPU kernel runs 15-30 %
faster than a boolean mask (it converts a boolean mask to that form on every call), unless a row
keeps nothing (a boolean mask is kept then, as before). A materialised mask that keeps everything
is dropped (plain SDPA, no mask tensor), and one that equals the causal mask runs as ``is_causal``:
both exact, and the fastest path SDPA has. A causal plan's own mask (upper-left aligned: q_offset 0)
runs on the CPU flash kernel with ``is_causal`` and the additive mask together, which PyTorch's
``scaled_dot_product_attention`` refuses but the kernel itself takes (calls of more keys than one of its
key blocks, ``_ONE_KV_BLOCK``): it then skips the key blocks above the diagonal instead of computing them under -inf (measured on the quiet 2-core CPU, 9 heads of 64, 1
thread, interleaved: 1.19-1.28x stock causal SDPA at 1K tokens and 1.17-1.21x at 2K for a mask keeping
80 % of 256-token tile pairs, against 1.55-1.87x with the causality folded into a non-causal mask).
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..ops.bias import additive as additive_bias
from ..ops.lse import _CPU_FLASH
from ..plan import Plan, materialise_mask, fold_q_scale
from .base import Kernel, core_step_why_not

NO_MASK, CAUSAL = "none", "causal"  # cached outcomes that need no mask tensor


class MaskCache:
    """LRU of derived masks, bounded by bytes and entries; safe under concurrent calls (lookups and
    inserts hold a lock; a build runs outside it, so two threads may build one mask once each)."""

    def __init__(self, max_bytes: int = 32 << 20, max_entries: int = 64):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.store: OrderedDict = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            value = self.store.get(key)
            if value is not None:
                self.store.move_to_end(key)
                return value
        value = build()
        size = value.numel() * value.element_size() if torch.is_tensor(value) else 0
        if size > self.max_bytes:
            return value  # too large to keep: built per call, as without the cache
        with self._lock:
            if key not in self.store:
                self.store[key] = value
                self.bytes += size
            while self.bytes > self.max_bytes or len(self.store) > self.max_entries:
                _, old = self.store.popitem(last=False)
                self.bytes -= old.numel() * old.element_size() if torch.is_tensor(old) else 0
        return value

    def clear(self) -> int:
        with self._lock:
            n, self.bytes = self.bytes, 0
            self.store.clear()
        return n


MASKS = MaskCache()


def _cached_keep(plan: Plan, B, H, Sq, Skv, device, dtype, additive: bool):
    """NO_MASK, CAUSAL, or the mask of a static plan: additive float in ``dtype`` when ``additive``
    and every row keeps a key, else boolean (True = keep)."""
    key = (plan.mask_mod, plan.causal, plan.q_offset, B, H, Sq, Skv, device, dtype if additive else torch.bool)
    memo = plan.__dict__.get("_sdpa_keep")
    if memo is not None and memo[0] == key:
        return memo[1]

    def build():
        keep = materialise_mask(plan, B, H, Sq, Skv, device)
        if bool(keep.all()):
            return NO_MASK
        if plan.causal and plan.q_offset == 0 and Sq == Skv and plan.mask_mod is not None:
            causal = torch.ones(Sq, Skv, dtype=torch.bool, device=device).tril()
            if keep.shape[:2] == (1, 1) and torch.equal(keep[0, 0], causal):
                return CAUSAL
        if additive and bool(keep.any(-1).all()):
            return additive_bias(keep, dtype)
        return keep

    value = MASKS.get(key, build)
    if not torch.is_tensor(value):  # no tensor to bound: remembered on the (cached, frozen) plan, no lock
        object.__setattr__(plan, "_sdpa_keep", (key, value))
    return value


_PREPARED_MAX_BYTES = 1 << 20  # a prepared call holds its mask outside MASKS' byte bound: small masks only


def _prepare(plan: Plan, key: tuple, keep, scale, gqa: bool, causal_flash: bool = False) -> None:
    """Remember on a static plan the exact SDPA call its next calls of this shape make (the
    per-call Python work is what a 64-256-token call pays on top of SDPA itself)."""
    if torch.is_tensor(keep) and keep.numel() * keep.element_size() > _PREPARED_MAX_BYTES:
        return
    if causal_flash:
        call = functools.partial(_flash_causal_masked, attn_mask=keep, scale=scale)
    else:
        call = functools.partial(F.scaled_dot_product_attention, attn_mask=keep if torch.is_tensor(keep) else None,
                                 is_causal=keep is CAUSAL, scale=scale, enable_gqa=gqa)
    object.__setattr__(plan, "_sdpa_call", (key, call))


def _causal_flash(q, k, v, plan: Plan, attn_mask) -> bool:
    """Whether a call can run the CPU flash kernel with ``is_causal`` and ``attn_mask`` together: an
    upper-left aligned causal plan (row i sees keys j <= i, the kernel's convention) and an additive mask
    in q's dtype. Called directly, the kernel keeps its autograd formula and its GQA (tests: equal to
    SDPA with the causality folded into the mask, outputs and gradients)."""
    return torch.is_tensor(attn_mask) and attn_mask.dtype == q.dtype and flash_skips_causal(q, k, v, plan)


def flash_skips_causal(q, k, v, plan: Plan) -> bool:
    """The call's side of ``_causal_flash`` (the mask's aside): an upper-left aligned causal plan over more than one key
    block where the CPU flash kernel runs; kernels/cost.py rates a static plan's masked call by it."""
    return plan.causal and plan.q_offset == 0 and k.shape[2] > _ONE_KV_BLOCK and _cpu_flash(q, k, v)


# the CPU flash kernel's key block (its kvSplitSize): a call with no more keys has one, so ``is_causal`` skips
# nothing there, and SDPA itself with the mask alone ran 1-5 % faster than the kernel called with both (64-512
# tokens, 9 / 3 heads of 64, 1 thread, interleaved; 64 tokens: 179 vs 189 us) while at 1K the skip saves 22 %
_ONE_KV_BLOCK = 512


def _flash_causal_masked(q, k, v, attn_mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=attn_mask, scale=scale)[0]


def _cpu_flash(q, k, v) -> bool:
    """True where CPU SDPA runs its flash kernel (which takes additive masks): floating 4-D inputs with one head
    size and unit last strides (else it falls back to the math backend)."""
    return q.device.type == "cpu" and q.dtype in _CPU_FLASH \
        and q.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


class SDPA(Kernel):
    name = "sdpa"

    def why_not(self, q, k, v, plan, mask=None):
        if plan.score_mod is not None:
            return "plan.score_mod cannot be expressed as an SDPA mask"
        return core_step_why_not(plan)

    def release(self) -> int:
        return MASKS.clear()

    def prepared(self, q, k, v, plan: Plan, scale=None):
        if plan.mask_mod is None and plan.score_mod is None and plan.q_scale is None and (not plan.causal or plan.q_offset == 0):
            # what run does for a plain call (no mask tensor): SDPA itself, dense or is_causal
            return functools.partial(F.scaled_dot_product_attention, scale=scale, is_causal=plan.causal,
                                     enable_gqa=q.shape[1] != k.shape[1])
        fast = plan.__dict__.get("_sdpa_call")
        return fast[1] if fast is not None and fast[0] == (q.shape, k.shape, v.shape[3], q.dtype, q.device, scale) else None

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        fast = plan.__dict__.get("_sdpa_call") if mask is None else None
        if fast is not None and fast[0] == (q.shape, k.shape, v.shape[3], q.dtype, q.device, scale):
            return fast[1](q, k, v)  # a static plan's prepared call: no re-derivation, ~4 us less per call
        q, scale, plan = fold_q_scale(q, scale, plan)  # a no-op after core.run folded it
        gqa = q.shape[1] != k.shape[1]
        if not plan.causal and plan.mask_mod is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        B, Hq, Sq, _ = q.shape
        Skv = k.shape[2]
        plain_causal = plan.causal and plan.mask_mod is None and mask is None
        if plain_causal and plan.q_offset == 0:
            # upper-left aligned causal is exactly SDPA's is_causal: no mask tensor, fastest path
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if plain_causal and Sq == 1 and plan.q_offset >= Skv - 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)  # one decode query sees the whole cache
        if plan.static or plan.mask_mod is None:
            keep = _cached_keep(plan, B, Hq, Sq, Skv, q.device, q.dtype, additive=mask is None)
            flash = mask is None and _causal_flash(q, k, v, plan, keep)
            if mask is None and plan.q_scale is None:
                _prepare(plan, (q.shape, k.shape, v.shape[3], q.dtype, q.device, scale), keep, scale, gqa, flash)
            if flash:
                return _flash_causal_masked(q, k, v, keep, scale)
            if keep is NO_MASK or (keep is CAUSAL and mask is None):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa,
                                                      is_causal=keep is CAUSAL)
            if keep is CAUSAL:
                keep = materialise_mask(Plan(causal=True), B, Hq, Sq, Skv, q.device)
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)
        else:
            keep = materialise_mask(plan, B, Hq, Sq, Skv, q.device)  # (B|1, Hq|1, Sq, Skv)
        if mask is None or mask.dtype == torch.bool:
            attn_mask = keep if mask is None else keep & mask
            # for its CPU flash kernel SDPA turns a boolean mask into this additive one with torch.where, ~8x slower
            # than ``additive_bias`` (1.8 ms of a 256-token, 9-head call); only where that kernel runs (the math backend
            # gives a boolean mask's empty rows 0, an additive one's NaN; checking for empty rows costs ~0.9 ms)
            if _cpu_flash(q, k, v):
                attn_mask = additive_bias(attn_mask, q.dtype)
        else:
            attn_mask = mask + additive_bias(keep, mask.dtype)  # -inf where the plan drops a key, the call's mask elsewhere
        if _causal_flash(q, k, v, plan, attn_mask):
            return _flash_causal_masked(q, k, v, attn_mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
