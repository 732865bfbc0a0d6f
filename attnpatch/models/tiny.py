"""Tiny random-weight models of every supported family, with inputs and the layout facts
(grid, text length, text position) read off those inputs: the embedded default of the demo
and the models of the tests. No downloads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    grid: tuple  # the visual grid the inputs imply
    text_len: int  # text tokens the joint calls carry (0: text only through cross-attention)
    text_first: bool
    kinds: set  # the attention kinds its calls have


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _flux_inputs(H=3, W=5, T=7):
    img_ids = torch.zeros(H * W, 3)
    img_ids[:, 1] = torch.arange(H).repeat_interleave(W)
    img_ids[:, 2] = torch.arange(W).repeat(H)
    return dict(hidden_states=_g(2, H * W, 4), encoder_hidden_states=_g(2, T, 32), pooled_projections=_g(2, 32),
                timestep=torch.tensor([0.75, 0.75]), img_ids=img_ids, txt_ids=torch.zeros(T, 3), return_dict=False)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                 dual_attention_layers=(0,))


def _sd3_inputs():
    return dict(hidden_states=_g(2, 4, 6, 10), encoder_hidden_states=_g(2, 9, 32), pooled_projections=_g(2, 32),
                timestep=torch.tensor([500.0, 500.0]), return_dict=False)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _wan_inputs():
    return dict(hidden_states=_g(1, 4, 3, 6, 10), encoder_hidden_states=_g(1, 11, 16), timestep=torch.tensor([250]),
                return_dict=False)


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                                          num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))


def _hunyuan_inputs():
    return dict(hidden_states=_g(1, 4, 3, 4, 5), timestep=torch.tensor([900]), encoder_hidden_states=_g(1, 6, 16),
                encoder_attention_mask=torch.ones(1, 6), pooled_projections=_g(1, 8), guidance=torch.tensor([3.5]),
                return_dict=False)


def _cog():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                                       text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=8)


def _cog_inputs():
    return dict(hidden_states=_g(1, 3, 4, 6, 8), encoder_hidden_states=_g(1, 8, 16), timestep=torch.tensor([400]),
                return_dict=False)


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                      attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16)


def _ltx_inputs():
    return dict(hidden_states=_g(1, 2 * 3 * 5, 8), encoder_hidden_states=_g(1, 7, 16), timestep=torch.tensor([600]),
                encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=3, width=5, return_dict=False)


def _mochi():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                                   in_channels=4, text_embed_dim=16, time_embed_dim=4)


def _mochi_inputs():
    return dict(hidden_states=_g(1, 4, 2, 4, 6), encoder_hidden_states=_g(1, 5, 16), timestep=torch.tensor([300]),
                encoder_attention_mask=torch.ones(1, 5), return_dict=False)


CASES = {
    "flux": Case("flux", _flux, _flux_inputs, (3, 5), 7, True, {"joint"}),
    "sd3": Case("sd3", _sd3, _sd3_inputs, (3, 5), 9, False, {"joint", "self"}),
    "wan": Case("wan", _wan, _wan_inputs, (3, 3, 5), 0, True, {"self", "cross"}),
    "hunyuan_video": Case("hunyuan_video", _hunyuan, _hunyuan_inputs, (3, 4, 5), 6, False, {"joint"}),
    "cogvideox": Case("cogvideox", _cog, _cog_inputs, (3, 3, 4), 8, True, {"joint"}),
    "ltx": Case("ltx", _ltx, _ltx_inputs, (2, 3, 5), 0, True, {"self", "cross"}),
    "mochi": Case("mochi", _mochi, _mochi_inputs, (2, 2, 3), 5, False, {"joint"}),
}


def flux_pipeline():
    """A FluxPipeline from tiny random components; call it with prompt embeddings (no tokenizer)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=1,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=_flux())


def flux_call(pipe, steps=3):
    return pipe(prompt_embeds=_g(1, 7, 32), pooled_prompt_embeds=_g(1, 32), height=16, width=24, num_inference_steps=steps,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def wan22_pipeline():
    """A Wan 2.2-style WanPipeline with two tiny transformers (high- and low-noise experts)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=_wan(), transformer_2=_wan(),
                       boundary_ratio=0.875)


def wan_call(pipe, steps=4):
    return pipe(prompt_embeds=_g(1, 11, 16), negative_prompt_embeds=_g(1, 11, 17)[:, :, :16], height=16, width=16, num_frames=5,
                num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0)).frames


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
