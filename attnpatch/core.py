"""One attention call: method -> plan -> kernel. Shared by ``attend`` and every patcher."""
from __future__ import annotations

import dataclasses

import torch

from . import kernels
from .kernels.base import check_mask, check_qkv, check_scale
from .methods.base import Method
from .plan import Plan, fold_q_scale, q_scale_as_score_mod
from .site import Site


def check_method(method) -> Method:
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"pass a method instance, e.g. {method.__name__}(), not the class {method.__name__}")
    if not isinstance(method, Method):
        raise TypeError(f"method must be an attnpatch Method instance (e.g. attnpatch.Dense()), got {type(method).__name__}")
    return method


def _softcapped(plan: Plan, softcap: float, q) -> Plan:
    """Gemma-2 style logit soft-capping composed before the plan's own score_mod (and its q_scale,
    which then becomes a score_mod: scaling q would scale before the cap)."""
    plan = q_scale_as_score_mod(plan, *q.shape[:3])
    inner = plan.score_mod

    def score_mod(score, b, h, q_idx, kv_idx):
        score = softcap * torch.tanh(score / softcap)
        return score if inner is None else inner(score, b, h, q_idx, kv_idx)

    return dataclasses.replace(plan, score_mod=score_mod)


def run(q, k, v, method: Method, site: Site, *, backend=None, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """Attention of ``method`` at ``site`` on ``(B, H, S, D)`` tensors; returns ``(B, H_q, S_q, D_v)``."""
    groups = method.head_plans(q, k, site)
    if len(groups) == 1 and groups[0][0] is None:
        return _run_plan(q, k, v, groups[0][1], site, backend, mask, scale, softcap)
    rep = q.shape[1] // k.shape[1]
    out = q.new_empty(*q.shape[:3], v.shape[3])
    for heads, plan in groups:  # per-head profiles: one plan per group of heads with equal parameters
        m = mask[:, heads] if torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[1] > 1 else mask
        out[:, heads] = _run_plan(q[:, heads], k[:, heads // rep], v[:, heads // rep], plan, site, backend, m, scale, softcap)
    return out


def _output(fn, out, q, k, v, scale, **call):
    """``Plan.output(out, q, k, v, scale)``; a callback that recomputes attention (SinkCalibration)
    names ``mask`` / ``softcap`` parameters and gets the call's own, so it sees what the kernel saw."""
    code = getattr(fn, "__code__", None)
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] if code is not None else ()
    return fn(out, q, k, v, scale, **{n: x for n, x in call.items() if n in names})


def _run_plan(q, k, v, plan, site, backend, mask, scale, softcap):
    plan = (plan or Plan()).with_site(site.causal, site.q_offset)
    if softcap:
        plan = _softcapped(plan, softcap, q)
    output, extra, transform = plan.output, plan.extra_kv, plan.transform
    if output is not None or extra is not None or transform is not None:  # kernels run the plain part
        plan = dataclasses.replace(plan, output=None, extra_kv=None, transform=None)
    if transform is not None:
        q, k, v = transform(q, k, v)
    own_mask = mask  # the call's mask over k alone (extra keys below widen it), for an output callback
    k_all, v_all = k, v
    if extra is not None:  # shared attention: more keys / values per row, always visible
        ek, ev = extra(k, v) if callable(extra) else extra
        k_all, v_all = torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        if mask is not None:  # the model's own mask does not cover the extra keys: keep them
            pad = torch.ones if mask.dtype == torch.bool else torch.zeros
            mask = torch.cat([mask, pad(*mask.shape[:-1], ek.shape[2], dtype=mask.dtype, device=mask.device)
                              .expand(*mask.shape[:-1], ek.shape[2])], -1)
    q, scale, plan = fold_q_scale(q, scale, plan)  # every kernel then runs a temperature at its own speed
    kernel = kernels.select(q, k_all, v_all, plan, mask=mask, backend=backend)
    out = kernel.run(q, k_all, v_all, plan, mask=mask, scale=scale)
    return out if output is None else _output(output, out, q, k, v, scale, mask=own_mask, softcap=softcap)


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
