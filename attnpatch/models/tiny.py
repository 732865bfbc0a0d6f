"""Tiny random-weight models and pipelines of every supported family, no downloads: the
embedded default of the demo and the models of the tests.

- ``CASES[family]``: a tiny denoiser built from its row's ``tiny`` config
  (``attnpatch.patchers.families``), forward inputs, and the layout facts read off those inputs.
- ``PIPES[family]()``: the real pipeline class with that kind of tiny transformer, the smallest VAE
  of its real class and its real scheduler, called with precomputed prompt embeddings (no text
  encoder, no tokenizer); ``run(pipe, kwargs)`` is one seeded call. Latent sizes give an odd,
  non-square token grid with distinct axes; each builder's docstring works out its grid.
- ``llm(model_type)``: a tiny random transformers decoder.

A new diffusers family: its row (with ``tiny=``) in ``families.FAMILIES``, its inputs in ``_INPUTS``
and its pipeline in ``PIPES``; the tests are parametrised over the rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..patchers.families import BY_NAME, FAMILIES

STEPS = 3


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _r(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model(family: str, **overrides) -> torch.nn.Module:
    """The tiny denoiser of ``family`` (its row's ``tiny`` config, with ``overrides``)."""
    import diffusers

    row = BY_NAME[family]
    return getattr(diffusers, row.models[0])(**{**row.tiny, **overrides})


# --- bare denoisers: inputs and the layout facts they imply --------------------------------------

def _flux_inputs(H=3, W=5, T=7):
    img_ids = torch.zeros(H * W, 3)
    img_ids[:, 1] = torch.arange(H).repeat_interleave(W)
    img_ids[:, 2] = torch.arange(W).repeat(H)
    return dict(hidden_states=_g(2, H * W, 4), encoder_hidden_states=_g(2, T, 32), pooled_projections=_g(2, 32),
                timestep=torch.tensor([0.75, 0.75]), img_ids=img_ids, txt_ids=torch.zeros(T, 3), return_dict=False)


_INPUTS = {  # family: (inputs, grid they imply, text tokens in joint calls, attention kinds)
    "flux": (_flux_inputs, (3, 5), 7, {"joint"}),
    "sd3": (lambda: dict(hidden_states=_g(2, 4, 6, 10), encoder_hidden_states=_g(2, 9, 32), pooled_projections=_g(2, 32),
                         timestep=torch.tensor([500.0, 500.0]), return_dict=False), (3, 5), 9, {"joint", "self"}),
    "wan": (lambda: dict(hidden_states=_g(1, 4, 3, 6, 10), encoder_hidden_states=_g(1, 11, 16), timestep=torch.tensor([250]),
                         return_dict=False), (3, 3, 5), 0, {"self", "cross"}),
    "hunyuan_video": (lambda: dict(hidden_states=_g(1, 4, 3, 4, 5), timestep=torch.tensor([900]),
                                   encoder_hidden_states=_g(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                                   pooled_projections=_g(1, 8), guidance=torch.tensor([3.5]), return_dict=False),
                      (3, 4, 5), 6, {"joint"}),
    "cogvideox": (lambda: dict(hidden_states=_g(1, 3, 4, 6, 8), encoder_hidden_states=_g(1, 8, 16), timestep=torch.tensor([400]),
                               return_dict=False), (3, 3, 4), 8, {"joint"}),
    "ltx": (lambda: dict(hidden_states=_g(1, 2 * 3 * 5, 8), encoder_hidden_states=_g(1, 7, 16), timestep=torch.tensor([600]),
                         encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=3, width=5, return_dict=False),
            (2, 3, 5), 0, {"self", "cross"}),
    "mochi": (lambda: dict(hidden_states=_g(1, 4, 2, 4, 6), encoder_hidden_states=_g(1, 5, 16), timestep=torch.tensor([300]),
                           encoder_attention_mask=torch.ones(1, 5), return_dict=False), (2, 2, 3), 5, {"joint"}),
}


@dataclass
class Case:
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    grid: tuple  # the visual grid the inputs imply
    text_len: int  # text tokens the joint calls carry (0: text only through cross-attention)
    text_first: bool
    kinds: set  # the attention kinds its calls have


def _case(f) -> Case:
    inputs, grid, text_len, kinds = _INPUTS[f.name]
    return Case(f.name, lambda: model(f.name), inputs, grid, text_len, f.text_first, kinds)


CASES = {f.name: _case(f) for f in FAMILIES if f.tiny is not None}


# --- whole pipelines -----------------------------------------------------------------------------

def _mask(n: int, valid: int) -> torch.Tensor:
    """(1, n) text attention mask: ``valid`` real tokens, then padding (as tokenizers pad)."""
    return (torch.arange(n) < valid).float()[None]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4,
                         sample_size=16, shift_factor=0.0, scaling_factor=1.0)


def flux():
    """FluxPipeline: VAE /2 and 2x2 packing, 12x20 px -> latent 6x10 -> grid (3, 5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_image_vae(1), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model("flux"))
    return _quiet(pipe), _flux_kw()


def _flux_kw():
    return dict(prompt_embeds=_r(1, 1, 7, 32), pooled_prompt_embeds=_r(2, 1, 32), height=12, width=20)


def sd3():
    """StableDiffusion3Pipeline (CFG on): VAE /2, patch 2, 12x20 px -> latent 6x10 -> grid (3, 5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = _image_vae(4)
    pipe = StableDiffusion3Pipeline(transformer=model("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    kw = dict(prompt_embeds=_r(1, 1, 9, 32), pooled_prompt_embeds=_r(2, 1, 32), negative_prompt_embeds=_r(3, 1, 9, 32),
              negative_pooled_prompt_embeds=_r(4, 1, 32), height=12, width=20, guidance_scale=4.0)
    return _quiet(pipe), kw


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def wan(experts: int = 1):
    """WanPipeline (CFG as two forwards): VAE /8 and /4 in time, patch (1, 2, 2),
    9 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7). ``experts=2``: Wan 2.2's
    high- and low-noise transformers."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    two = dict(transformer_2=model("wan"), boundary_ratio=0.875) if experts == 2 else {}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=sched, transformer=model("wan"), **two)
    return _quiet(pipe), _wan_kw()


def _wan_kw():
    return dict(prompt_embeds=_r(1, 1, 11, 16), negative_prompt_embeds=_r(2, 1, 11, 16), height=80, width=112, num_frames=9,
                guidance_scale=5.0)


def hunyuan_video():
    """HunyuanVideoPipeline: VAE /8 and /4 in time, patch 2 (as the real model; the pipeline
    wants pixel sizes divisible by 16), 9 frames of 80x112 px -> latent 3x10x14 -> grid (3, 5, 7).
    The text mask pads 2 of 6 tokens, as the LLM encoder's padding does."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    torch.manual_seed(0)
    transformer = model("hunyuan_video", patch_size=2)
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
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model("cogvideox"), scheduler=sched)
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
                       transformer=model("ltx"))
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
                         transformer=model("mochi"))
    kw = dict(prompt_embeds=_r(1, 1, 5, 16), prompt_attention_mask=_mask(5, 5), negative_prompt_embeds=_r(2, 1, 5, 16),
              negative_prompt_attention_mask=_mask(5, 3), height=80, width=112, num_frames=13, guidance_scale=4.5)
    return _quiet(pipe), kw


PIPES = {"flux": flux, "sd3": sd3, "wan": wan, "hunyuan_video": hunyuan_video, "cogvideox": cogvideox, "ltx": ltx,
         "mochi": mochi}


# (grid, kinds of attention call) each builder's call implies, worked out by hand from its sizes:
# image: px / VAE factor / patch (Flux packs 2x2 latents); video: frames (f - 1) / temporal
# factor + 1, then px / VAE factor / patch per spatial axis.
PIPE_LAYOUT = {
    "flux": ((12 // 2 // 2, 20 // 2 // 2), {"joint"}),  # VAE /2 (2 blocks), 2x2 packing
    "sd3": ((12 // 2 // 2, 20 // 2 // 2), {"joint", "self"}),  # VAE /2, patch 2; layer 0 has dual attention
    "wan": (((9 - 1) // 4 + 1, 80 // 8 // 2, 112 // 8 // 2), {"self", "cross"}),  # VAE /8 /4t, patch (1, 2, 2)
    "hunyuan_video": (((9 - 1) // 4 + 1, 80 // 8 // 2, 112 // 8 // 2), {"joint"}),  # VAE /8 /4t, patch 2, patch_t 1
    "cogvideox": (((9 - 1) // 4 + 1, 80 // 8 // 2, 112 // 8 // 2), {"joint"}),  # VAE /8 (4 blocks) /4t, patch 2
    "ltx": (((17 - 1) // 8 + 1, 160 // 32, 224 // 32), {"self", "cross"}),  # VAE /32 /8t, patch 1
    "mochi": (((13 - 1) // 6 + 1, 80 // 8 // 2, 112 // 8 // 2), {"joint"}),  # pipeline-fixed /8 /6t, patch 2
}


def run(pipe, kwargs, steps: int = STEPS, output_type: str = "pt") -> torch.Tensor:
    """One seeded pipeline call: the decoded images / frames (or latents) as a tensor."""
    with torch.no_grad():
        out = pipe(**kwargs, num_inference_steps=steps, output_type=output_type,
                   generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    return out


def flux_pipeline():
    """The tiny FluxPipeline; ``flux_call(pipe)`` calls it with its prompt embeddings."""
    return flux()[0]


def flux_call(pipe, steps=STEPS):
    """16x24 px -> grid (4, 6) (the quickstart prints it)."""
    return run(pipe, dict(_flux_kw(), height=16, width=24), steps)


def wan22_pipeline():
    """A Wan 2.2-style WanPipeline with two tiny transformers (high- and low-noise experts)."""
    return wan(experts=2)[0]


def wan_call(pipe, steps=4):
    return run(pipe, _wan_kw(), steps)


def llm(model_type: str, **overrides):
    """A tiny random decoder of a transformers family (GQA 4/2 unless overridden)."""
    import transformers

    names = {"llama": ("Llama", "Llama"), "mistral": ("Mistral", "Mistral"), "qwen2": ("Qwen2", "Qwen2"),
             "qwen3": ("Qwen3", "Qwen3"), "gemma": ("Gemma", "Gemma"), "gemma2": ("Gemma2", "Gemma2"),
             "gemma3_text": ("Gemma3Text", "Gemma3")}
    cfg_cls = getattr(transformers, f"{names[model_type][0]}Config")
    model_cls = getattr(transformers, f"{names[model_type][1]}ForCausalLM")
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval()
