"""Inversion of a pipeline's sampler, and style transfer on top of it (``StyleInjection``).

``invert(pipe, latents)`` walks the pipeline's own denoising schedule backwards from a clean latent to
the noise the sampler would turn back into it: the reversed flow ODE for flow-matching pipelines
(FLUX, SD3: ``x_i = x_{i+1} + (sigma_i - sigma_{i+1}) v``), DDIM inversion for DDIM pipelines
(``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``). The denoiser is evaluated at step i's timestep on the
latent one step cleaner, the usual approximation (the authors of StyleID do the same): exact when the
prediction does not depend on the latent, close when it varies slowly. The denoiser's other inputs
(prompt embeddings, ids, guidance) are those the pipeline itself passes: a pipeline call is started
and stopped at its first denoiser forward, so any prompt argument the pipeline takes works.

``style_transfer(pipe, content, style)`` is Style Injection in Diffusion in one call: invert both
images recording the style's keys / values and the content's queries, then sample from the content's
noise AdaIN-ed toward the style's with the recorded features injected (no text and no guidance by
default, as the paper).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from .. import api
from ..methods.style import StyleInjection


@dataclass
class Schedule:
    """What the pipeline feeds its denoiser: every input of the first forward, the latent's argument
    name, the sampler's timesteps (and flow sigmas), and the model's timestep per scheduler timestep."""

    kwargs: dict
    latent: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None  # flow matching: the N + 1 sigmas; None: DDIM
    scheduler: object

    def model_timestep(self, i: int):
        """Step i's timestep as the pipeline passes it (FLUX divides by 1000, UNets take it as is)."""
        first = torch.as_tensor(self.kwargs["timestep"])
        t = self.timesteps[i]
        if not first.is_floating_point():
            return t.expand_as(first).to(first.dtype)
        scale = float(self.timesteps[0]) / float(first.flatten()[0])
        scale = round(scale) if abs(scale - round(scale)) < 1e-3 else scale  # 1000 for FLUX, read off float32
        t = t.expand_as(first).to(first.dtype)
        return t if scale == 1 else t / scale


class _Stop(Exception):
    pass


def denoiser(pipe):
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise TypeError(f"{type(pipe).__name__} has neither a transformer nor a unet to invert with")
    return model


def no_guidance(pipe) -> dict:
    """The call argument that turns classifier-free guidance off (inversion needs one prediction per step)."""
    params = inspect.signature(pipe.__call__).parameters
    for name in ("true_cfg_scale", "guidance_scale"):  # FLUX's true CFG; the others' CFG (FLUX's guidance_scale is
        if name in params:  # an embedding, never reached: FLUX has true_cfg_scale)
            return {name: 1.0}
    return {}


def capture(pipe, latents: torch.Tensor, **call) -> Schedule:
    """Start ``pipe(latents=latents, **call)`` (guidance off unless ``call`` says otherwise) and stop it at
    its first denoiser forward: that forward's inputs and the schedule the pipeline set."""
    model, got = denoiser(pipe), {}

    def stop(module, args, kwargs):
        got.update(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        raise _Stop

    handle = model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        pipe(latents=latents, **{**no_guidance(pipe), **call})
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(pipe).__name__} returned without calling its denoiser")
    sched = pipe.scheduler
    flow = hasattr(sched, "sigmas") and not hasattr(sched, "alphas_cumprod")
    if not flow and type(sched).__name__ != "DDIMScheduler":
        raise TypeError(f"invert needs a flow-matching or a DDIM scheduler, not {type(sched).__name__}: set "
                        "pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)")
    return Schedule(got, next(iter(inspect.signature(model.forward).parameters)), sched.timesteps.clone(),
                    sched.sigmas.clone() if flow else None, sched)


def _predict(model, sched: Schedule, x: torch.Tensor, i: int) -> torch.Tensor:
    out = model(**{**sched.kwargs, sched.latent: x.to(sched.kwargs[sched.latent].dtype), "timestep": sched.model_timestep(i)})
    return (out[0] if isinstance(out, tuple) else out.sample).to(x.dtype)


def _ddim_back(s, pred, x, i: int) -> torch.Tensor:
    """One DDIM step backwards: x at step i's previous (cleaner) level -> x at step i's timestep."""
    t = int(s.timesteps[i])
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t]
    a_p = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
    kind = s.config.prediction_type
    if kind == "epsilon":
        eps = pred
    elif kind == "v_prediction":  # v at the level of x: eps = sqrt(a) v + sqrt(1 - a) x
        eps = a_p.sqrt() * pred + (1 - a_p).sqrt() * x
    else:
        raise ValueError(f"DDIM inversion supports epsilon and v_prediction models, not {kind!r}")
    x0 = (x - (1 - a_p).sqrt() * eps) / a_p.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


@torch.no_grad()
def invert(pipe, latents: torch.Tensor, schedule: Schedule | None = None, **call) -> torch.Tensor:
    """The noise latent that ``pipe(latents=..., **call)`` (guidance off) samples back to ``latents`` (a clean
    latent in the pipeline's own format, e.g. ``pipe(..., output_type="latent").images``, or ``encode``'s)."""
    sched = schedule or capture(pipe, latents, **call)
    model, x = denoiser(pipe), latents.float()
    for i in reversed(range(len(sched.timesteps))):
        pred = _predict(model, sched, x, i).float()
        if sched.sigmas is not None:
            x = x + (sched.sigmas[i] - sched.sigmas[i + 1]).to(x.device) * pred
        else:
            x = _ddim_back(sched.scheduler, pred, x, i)
    return x.to(latents.dtype)


@torch.no_grad()
def encode(pipe, image) -> torch.Tensor:
    """Images (PIL, or a (B, 3, H, W) tensor in [0, 1]) as the pipeline's latents (FLUX: packed tokens)."""
    x = pipe.image_processor.preprocess(image)  # (B, 3, H, W) in [-1, 1]
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
    z = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    if hasattr(pipe, "_pack_latents"):  # FLUX: 2x2 latent patches as tokens (B, h / 2 * w / 2, 4 C)
        z = pipe._pack_latents(z, *z.shape)
    return z


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``content`` renormalised to ``style``'s mean / std per latent channel over positions (the paper's
    initial-latent AdaIN; std unbiased, eps on the content's). (B, C, H, W) latents, or FLUX's packed
    tokens (B, S, 4 C) whose channel c is the features 4 c .. 4 c + 3 (its 2 x 2 patch)."""
    def stats(x):
        if x.dim() == 3:
            y = x.reshape(*x.shape[:2], -1, 4)  # (B, S, C, 4): one channel's values in dims 1 and 3
            mu, sd = y.mean((1, 3), keepdim=True), y.std((1, 3), keepdim=True)
            return (lambda t: t.reshape(*t.shape[:2], -1, 4)), mu, sd
        return (lambda t: t), x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)

    view, mc, sc = stats(content)
    _, ms, ss = stats(style)
    return ((view(content) - mc) / (sc + eps) * ss + ms).reshape(content.shape)


def latents_of(pipe, x) -> torch.Tensor:
    """``x`` as latents: images (PIL, arrays, 3-channel (B, 3, H, W) tensors) are encoded; latents pass."""
    if torch.is_tensor(x) and not (x.dim() == 4 and x.shape[1] == 3):
        return x
    return encode(pipe, x)


@contextlib.contextmanager
def ddim_for(pipe):
    """A DDIM scheduler (no clipping: invertible) for the duration, unless the pipeline samples a flow."""
    old = pipe.scheduler
    if hasattr(old, "alphas_cumprod") or not hasattr(old, "sigmas"):
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(old.config, clip_sample=False)
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def default_layers(pipe):
    """The paper's layers for a UNet: the decoder's self-attention; a DiT: every block."""
    return "unet.up_blocks.*attn1" if getattr(pipe, "unet", None) is not None else None


def style_transfer(pipe, content, style, method: StyleInjection | None = None, *, layers="default", init_adain=True,
                   **call):
    """Style Injection in Diffusion: ``content`` restyled after ``style`` (images or latents of one size).
    ``call`` goes to every pipeline call (``num_inference_steps``, ``prompt`` / ``prompt_embeds``, ...);
    the prompt defaults to "" and guidance is off, as the paper. ``layers`` as in ``patch`` ("default": a UNet's
    decoder self-attention, a DiT's every block). The recorded features stay on ``method.bank`` (layers x steps x
    3 x tokens x width: choose a few layers of a large model). Returns the pipeline's output."""
    method = method or StyleInjection()
    if "prompt" not in call and "prompt_embeds" not in call:
        call["prompt"] = ""
    call = {**no_guidance(pipe), **call}
    with ddim_for(pipe):
        zc, zs = latents_of(pipe, content), latents_of(pipe, style)
        sched = capture(pipe, zc, **call)
        method.clear()
        with api.patch(pipe, method, layers=default_layers(pipe) if layers == "default" else layers):
            method.record("style")
            zs_T = invert(pipe, zs, sched)
            method.record("content")
            zc_T = invert(pipe, zc, sched)
            method.record(None)
            start = adain(zc_T, zs_T) if init_adain else zc_T
            return pipe(latents=start, **call)
