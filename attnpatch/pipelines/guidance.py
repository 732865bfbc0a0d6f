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

import inspect
import sys

import torch

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


def install(model, method, state, tracker, pipe=None):
    """Wrap ``model.forward``; returns the undo."""
    orig = model.forward
    sig = inspect.signature(orig)
    if hasattr(method, "bind_model"):
        method.bind_model(model)

    def forward(*args, **kwargs):
        mode, g = cfg(pipe, tracker)
        tracker.calls += 1
        step = tracker.step if state.timestep is not None else None
        if not getattr(method, "guidance", False):  # methods that only need the batch roles (SharedAttention)
            B = _batch(sig.bind(*args, **kwargs).arguments)
            half = B // 2 if mode == "batched" else 0
            state.roles = tuple(["uncond"] * half + [("uncond" if mode == "uncond" else "cond")] * (B - half))
            try:
                return orig(*args, **kwargs)
            finally:
                state.roles = ()
        if mode == "uncond" or not method.guides(step):
            return orig(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        B = _batch(bound.arguments)
        rows = torch.arange(B // 2 if mode == "batched" else 0, B)  # the conditional rows
        for name, value in list(bound.arguments.items()):
            bound.arguments[name] = _dup(value, B, rows, name)
        roles = ["uncond"] * (B // 2) + ["cond"] * (B - B // 2) if mode == "batched" else ["cond"] * B
        state.roles = tuple(roles + ["perturbed"] * len(rows))
        try:
            out = orig(*bound.args, **bound.kwargs)
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

    model.forward = forward
    return lambda: model.__dict__.pop("forward", None)
