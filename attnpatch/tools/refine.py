"""Coarse-to-fine generation above a model's training resolution (FreeSwim's pipeline).

From noise at several times its training side, a text-to-image model either leaves its training
distribution (stock attention: near-blank images on the FLUX fixture at 3x) or, under a local
window, draws the subject once per window (repetition). The coarse-to-fine pipeline fixes the
layout first: generate at a size the model knows, upsample the decoded image, then run the
pipeline's img2img counterpart (same modules) at the full size on that image noised to level
``strength``, so only the last ``strength * steps`` or so of the steps run at full size::

    import attnpatch as ap
    from attnpatch.tools.refine import refine

    with ap.patch(pipe, ap.SlidingTile(tile=8, window=3, dense_steps=0.4)):
        images = refine(pipe, "a large red circle at the top left", height=192, width=192, from_size=64).images

A patch on ``pipe`` applies to both stages: its hooks live on the denoiser, which the img2img
pipeline shares, and the img2img pipeline's calls are wrapped like a patched pipeline's, so the
hooks see its arguments and its step count: ``dense_steps`` counts the img2img call's own steps (a
fraction: ``floor(dense_steps * n)`` of its ``n = steps - int(steps - strength * steps)`` steps,
diffusers' count, about ``strength * steps``). A window sized to the training grid keeps every key
at the first stage's size, where it is exact. Guidance methods (PAG) read the CFG layout from the
family table, which lists ``FluxPipeline`` but not ``FluxImg2ImgPipeline`` yet: under true CFG
their img2img stage would perturb both branches.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

from ..patchers import guidance

_I2I: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> its img2img counterpart
_RUNNING: set = set()  # ids of the img2img pipelines inside a refine call (``current_timestep``)
# call arguments the two stages set themselves; every other default of the text-to-image
# pipeline's call (e.g. a fixture's true_cfg_scale, max_sequence_length, num_inference_steps) is
# carried to the img2img call, so both stages run with the same settings
_OWN = {"prompt", "prompt_2", "height", "width", "image", "strength", "generator", "latents", "output_type",
        "return_dict", "sigmas", "timesteps"}


class NoImg2Img(ValueError):
    """The pipeline has no img2img counterpart that diffusers knows."""


def img2img(pipe):
    """The img2img pipeline that shares ``pipe``'s modules (``AutoPipelineForImage2Image.from_pipe``),
    built once per pipeline (rebuilt if a module was swapped), its calls wrapped so that a patch on
    the shared denoiser sees them as it sees a patched pipeline's."""
    cached = _I2I.get(pipe)
    if cached is not None and all(getattr(cached, k, None) is v for k, v in pipe.components.items() if k in cached.components):
        return cached
    from diffusers import AutoPipelineForImage2Image

    try:
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)  # no dtype cast (DiffusionPipeline.from_pipe casts to float32)
    except ValueError as e:
        raise NoImg2Img(f"{type(pipe).__name__} has no img2img counterpart in diffusers "
                        f"(AutoPipelineForImage2Image: {str(e).splitlines()[0]}); coarse-to-fine needs a text-to-image "
                        "pipeline such as FluxPipeline or StableDiffusion3Pipeline") from None
    i2i.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    guidance.wrap_calls(i2i)  # permanent and harmless: with no attnpatch hook on the denoiser it calls straight through
    _I2I[pipe] = i2i
    return i2i


def coarse_size(height: int, width: int, from_size, multiple: int = 16) -> tuple[int, int]:
    """The first stage's (height, width): ``from_size`` as (h, w), or an int for the longer side,
    the other side keeping the aspect ratio, rounded to ``multiple`` px (at least one multiple)."""
    if isinstance(from_size, (tuple, list)):
        return int(from_size[0]), int(from_size[1])
    longest, n = max(height, width), int(from_size)
    side = lambda x: n if x == longest else max(multiple, round(x * n / longest / multiple) * multiple)  # noqa: E731
    return side(height), side(width)


def _defaults(cls) -> dict:
    """The call defaults of a pipeline class (past attnpatch's call wrapper, whose signature is generic)."""
    for c in cls.__mro__:
        fn = c.__dict__.get("__call__")
        if fn is not None and fn is not guidance._Calls.__call__:
            return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    return {}


def _carried(pipe, i2i) -> dict:
    """Defaults of ``pipe``'s call that differ from the img2img call's, for arguments both take."""
    mine, theirs = _defaults(type(pipe)), _defaults(type(i2i))
    out = {}
    for name, value in mine.items():
        if name in theirs and name not in _OWN:
            try:
                same = bool(value == theirs[name])
            except (TypeError, RuntimeError, ValueError):  # values without a plain ==: carry them
                same = False
            if not same:
                out[name] = value
    return out


def refine(pipe, prompt=None, *, height: int, width: int, from_size, strength: float = 0.7, generator=None,
           output_type: str = "pil", mode: str = "bilinear", **call):
    """Generate at ``from_size`` (see ``coarse_size``) with ``pipe``, upsample the decoded images
    to ``height`` x ``width`` (``mode`` of ``torch.nn.functional.interpolate``), then run
    ``img2img(pipe)`` on them at ``strength`` (only its last ~``strength * steps`` steps run).
    ``generator`` draws both stages' noise in turn; ``call`` goes to both calls (e.g.
    ``num_inference_steps``, ``prompt_embeds``). Returns the img2img call's output."""
    if not 0 < strength <= 1:
        raise ValueError(f"refine strength={strength}: expected 0 < strength <= 1 (the part of the noise schedule "
                         "run at full size; FreeSwim uses 0.7)")
    i2i = img2img(pipe)
    multiple = 2 * int(getattr(pipe, "vae_scale_factor", 8))
    h0, w0 = coarse_size(height, width, from_size, multiple)
    if h0 > height or w0 > width:
        raise ValueError(f"refine from {h0}x{w0} to {height}x{width}: the first stage must not be larger than the output")
    first = {k: v for k, v in call.items() if k != "return_dict"}
    base = pipe(prompt, height=h0, width=w0, generator=generator, output_type="pt", **first).images  # (N, 3, h0, w0) in [0, 1]
    align = dict(align_corners=False) if mode in ("bilinear", "bicubic") else {}
    up = torch.nn.functional.interpolate(base.float(), size=(height, width), mode=mode, **align).clamp(0, 1)
    kw = {**_carried(pipe, i2i), **call}
    _RUNNING.add(id(i2i))
    try:
        with _cache_contexts(i2i):
            return i2i(prompt, image=up, strength=strength, height=height, width=width, generator=generator,
                       output_type=output_type, **kw)
    finally:
        _RUNNING.discard(id(i2i))


@contextlib.contextmanager
def _cache_contexts(i2i):
    """Name each denoiser call's CFG branch for diffusers' caches when the img2img pipeline does
    not: FluxImg2ImgPipeline (diffusers 0.42) calls its transformer without ``cache_context``, so a
    cache enabled on the shared transformer (FirstBlockCache, ...) raises "No cache context is set".
    Its true-CFG loop calls the conditional branch first at each timestep, the unconditional one
    second at the same timestep: the first call at a timestep is "cond", a repeat is "uncond", each
    with the state of its own branch, as in the text-to-image pipeline that names them."""
    model = getattr(i2i, "transformer", None)
    if model is None or not getattr(model, "is_cache_enabled", False) or "cache_context" in call_source(i2i):
        yield
        return
    own = model.__dict__.get("forward")  # the hook chain diffusers installed as the instance's forward
    inner, last = model.forward, [None]

    def forward(*args, **kwargs):
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else t
        name = "uncond" if last[0] is not None and t == last[0] else "cond"
        last[0] = t
        with model.cache_context(name):
            return inner(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def current_timestep(pipe):
    """The timestep ``pipe`` is at mid-call (diffusers' ``current_timestep``; None between calls), or, during
    ``refine``'s img2img stage, that stage's: a cache's ``current_timestep_callback`` on the shared denoiser
    serves both stages. FluxImg2ImgPipeline (diffusers 0.42) keeps no ``current_timestep``: its scheduler's
    does (the step being run, from the begin index img2img sets before its first step)."""
    t = getattr(pipe, "current_timestep", None)
    i2i = _I2I.get(pipe)
    if t is not None or i2i is None or id(i2i) not in _RUNNING:
        return t
    t = getattr(i2i, "current_timestep", None)
    if t is None:
        s = i2i.scheduler
        t = s.timesteps[s.step_index if s.step_index is not None else (s.begin_index or 0)]
    return t


def call_source(pipe) -> str:
    """The source of the pipeline's ``__call__`` and its bases'."""
    text = []
    for cls in type(pipe).__mro__:
        fn = cls.__dict__.get("__call__")
        if fn is not None:
            with contextlib.suppress(OSError, TypeError):
                text.append(inspect.getsource(fn))
    return "\n".join(text)


def blobs(img: torch.Tensor, caption: str, min_frac: float = 0.004) -> int:
    """How many times a shapes-fixture image (3, H, W) in [0, 1] draws its caption's subject:
    connected regions (8-connectivity) of pixels near the caption's colour, each at least
    ``min_frac`` of the image. 1: drawn once; more: repetition (what local windows from noise do
    above the training size); 0: nothing drawn (what stock attention does there)."""
    from ..models import shapes

    want = torch.tensor(shapes.COLORS[shapes._parse(caption)["color"]], dtype=torch.float32).view(3, 1, 1)
    img = img.float()
    fg = (img - shapes.BACKGROUND).abs().amax(0) > 0.25
    near = fg & ((img - want).square().sum(0).sqrt() < 0.35)  # (H, W) caption-coloured pixels
    H, W = near.shape
    # connected components by max-label propagation: each pixel takes the largest label among its
    # 3x3 neighbours of the same region until nothing changes (a region converges to its largest index)
    lab = torch.where(near, torch.arange(1, H * W + 1, dtype=torch.float32).view(H, W), torch.zeros(()))[None, None]
    while True:
        grown = torch.nn.functional.max_pool2d(lab, 3, stride=1, padding=1) * near
        if torch.equal(grown, lab):
            break
        lab = grown
    sizes = torch.bincount(lab.flatten().long())[1:]
    return int((sizes >= min_frac * H * W).sum())
