"""StyleInjection and the inversion tools: the single-call definition is in the zoo (tests/zoo.py,
goldens_style.py); here the recording lifecycle, the inversions (exact where the definition says they
are), the initial-latent AdaIN, and whole style transfers on a tiny SD UNet pipeline and the FLUX fixture."""
from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.tools import invert as I


def _qkv(seed, B=1, H=2, S=14, D=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))


JOINT = Site(grid=(3, 4), text_len=2, kind="joint", timestep=0.5)


def test_recording_passes_are_stock_attention_and_keep_what_the_phase_names():
    m = ap.StyleInjection()
    q, k, v = _qkv(0)
    dense = ap.attend(q, k, v, ap.Dense(), JOINT)
    assert torch.equal(ap.attend(q, k, v, m.record("style"), JOINT), dense)
    assert torch.equal(ap.attend(q, k, v, m.record("content"), JOINT), dense)
    slot = m.bank[(0, "")][0.5]
    assert sorted(slot) == ["k", "q", "v"]
    assert torch.equal(slot["k"], k[:, :, 2:]) and torch.equal(slot["q"], q[:, :, 2:])  # visual tokens only


def test_injecting_a_pass_into_itself_without_blend_or_temperature_is_stock_attention():
    """query_keep=1, T=1, style = content = the call itself: q_hat = q, keys and values unchanged."""
    m = ap.StyleInjection(query_keep=1.0, temperature=1.0)
    q, k, v = _qkv(1)
    ap.attend(q, k, v, m.record("style"), JOINT)
    ap.attend(q, k, v, m.record("content"), JOINT)
    out = ap.attend(q, k, v, m.record(None), JOINT)
    torch.testing.assert_close(out, ap.attend(q, k, v, ap.Dense(), JOINT), rtol=0, atol=1e-12)
    q, (_, k, v) = _qkv(4, S=6)[0], _qkv(5, S=9)
    assert torch.equal(ap.attend(q, k, v, m, Site(kind="cross")), ap.attend(q, k, v, ap.Dense(), Site(kind="cross")))


def test_injection_finds_the_nearest_recorded_timestep_and_refuses_others():
    m = ap.StyleInjection()
    q, k, v = _qkv(2)
    ap.attend(q, k, v, m.record("style"), JOINT)
    ap.attend(q, k, v, m.record("content"), JOINT)
    m.record(None)
    near = Site(grid=(3, 4), text_len=2, kind="joint", timestep=0.5 + 4e-4)
    torch.testing.assert_close(ap.attend(q, k, v, m, near), ap.attend(q, k, v, m, JOINT), rtol=0, atol=0)
    with pytest.raises(KeyError, match="record the style's and the content's"):
        ap.attend(q, k, v, m, Site(grid=(3, 4), text_len=2, kind="joint", timestep=0.52))
    with pytest.raises(ValueError, match="transfer's size"):  # 10 visual tokens against the 12 recorded
        ap.attend(*_qkv(3, S=12), m, Site(grid=(2, 5), text_len=2, kind="joint", timestep=0.5))
    with pytest.raises(ValueError, match="query_keep"):
        ap.StyleInjection(query_keep=1.5)


def test_adain_gives_the_style_statistics_and_packed_tokens_match_unpacked_latents():
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    c, s = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g) * 3 + 1
    out = I.adain(c, s)
    torch.testing.assert_close(out.mean((2, 3)), s.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((2, 3)), s.std((2, 3)), atol=1e-3, rtol=1e-4)
    pack = lambda x: FluxPipeline._pack_latents(x, *x.shape)  # noqa: E731  (B, 12, 16): 2x2 patches as tokens
    torch.testing.assert_close(I.adain(pack(c), pack(s)), pack(out), atol=1e-6, rtol=0)


def _t_only(model):
    """A forward hook making the denoiser's prediction a function of the timestep alone: then one step of
    the sampler is an affine map of the latent, and the inversion must undo it exactly."""
    def hook(module, args, kwargs, out):
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        t = torch.as_tensor(kwargs["timestep"] if "timestep" in kwargs else args[1]).float().flatten()[0]
        t = t / 1000 if t > 1.5 else t  # UNets take timesteps 0..999, FLUX 0..1
        pred = torch.sin(torch.arange(x.numel(), dtype=x.dtype).view_as(x) + t * 7) * (1 + t)
        return (pred,) + tuple(out[1:]) if isinstance(out, tuple) else pred
    return model.register_forward_hook(hook, with_kwargs=True)


def _sd():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, scheduler=DDIMScheduler(clip_sample=False), text_encoder=None,
                                   tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    return pipe, dict(prompt_embeds=torch.randn(1, 5, 12, generator=g), height=16, width=16, num_inference_steps=4,
                guidance_scale=1.0)


def _flux():
    from attnpatch.models import tiny

    pipe, kw = tiny.flux()
    return pipe, dict(kw, num_inference_steps=4)


@pytest.mark.parametrize("make", [_sd, _flux], ids=["ddim-unet", "flow-flux"])
def test_inversion_walks_the_pipelines_own_schedule_back_exactly(make):
    pipe, kw = make()
    model = I.denoiser(pipe)
    z0 = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    handle = _t_only(model)
    try:
        zT = I.invert(pipe, z0, **kw)
        back = pipe(latents=zT, **{**I.no_guidance(pipe), **kw}, output_type="latent").images
    finally:
        handle.remove()
    assert (zT - z0).abs().max() > 0.1  # it moved
    torch.testing.assert_close(back, z0, atol=2e-5, rtol=1e-5)


def test_style_transfer_on_a_tiny_sd_unet_records_every_decoder_self_attention_step():
    pipe, kw = _sd()
    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    m, before = ap.StyleInjection(), pipe.scheduler
    stock = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    out = I.style_transfer(pipe, content, style, m, output_type="latent", **kw).images
    decoder = [n for n, mod in pipe.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]
    assert len(m.bank) == len(decoder) > 0
    for slots in m.bank.values():  # one slot per step (the transfer pass found each: a missing one raises)
        assert len(slots) == kw["num_inference_steps"] and all(sorted(s) == ["k", "q", "v"] for s in slots.values())
    assert pipe.scheduler is before  # DDIM without clipping was swapped in for the call only (here: the same class)
    assert torch.equal(pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images, stock)  # unpatched
    # the same passes without the injection: the recording passes are stock, so these are the same inverted latents
    start = I.adain(I.invert(pipe, I.encode(pipe, content), **kw), I.invert(pipe, I.encode(pipe, style), **kw))
    plain = pipe(latents=start, **{**I.no_guidance(pipe), **kw}, output_type="latent").images
    assert (out - plain).abs().max() > 1e-3  # the injection changes the transfer pass


def test_style_transfer_on_the_flux_fixture_keeps_the_content_shape_and_place_and_takes_the_style_colour():
    from attnpatch.models import flux_shapes
    from attnpatch.models.shapes import judge

    pipe = flux_shapes()
    gen = lambda cap, seed: pipe(cap, generator=torch.Generator().manual_seed(seed), output_type="pt").images  # noqa: E731
    content, style = gen("a large red circle at the top left", 0), gen("a large blue square in the center", 1)
    out = I.style_transfer(pipe, content, style, output_type="pt").images
    verdict = judge(out[0], "a large blue circle at the top left")
    assert verdict["color"] and verdict["place"], verdict


def test_the_example_runs_offline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "examples/style_injection.py", "--steps", "6", "--out", str(tmp_path / "s.png")],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "recorded 6 attention layers x 6 steps" in r.stdout and (tmp_path / "s.png").is_file()
