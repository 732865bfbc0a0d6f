"""The kernel registry. ``select`` runs the cheapest capable kernel for a call by the cost model
(``kernels/cost.py``, constants calibrated per device by ``benchmarks/calibrate_cost.py``); kernels
the model does not know, devices without constants and near-ties keep ``PREFERENCE``, one fixed
list per (device kind, plan kind). Capability is each kernel's ``why_not``.

A kernel that cannot run a call says why (``why_not``); ``select`` falls back to the next one
and logs the reason and the estimates (``ATTNPATCH_LOG=debug``). A named backend that cannot run
raises. The ranking is cached per call signature (shapes, dtype, device, threads, plan kind, block
structure), so a static plan pays for it once.
"""
from __future__ import annotations

import threading

import torch

from .._log import debug_once
from . import cost, tune
from .base import Kernel, check_qkv
from .reference import Reference
from .flex import Flex
from .buckets import Buckets
from .classes import Classes
from .gather import Gather
from .lines import Lines
from .lines_native import LinesNative
from .sdpa import SDPA
from .tiles import Tiles
from .triton import Triton

_REGISTRY: list[Kernel] = [SDPA(), Triton(), Tiles(), LinesNative(), Lines(), Gather(), Classes(), Buckets(), Flex(), Reference()]

# Preference order: {(device kind, plan kind): kernel names, first tried first}. A "plain" plan has no
# mask_mod (dense, causal, score-only): SDPA runs it at full speed, with no mask tensor or a causal one.
# A "masked" plan has a mask_mod, which SDPA must materialise as an (S_q, S_kv) mask: the block-sparse
# kernels skip the empty blocks instead. On CUDA the fused kernels (triton, compiled flex) beat slicing
# into SDPA calls (tiles); on CPU tiles reaches 0.85-0.95 of the ideal speedup, FlexAttention 0.2-0.7
# (DESIGN.md), and triton only runs interpreted (tests name it). The reference oracle is always last.
# Other device kinds (mps, xpu, ...) use "default". Kernels added by ``register`` join every list.
# The cost model reorders the kernels it knows by estimated time; this order breaks ties and ranks the rest.
# buckets leads the masked lists: only a plan with Plan.buckets (HyperAttention) has it, and for that plan
# every other kernel builds the (S_q, S_kv) score table. gather follows sdpa: where the cost model has no
# estimate for it (head dims above cost.MAX_MODELLED_D, uncalibrated devices) masked SDPA runs first.
# classes (one call per class of rows with identical keys) has no estimate: kernels/tune.py measures it.
PREFERENCE: dict[tuple[str, str], list[str]] = {
    ("cpu", "plain"): ["sdpa", "tiles", "flex", "triton", "reference"],
    ("cpu", "masked"): ["buckets", "lines_native", "tiles", "lines", "sdpa", "gather", "classes", "flex", "triton", "reference"],
    ("cuda", "plain"): ["sdpa", "triton", "flex", "tiles", "reference"],
    ("cuda", "masked"): ["buckets", "triton", "lines", "flex", "tiles", "sdpa", "gather", "classes", "reference"],
    ("default", "plain"): ["sdpa", "tiles", "flex", "triton", "reference"],
    ("default", "masked"): ["buckets", "tiles", "sdpa", "lines", "gather", "classes", "flex", "triton", "reference"],
}


def register(kernel: Kernel, *, before: str | None = None) -> Kernel:
    """Add ``kernel`` to the registry (replacing one of the same name), ahead of ``before``
    or, by default, ahead of ``reference`` (the oracle stays last)."""
    if not getattr(kernel, "name", None):
        raise ValueError("a kernel needs a non-empty .name")
    _REGISTRY[:] = [k for k in _REGISTRY if k.name != kernel.name]
    invalidate()  # cached orders and the plans' remembered choices name the kernel objects
    target = before or "reference"
    idx = next((i for i, k in enumerate(_REGISTRY) if k.name == target), len(_REGISTRY))
    _REGISTRY.insert(idx, kernel)
    for order in PREFERENCE.values():  # the same place in every preference list
        if kernel.name in order:
            order.remove(kernel.name)
        order.insert(order.index(target) if target in order else len(order), kernel.name)
    return kernel


def names() -> list[str]:
    """Kernel names in registry order."""
    return [k.name for k in _REGISTRY]


def get(name: str) -> Kernel:
    for k in _REGISTRY:
        if k.name == name:
            return k
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(names())}")


def release_buffers() -> int:
    """Free the buffers kernels keep between calls in the calling thread (``tiles`` keeps its
    tile-order copies of q, k, v and its last outputs, a few times the size of one layer's q) and
    the static-plan masks ``sdpa`` caches for all threads (at most 32 MB); returns the bytes
    released. The next call allocates them again."""
    return sum(k.release() for k in _REGISTRY)


def preference(device_type: str, plan) -> list[Kernel]:
    """The registered kernels in the order ``select`` tries them for ``plan`` on ``device_type``."""
    kind = "plain" if plan.mask_mod is None else "masked"
    order = PREFERENCE.get((device_type, kind)) or PREFERENCE[("default", kind)]
    by_name = {k.name: k for k in _REGISTRY}
    return [by_name[n] for n in order if n in by_name]


_RANKED: dict = {}  # call signature -> kernels in the order select tries them
_RANKED_MAX = 512
_RANKED_LOCK = threading.Lock()


def _signature(q, k, v, plan, mask) -> tuple:
    """Everything the ranking depends on: the block structure by identity (cached per plan); whether the
    plan has lines (a plan without them must not reuse the ranking of one with them), not which: a
    data-dependent plan's lines change every call by content, not by size, and re-ranking would pay the
    lines layout on calls that SDPA then runs."""
    dev, plain = q.device.type, plan.mask_mod is None
    return (dev, q.dtype, q.shape, k.shape, v.shape[3], torch.get_num_threads(), plain, plan.score_mod is None,
            plan.causal, plan.q_offset, plan.static, plan.blocks, plan.lines is not None, None if mask is None else (mask.dtype, mask.shape),
            len(_REGISTRY), tuple(PREFERENCE.get((dev, "plain" if plain else "masked")) or ()))


def ranked(q, k, v, plan, mask=None) -> list[Kernel]:
    """The registered kernels in the order ``select`` tries them for this call: by estimated cost
    where the device is calibrated (``cost.rank``), else ``preference``."""
    key = _signature(q, k, v, plan, mask)
    order = _RANKED.get(key)
    if order is not None:
        return order
    pref = preference(q.device.type, plan)
    names_, est = cost.rank([kr.name for kr in pref], cost.constants(q.device.type, torch.get_num_threads()),
                            q, k, v, plan, mask)
    by_name = {kr.name: kr for kr in pref}
    order = [by_name[n] for n in names_]
    if est:
        debug_once(f"plan {plan.name!r} on q {tuple(q.shape)} {q.dtype}: estimated "
                   + ", ".join(f"{n} {1e3 * est[n]:.3g} ms" for n in names_ if est[n] != float("inf")))
    with _RANKED_LOCK:
        if len(_RANKED) >= _RANKED_MAX:
            _RANKED.clear()  # signatures of dropped block structures would pile up (data-dependent plans)
        _RANKED[key] = order
    return order


def select(q, k, v, plan, *, mask=None, backend: str | None = None) -> Kernel:
    """The cheapest capable kernel (or the named ``backend``) for ``plan`` on these tensors."""
    if backend is not None:
        kernel = get(backend)
        reason = kernel.why_not(q, k, v, plan, mask)
        if reason:
            raise RuntimeError(f"backend {backend!r} cannot run plan {plan.name!r}: {reason}")
        return kernel
    # A plan a method caches and returns on every call (static, or no mask_mod) remembers its choice per
    # call shape: the ranking signature and the why_not checks cost a 64-token call ~5 % of SDPA's time
    memo_key = None
    if plan.static or plan.mask_mod is None:
        memo_key = _memo_key(q, k, v, mask)
        memo = plan.__dict__.get("_selected")
        if memo is not None and memo[0] == memo_key:
            return memo[1]
    kernel = _select(q, k, v, plan, mask)
    if memo_key is not None and tune.applies(plan):  # a static masked plan: its first calls may measure
        kernel, final = tune.choose(memo_key, kernel, lambda: _capable(q, k, v, plan, mask), q, k, v, plan, mask)
        if not final:
            return kernel  # not remembered yet: the next call of this shape goes on measuring
    if memo_key is not None:
        object.__setattr__(plan, "_selected", (memo_key, kernel))  # one tuple: readers see old or new
    return kernel


def _memo_key(q, k, v, mask) -> tuple:
    return (q.shape, k.shape, v.shape[3], q.dtype, q.device, torch.get_num_threads(),
            None if mask is None else (mask.dtype, mask.shape), _EPOCH[0])


def settled(q, k, v, plan, mask=None) -> Kernel | None:
    """The kernel ``select`` remembered on ``plan`` for calls of this shape, once final (a static plan's
    trials done, ``tune``); None before, or for a plan that remembers none (data-dependent)."""
    memo = plan.__dict__.get("_selected")
    return memo[1] if memo is not None and memo[0] == _memo_key(q, k, v, mask) else None


_EPOCH = [0]  # bumped when PREFERENCE or the cost constants may have changed (invalidates the plan memos)


def invalidate() -> None:
    """Forget every cached kernel choice (after editing ``PREFERENCE`` or the cost constants) and every
    measured one (kernels/tune.py: its trials are keyed by the same epoch)."""
    _EPOCH[0] += 1
    with _RANKED_LOCK:
        _RANKED.clear()


def _capable(q, k, v, plan, mask) -> list[Kernel]:
    """Every kernel that can run the call, in ranked order."""
    return [kr for kr in ranked(q, k, v, plan, mask) if kr.why_not(q, k, v, plan, mask) is None]


def _select(q, k, v, plan, mask) -> Kernel:
    reasons = []
    for kernel in ranked(q, k, v, plan, mask):
        reason = kernel.why_not(q, k, v, plan, mask)
        if reason is None:
            if reasons:
                debug_once(f"plan {plan.name!r} on {tuple(q.shape)}: using {kernel.name} ({'; '.join(reasons)})")
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    raise RuntimeError(f"no kernel can run plan {plan.name!r} on q {tuple(q.shape)}: " + "; ".join(reasons))


__all__ = ["Kernel", "PREFERENCE", "check_qkv", "register", "names", "get", "preference", "ranked", "select", "settled"]
