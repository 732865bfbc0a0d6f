"""The public surface: names, Site keywords, Handle semantics and bad input."""
import os
import subprocess
import sys

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.models.tiny import CASES, llm


def test_public_names():
    for name in ["patch", "unpatch", "attend", "Site", "Plan", "Method", "Dense", "Handle", "SinkWindow"]:
        assert hasattr(ap, name), name
    for name in ["register", "select", "names"]:
        assert callable(getattr(ap.kernels, name))
    assert ap.kernels.names()[-1] == "reference"


def test_site_keywords():
    s = Site(grid=(64, 64), text_len=0, text_first=True, causal=False, layer=0)
    assert s.visual_len == 4096 and s.visual_start == 0
    assert Site(grid=(3, 4, 5)).visual_len == 60 and Site(causal=True).prefill
    assert Site(grid=(2, 2), text_len=5, text_first=True).visual_start == 5
    with pytest.raises(ValueError, match="Site.grid"):
        Site(grid=(0, 4))
    with pytest.raises(ValueError, match="Site.kind"):
        Site(kind="diagonal")


@pytest.mark.parametrize("kwargs,match", [
    (dict(sink=-1), r"SinkWindow\(sink=.*must be an integer >= 0"),
    (dict(window=0), r"SinkWindow\(window=.*must be an integer >= 1"),
    (dict(window=2.5), r"SinkWindow\(window=.*"),
])
def test_method_parameter_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ap.SinkWindow(**kwargs)


def test_unsupported_objects_name_supported_families():
    with pytest.raises(TypeError, match="supported: diffusers pipelines and models: Flux, SD3, Wan"):
        ap.patch(torch.nn.Linear(2, 2), ap.Dense())
    from diffusers import UNet2DModel

    with pytest.raises(TypeError, match="does not support UNet2DModel; supported"):
        ap.patch(UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, sample_size=8,
                             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
                 ap.Dense())


def test_bad_method_and_backend():
    m = llm("llama")
    with pytest.raises(TypeError, match=r"pass a method instance, e.g. Dense\(\)"):
        ap.patch(m, ap.Dense)
    with pytest.raises(TypeError, match="attnpatch Method instance"):
        ap.patch(m, "dense")
    with pytest.raises(ValueError, match="unknown backend 'triton2'; available"):
        ap.patch(m, ap.Dense(), backend="triton2")
    assert m.config._attn_implementation == "sdpa"  # nothing half-applied


def test_patch_twice_replaces_and_unpatch_restores():
    c = CASES["flux"]
    model, inputs = c.build().eval(), c.inputs()
    procs = {n: mod.processor for n, mod in model.named_modules() if hasattr(mod, "processor")}
    with torch.no_grad():
        stock = model(**inputs)[0]
        h1 = ap.patch(model, ap.Dense())
        h2 = ap.patch(model, ap.Dense(), backend="reference")
        assert not h1.active and h2.active
        from diffusers.hooks import HookRegistry  # the patch's one hook lives in the model's HookRegistry

        assert HookRegistry.check_if_exists_or_initialize(model)._hook_order == ["attnpatch"]
        torch.testing.assert_close(model(**inputs)[0], stock, atol=1e-5, rtol=1e-5)
        ap.unpatch(model)
        assert torch.equal(model(**inputs)[0], stock)
    assert all(mod.processor is procs[n] for n, mod in model.named_modules() if hasattr(mod, "processor"))
    with pytest.raises(ValueError, match="not patched"):
        ap.unpatch(model)
    h2.remove()  # a removed handle is inert


def test_named_backend_that_cannot_run_raises_inside_a_model():
    m = llm("gemma2")  # logit soft-capping needs a score_mod: sdpa cannot
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad(), ap.patch(m, ap.Dense(), backend="sdpa"):
        with pytest.raises(RuntimeError, match="backend 'sdpa' cannot run.*score_mod"):
            m(ids)


def test_fallback_is_logged_with_attnpatch_log_debug():
    code = (
        "import torch, attnpatch as ap\n"
        "from attnpatch import Plan\n"
        "class T(ap.Method):\n"
        "    def plan(self, q, k, site): return Plan(score_mod=lambda s, *i: s * 2, name='tempered')\n"
        "q = torch.randn(1, 2, 8, 8)\n"
        "ap.attend(q, q, q, T())\n"
    )
    env = dict(os.environ, ATTNPATCH_LOG="debug")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "using reference (sdpa: plan.score_mod cannot be expressed as an SDPA mask;" in r.stderr
    env.pop("ATTNPATCH_LOG")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "using reference" not in r.stderr


# --- the Method protocol (issue 17): declared defaults, forwarded by Observed, nothing written onto a method ---


def test_protocol_defaults_are_declared_on_method():
    """Patchers read the protocol as plain attributes: every method has them, with these defaults."""
    from attnpatch.methods.base import Method

    m, dense = Method(), ap.Dense()
    assert (m.llm, m.guidance, m.needs_roles, m.kv_policy()) == (True, False, False, None)
    assert dense.llm and dense.bind_model(object()) is None
    assert (ap.PAG().guidance, ap.PAG().needs_roles, ap.PAG().llm) == (True, True, False)
    assert (ap.SharedAttention().guidance, ap.SharedAttention().needs_roles) == (False, True)
    assert ap.SinkWindow().kv_policy() is None  # the patcher's default, KeepAll
    assert (m.guides(3), m.guidance_weight(), ap.PAG(scale=2.5).guidance_weight(), ap.PAG(steps=[1]).guides(2)) == (
        False, 0.0, 2.5, False)
    evict = ap.SinkWindow(sink=2, window=5, evict=True)
    a, b = evict.kv_policy(), evict.kv_policy()
    assert a is not b and (a.sink, a.window, a.keep) == (2, 5, 6)  # one policy (and its statistics) per patch


def _sd3_pipe():
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0)
    return diffusers.StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                              text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)


def _sd3_run(pipe):
    g = lambda *s, seed=0: torch.randn(*s, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    return pipe(prompt_embeds=g(1, 7, 32), pooled_prompt_embeds=g(1, 16), negative_prompt_embeds=g(1, 7, 32, seed=1),
                negative_pooled_prompt_embeds=g(1, 16, seed=1), height=10, width=14, num_inference_steps=2,
                guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_observed_pag_still_guides():
    """Observing PAG keeps its guidance: the denoiser wrapper is installed for the observer (its
    flags and PAG's own guides() / scale are forwarded), so the output is PAG's bit for bit."""
    from attnpatch.methods.observe import Observed

    pipe = _sd3_pipe()
    with torch.no_grad():
        stock = _sd3_run(pipe)
        with ap.patch(pipe, ap.PAG(scale=2.0, layers=["blocks.1"])):
            guided = _sd3_run(pipe)
        seen = []
        with ap.patch(pipe, Observed(ap.PAG(scale=2.0, layers=["blocks.1"]), lambda q, k, site, g: seen.append(site.roles))):
            observed = _sd3_run(pipe)
    assert (guided - stock).abs().max() > 1e-4
    assert torch.equal(observed, guided)
    assert any("perturbed" in roles for roles in seen)  # the watcher saw the guidance rows


def test_observed_sinkwindow_still_evicts_and_nothing_is_written_onto_the_method():
    """Observing SinkWindow(evict=True) keeps its KV-cache policy (forwarded kv_policy): the same
    logits and the same eviction, counted on the handle; the method object is left as it was."""
    from attnpatch.methods.observe import Observed

    model = llm("llama")
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    method = ap.SinkWindow(sink=3, window=8, evict=True)
    before = dict(vars(method))
    runs, calls = [], []
    for m in (method, Observed(method, lambda q, k, site, groups: calls.append(k.shape[2]))):
        with ap.patch(model, m) as handle:
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        runs.append((torch.stack(out.logits, 1), handle.stats()["kv_cache"], out.cache.layers[0].keys.shape[2]))
    (l0, kv0, held0), (l1, kv1, held1) = runs
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    assert kv1 == kv0 and kv0["evicted"] == 30 + 11 - 10 and kv0["after"] < kv0["before"]
    assert held0 == held1 == 3 + 8 - 1  # the cache holds sink + window - 1 keys
    assert calls[:2] == [30, 30] and set(calls[2:]) == {3 + 8 - 1 + 1}  # prefill; decode: the trimmed cache + the new key
    assert vars(method).keys() == before.keys()  # no statistics written onto the method
    with pytest.raises(TypeError, match="PAG is an image / video"):  # llm = False is forwarded too
        ap.patch(model, Observed(ap.PAG()))


def test_trusted_sites_equal_checked_sites():
    """Patchers build their per-call Site with Site.trusted (no checks): it equals Site(...) on the
    same values, and unknown fields still fail."""
    from attnpatch import Site

    kw = dict(grid=(4, 6), text_len=3, kind="joint", layer=2, name="blocks.2.attn", family="flux", timestep=0.5,
              step=3, steps=20, roles=("cond", "perturbed"))
    assert Site.trusted(**kw) == Site(**kw)
    assert Site.trusted() == Site()
    with pytest.raises(TypeError, match="unknown fields"):
        Site.trusted(gird=(4, 6))


def test_flux_grid_follows_new_ids_of_the_same_length():
    """The FLUX grid is remembered per img_ids tensor: new ids with the same token count but another
    layout (or the same tensor changed in place) give their own grid."""
    from attnpatch.patchers.families import _flux_grid

    def ids(H, W):
        t = torch.zeros(H * W, 3)
        t[:, 1], t[:, 2] = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
        return t

    a = ids(16, 16)
    assert _flux_grid(None, {"img_ids": a}) == (16, 16) == _flux_grid(None, {"img_ids": a})
    assert _flux_grid(None, {"img_ids": ids(32, 8)}) == (32, 8)
    a.copy_(ids(8, 32))
    assert _flux_grid(None, {"img_ids": a}) == (8, 32)
