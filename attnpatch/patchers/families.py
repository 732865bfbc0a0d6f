"""Every per-family fact of the diffusers patcher, one row per family: ``FAMILIES``.

The patcher (``diffusers.py``), the denoiser guidance hook (``guidance.py``), the supported list
(``SUPPORTED``, the README's "Supported" section) and the tiny test models
(``attnpatch.models.tiny``) all read these rows; the tests are parametrised over them. Adding a
diffusers family is one row here plus its tiny inputs / pipeline in ``models/tiny.py``.

Nothing here imports diffusers: rows name classes, the grid readers take the model and its bound
forward arguments.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._log import log_once
from ..ops.rope import rope_shift


def _latent(p_t: str | None, p: str, layout: str) -> Callable:
    """Grid from a latent ``hidden_states`` whose dims are named by ``layout`` (e.g. "BCTHW")."""

    def grid(model, args):
        x = args["hidden_states"]
        dims = dict(zip(layout, x.shape))  # e.g. {"B": 1, "C": 16, "T": 5, "H": 8, "W": 8}
        cfg = model.config
        ps = getattr(cfg, p)
        ph, pw = (ps[-2], ps[-1]) if isinstance(ps, (tuple, list)) else (ps, ps)
        spatial = (dims["H"] // ph, dims["W"] // pw)
        if "T" not in dims:
            return spatial
        pt = ps[0] if isinstance(ps, (tuple, list)) else (getattr(cfg, p_t, None) or 1) if p_t else 1
        return (math.ceil(dims["T"] / pt), *spatial)

    return grid


def _flux_rope(model) -> Callable:
    """FLUX's RoPE as a position shift (its axes from the config, theta 10000 as FluxPosEmbed)."""
    axes = tuple(model.config.axes_dims_rope)
    return lambda x, offsets: rope_shift(x, axes, 10000, offsets)


# (img_ids tensor, its version, grid) of the latest call: a pipeline passes the same ids tensor every step. The
# tensor itself is held (not its address: a freed tensor's memory may hold other ids of the same shape next time)
_FLUX_GRID: list = [None]


def _flux_grid(model, args):
    ids = args.get("img_ids")
    if ids is None:
        return None
    memo = _FLUX_GRID[0]  # one read: another thread may replace the triple, never part of it
    if memo is not None and memo[0] is ids and memo[1] == ids._version:
        return memo[2]
    grid = _flux_grid_of(ids)
    _FLUX_GRID[0] = (ids, ids._version, grid)
    return grid


def _flux_grid_of(ids):
    ids = ids[0] if ids.dim() == 3 else ids  # (S_img, 3): (frame, row, col); legacy 3-D ids are batched
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    H, W = int(rows.max()) + 1, int(cols.max()) + 1
    if H * W != ids.shape[0] or not torch.equal(rows * W + cols, torch.arange(H * W, device=ids.device)):
        log_once(logging.INFO, f"flux: img_ids ({ids.shape[0]} tokens) are not one row-major grid; no grid given to methods")
        return None
    return (H, W)


def _unet_grid(model, args):
    x = args.get("sample")
    return None if x is None else tuple(x.shape[-2:])  # (H, W) of the latent; deeper levels are derived per call


def _ltx_grid(model, args):
    cfg = model.config
    f, h, w = args.get("num_frames"), args.get("height"), args.get("width")
    if None in (f, h, w):
        return None
    return (f // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)


# forward arguments that describe the whole call, not one batch row: the guidance hook never
# appends perturbed rows to them
_LAYOUT_ARGS = frozenset({"return_dict"})


# true CFG runs only with a negative prompt: its text, or its embeddings and pooled embeddings
_NEGATIVE = (("negative_prompt",), ("negative_prompt_embeds", "negative_pooled_prompt_embeds"))


@dataclass(frozen=True)
class Family:
    name: str  # Site.family
    label: str  # the name users know, for the supported list
    models: tuple  # denoiser class names (matched along the model's MRO)
    pipelines: tuple  # pipeline class names this row describes (matched along the pipeline's MRO)
    text_first: bool  # where joint attention puts the text segment
    grid: Callable  # (model, bound forward args) -> grid tuple or None
    t_scale: float = 1000.0  # the transformer's timestep / t_scale = noise level in [0, 1]
    t_inverted: bool = False  # Mochi counts time up: noise level = 1 - t / t_scale
    skip: tuple = ()  # module-name prefixes whose attention never touches visual tokens
    multires: bool = False  # UNets: attention at several resolutions, each level halves the grid (ceil)
    # classifier-free guidance: "batched" = [uncond, cond] rows in one denoiser call; "separate" =
    # one call per branch, conditional first (the pipeline's cache_context names it "cond" / "uncond")
    cfg: str = "batched"
    # where the CFG scale g is, per denoiser component (transformer, transformer_2): a pipeline
    # attribute, or "call:NAME" for an argument of the pipeline call
    cfg_scale: tuple = ("guidance_scale",)
    # "call:" CFG runs only when the scale is above 1 and all arguments of one of these groups are given
    cfg_needs: tuple = ()
    not_batched: frozenset = _LAYOUT_ARGS  # forward arguments shared by all rows (never duplicated)
    joint: bool = True  # text joins the visual tokens in self-attention (False: only through cross-attention)
    row_calls: bool = False  # the processor attends one batch row per call, in order (Mochi)
    tiny: dict | None = field(default=None, compare=False)  # the tiny random denoiser of the tests
    note: str = ""  # what the supported list adds after the label
    rope: Callable | None = None  # model -> rope(x, offsets per axis), handed to methods as Site.rope

    def matches_pipeline(self, pipe) -> bool:
        return any(c.__name__ in self.pipelines for c in type(pipe).__mro__)


FAMILIES = (
    Family("flux", "Flux", ("FluxTransformer2DModel",), ("FluxPipeline", "FluxImg2ImgPipeline"), True, _flux_grid, t_scale=1.0,
           cfg="separate", cfg_scale=("call:true_cfg_scale",), cfg_needs=_NEGATIVE,
           not_batched=_LAYOUT_ARGS | {"img_ids", "txt_ids"}, rope=_flux_rope,
           tiny=dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))),
    Family("sd3", "SD3", ("SD3Transformer2DModel",), ("StableDiffusion3Pipeline",), False,
           _latent(None, "patch_size", "BCHW"),
           tiny=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                     dual_attention_layers=(0,))),
    Family("wan", "Wan", ("WanTransformer3DModel",), ("WanPipeline",), True, _latent(None, "patch_size", "BCTHW"),
           cfg="separate", cfg_scale=("guidance_scale", "_guidance_scale_2"), note="(2.1 / 2.2)", joint=False,
           tiny=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                     text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)),
    Family("hunyuan_video", "HunyuanVideo", ("HunyuanVideoTransformer3DModel",), ("HunyuanVideoPipeline",), False,
           _latent("patch_size_t", "patch_size", "BCTHW"), skip=("context_embedder.",),
           cfg="separate", cfg_scale=("call:true_cfg_scale",), cfg_needs=_NEGATIVE,
           tiny=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                     num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                     pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))),
    Family("cogvideox", "CogVideoX", ("CogVideoXTransformer3DModel",), ("CogVideoXPipeline",), True,
           _latent("patch_size_t", "patch_size", "BTCHW"),
           tiny=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                     text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                     temporal_compression_ratio=4, max_text_seq_length=8)),
    Family("ltx", "LTX-Video", ("LTXVideoTransformer3DModel",), ("LTXPipeline",), True, _ltx_grid, joint=False,
           not_batched=_LAYOUT_ARGS | {"num_frames", "height", "width", "rope_interpolation_scale"},
           tiny=dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                     attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16)),
    Family("mochi", "Mochi", ("MochiTransformer3DModel",), ("MochiPipeline",), False, _latent(None, "patch_size", "BCTHW"),
           t_inverted=True, row_calls=True,
           tiny=dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                     in_channels=4, text_embed_dim=16, time_embed_dim=4)),
    Family("unet", "Stable Diffusion UNets", ("UNet2DConditionModel",), ("StableDiffusionPipeline",), True, _unet_grid,
           multires=True, joint=False, note="(attention methods that need no token grid, e.g. PAG)"),
)
BY_MODEL = {cls: fam for fam in FAMILIES for cls in fam.models}
BY_NAME = {fam.name: fam for fam in FAMILIES}


def family_of(model) -> Family | None:
    """The row of ``model``'s class (or a base class), or None."""
    return next((BY_MODEL[c.__name__] for c in type(model).__mro__ if c.__name__ in BY_MODEL), None)


def pipeline_family(pipe) -> Family | None:
    """The row naming ``pipe``'s class (or a base class), or None (an unlisted pipeline: its
    guidance layout is read from ``do_classifier_free_guidance`` alone)."""
    return next((f for f in FAMILIES if f.matches_pipeline(pipe)), None)


def supported_text() -> str:
    """The diffusers half of ``attnpatch.patchers.SUPPORTED``: every row's label and note."""
    return ", ".join(f"{f.label} {f.note}".strip() for f in FAMILIES)


def _cfg_cell(f: Family) -> str:
    where = ", ".join(f"`{s[5:]}` argument" if s.startswith("call:") else f"`pipe.{s}`" for s in f.cfg_scale)
    return f"{f.cfg} ({where})"


def supported_markdown() -> str:
    """The README's per-family table (between its ``supported families`` markers)."""
    rows = ["| family | `Site.family` | denoiser | pipeline | text in joint attention | classifier-free guidance |",
            "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        text = ("first" if f.text_first else "last") if f.joint else "none (cross-attention)"
        rows.append(f"| {f.label} {f.note}".rstrip() + f" | `{f.name}` | {', '.join(f'`{m}`' for m in f.models)} | "
                    f"{', '.join(f'`{p}`' for p in f.pipelines)} | {text} | {_cfg_cell(f)} |")
    return "\n".join(rows) + "\n"
