"""The trained fixtures as stock diffusers pipelines: ``flux_shapes()`` (``FluxPipeline``) and
``wan_shapes()`` (``WanPipeline``), loaded offline from the diffusers-format folders committed
under ``attnpatch/models/weights`` (or any folder written by ``python -m attnpatch.models.train``).

The components are the real diffusers / transformers classes at small sizes: a word-level
tokenizer over the caption vocabulary, CLIP-slot and T5-slot text encoders trained jointly with
the denoiser, a small autoencoder trained first, and the transformer. The pipelines are thin
subclasses whose only change is call defaults matching training (resolution, frames, a 16-token
text length, steps, CFG); every other argument works as in the stock pipeline.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .._extras import require
from . import shapes

WEIGHTS = Path(__file__).resolve().parent / "weights"
TEXT = dict(vocab_size=len(shapes.VOCAB), pad_token_id=0, eos_token_id=1)


def flux_components(seed: int = 0) -> dict:
    """Untrained components of the FLUX-architecture fixture (64x64 images, 16x16 tokens)."""
    require("diffusers", "transformers", what="the builtin fixtures")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=64, shift_factor=0.0, scaling_factor=1.0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=shapes.MAX_TOKENS, projection_dim=32, bos_token_id=1, **TEXT))
    t5 = T5EncoderModel(T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0,
                                 feed_forward_proj="gated-gelu", **TEXT))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                         attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 8, 8))
    tok = shapes.tokenizer()
    return dict(vae=vae, text_encoder=clip, text_encoder_2=t5, tokenizer=tok, tokenizer_2=tok,
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))


def wan_components(seed: int = 0) -> dict:
    """Untrained components of the Wan-architecture fixture (9 frames of 32x32 -> 5x8x8 tokens):
    ``AutoencoderKLWan`` with one spatio-temporal stage (2x spatial, 2x temporal with the first
    frame alone, as Wan; 4 latent channels), UMT5 text encoder, ``WanTransformer3DModel``."""
    require("diffusers", "transformers", what="the builtin fixtures")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    z = 4
    vae = AutoencoderKLWan(base_dim=16, z_dim=z, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * z, latents_std=[1.0] * z, scale_factor_temporal=2, scale_factor_spatial=2)
    umt5 = UMT5EncoderModel(UMT5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0,
                                       feed_forward_proj="gated-gelu", **TEXT))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=z,
                                        out_channels=z, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    return dict(vae=vae, text_encoder=umt5, tokenizer=shapes.tokenizer(), transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))


def _defaults(base, **defaults):
    """``base`` with new call defaults (keyword arguments the caller passes still win)."""
    def __call__(self, *args, **kwargs):
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
        return base.__call__(self, *args, **kwargs)

    # the base's signature with these defaults: whoever binds a call (the guidance hook reads
    # true_cfg_scale / negative_prompt from it) sees the arguments the pipeline really runs with
    sig = inspect.signature(base.__call__)
    __call__.__signature__ = sig.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()])
    return type(base.__name__, (base,), {"__call__": __call__, "__doc__": base.__doc__, "__module__": base.__module__})


def _pipe_classes():
    from diffusers import FluxPipeline, WanPipeline

    flux = _defaults(FluxPipeline, height=64, width=64, num_inference_steps=20, max_sequence_length=shapes.MAX_TOKENS,
                     true_cfg_scale=4.0, negative_prompt="")
    wan = _defaults(WanPipeline, height=32, width=32, num_frames=9, num_inference_steps=20,
                    max_sequence_length=shapes.MAX_TOKENS, guidance_scale=4.0, negative_prompt="")
    return flux, wan


def _load(name: str, path, dtype, device, cls_index: int):
    folder = Path(path) if path is not None else WEIGHTS / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained {name} weights at {folder}; train them with: python -m attnpatch.models.train "
                                f"{name.split('-')[0]} --out {folder}")
    pipe = _pipe_classes()[cls_index].from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def flux_shapes(path=None, dtype: torch.dtype = torch.float32, device="cpu"):
    """The trained FLUX-architecture text-to-image pipeline (64x64 coloured shapes)."""
    return _load("flux-shapes", path, dtype, device, 0)


def wan_shapes(path=None, dtype: torch.dtype = torch.float32, device="cpu"):
    """The trained Wan-architecture text-to-video pipeline (9 frames of 32x32 moving shapes)."""
    return _load("wan-shapes", path, dtype, device, 1)
