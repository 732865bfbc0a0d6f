"""diffusers: every supported family, tiny random weights. Dense through attnpatch equals the
stock model, unpatch restores it bit for bit, and every Site carries the real layout."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Method
from attnpatch.models.tiny import CASES, flux_call, flux_pipeline, wan22_pipeline, wan_call
from attnpatch.patchers.families import BY_NAME, FAMILIES

# every row of the family table with a tiny config: a new row is tested here with no edit
TINY = [f.name for f in FAMILIES if f.tiny is not None]


class Record(Method):
    """Dense attention that remembers every site it was asked about."""

    def __init__(self):
        self.sites, self.resets = [], 0

    def plan(self, q, k, site):
        self.sites.append((site, q.shape[2], k.shape[2]))
        return None

    def reset(self):
        self.resets += 1


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_every_family_row_has_a_tiny_model_and_pipeline():
    """A row without its tiny model would silently drop out of every parametrised test."""
    from attnpatch.models.tiny import PIPES

    assert set(CASES) == set(TINY) == set(PIPES)
    assert {f.name for f in FAMILIES} - set(TINY) == {"unet"}  # UNets: tests/test_guidance.py builds its own


def test_readme_supported_table_is_the_family_table():
    """The README's per-family table is generated from FAMILIES: an edited row shows up there."""
    from pathlib import Path

    from attnpatch.patchers.families import supported_markdown

    text = (Path(__file__).parents[1] / "README.md").read_text()
    begin, end = "<!-- supported families: begin -->\n", "<!-- supported families: end -->"
    assert begin in text and end in text, "README.md lost its supported-families markers"
    section = text[text.index(begin) + len(begin):text.index(end)]
    assert section == supported_markdown(), "regenerate: python -c 'from attnpatch.patchers.families import " \
        "supported_markdown as s; print(s())' and paste it between the README's markers"
    assert all(f"`{f.name}`" in section for f in FAMILIES)


@pytest.fixture(scope="module", params=TINY)
def case(request):
    c = CASES[request.param]
    model = c.build().eval()
    inputs = c.inputs()
    with torch.no_grad():
        stock = model(**inputs)[0]
    return c, model, inputs, stock


def test_dense_matches_stock_and_unpatch_restores(case):
    c, model, inputs, stock = case
    before = _processors(model)
    with torch.no_grad():
        with ap.patch(model, ap.Dense()) as h:
            # processors stay the model's own (diffusers rebuilds and swaps them): hooks mark the modules
            assert h.modules and all(p is before[n] for n, p in _processors(model).items())
            out = model(**inputs)[0]
        after = model(**inputs)[0]
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, stock)
    assert all(p is before[n] for n, p in _processors(model).items())
    assert not model._forward_pre_hooks and "forward" not in model.__dict__ and not hasattr(model, "_diffusers_hook")


def test_site_layout_from_real_inputs(case):
    c, model, inputs, _ = case
    rec = Record()
    with torch.no_grad(), ap.patch(model, rec):
        model(**inputs)
    assert rec.sites, "no attention call reached the method"
    kinds = {s.kind for s, _, _ in rec.sites}
    assert kinds == c.kinds
    n_vis = 1
    for g in c.grid:
        n_vis *= g
    for site, Sq, Skv in rec.sites:
        assert site.grid == c.grid and site.family == c.family
        if site.kind == "joint":
            assert site.text_len == c.text_len and site.text_first == c.text_first and Sq == n_vis + c.text_len
        else:
            assert site.text_len == 0 and Sq == n_vis
        if site.kind == "cross":
            assert Skv == inputs["encoder_hidden_states"].shape[1]
    assert rec.sites[0][0].layer == 0 and rec.sites[-1][0].layer == len({s.name.rsplit(".", 1)[0] for s, _, _ in rec.sites}) - 1
    fam = BY_NAME[c.family]
    assert c.text_first == fam.text_first and (c.text_len > 0) == fam.joint
    t = inputs["timestep"].flatten()[0].item()
    expect = {"flux": t, "mochi": 1 - t / 1000}.get(c.family, t / 1000)  # independent of the row's t_scale
    assert rec.sites[0][0].timestep == pytest.approx(expect)


def test_layers_selection(case):
    c, model, inputs, _ = case
    rec = Record()
    with torch.no_grad(), ap.patch(model, rec, layers=[0]):
        model(**inputs)
    assert {s.layer for s, _, _ in rec.sites} == {0}
    name = rec.sites[0][0].name
    rec2 = Record()
    with torch.no_grad(), ap.patch(model, rec2, layers=name):
        model(**inputs)
    assert {s.name for s, _, _ in rec2.sites} == {name}
    with pytest.raises(ValueError, match="matches no attention layer"):
        ap.patch(model, rec, layers=[99])
    assert not model._forward_pre_hooks


def test_llm_method_on_diffusion_model_is_a_clear_error(case):
    c, model, inputs, _ = case
    with torch.no_grad(), ap.patch(model, ap.SinkWindow(sink=1, window=4)):
        with pytest.raises(ValueError, match="SinkWindow is causal"):
            model(**inputs)


def test_masked_method_changes_output():
    """A real pattern reaches the computation (not a silent no-op)."""

    class Diagonal(Method):
        def plan(self, q, k, site):
            return ap.Plan(mask_mod=lambda b, h, qi, kv: qi == kv, name="diagonal")

    c = CASES["flux"]
    model, inputs = c.build().eval(), c.inputs()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with ap.patch(model, Diagonal()):
            out = model(**inputs)[0]
    assert (out - stock).abs().max() > 1e-3


def test_hunyuan_text_padding_mask_is_honoured():
    c = CASES["hunyuan_video"]
    model, inputs = c.build().eval(), c.inputs()
    inputs["encoder_attention_mask"] = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        stock = model(**inputs)[0]
        with ap.patch(model, ap.Dense(), backend="reference"):
            out = model(**inputs)[0]
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_flux_pipeline_steps_and_restore():
    pipe = flux_pipeline()
    stock = flux_call(pipe)
    rec = Record()
    with ap.patch(pipe, rec) as h:
        assert all(n.startswith("transformer.") for n in h.modules)
        out = flux_call(pipe)
        first = len(rec.sites)
        flux_call(pipe)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    steps = [s.step for s, _, _ in rec.sites[:first]]
    assert steps[0] == 0 and steps[-1] == 2 and sorted(set(steps)) == [0, 1, 2]
    assert rec.sites[first][0].step == 0  # a new pipeline call starts again at step 0
    assert rec.resets >= 2
    ts = [s.timestep for s, _, _ in rec.sites[:first]]
    assert ts == sorted(ts, reverse=True) and 0 < ts[-1] < ts[0] <= 1
    assert torch.equal(flux_call(pipe), stock)
    assert "progress_bar" not in pipe.__dict__


def test_wan22_pipeline_patches_both_transformers():
    pipe = wan22_pipeline()
    stock = wan_call(pipe)
    rec = Record()
    with ap.patch(pipe, rec) as h:
        assert {n.split(".")[0] for n in h.modules} == {"transformer", "transformer_2"}
        out = wan_call(pipe)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    names = {s.name.split(".")[0] for s, _, _ in rec.sites}
    assert names == {"transformer", "transformer_2"}
    assert max(s.step for s, _, _ in rec.sites) == 3
    assert torch.equal(wan_call(pipe), stock)


def test_sparse_methods_inside_every_family(case):
    """Locality methods run inside the real model: the auto-selected kernel equals the float
    reference kernel, a window covering everything equals stock, a narrow one changes it."""
    c, model, inputs, stock = case
    narrow = ap.SlidingTile(tile=2, window=1)
    with torch.no_grad():
        with ap.patch(model, narrow):
            fast = model(**inputs)[0]
        with ap.patch(model, narrow, backend="reference"):
            ref = model(**inputs)[0]
        with ap.patch(model, ap.Neighborhood(window=99)):
            wide = model(**inputs)[0]
        if len(c.grid) == 3:
            with ap.patch(model, ap.Radial(window=1, tile=1, dense_frames=0)):
                radial = model(**inputs)[0]
            assert (radial - stock).abs().max() > 1e-4
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide, stock, atol=1e-5, rtol=1e-5)
    assert (fast - stock).abs().max() > 1e-4


def _registry_state(model):
    return "forward" in model.__dict__, getattr(model, "_diffusers_hook", None)


@pytest.mark.parametrize("order", ["unpatch_first", "disable_first"])
def test_first_block_cache_composes_with_a_patch(order):
    """attnpatch's hook sits in the transformer's HookRegistry beside diffusers' FirstBlockCache:
    Dense under the cache gives the cache's own output (the cache really skips blocks here), the
    cache's skipped blocks make no attention calls, and disabling / unpatching in either order
    leaves the other working and finally the stock pipeline."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = flux_pipeline()
    model = pipe.transformer
    plain = flux_call(pipe)
    before = _registry_state(model)
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # every step after the first reuses the cache
    cached = flux_call(pipe)
    assert (cached - plain).abs().max() > 1e-4
    with ap.patch(pipe, ap.Dense()) as h:
        assert model._diffusers_hook.get_hook("attnpatch") is not None  # in diffusers' registry, beside the cache's hooks
        torch.testing.assert_close(flux_call(pipe), cached, atol=1e-5, rtol=1e-5)
    assert h.stats()["routed"] == 2 + 1 + 1  # step 0: both blocks; steps 1, 2: the first only (the rest is cached)
    assert torch.equal(flux_call(pipe), cached)
    model.disable_cache()
    h = ap.patch(pipe, ap.Dense())
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # the cache's hooks on top of a patched model
    torch.testing.assert_close(flux_call(pipe), cached, atol=1e-5, rtol=1e-5)
    if order == "unpatch_first":
        ap.unpatch(pipe)
        assert torch.equal(flux_call(pipe), cached)  # the cache still works without attnpatch
        model.disable_cache()
    else:
        model.disable_cache()
        torch.testing.assert_close(flux_call(pipe), plain, atol=1e-5, rtol=1e-5)  # attnpatch still works without it
        ap.unpatch(pipe)
    assert torch.equal(flux_call(pipe), plain)
    assert "forward" not in model.__dict__ and not model._diffusers_hook.hooks and before[0] is False


@torch.no_grad()
def test_unpatch_under_a_later_new_forward_hook_keeps_that_hook():
    """A hook registered after attnpatch's with its own ``new_forward`` (as FasterCache's denoiser
    hook) keeps running after unpatch (diffusers' remove_hook alone would bypass it), and the
    model under it is stock again: no guidance rows any more."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Count(ModelHook):
        calls = 0

        def new_forward(self, module, *args, **kwargs):
            self.calls += 1
            return self.fn_ref.original_forward(*args, **kwargs)

    c = CASES["flux"]
    model, inputs = c.build().eval(), c.inputs()
    stock = model(**inputs)[0]
    h = ap.patch(model, ap.PAG(scale=2.0, layers=[0]))
    guided = model(**inputs)[0]
    count = Count()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(count, "count")
    assert torch.equal(model(**inputs)[0], guided) and count.calls == 1
    h.remove()
    assert (guided - stock).abs().max() > 1e-4
    assert torch.equal(model(**inputs)[0], stock) and count.calls == 2
    model._diffusers_hook.remove_hook("count")
    assert torch.equal(model(**inputs)[0], stock) and count.calls == 2
    assert "forward" not in model.__dict__ or model.forward.__func__ is type(model).forward
