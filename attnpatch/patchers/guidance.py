"""Guidance at the denoiser level: ``run`` is the forward of a ``steps.DenoiserHook`` for methods
that need batch roles. For guidance methods it adds perturbed copies of the conditional rows,
runs once, and returns the guided prediction, so any pipeline gets PAG-style guidance without a
forked pipeline class.

With the pipeline's classifier-free guidance at scale g, the conditional rows are returned as
``cond + (s / g) * (cond - perturbed)``, so the pipeline's own ``uncond + g * (cond - uncond)``
yields ``uncond + g * (cond - uncond) + s * (cond - perturbed)``: diffusers' PAG formula.

Which rows are conditional, and where g is, are facts of the family's row
(``families.Family.cfg`` / ``cfg_scale``): batched pipelines put ``[uncond, cond]`` in one call;
separate ones make one call per branch, conditional first (named by the pipeline's
``cache_context``). g is a public pipeline attribute or an argument of the pipeline call, which
``wrap_calls`` hands to the hooks.
"""
from __future__ import annotations

import functools
import inspect

import torch
from diffusers.hooks import HookRegistry

from .families import pipeline_family
from .steps import NAME


def _scale(fam, pipe, args: dict, slot: int) -> float:
    where = fam.cfg_scale[min(slot, len(fam.cfg_scale) - 1)]
    value = args.get(where[5:]) if where.startswith("call:") else getattr(pipe, where, None)
    return 1.0 if value is None else float(value)


def cfg(state, branch: str | None) -> tuple[str, float]:
    """("none" | "batched" | "cond" | "uncond", g) for the current denoiser call."""
    if state.call is None:
        return "none", 1.0
    pipe, args = state.call
    fam = pipeline_family(pipe)
    if fam is not None and fam.cfg == "separate":
        g = _scale(fam, pipe, args, state.slot)
        if fam.cfg_needs:  # true CFG: a scale above 1 and a negative prompt in the call
            on = g > 1 and any(all(args.get(a) is not None for a in alt) for alt in fam.cfg_needs)
        else:
            on = bool(getattr(pipe, "do_classifier_free_guidance", False))
        if not on:
            return "none", 1.0
        first = branch != "uncond" if branch in ("cond", "uncond") else state.tracker.calls == 0
        return ("cond" if first else "uncond"), g
    if getattr(pipe, "do_classifier_free_guidance", False):
        return "batched", _scale(fam, pipe, args, state.slot) if fam is not None else float(pipe.guidance_scale)
    return "none", 1.0


def _dup(x, B: int, rows: torch.Tensor, skip: frozenset, name: str = ""):
    """x with ``rows`` appended along the batch dimension, if it is batched."""
    if name in skip:
        return x
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == B:
        return torch.cat([x, x[rows]])
    if isinstance(x, dict):
        return {k: _dup(v, B, rows, skip, k) for k, v in x.items()}
    return x


def _batch(bound: dict) -> int:
    x = bound.get("hidden_states", bound.get("sample"))
    return x.shape[0]


def run(hook, args, kwargs):
    """The denoiser forward under a method with ``needs_roles`` (SharedAttention) or ``guidance``."""
    method, state, tracker = hook.method, hook.state, hook.state.tracker
    forward = hook.fn_ref.original_forward
    mode, g = cfg(state, hook.branch.name)
    tracker.calls += 1
    step = tracker.step if state.timestep is not None else None
    if not method.guidance:  # methods that only need the batch roles
        B = _batch(state.bind(args, kwargs))
        half = B // 2 if mode == "batched" else 0
        state.roles = tuple(["uncond"] * half + [("uncond" if mode == "uncond" else "cond")] * (B - half))
        try:
            return forward(*args, **kwargs)
        finally:
            state.roles = ()
    if mode == "uncond" or not method.guides(step):
        return forward(*args, **kwargs)
    return _guided(hook, forward, mode, g, state.bind(args, kwargs))


def _guided(hook, forward, mode: str, g: float, bound: dict):
    method, state = hook.method, hook.state
    B = _batch(bound)
    rows = torch.arange(B // 2 if mode == "batched" else 0, B)  # the conditional rows
    bound = {name: _dup(value, B, rows, state.family.not_batched, name) for name, value in bound.items()}
    roles = ["uncond"] * (B // 2) + ["cond"] * (B - B // 2) if mode == "batched" else ["cond"] * B
    state.roles = tuple(roles + ["perturbed"] * len(rows))
    try:
        out = forward(**bound)
    finally:
        state.roles = ()
    pred = out[0] if isinstance(out, tuple) else out.sample
    base, ptb = pred[:B], pred[B:]
    cond = base[rows]
    guided = base.clone()
    guided[rows] = cond + (method.guidance_weight() / g) * (cond - ptb)
    if isinstance(out, tuple):
        return (guided, *out[1:])
    out.sample = guided
    return out


# --- the pipeline call: its arguments reach the hooks ------------------------------------------

DENOISERS = ("transformer", "transformer_2", "unet")


def _hooks(pipe) -> list:
    out = []
    for name in DENOISERS:
        registry = getattr(getattr(pipe, name, None), "_diffusers_hook", None)
        hook = registry.get_hook(NAME) if isinstance(registry, HookRegistry) else None
        if hook is not None:
            out.append(hook)
    return out


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.__call__)


class _Calls:
    """Mixed into a patched pipeline's class: each call hands its arguments (bound, defaults
    filled in) to its denoisers' hooks and restarts their step tracking."""

    def __call__(self, *args, **kwargs):
        hooks = _hooks(self)
        if not hooks:  # e.g. a pipeline built with type(patched_pipe)(**components), or after unpatch
            return super().__call__(*args, **kwargs)
        base = type(self).__mro__[2]  # the pipeline's own class (see _subclass)
        try:
            bound = _signature(base).bind(self, *args, **kwargs)
        except TypeError:  # arguments the pipeline refuses: let it say so itself
            return super().__call__(*args, **kwargs)
        bound.apply_defaults()
        call = (self, {k: v for k, v in bound.arguments.items() if k != "self"})
        for tracker in {id(h.state.tracker): h.state.tracker for h in hooks}.values():
            tracker.total = None  # read from the pipeline's num_timesteps at its first denoiser call
            tracker.reset()
        for h in hooks:
            h.state.call = call
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for h in hooks:
                h.state.call = None


_SUBCLASSES: dict = {}


def _subclass(cls):
    """``cls`` with ``_Calls`` in front, same name and module (what dispatch and reprs read)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (_Calls, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _SUBCLASSES[cls]


def wrap_calls(pipe):
    """Swap ``pipe``'s class for its ``_Calls`` subclass; returns the undo."""
    cls = type(pipe)
    if issubclass(cls, _Calls):
        return lambda: None
    pipe.__class__ = _subclass(cls)
    return _Unwrap(pipe, cls)


class _Unwrap:  # an object, not a closure: deepcopy maps the pipeline onto the copy
    def __init__(self, pipe, cls):
        self.pipe, self.cls = pipe, cls

    def __call__(self) -> None:
        if type(self.pipe) is _SUBCLASSES.get(self.cls):
            self.pipe.__class__ = self.cls
