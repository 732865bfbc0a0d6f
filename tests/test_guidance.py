"""Guidance as a patch: PAG / SoftPAG reproduce diffusers' own PAG pipelines (SD3, SD UNet),
scale 0 / soft 0 reproduce the unguided output exactly, unpatch restores the pipeline, and the
guidance composes with classifier-free guidance; SharedAttention on batches."""
import pytest
import torch

import attnpatch as ap
from attnpatch.patchers.families import FAMILIES


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def sd3_parts():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0)
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def sd3_call(pipe, cfg: float, **kw):
    emb = dict(prompt_embeds=_g(1, 7, 32), pooled_prompt_embeds=_g(1, 16), negative_prompt_embeds=_g(1, 7, 32, seed=1),
               negative_pooled_prompt_embeds=_g(1, 16, seed=1))
    return pipe(**emb, height=10, width=14, num_inference_steps=3, guidance_scale=cfg, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


def sd_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4)
    return dict(unet=unet, vae=vae, scheduler=DDIMScheduler(), text_encoder=None, tokenizer=None, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def sd_call(pipe, cfg: float, **kw):
    return pipe(prompt_embeds=_g(1, 5, 12), negative_prompt_embeds=_g(1, 5, 12, seed=1), height=24, width=16,
                num_inference_steps=3, guidance_scale=cfg, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kw).images


CASES = {
    "sd3": (sd3_parts, sd3_call, "StableDiffusion3Pipeline", "StableDiffusion3PAGPipeline", "blocks.1"),
    "sd": (sd_parts, sd_call, "StableDiffusionPipeline", "StableDiffusionPAGPipeline", "mid"),
}


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pag_reproduces_diffusers_pag_pipeline(name, cfg):
    import diffusers

    parts, call, plain, pag_cls, layer = CASES[name]
    comps = parts()
    pipe = getattr(diffusers, plain)(**comps)
    theirs = call(getattr(diffusers, pag_cls)(**comps, pag_applied_layers=layer), cfg, pag_scale=2.5)
    stock = call(pipe, cfg)
    with ap.patch(pipe, ap.PAG(scale=2.5, layers=[layer])):
        ours = call(pipe, cfg)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - stock).abs().max() > 1e-3  # the guidance does something
    assert torch.equal(call(pipe, cfg), stock)  # unpatched: stock again, bit for bit


@pytest.mark.parametrize("method", [ap.PAG(scale=0.0, layers=["blocks.1"]), ap.PAG(scale=3.0, soft=0.0, layers=["blocks.1"])],
                         ids=["scale0", "soft0"])
def test_inactive_guidance_is_exactly_unguided(method):
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline(**sd3_parts())
    stock = sd3_call(pipe, 4.0)
    with ap.patch(pipe, method):
        assert torch.equal(sd3_call(pipe, 4.0), stock)


def test_soft_pag_interpolates_and_heads_restrict():
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline(**sd3_parts())
    stock = sd3_call(pipe, 1.0)
    outs = {}
    for key, m in {"full": ap.PAG(scale=2.0, layers=["blocks.1"]), "half": ap.PAG(scale=2.0, soft=0.5, layers=["blocks.1"]),
                   "head0": ap.PAG(scale=2.0, layers=["blocks.1"], heads=[0])}.items():
        with ap.patch(pipe, m):
            outs[key] = sd3_call(pipe, 1.0)
    d = {k: (v - stock).abs().mean().item() for k, v in outs.items()}
    assert 0 < d["half"] < d["full"] and 0 < d["head0"] < d["full"], d


def test_bad_pag_parameters():
    with pytest.raises(ValueError, match="soft"):
        ap.PAG(soft=1.5)
    with pytest.raises(ValueError, match="not a PAG head profile"):
        from safetensors.torch import save_file
        import tempfile, os
        path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        save_file({"x": torch.zeros(1)}, path)
        ap.PAG(heads=path)


def _flux_batch_pipe():
    from attnpatch.models.tiny import flux_pipeline

    return flux_pipeline()


def test_shared_attention_reference_only_batch_is_stock_and_others_change():
    from attnpatch.models.tiny import flux_call

    pipe = _flux_batch_pipe()
    one = flux_call(pipe)
    with ap.patch(pipe, ap.SharedAttention()):
        assert torch.equal(flux_call(pipe), one)  # the embeds of flux_call are a batch of one per call


def test_shared_attention_definition_on_a_joint_call():
    """Against a direct implementation: row b attends [own keys, reference visual keys] after AdaIN."""
    from attnpatch import Site

    g = torch.Generator().manual_seed(0)
    B, H, T, n, D = 3, 2, 3, 12, 8
    q, k, v = (torch.randn(B, H, T + n, D, generator=g) for _ in range(3))
    site = Site(grid=(3, 4), text_len=T, kind="joint")
    m = ap.SharedAttention(reference=1, shift_pe=False)
    out = ap.attend(q, k, v, m, site)
    from attnpatch.methods.shared import _adain

    for b in range(B):
        qb, kb = q[b:b + 1].clone(), k[b:b + 1].clone()
        if b != 1:
            qb[:, :, T:] = _adain(qb[:, :, T:], q[1:2, :, T:])
            kb[:, :, T:] = _adain(kb[:, :, T:], k[1:2, :, T:])
            kb = torch.cat([kb, k[1:2, :, T:]], 2)
            vb = torch.cat([v[b:b + 1], v[1:2, :, T:]], 2)
        else:
            vb = v[b:b + 1]
        want = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], torch.nn.functional.scaled_dot_product_attention(q[1:2], k[1:2], v[1:2])[0])


def test_shift_pe_equals_rope_at_shifted_positions():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from attnpatch import Site

    axes, (Hh, Ww) = (4, 6, 6), (3, 5)
    ids = torch.zeros(Hh * Ww, 3)
    ids[:, 1], ids[:, 2] = torch.arange(Hh).repeat_interleave(Ww), torch.arange(Ww).repeat(Hh)
    rope = FluxPosEmbed(theta=10000, axes_dim=list(axes))
    x = torch.randn(1, 2, Hh * Ww, sum(axes), dtype=torch.float64).float()
    k = apply_rotary_emb(x, rope(ids), sequence_dim=2)
    shifted = ids.clone()
    shifted[:, 2] += Ww
    want = apply_rotary_emb(x, rope(shifted), sequence_dim=2)
    from attnpatch.patchers.families import FAMILIES

    flux = next(f for f in FAMILIES if f.name == "flux")
    model = type("M", (), {"config": type("C", (), {"axes_dims_rope": axes})()})()  # what the row reads
    got = ap.SharedAttention()._shift(k, Site(grid=(Hh, Ww), family="flux", rope=flux.rope(model)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_shift_is_diffusers_rope_bit_for_bit(dtype):
    """ops/ computes the FLUX RoPE shift with plain torch (no diffusers import): same bits as
    diffusers' own get_1d_rotary_pos_embed + apply_rotary_emb, which it replaced."""
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    from attnpatch.ops.rope import rope_shift

    axes, shift = (16, 56, 56), torch.tensor([0.0, 0.0, 24.0])
    k = torch.randn(2, 3, 40, sum(axes)).to(dtype)
    cos, sin = zip(*(get_1d_rotary_pos_embed(d, shift[i:i + 1], theta=10000, repeat_interleave_real=True, use_real=True,
                                             freqs_dtype=torch.float64) for i, d in enumerate(axes)))
    want = apply_rotary_emb(k, (torch.cat(cos, -1).float(), torch.cat(sin, -1).float()), use_real=True,
                            use_real_unbind_dim=-1, sequence_dim=2)
    assert torch.equal(rope_shift(k, axes, 10000, (0.0, 0.0, 24.0)), want)

@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny pipelines: thread hand-offs cost more than the work
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES if f.tiny is not None])
def test_pag_and_shared_attention_on_every_pipeline(family, one_thread):
    """PAG changes the output, scale 0 is exactly stock, unpatch restores; SharedAttention runs
    on a batch of two and leaves the reference row... close to its own stock row only when
    nothing is shared, so here we check it runs and differs for the non-reference row."""
    from attnpatch.models.tiny import PIPES, run

    pipe, kw = PIPES[family]()
    stock = run(pipe, kw)
    with ap.patch(pipe, ap.PAG(scale=2.0, layers=[0])):
        guided = run(pipe, kw)
    with ap.patch(pipe, ap.PAG(scale=0.0, layers=[0])):
        assert torch.equal(run(pipe, kw), stock)
    assert (guided - stock).abs().max() > 1e-4
    assert torch.equal(run(pipe, kw), stock)


def test_headhunter_greedy_choice_and_profile(tmp_path, one_thread):
    from attnpatch.methods.pag import load_heads
    from attnpatch.tools.headhunter import candidates, hunt
    from attnpatch.models.tiny import PIPES, run

    pipe, kw = PIPES["sd3"]()

    def generate(p):
        return run(p, kw)

    def score(imgs):  # any objective: here, brighter outputs
        return imgs.mean().item()

    pool = candidates(pipe, generate)
    assert len(pool) == len(set(pool)) > 2 and all(h in (0, 1) for _, h in pool)  # tiny SD3: 2 heads per layer
    pool = pool[:3]
    result = hunt(pipe, generate, score, rounds=1, scale=2.0, pool=pool, out=tmp_path / "heads.safetensors", progress=False)
    # the chosen pair is the best single pair, recomputed independently
    scores = {}
    for l, h in pool:
        with ap.patch(pipe, ap.PAG(scale=2.0, layers=[l], heads={l: [h]})):
            scores[(l, h)] = score(generate(pipe))
    best = max(scores, key=scores.get)
    base = score(generate(pipe))
    if scores[best] > base:
        assert result["heads"] == {best[0]: [best[1]]}
        assert load_heads(tmp_path / "heads.safetensors") == result["heads"]
    else:
        assert result["heads"] == {}


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_guidance_reads_the_cfg_scale_of_separate_cfg_pipelines(family, one_thread):
    """Flux's true CFG scale is a call argument, Wan's a pipeline attribute. In one Euler step the
    output is linear in the noise prediction u + g (c' - u), with c' = c + (s / g)(c - p): PAG's
    change of the output, s (c - p) dt, does not depend on g. With a wrong g (e.g. 1) it would
    grow with g."""
    from attnpatch.models.tiny import PIPES, run

    pipe, kw = PIPES[family]()
    if family == "flux":
        kw = dict(kw, negative_prompt_embeds=kw["prompt_embeds"].flip(1), negative_pooled_prompt_embeds=-kw["pooled_prompt_embeds"])
    deltas = []
    for g in (2.0, 5.0):
        kw_g = dict(kw, **({"true_cfg_scale": g} if family == "flux" else {"guidance_scale": g}))
        stock = run(pipe, kw_g, steps=1, output_type="latent")
        with ap.patch(pipe, ap.PAG(scale=2.0, layers=[0])):
            guided = run(pipe, kw_g, steps=1, output_type="latent")
        deltas.append(guided - stock)
    assert deltas[0].abs().max() > 1e-4
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-5, rtol=1e-4)


def _pag_batches_on_the_fixture(generate) -> list[int]:
    """Batch size of layer 0's self / joint calls while ``generate(pipe)`` runs under PAG(scale=2)."""
    from attnpatch.methods.observe import Observed
    from attnpatch.models import fixtures

    pipe = fixtures.flux_shapes()
    batches = []

    def watch(q, k, site, groups):
        if site.layer == 0 and site.kind != "cross":
            batches.append(q.shape[0])

    with ap.patch(pipe, Observed(ap.PAG(scale=2.0), watch)):
        generate(pipe)
    return batches


def test_pag_on_the_flux_fixture_perturbs_the_conditional_pass_only(one_thread):
    """The fixture's pipeline fills in true CFG defaults (true_cfg_scale=4, negative_prompt=""):
    the guidance hook must see them, so only the conditional pass carries the perturbed rows."""
    batches = _pag_batches_on_the_fixture(lambda pipe: pipe("a red circle", num_inference_steps=2, output_type="latent"))
    assert batches == [2, 1, 2, 1], batches  # per step: cond + perturbed, then uncond alone


def test_pag_in_the_refine_img2img_stage_perturbs_the_conditional_pass_only(one_thread):
    """FluxImg2ImgPipeline (the coarse-to-fine second stage) is in the FLUX row: its true-CFG
    passes are told apart too, so only the conditional one carries the perturbed rows."""
    from attnpatch.tools.refine import refine

    batches = _pag_batches_on_the_fixture(lambda pipe: refine(
        pipe, "a red circle", height=96, width=96, from_size=64, strength=0.5, num_inference_steps=2,
        output_type="latent", generator=torch.Generator().manual_seed(0)))
    assert batches and batches == [2, 1] * (len(batches) // 2), batches  # both stages: cond + perturbed, uncond alone


def test_the_family_rope_reaches_the_sites_of_its_calls(one_thread):
    """FLUX's RoPE comes from its family row through Site.rope (nothing imported by the method):
    a patched FLUX pipeline's visual calls carry it, equal to rope_shift with the model's axes;
    Wan's row has none."""
    from attnpatch.methods.observe import Observed
    from attnpatch.models import tiny
    from attnpatch.ops.rope import rope_shift

    seen = {}

    def watch(q, k, site, groups):
        seen.setdefault(site.family, site.rope)

    flux = tiny.flux_pipeline()
    with ap.patch(flux, Observed(ap.SharedAttention(), watch)):
        tiny.flux_call(flux, steps=1)
    wan = tiny.wan22_pipeline()
    with ap.patch(wan, Observed(ap.SharedAttention(), watch)):
        tiny.wan_call(wan, steps=1)
    assert seen["wan"] is None and seen["flux"] is not None
    x = torch.randn(1, 2, 5, sum(flux.transformer.config.axes_dims_rope))
    want = rope_shift(x, tuple(flux.transformer.config.axes_dims_rope), 10000, (0.0, 0.0, 6.0))
    assert torch.equal(seen["flux"](x, (0.0, 0.0, 6.0)), want)
