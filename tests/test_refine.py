"""Coarse-to-fine (``attnpatch.tools.refine``, ``attnpatch compare --refine-from``): a patch on the
pipeline runs in the img2img stage too (hooks on the shared transformer, the step schedule counting
that call's own steps), Dense through it equals the stock pipeline bit for bit, the img2img stage
runs with the text-to-image pipeline's call defaults, the repetition count counts regions, the
report's headline follows the numbers either way, and bad flags exit 2 before any model loads."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

import attnpatch as ap  # noqa: E402
from attnpatch.cli import refine_setting  # noqa: E402
from attnpatch.methods.observe import Observed  # noqa: E402
from attnpatch.models import shapes, tiny  # noqa: E402
from attnpatch.tools import refine as rf  # noqa: E402

# tiny FLUX: VAE /2 and 2x2 packing, 4 px per token: 8x12 px -> grid (2, 3), 16x24 px -> grid (4, 6)
SMALL, BIG = (8, 12), dict(height=16, width=24)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # kilobyte models on a shared 2-core CPU: one thread (see test_pipelines)
    yield
    torch.set_num_threads(n)


def _refine(pipe, steps=5, strength=0.8):
    kw = tiny._flux_kw()
    kw.pop("height"), kw.pop("width")
    with torch.no_grad():
        return rf.refine(pipe, None, **BIG, from_size=SMALL, strength=strength, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_dense_through_refine_equals_stock_refine():
    pipe = tiny.flux_pipeline()
    stock = _refine(pipe)
    with ap.patch(pipe, ap.Dense()):
        dense = _refine(pipe)
    assert stock.shape == (1, 3, 16, 24) and torch.equal(dense, stock)
    assert torch.equal(_refine(pipe), stock)  # unpatched again: the cached img2img pipeline is stock too


def test_the_patch_runs_in_the_img2img_stage_and_dense_steps_counts_its_steps():
    """5 steps at strength 0.8: the img2img call runs 4 (diffusers: 5 - int(5 - 4.0)); dense_steps=0.5
    keeps its first floor(0.5 * 4) = 2 dense and plans the other 2, on the full-size grid."""
    pipe = tiny.flux_pipeline()
    seen = []

    def watch(q, k, site, groups):
        seen.append((site.grid, site.steps, site.step, all(p is None for _, p in groups)))

    method = ap.SlidingTile(tile=1, window=1, dense_steps=0.5)
    with ap.patch(pipe, Observed(method, watch)) as handle:
        _refine(pipe)
    assert rf.img2img(pipe).transformer is pipe.transformer  # the hooks' modules are the img2img pipeline's
    first = [s for s in seen if s[0] == (2, 3)]
    second = [s for s in seen if s[0] == (4, 6)]
    assert first and second and len(first) + len(second) == len(seen) == handle.stats()["routed"]
    assert {s[1] for s in first} == {5} and {s[1] for s in second} == {4}
    assert {s[2]: s[3] for s in second} == {0: True, 1: True, 2: False, 3: False}
    assert {s[2] for s in first if s[3]} == {0, 1}  # the first stage: floor(0.5 * 5) = 2 dense steps


def test_img2img_is_built_once_shares_the_modules_and_is_rebuilt_when_one_is_swapped():
    pipe = tiny.flux_pipeline()
    a = rf.img2img(pipe)
    assert type(a).__name__ == "FluxImg2ImgPipeline" and rf.img2img(pipe) is a
    assert all(getattr(a, k) is v for k, v in pipe.components.items() if k in a.components)
    pipe.transformer = tiny.model("flux")
    b = rf.img2img(pipe)
    assert b is not a and b.transformer is pipe.transformer


def test_a_pipeline_without_an_img2img_counterpart_says_so():
    pipe, _ = tiny.PIPES["wan"]()
    with pytest.raises(rf.NoImg2Img, match="WanPipeline has no img2img counterpart"):
        rf.img2img(pipe)


def test_the_img2img_call_inherits_the_pipelines_own_defaults_even_when_patched():
    from diffusers import FluxPipeline

    from attnpatch.models.fixtures import _defaults

    cls = _defaults(FluxPipeline, height=64, width=64, num_inference_steps=4, true_cfg_scale=4.0, negative_prompt="")
    pipe = cls(**tiny.flux_pipeline().components)
    want = dict(num_inference_steps=4, true_cfg_scale=4.0, negative_prompt="", guidance_scale=3.5)  # FluxImg2Img: 28, 1, None, 7
    assert rf._carried(pipe, rf.img2img(pipe)) == want
    with ap.patch(pipe, ap.Dense()):  # the patched class's __call__ is attnpatch's generic wrapper
        assert rf._carried(pipe, rf.img2img(pipe)) == want


def test_coarse_size_keeps_the_aspect_ratio():
    assert rf.coarse_size(192, 192, 64) == (64, 64)
    assert rf.coarse_size(192, 128, 64) == (64, 48)  # 128 * 64 / 192 = 42.7 -> 48 (multiple of 16)
    assert rf.coarse_size(128, 256, 64, 4) == (32, 64)
    assert rf.coarse_size(192, 192, (48, 64)) == (48, 64)


def test_blobs_counts_regions_of_the_captions_colour():
    cap = "a large red circle at the top left"
    red, blue = (torch.tensor(shapes.COLORS[c]).view(3, 1, 1) for c in ("red", "blue"))
    img = torch.full((3, 64, 64), shapes.BACKGROUND)
    assert rf.blobs(img, cap) == 0
    img[:, 5:15, 5:15] = red
    img[:, 30:40, 30:40] = blue  # another colour: not the subject
    assert rf.blobs(img, cap) == 1
    img[:, 15:20, 15:20] = red  # touches the first square at one corner (8-connectivity): still one region
    img[:, 50:60, 2:12] = red
    img[:, 40:56, 40:44] = red
    assert rf.blobs(img, cap) == 3
    img[:, 0:1, 63:64] = red  # one pixel: below min_frac, not a copy
    assert rf.blobs(img, cap) == 3


def _row(setting, speedup, csp, copies, kind="method"):
    return dict(setting=setting, kind=kind, speedup=speedup, speedup_min=speedup - 0.1, speedup_max=speedup + 0.1,
                repeats=2, color=csp[0], shape=csp[1], place=csp[2], copies=copies)


def test_the_headline_follows_the_numbers_either_way():
    stock = _row("stock attention", 1.0, (0.5, 0, 0), "0 1", "stock")
    c2f = _row("stock attention + c2f", 1.2, (1, 0.5, 0.5), "1 1", "stock + coarse-to-fine")
    noise = _row("ST", 1.8, (1, 0, 0.5), "8 7")
    both = _row("ST + c2f", 1.45, (1, 0.5, 0.5), "1 1", "method + coarse-to-fine")
    text = refine_setting.headline([stock, c2f, noise, both], "192x192 px")
    assert text.startswith("At 192x192 px, stock attention judges colour/shape/place 0.5/0/0")
    assert ("Fastest setting that draws every caption's subject once and judges at least as well: ST + c2f: 1.45x "
            "stock's speed (stock's time / its time, 1.35-1.55x over 2 repeats), colour/shape/place 1/0.5/0.5 vs stock "
            "0.5/0/0.") in text
    assert "ST: 1.80x, 1/0/0.5, copies 8 7" in text  # faster, but repeats: not the lead
    slow = refine_setting.headline([stock, dict(c2f, speedup=0.8), noise], "192x192 px")
    assert "stock attention + c2f: 0.80x stock's speed" in slow and "(slower than stock)" in slow
    none = refine_setting.headline([stock, noise], "192x192 px")
    assert "No setting draws every caption's subject exactly once" in none


def test_expand_adds_coarse_to_fine_rows_after_the_from_noise_ones():
    from attnpatch.cli import compare

    r = refine_setting.Refine(64)
    sets = refine_setting.expand(compare.settings("SlidingTile(tile=8, window=3)", []), r)
    assert [s.kind for s in sets] == ["stock + coarse-to-fine", "method", "method + coarse-to-fine"]
    assert sets[0].label == "stock attention + coarse-to-fine from 64px (strength 0.7)"
    assert sets[2].label.endswith("+ coarse-to-fine from 64px (strength 0.7)") and sets[2].method is sets[1].method


BASE = ["compare", "--model", "builtin:flux-shapes", "--methods", "SlidingTile(tile=8, window=3)"]


@pytest.mark.parametrize("extra, msg", [
    (["--refine-from", "64"], "give --height and --width above PX"),
    (["--refine-from", "64", "--height", "64", "--width", "64"], "is not below --height 64 x --width 64"),
    (["--refine-from", "48x200", "--height", "192", "--width", "192"], "is not below"),
    (["--refine-from", "64", "--height", "192", "--width", "192", "--refine-strength", "1.5"], "expected 0 < S <= 1"),
    (["--refine-strength", "0.5"], "add --refine-from PX"),
    (["--refine-from", "64", "--height", "128", "--width", "128", "--model", "builtin:wan-shapes"], "not an image pipeline"),
    (["--refine-from", "64", "--height", "128", "--width", "128", "--model", "builtin:smollm2"], "not an image pipeline"),
])
def test_bad_refine_flags_exit_2_before_loading(monkeypatch, tmp_path, capsys, extra, msg):
    from attnpatch import cli
    from attnpatch.cli import runner

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    assert cli.main(BASE + extra + ["--out", str(tmp_path / "r")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_generate_refine_from_with_compare_exits_2_before_loading(monkeypatch, tmp_path, capsys):
    from attnpatch import cli
    from attnpatch.cli import runner

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    assert cli.main(["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile", "--refine-from", "64",
                     "--height", "192", "--width", "192", "--compare", "--out", str(tmp_path / "g")]) == 2
    assert "use: attnpatch compare --refine-from" in capsys.readouterr().err


def test_generate_refine_from_runs_the_method_coarse_to_fine(tmp_path, capsys):
    from attnpatch import cli

    out = tmp_path / "g"
    assert cli.main(["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile(tile=8, window=3)",
                     "--refine-from", "64", "--height", "96", "--width", "96", "--steps", "3",
                     "--prompt", "a large red circle at the top left", "--out", str(out), "--quiet"]) == 0
    assert "attnpatch: " in capsys.readouterr().out  # the patch's counters: it ran under the method
    from PIL import Image

    assert Image.open(out / "patched_0.png").size == (96, 96)


def test_a_malformed_refine_size_is_a_usage_error(capsys):
    from attnpatch import cli

    with pytest.raises(SystemExit) as e:
        cli.main(BASE + ["--refine-from", "64px", "--height", "192", "--width", "192"])
    assert e.value.code == 2 and "expected a side in px (64) or HxW" in capsys.readouterr().err


def test_compare_refine_from_on_the_fixture_leads_with_the_pixel_judge(tmp_path, capsys):
    """The whole command on the trained fixture, shrunk (96 px, 2 steps, 1 repeat): four rows, the
    judge's columns, and a report whose first sentence is the headline."""
    from attnpatch import cli

    out = tmp_path / "r"
    code = cli.main(BASE + ["--height", "96", "--width", "96", "--refine-from", "64", "--steps", "2", "--repeats", "1",
                            "--prompt", "a large red circle at the top left", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["stock", "stock + coarse-to-fine", "method", "method + coarse-to-fine"]
    assert all({"color", "shape", "place", "copies", "judged"} <= set(r) for r in rows)
    md = (out / "report.md").read_text().splitlines()
    assert md[2].startswith("At 96x96 px, stock attention judges colour/shape/place")
    assert "not PSNR" in (out / "report.md").read_text() and "| copies |" in md[6]


def _cfg_kw():
    kw = tiny._flux_kw()
    kw.pop("height"), kw.pop("width")
    g = torch.Generator().manual_seed(3)
    neg = dict(negative_prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    return dict(kw, **neg, true_cfg_scale=3.0)


def _cached_refine(pipe, threshold):
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        with torch.no_grad():
            return rf.refine(pipe, None, **BIG, from_size=SMALL, strength=0.8, num_inference_steps=6,
                             generator=torch.Generator().manual_seed(0), output_type="pt", **_cfg_kw()).images
    finally:
        pipe.transformer.disable_cache()


def test_a_cache_on_the_shared_transformer_runs_through_the_img2img_stage_branch_by_branch():
    """FluxImg2ImgPipeline names no cache_context: refine names each true-CFG call's branch, so
    FirstBlockCache runs there; a threshold no residual change is under (0) never reuses and gives
    exactly the uncached images; a huge one reuses every step after the first and changes them;
    the uncond branch's state is its own (else the uncond call would reuse the cond residual)."""
    pipe = tiny.flux_pipeline()
    with torch.no_grad():
        plain = rf.refine(pipe, None, **BIG, from_size=SMALL, strength=0.8, num_inference_steps=6,
                          generator=torch.Generator().manual_seed(0), output_type="pt", **_cfg_kw()).images
    assert torch.equal(_cached_refine(pipe, 0.0), plain)
    seen = []
    from diffusers.hooks import HookRegistry

    reg = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    real = reg.__class__.reset_stateful_hooks

    def spy(self, recurse=True):  # the states before diffusers resets them at the end of each pipeline call
        for child in (self, *self._get_child_registries()):
            for name in child._hook_order:
                for attr in vars(child.hooks[name]).values():
                    seen.extend(getattr(attr, "_state_cache", {}).keys())
        return real(self, recurse)

    reg.__class__.reset_stateful_hooks = spy
    try:
        reused = _cached_refine(pipe, 1e9)
    finally:
        reg.__class__.reset_stateful_hooks = real
    assert not torch.equal(reused, plain)
    assert {"cond", "uncond"} <= set(seen)
    assert "forward" not in pipe.transformer.__dict__ or pipe.transformer.forward.__name__ != "forward"


@pytest.mark.parametrize("name", ["PyramidAttentionBroadcast", "FasterCache"])
def test_timestep_caches_see_the_img2img_stage_s_timesteps(name):
    """PAB and FasterCache skip by the current timestep, which attnpatch supplies (``cli.caches``): in the
    img2img stage of coarse-to-fine the text-to-image pipeline has none (None: both failed there), so the
    callback reads the stage that runs. Every value it gives during a refine is a timestep of the stage
    running at that moment, the img2img stage's included."""
    from attnpatch.cli import caches

    pipe = tiny.flux_pipeline()
    cache = caches.parse(name)
    if name == "FasterCache":
        cache.resolved["is_guidance_distilled"] = True  # true CFG calls the negative prompt on its own
    config = cache.config(pipe)
    given, real = [], config.current_timestep_callback
    i2i = rf.img2img(pipe)

    def spy():
        t = real()
        given.append((id(i2i) in rf._RUNNING, None if t is None else float(t)))
        return t

    config.current_timestep_callback = spy
    pipe.transformer.enable_cache(config)
    try:
        images = _refine(pipe, steps=6)
    finally:
        pipe.transformer.disable_cache()
    assert torch.isfinite(images).all() and given and all(t is not None for _, t in given)
    s = i2i.scheduler  # the img2img stage's schedule (its call was the last), from its begin index
    seen = [t for stage2, t in given if stage2]  # asked once per hooked block and call: each step's value in turn
    assert [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]] == [float(t) for t in s.timesteps[s.begin_index:]]
