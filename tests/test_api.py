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
        assert len(model._forward_pre_hooks) == 1
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
