"""Guidance at the denoiser level: a wrapper around the patched model's ``forward`` that adds
perturbed copies of the conditional rows, runs once, and returns the guided prediction, so any
pipeline gets PAG-style guidance without a forked pipeline class.

With the pipeline's classifier-free guidance at scale g, the conditional rows are returned as
``cond + (s / g) * (cond - perturbed)``, so the pipeline's own ``uncond + g * (cond - uncond)``
yields ``uncond + g * (cond - uncond) + s * (cond - perturbed)``: diffusers' PAG formula.

Which rows are conditional: pipelines that batch CFG put ``[uncond, cond]`` in one call (SD,
SD3, CogVideoX, LTX, Mochi); FLUX (true CFG), Wan and HunyuanVideo make one call per branch,
conditional first, so the first call at each step is the conditional one.
"""
from __future__ import annotations

import copy
import functools
import inspect
import sys

import torch

from ..handle import pop_attr

SEPARATE_CFG = {  # pipeline class -> (local with the CFG scale in __call__, local saying CFG is on)
    "FluxPipeline": ("true_cfg_scale", "do_true_cfg"),
    "HunyuanVideoPipeline": ("true_cfg_scale", "do_true_cfg"),
    "WanPipeline": ("current_guidance_scale", None),
}
NOT_BATCHED = {"img_ids", "txt_ids", "return_dict", "num_frames", "height", "width", "rope_interpolation_scale"}


def _pipe_locals(pipe) -> dict:
    """Locals of the running ``pipe.__call__`` (the CFG scale some pipelines keep only there)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "__call__" and f.f_locals.get("self") is pipe:
            return f.f_locals
        f = f.f_back
    return {}


def cfg(pipe, tracker) -> tuple[str, float]:
    """("none" | "batched" | "cond" | "uncond", g) for the current denoiser call."""
    if pipe is None:
        return "none", 1.0
    name = next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in SEPARATE_CFG), None)
    if name is not None:
        scale_var, flag_var = SEPARATE_CFG[name]
        loc = _pipe_locals(pipe)
        on = bool(loc.get(flag_var)) if flag_var else bool(getattr(pipe, "do_classifier_free_guidance", False))
        if not on:
            return "none", 1.0
        g = float(loc.get(scale_var, getattr(pipe, "guidance_scale", 1.0)))
        return ("cond" if tracker.calls == 0 else "uncond"), g
    if getattr(pipe, "do_classifier_free_guidance", False):
        return "batched", float(pipe.guidance_scale)
    return "none", 1.0


def _dup(x, B: int, rows: torch.Tensor, name: str = ""):
    """x with ``rows`` appended along the batch dimension, if it is batched."""
    if name in NOT_BATCHED:
        return x
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == B:
        return torch.cat([x, x[rows]])
    if isinstance(x, dict):
        return {k: _dup(v, B, rows, k) for k, v in x.items()}
    return x


def _batch(bound: dict) -> int:
    x = bound.get("hidden_states", bound.get("sample"))
    return x.shape[0]


class _Forward:
    """Stands in for the patched model's ``forward`` (an object, not a closure, so that a deep copy
    of the model gets a wrapper around the copy; the method object is shared, see ``SharesMethod``)."""

    def __init__(self, model, method, state, tracker, pipe):
        self.orig = model.forward
        self.params = list(inspect.signature(self.orig).parameters)
        self.method, self.state, self.tracker, self.pipe = method, state, tracker, pipe

    def __deepcopy__(self, memo):
        memo.setdefault(id(self.method), self.method)
        memo.setdefault(id(self.pipe), self.pipe)  # copying only the model keeps its pipeline (copying the pipe maps it)
        new = object.__new__(_Forward)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _bind(self, args, kwargs) -> dict:
        return {**dict(zip(self.params, args)), **kwargs}

    def __call__(self, *args, **kwargs):
        method, state, tracker = self.method, self.state, self.tracker
        mode, g = cfg(self.pipe, tracker)
        tracker.calls += 1
        step = tracker.step if state.timestep is not None else None
        if not getattr(method, "guidance", False):  # methods that only need the batch roles (SharedAttention)
            B = _batch(self._bind(args, kwargs))
            half = B // 2 if mode == "batched" else 0
            state.roles = tuple(["uncond"] * half + [("uncond" if mode == "uncond" else "cond")] * (B - half))
            try:
                return self.orig(*args, **kwargs)
            finally:
                state.roles = ()
        if mode == "uncond" or not method.guides(step):
            return self.orig(*args, **kwargs)
        return self._guided(mode, g, args, kwargs)

    def _guided(self, mode: str, g: float, args, kwargs):
        method, state = self.method, self.state
        bound = self._bind(args, kwargs)
        B = _batch(bound)
        rows = torch.arange(B // 2 if mode == "batched" else 0, B)  # the conditional rows
        bound = {name: _dup(value, B, rows, name) for name, value in bound.items()}
        roles = ["uncond"] * (B // 2) + ["cond"] * (B - B // 2) if mode == "batched" else ["cond"] * B
        state.roles = tuple(roles + ["perturbed"] * len(rows))
        try:
            out = self.orig(**bound)
        finally:
            state.roles = ()
        pred = out[0] if isinstance(out, tuple) else out.sample
        base, ptb = pred[:B], pred[B:]
        cond = base[rows]
        guided = base.clone()
        guided[rows] = cond + (method.scale / g) * (cond - ptb)
        if isinstance(out, tuple):
            return (guided, *out[1:])
        out.sample = guided
        return out


def install(model, method, state, tracker, pipe=None):
    """Wrap ``model.forward``; returns the undo."""
    if hasattr(method, "bind_model"):
        method.bind_model(model)
    model.forward = _Forward(model, method, state, tracker, pipe)
    return functools.partial(pop_attr, model, "forward")
