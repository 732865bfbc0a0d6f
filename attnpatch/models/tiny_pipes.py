"""Tiny random-weight *pipelines* of every supported diffusers family: the real pipeline class
with a tiny transformer, the smallest VAE of its real class and its real scheduler, called with
precomputed prompt embeddings (no text encoder, no tokenizer). Latent sizes give an odd,
non-square token grid with distinct axes; each builder's docstring works out the grid its call
implies. No downloads.

    pipe, kwargs = PIPES["wan"]()
    video = run(pipe, kwargs)
"""
from __future__ import annotations

import torch

from .tiny import _cog, _flux, _ltx, _mochi, _sd3, _wan

STEPS = 3


def _r(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mask(n: int, valid: int) -> torch.Tensor:
    """(1, n) text attention mask: ``valid`` real tokens, then padding (as tokenizers pad)."""
    return (torch.arange(n) < valid).float()[None]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux():
    """FluxPipeline: VAE /2 and 2x2 packing, 12x20 px -> latent 6x10 -> grid (3, 5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=1, layers_per_block=1, norm_num_groups=4,
                        sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=_flux())
    kw = dict(prompt_embeds=_r(1, 1, 7, 32), pooled_prompt_embeds=_r(2, 1, 32), height=12, width=20)
    return _quiet(pipe), kw


def sd3():
    """StableDiffusion3Pipeline (CFG on): VAE /2, patch 2, 12x20 px -> latent 6x10 -> grid (3, 5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    pipe = StableDiffusion3Pipeline(transformer=_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    kw = dict(prompt_embeds=_r(1, 1, 9, 32), pooled_prompt_embeds=_r(2, 1, 32), negative_prompt_embeds=_r(3, 1, 9, 32),
              negative_pooled_prompt_embeds=_r(4, 1, 32), height=12, width=20, guidance_scale=4.0)
    return _quiet(pipe), kw


def wan():
    """WanPipeline (CFG as two forwards): VAE /8 and /4 in time, patch (1, 2, 2),
    9 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=_wan())
    kw = dict(prompt_embeds=_r(1, 1, 11, 16), negative_prompt_embeds=_r(2, 1, 11, 16), height=80, width=112, num_frames=9,
              guidance_scale=5.0)
    return _quiet(pipe), kw


def hunyuan_video():
    """HunyuanVideoPipeline: VAE /8 and /4 in time, patch 2 (as the real model; the pipeline
    wants pixel sizes divisible by 16), 9 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7).
    The text mask pads 2 of 6 tokens, as the LLM encoder's padding does."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4, mid_block_add_attention=False)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None)
    kw = dict(prompt_embeds=_r(1, 1, 6, 16), pooled_prompt_embeds=_r(2, 1, 8), prompt_attention_mask=_mask(6, 4),
              height=80, width=112, num_frames=9)
    return _quiet(pipe), kw


def cogvideox():
    """CogVideoXPipeline (CFG batched): VAE /8 and /4 in time, patch 2,
    9 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    sched = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=_cog(), scheduler=sched)
    kw = dict(prompt_embeds=_r(1, 1, 8, 16), negative_prompt_embeds=_r(2, 1, 8, 16), height=80, width=112, num_frames=9,
              guidance_scale=6.0, max_sequence_length=8)
    return _quiet(pipe), kw


def ltx():
    """LTXPipeline (CFG batched): VAE patch 4 x three 2x scalings = /32 in space, /8 in time
    (the pipeline wants pixel sizes divisible by 32), transformer patch 1,
    17 frames of 160x224 px -> latent 3x5x7 -> grid (3, 5, 7)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, True, False),
                                decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=4, patch_size_t=1)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=_ltx())
    kw = dict(prompt_embeds=_r(1, 1, 7, 16), prompt_attention_mask=_mask(7, 5), negative_prompt_embeds=_r(2, 1, 7, 16),
              negative_prompt_attention_mask=_mask(7, 3), height=160, width=224, num_frames=17, guidance_scale=3.0)
    return _quiet(pipe), kw


def mochi():
    """MochiPipeline (CFG batched; the pipeline fixes VAE /8 and /6 in time, patch 2),
    13 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLMochi(latent_channels=4, encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5,
                             latents_mean=None, latents_std=None)  # the pipeline's denormalisation assumes 12 channels
    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)  # as genmo/mochi-1-preview: time counts up
    pipe = MochiPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                         transformer=_mochi())
    kw = dict(prompt_embeds=_r(1, 1, 5, 16), prompt_attention_mask=_mask(5, 5), negative_prompt_embeds=_r(2, 1, 5, 16),
              negative_prompt_attention_mask=_mask(5, 3), height=80, width=112, num_frames=13, guidance_scale=4.5)
    return _quiet(pipe), kw


PIPES = {"flux": flux, "sd3": sd3, "wan": wan, "hunyuan_video": hunyuan_video, "cogvideox": cogvideox, "ltx": ltx,
         "mochi": mochi}


def run(pipe, kwargs, steps: int = STEPS, output_type: str = "pt") -> torch.Tensor:
    """One seeded pipeline call: the decoded images / frames (or latents) as a tensor."""
    with torch.no_grad():
        out = pipe(**kwargs, num_inference_steps=steps, output_type=output_type,
                   generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    return out


if __name__ == "__main__":
    import time

    for name, build in PIPES.items():
        t0 = time.perf_counter()
        pipe, kw = build()
        t1 = time.perf_counter()
        out = run(pipe, kw)
        print(f"{name:14s} build {t1 - t0:5.2f} s  call {time.perf_counter() - t1:5.2f} s  -> {tuple(out.shape)}")
