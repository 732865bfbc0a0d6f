"""One attention call: method -> plan -> kernel. Shared by ``attend`` and every patcher."""
from __future__ import annotations

import dataclasses
import functools
import operator

import torch

from . import kernels
from .kernels.base import check_mask, check_qkv, check_scale
from .merge_heads import merged
from .methods.base import Method, remembered_calls
from .ops.lse import dense_lse
from .plan import Plan, _derived, fold_q_scale, q_scale_as, q_scale_as_score_mod, scale_rows
from .site import Site


def check_method(method) -> Method:
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"pass a method instance, e.g. {method.__name__}(), not the class {method.__name__}")
    if not isinstance(method, Method):
        raise TypeError(f"method must be an attnpatch Method instance (e.g. attnpatch.Dense()), got {type(method).__name__}")
    return method


def run(q, k, v, method: Method, site: Site, *, backend=None, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """Attention of ``method`` at ``site`` on ``(B, H, S, D)`` tensors; returns ``(B, H_q, S_q, D_v)``."""
    key = None
    if REMEMBER[0] and (method.plans_by_site or method.some_static) and backend is None and mask is None and not softcap \
            and site.kv_shift is None and site.head_sum is None:
        key = (_LAYERLESS(site) if method.layer_free() else site, q.shape, k.shape, v.shape, q.dtype, q.device, scale,
               torch.get_num_threads(), kernels._EPOCH[0])
        fast = (remembered_calls(method) or _NONE).get(key)
        if fast is not None:
            return fast(q, k, v)
    groups = method.head_plans(q, k, site)
    if len(groups) == 1 and groups[0][0] is None:
        out = _run_plan(q, k, v, groups[0][1], site, backend, mask, scale, softcap)
        # a some_static method's data-independent calls all plan None: only those ask static_at (no work on a sparse call)
        if key is not None and (method.plans_by_site or (groups[0][1] is None and method.static_at(q, k, site))):
            _remember(method, key, q, k, v, groups[0][1], site, scale)
        return out
    one = merged(groups, q, k, v, site, mask, backend)  # small static groups: one masked call is cheaper
    if one is not None:
        out = _run_plan(q, k, v, one, site, backend, mask, scale, softcap)
        if key is not None and method.plans_by_site:  # a static merged plan (StreamingHeads' mixed layer): remembered too
            _remember(method, key, q, k, v, one, site, scale)
        return out
    rep = q.shape[1] // k.shape[1]
    out = q.new_empty(*q.shape[:3], v.shape[3])
    for heads, plan in groups:  # per-head profiles: one plan per group of heads with equal parameters
        sel, kv = _head_select(heads, rep)
        m = _mask_slice(mask, None, sel)
        out[:, sel] = _run_plan(q[:, sel], k[:, kv], v[:, kv], plan, site, backend, m, scale, softcap)
    return out


# A method whose plans depend only on its parameters, the Site and the call's shapes (``plans_by_site``) remembers,
# per (Site, shapes, scale, threads), the kernel call its plan came to: a later equal call skips the method's plan
# lookup, the call steps and kernel selection (~20-45 us of Python per call on the 2-core CPU, measured interleaved
# with SDPA: 1.1-1.3x stock on 64-token calls). Only plain plans (a mask_mod that reads no data, or none; a float
# q_scale at most; no output step, transform, extra keys, parts, rows or direct path) once their kernel is final.
_NONE: dict = {}
# a Site's compared fields but its layer and name: the key of a layer-free method (one entry serves every layer)
_LAYERLESS = operator.attrgetter(*(f.name for f in dataclasses.fields(Site) if f.compare and f.name not in ("layer", "name")))
_CALLS_MAX = 256
REMEMBER = [True]  # False: every call plans and selects (benchmarks and tests that watch ``kernels.select``)


def _remember(method: Method, key: tuple, q, k, v, plan: Plan | None, site: Site, scale) -> None:
    plan = _DENSE if plan is None else plan
    if plan.output is not None or plan.transform is not None or plan.extra_kv is not None or plan.parts \
            or plan.rows is not None or plan.direct is not None or not (plan.static or plan.mask_mod is None):
        return
    whole = plan.with_site(site.causal, site.q_offset)
    q2, sc, plan = fold_q_scale(q, scale, whole)  # a float q_scale: the scale; a tensor: q's rows, per call below
    kernel = kernels.settled(q2, k, v, plan)
    if kernel is None:  # not chosen for good yet (a static plan's first calls measure kernels: kernels/tune.py)
        return
    fast = kernel.prepared(q2, k, v, plan, sc) or functools.partial(_kernel_call, kernel, plan, sc)
    if torch.is_tensor(whole.q_scale):  # per-row scales (EntropyScale on a causal call): q scaled, then the call
        fast = functools.partial(_scaled_call, fast, q_scale_as(whole, q))
    calls = remembered_calls(method, create=True)
    if len(calls) >= _CALLS_MAX:
        calls.clear()  # bounded: a method sees a Site per layer, step and role
    calls[key] = fast


def _scaled_call(call, qs, q, k, v):
    """``fold_q_scale``'s product with the scales cast once (the key holds q's dtype and device): ~4 us less
    of Python on a 64-token call."""
    return call(scale_rows(q, qs), k, v)


def _kernel_call(kernel, plan, scale, q, k, v):
    return kernel.run(q, k, v, plan, mask=None, scale=scale)


def _head_select(heads: torch.Tensor, rep: int):
    """(query-head selector, KV-head selector) of a group of query heads (ascending): slices (views, no copy)
    when the group is one run of whole GQA groups, each KV head gathered once when it is whole GQA groups (the
    kernel keeps GQA), else each query head's KV head (one KV copy per query head: llama-8B shapes at 1K
    copied ~30 MB per call that way)."""
    h = heads.tolist()
    n = len(h)
    whole = n % rep == 0 and all(h[i] % rep == 0 and h[i + rep - 1] == h[i] + rep - 1 for i in range(0, n, rep))
    if whole and h == list(range(h[0], h[0] + n)):  # one ascending run: views
        return slice(h[0], h[0] + n), slice(h[0] // rep, (h[0] + n) // rep)
    if whole:
        return heads, heads[::rep] // rep
    return heads, heads // rep


def _mask_slice(mask, rows, heads):
    """The call's mask for batch rows ``rows`` and query heads ``heads`` (None: all) of the call."""
    if not torch.is_tensor(mask):
        return mask
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, Sq|1, Skv|1), a view
    if rows is not None and mask.shape[0] > 1:
        mask = mask[rows]
    if heads is not None and mask.shape[1] > 1:
        mask = mask[:, heads]
    return mask


@dataclasses.dataclass
class Call:
    """One attention call as the steps below rewrite it. ``k`` / ``v`` are the call's keys after
    ``transform``; ``k_all`` / ``v_all`` add the extra keys; ``own_mask`` is the call's mask over ``k``;
    ``inputs`` keeps the call's own (q, k, v, mask) for its parts."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plan: Plan
    mask: object
    scale: float | None
    softcap: float | None
    site: Site
    backend: str | None
    k_all: torch.Tensor = None
    v_all: torch.Tensor = None
    own_mask: object = None
    inputs: tuple = ()
    lse: torch.Tensor = None  # (B, H_q, S_q) of every row over the call's keys, when the kernel returned it

    def __post_init__(self):
        self.inputs = (self.q, self.k, self.v, self.mask)


def _site(c: Call) -> None:
    c.plan = (c.plan or Plan()).with_site(c.site.causal, c.site.q_offset)


def _softcap(c: Call) -> None:
    """Gemma-2 style logit soft-capping composed before the plan's own score_mod (and its q_scale,
    which then becomes a score_mod: scaling q would scale before the cap)."""
    if not c.softcap:
        return
    plan, cap = q_scale_as_score_mod(c.plan, *c.q.shape[:3]), c.softcap
    inner = plan.score_mod

    def score_mod(score, b, h, q_idx, kv_idx):
        score = cap * torch.tanh(score / cap)
        return score if inner is None else inner(score, b, h, q_idx, kv_idx)

    c.plan = dataclasses.replace(plan, score_mod=score_mod)


def _transform(c: Call) -> None:
    fn = c.plan.transform
    if fn is None:
        return
    if "mask" in _names(fn):  # a transform that selects keys (decode gathers: Quest, SinkWindow) maps the mask too
        c.q, c.k, c.v, c.mask = fn(c.q, c.k, c.v, mask=c.mask)
    else:
        c.q, c.k, c.v = fn(c.q, c.k, c.v)


def _extra_kv(c: Call) -> None:
    """Shared attention: more keys / values per row, always visible (the model's own mask, which
    does not cover them, is widened to keep them)."""
    c.k_all, c.v_all, c.own_mask = c.k, c.v, c.mask
    extra = c.plan.extra_kv
    if extra is None:
        return
    ek, ev = extra(c.k, c.v) if callable(extra) else extra
    c.k_all, c.v_all = torch.cat([c.k, ek], 2), torch.cat([c.v, ev], 2)
    if c.mask is not None:
        m, E = c.mask, ek.shape[2]
        pad = (torch.ones if m.dtype == torch.bool else torch.zeros)(*m.shape[:-1], E, dtype=m.dtype, device=m.device)
        c.mask = torch.cat([m, pad.expand(*m.shape[:-1], E)], -1)


def _q_scale(c: Call) -> None:
    c.q, c.scale, c.plan = fold_q_scale(c.q, c.scale, c.plan)  # every kernel then runs a temperature at its own speed


def _names(fn) -> tuple:
    code = getattr(fn, "__code__", None)
    return code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] if code is not None else ()


def _output(c: Call, out):
    """``Plan.output(out, q, k, v, scale)``; a callback that recomputes attention (SinkCalibration)
    names ``mask`` / ``softcap`` parameters and gets the call's own, so it sees what the kernel saw,
    and ``lse``: each row's log-sum-exp when the kernel returned it (see ``_kernel``), else None."""
    fn = c.plan.output
    if fn is None:
        return out
    names = _names(fn)
    call = dict(mask=c.own_mask, softcap=c.softcap, lse=c.lse)
    return fn(out, c.q, c.k, c.v, c.scale, **{n: x for n, x in call.items() if n in names})


def _parts(c: Call, out):
    """Each ``Part``: its rows / heads of the call's own inputs through every step with the part's
    plan, blended into ``out`` as ``(1 - weight) * out + weight * part``."""
    if not c.plan.parts:
        return out
    q, k, v, mask = c.inputs
    out, rep = out.clone(), q.shape[1] // k.shape[1]
    for part in c.plan.parts:
        rows = torch.tensor(part.rows, device=q.device)
        heads = torch.arange(q.shape[1], device=q.device) if part.heads is None else torch.tensor(part.heads, device=q.device)
        kh = heads // rep  # the KV head of every chosen query head (GQA repeated)
        got = _run_plan(q[rows][:, heads], k[rows][:, kh], v[rows][:, kh], part.plan, c.site, c.backend,
                        _mask_slice(mask, rows, heads), c.scale, c.softcap)
        sub = out[rows]  # (R, H, Sq, Dv)
        mixed = got if part.weight == 1.0 else (1 - part.weight) * sub[:, heads] + part.weight * got
        sub[:, heads] = mixed.to(out.dtype)
        out[rows] = sub
    return out


def _kernel(c: Call):
    """The selected kernel on the plan the steps before it leave (no step core applies itself)."""
    plan = c.plan
    if plan.output is not None or plan.extra_kv is not None or plan.transform is not None or plan.parts:
        # remembered on the plan: one a method caches and returns again derives its bare form (and kernel choice) once
        plan = _derived(plan, "_bare", None, lambda: dataclasses.replace(plan, output=None, extra_kv=None, transform=None, parts=()))
    kernel = kernels.select(c.q, c.k_all, c.v_all, plan, mask=c.mask, backend=c.backend)
    if kernel.name == "sdpa" and plan.mask_mod is None and c.k_all is c.k and "lse" in _names(c.plan.output):
        # a plain plan whose output step wants each row's LSE: the fused kernel returns it with the output at
        # SDPA's cost (SinkCalibration otherwise re-reads every score); None: no fused kernel fits, the step recomputes
        got = dense_lse(c.q, c.k, c.v, mask=c.mask, scale=c.scale, causal=plan.causal, q_offset=plan.q_offset)
        if got is not None:
            out, c.lse = got
            return out
    return kernel.run(c.q, c.k_all, c.v_all, plan, mask=c.mask, scale=c.scale)


# The steps of one call, in this order, whatever kernel runs it (the reference included): a kernel is
# handed only the plan the steps before it leave: causal / q_offset set from the Site, soft-capping and
# any q_scale in it, and none of transform, extra_kv, output or parts.
BEFORE_KERNEL = (_site, _softcap, _transform, _extra_kv, _q_scale)
# output: q and scale after the q_scale fold, k / v after transform without the extra keys, the call's own
# mask. parts: each part's plan through all these steps, on the call's own inputs.
AFTER_KERNEL = (_output, _parts)


_DENSE = Plan()


def _run_plan(q, k, v, plan, site, backend, mask, scale, softcap):
    if plan is None:
        plan = _DENSE
    if plan.rows is not None and len(plan.rows) == q.shape[0] and backend is None:
        # rows estimated apart: each row its own call with its own plan (a batch of different prompts must
        # give each prompt what it gets alone); a named backend runs the whole call on mask_mod instead
        return torch.cat([_run_plan(q[b:b + 1], k[b:b + 1], v[b:b + 1], p, site, None, _mask_slice(mask, slice(b, b + 1), None),
                                    scale, softcap) for b, p in enumerate(plan.rows)])
    if plan.direct is not None and backend is None and mask is None and not softcap and plan.transform is None \
            and plan.extra_kv is None and not plan.parts and plan.q_scale is None \
            and (scale is None or scale == q.shape[-1] ** -0.5):
        return plan.direct(v)  # the method's own scores of every row (its output step included): no kernel pass
    if not softcap and plan.transform is None and plan.extra_kv is None and plan.output is None and not plan.parts:
        # the common call, where only the site and q_scale steps apply: the same steps without the Call
        # record (per-call Python overhead is what a 64-token call pays on top of SDPA)
        plan = plan.with_site(site.causal, site.q_offset)
        q, scale, plan = fold_q_scale(q, scale, plan)
        return kernels.select(q, k, v, plan, mask=mask, backend=backend).run(q, k, v, plan, mask=mask, scale=scale)
    c = Call(q, k, v, plan, mask, scale, softcap, site, backend)
    for step in BEFORE_KERNEL:
        step(c)
    out = _kernel(c)
    for step in AFTER_KERNEL:
        out = step(c, out)
    return out


def attend(q, k, v, method: Method, site: Site | None = None, *, backend: str | None = None, mask=None, scale=None):
    """Functional attention: ``method`` applied at ``site`` to ``(B, H, S, D)`` tensors (GQA allowed).

    ``mask`` is an optional boolean (True = keep) or additive mask broadcastable to
    ``(B, H_q, S_q, S_kv)``, combined with the method's own pattern; ``scale`` defaults to
    ``1/sqrt(D)``; ``backend`` names a kernel (``attnpatch.kernels.names()``), else the fastest
    capable one is chosen.
    """
    check_qkv(q, k, v)
    check_mask(mask, q, k)
    check_scale(scale)
    check_method(method)
    if site is None:
        site = Site()
    if not isinstance(site, Site):
        raise TypeError(f"site must be an attnpatch.Site, got {type(site).__name__}")
    if backend is not None:
        kernels.get(backend)  # unknown names raise here, listing the available ones
    return run(q, k, v, method, site, backend=backend, mask=mask, scale=scale)
