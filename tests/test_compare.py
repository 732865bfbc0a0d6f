"""``attnpatch compare``: speed interleaved with stock over repeats (median and spread of per-repeat
ratios, unmoved by a load spike), diffusers' caches as settings and with a method, the frontier
statement computed from the numbers. Times are injected: no test reads the wall clock."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from attnpatch.cli import caches, compare, report, runner  # noqa: E402
from attnpatch.tools import timing  # noqa: E402


def test_interleave_rotates_and_one_slow_repeat_does_not_move_the_median():
    """Seconds are injected: stock 1 s, A 0.5 s, B 2 s; A's second run hits a 10x load spike and a
    slow spell doubles every run of repeat 3. The median ratios stay 2.0 and 0.5."""
    order, runs_of = [], {"stock": 0, "A": 0, "B": 0}
    base = {"stock": 1.0, "A": 0.5, "B": 2.0}

    def fake(name):
        def run():
            order.append(name)
            runs_of[name] += 1
            spike = 10.0 if (name == "A" and runs_of[name] == 2) else 1.0
            spell = 2.0 if runs_of[name] == 3 else 1.0
            return base[name] * spike * spell
        return run

    times = timing.interleave({n: fake(n) for n in base}, repeats=3)
    assert order == ["stock", "A", "B", "A", "B", "stock", "B", "stock", "A"]  # every repeat starts one later
    sp = timing.speedups(times, "stock")
    assert sp["A"]["median"] == pytest.approx(2.0) and sp["B"]["median"] == pytest.approx(0.5)
    assert sp["A"]["min"] == pytest.approx(0.2) and sp["A"]["n"] == 3  # the spike shows as spread, not as the figure
    assert sp["stock"]["median"] == 1.0


def test_a_failing_run_leaves_later_repeats_and_keeps_the_others():
    calls = []

    def bad():
        calls.append("bad")
        return None

    times = timing.interleave({"stock": lambda: 1.0, "bad": bad, "ok": lambda: 0.5}, repeats=3)
    assert calls == ["bad"] and times["bad"] == [] and len(times["ok"]) == 3
    assert "bad" not in timing.speedups(times, "stock")


def _row(setting, kind, speedup, psnr, lo=None, hi=None, repeats=3):
    return dict(setting=setting, kind=kind, speedup=speedup, psnr=psnr, speedup_min=lo or speedup, speedup_max=hi or speedup,
                repeats=repeats)


STOCK = _row("stock attention", "stock", 1.0, float("inf"))


def test_statement_says_no_method_is_ahead_when_the_cache_wins():
    rows = [STOCK, _row("FirstBlockCache(threshold=0.2)", "cache", 1.54, 37.2), _row("TopKBlocks()", "method", 0.9, 25.0),
            _row("TopKBlocks() + FirstBlockCache(threshold=0.2)", "method + cache", 1.5, 26.0)]
    assert [r["setting"] for r in report.frontier(rows)] == ["stock attention", "FirstBlockCache(threshold=0.2)"]
    text = report.statement(rows)
    assert "No method or method + cache is ahead" in text and "Ahead of" not in text and "Caution" not in text
    rows[1] = dict(rows[1], speedup_min=0.5, speedup_max=3.0)  # a loaded machine: 6x between repeats
    assert "Caution: a speedup varied 6.0x between repeats" in report.statement(rows)


def test_statement_names_a_combination_ahead_of_the_best_cache():
    rows = [STOCK, _row("FirstBlockCache(threshold=0.2)", "cache", 1.54, 37.2, 1.5, 1.6),
            _row("PyramidAttentionBroadcast()", "cache", 1.2, 30.0),  # beaten by the first cache: not a best cache
            _row("N + FirstBlockCache(threshold=0.2)", "method + cache", 1.58, 37.2, 1.52, 1.7),
            _row("M", "method", 1.3, 38.0, 1.25, 1.35)]
    assert [r["setting"] for r in report.frontier(rows)] == ["stock attention", "M", "N + FirstBlockCache(threshold=0.2)"]
    text = report.statement(rows)
    assert "Best caches alone (no other cache beats them): FirstBlockCache" in text and "PyramidAttentionBroadcast" not in text
    assert "Ahead of FirstBlockCache(threshold=0.2): N + FirstBlockCache(threshold=0.2) (1.58x" in text
    assert "within the spread" in text  # 1.52-1.7 overlaps the cache's 1.5-1.6
    assert "No method" not in text and "Ahead of FirstBlockCache(threshold=0.2): M" not in text  # M is slower


@pytest.fixture
def main(monkeypatch, capsys):
    from attnpatch import cli

    def load(*a, **k):
        raise AssertionError("loaded a model: the error came too late")

    monkeypatch.setattr(runner, "load", load)

    def run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr()

    return run


@pytest.mark.parametrize("args,msg", [
    (["--caches", "Bogus"], "unknown cache 'Bogus'; available: FirstBlockCache, TaylorSeerCache"),
    (["--caches", "FirstBlockCache(thresh=0.2)"], "FirstBlockCache has no parameter 'thresh' that a command line can set; valid: threshold"),
    (["--caches", "FirstBlockCache(0.2)"], "give parameters by name, e.g. FirstBlockCache(threshold=0.2)"),
    (["--caches", "MagCache(max_skip_steps=2, mag_ratios=(1.0, 'x'))"], "cache MagCache("),
    (["--methods", "Neighborhood+FirstBlokCache"], "unknown method 'FirstBlokCache'; valid: Dense"),
    (["--methods", "Neighborhood+FirstBlockCache+MagCache"], "at most one method and one cache"),
    (["--methods", "Neighborhood", "--combine"], "--combine runs every method in --methods with every cache"),
    (["--caches", "FirstBlockCache+MagCache"], "one cache per entry"),
    # values diffusers takes and then runs as stock (a threshold of 0 or less) or crashes on mid-run (a skip range of 0)
    (["--caches", "MagCache(threshold=-1)"], "MagCache(threshold=-1): expected a number > 0"),
    (["--caches", "FirstBlockCache(threshold=0)"], "so the cache would run as stock"),
    (["--caches", "FasterCache(spatial_attention_block_skip_range=0)"], "expected an integer >= 1"),
    (["--caches", "PyramidAttentionBroadcast(spatial_attention_timestep_skip_range=(800, 100))"], "with low < high"),
    (["--caches", "TaylorSeerCache(cache_interval=0)"], "TaylorSeerCache(cache_interval=0): expected an integer >= 1"),
    (["--caches", "MagCache(retention_ratio=2)"], "0 <= retention_ratio <= 1"),
    ([], "nothing to compare"),
])
def test_bad_cache_input_exits_2_before_loading(main, args, msg, tmp_path):
    code, cap = main("compare", "--model", "builtin:flux-shapes", *args, "--out", str(tmp_path / "o"))
    assert code == 2 and msg in cap.err, cap.err
    assert "or a diffusers cache: FirstBlockCache" in cap.err if "FirstBlok" in str(args) else True


def test_caches_on_a_language_model_exit_2_before_loading(main, tmp_path):
    code, cap = main("compare", "--model", "builtin:smollm2", "--caches", "FirstBlockCache", "--out", str(tmp_path / "o"))
    assert code == 2 and "caches run on diffusion pipelines" in cap.err


def _tiny_flux(monkeypatch=None):
    """A tiny untrained FLUX pipeline; with ``monkeypatch``, also what ``--model x`` loads."""
    from diffusers import FluxPipeline

    from attnpatch.models import fixtures

    pipe = FluxPipeline(**fixtures.flux_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    if monkeypatch is not None:
        monkeypatch.setattr(runner, "resolve", lambda spec: runner.Source(spec, "tiny", "folder", True))
        monkeypatch.setattr(runner, "load", lambda *a, **k: runner.Loaded("diffusion", pipe, None, "tiny", ["a red circle"]))
    return pipe


def test_method_and_cache_together_both_act():
    """Neighborhood + FirstBlockCache on a tiny FLUX: with a threshold no change can pass, every
    step after the first reuses the cache, so only the first block's attention runs then; the
    method must see exactly those calls (its hooks inside the cache's, neither bypassing the other)."""
    from attnpatch import api, methods

    pipe = _tiny_flux()
    loaded = runner.Loaded("diffusion", pipe, None, "tiny", ["a red circle"])
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    kw = dict(steps=3, height=32, width=32)
    cache = caches.parse("FirstBlockCache(threshold=1e9)")
    caches.prepare(loaded, cache, calibrate=None)
    with api.patch(pipe, methods.Neighborhood(window=3, dense_steps=0)) as h:
        alone, _ = runner.run(loaded, ["a red circle"], 0, **kw)
        assert h.stats()["routed"] == 3 * blocks
    with api.patch(pipe, methods.Neighborhood(window=3, dense_steps=0)) as h, caches.enabled(pipe, cache):
        both, _ = runner.run(loaded, ["a red circle"], 0, **kw)
        assert h.stats()["routed"] == blocks + 2  # step 1: every block; steps 2-3: the first block only
    assert pipe.transformer._cache_config is None  # disabled after the run
    assert not torch.allclose(alone, both)


def test_compare_cli_caches_combination_and_a_load_spike(monkeypatch, tmp_path, capsys):
    """The whole command on a tiny FLUX with injected times: stock 4 s, Neighborhood 2 s (10x once:
    load), FirstBlockCache 1 s, both 0.8 s. The report's medians are the true ratios; SeaCache,
    which FluxPipeline cannot drive, is a failed row saying why; MagCache calibrates itself."""
    from attnpatch import cli
    from attnpatch.handle import handle_of

    _tiny_flux(monkeypatch)
    real, seen = runner.run, {}
    base = {"": 4.0, "Neighborhood": 2.0, "FirstBlockCacheConfig": 1.0, "Neighborhood+FirstBlockCacheConfig": 0.8}

    def run(loaded, prompts, seed, **kw):
        out, _ = real(loaded, prompts, seed, **kw)
        h, cfg = handle_of(loaded.obj), loaded.obj.transformer._cache_config
        label = "+".join(([type(h.method).__name__] if h else []) + ([type(cfg).__name__] if cfg else []))
        seen[label] = seen.get(label, 0) + (kw.get("steps") != 1)  # warm-ups (1 step) are not timed runs
        return out, base.get(label, 1.0) * (10.0 if label == "Neighborhood" and seen[label] == 2 else 1.0)

    monkeypatch.setattr(runner, "run", run)
    out = tmp_path / "r"
    code = cli.main(["compare", "--model", "x", "--methods", "Neighborhood(window=3, dense_steps=0)",
                     "--caches", "FirstBlockCache(threshold=0.2),SeaCache,MagCache", "--combine", "--steps", "3",
                     "--height", "32", "--width", "32", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    rows = {r["setting"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    (neigh,) = [k for k, r in rows.items() if r["kind"] == "method"]
    fbc = "FirstBlockCache(threshold=0.2)"
    assert rows[neigh]["speedup"] == pytest.approx(2.0) and rows[neigh]["speedup_min"] == pytest.approx(0.2)
    assert rows[fbc]["speedup"] == pytest.approx(4.0) and rows[fbc]["kind"] == "cache"
    both = rows[f"{neigh} + {fbc}"]
    assert both["speedup"] == pytest.approx(5.0) and both["kind"] == "method + cache" and both["patch"]["routed"] > 0
    assert "never cache" in rows["SeaCache"]["error"]
    assert "error" not in rows["MagCache"] and rows["MagCache"]["repeats"] == 3
    assert all(r.get("psnr") is not None and r.get("ssim") is not None for r in rows.values() if "error" not in r)
    md = (out / "report.md").read_text()
    assert "| 0.20-2.00 |" in md  # the spike is the spread
    assert "SeaCache: failed:" in md and report.statement(list(rows.values())) in md
    assert f"speedup 2.00x (0.20-2.00x over 3 repeats)" in printed
    for f in ("scatter.png", "grid.png", "masks/setting1.png"):
        assert (out / f).is_file(), f


def test_one_repeat_claims_no_spread(monkeypatch, tmp_path, capsys):
    from attnpatch import cli

    _tiny_flux(monkeypatch)
    out = tmp_path / "r"
    assert cli.main(["compare", "--model", "x", "--caches", "FirstBlockCache(threshold=0.2)", "--repeats", "1", "--steps", "2",
                     "--height", "32", "--width", "32", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    (row,) = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["kind"] == "cache"]
    line = next(x for x in printed.splitlines() if x.startswith("FirstBlockCache(threshold=0.2): "))
    assert row["repeats"] == 1 and "repeats" not in line and "speedup" in line
    assert report.spread(row) is None and "over 1 repeats" not in (out / "report.md").read_text()


def test_generate_compare_interleaves_and_prints_the_median(monkeypatch, tmp_path, capsys):
    """``generate --compare``: stock 3 s, the method 1.5 s except one 10x run (load): 2.00x, spread 0.20-2.00."""
    from attnpatch import cli
    from attnpatch.handle import handle_of

    _tiny_flux(monkeypatch)
    real, order = runner.run, []

    def run(loaded, prompts, seed, **kw):
        out, _ = real(loaded, prompts, seed, **kw)
        if kw.get("steps") == 1:  # a warm-up
            return out, 0.0
        order.append("method" if handle_of(loaded.obj) else "stock")
        return out, (1.5 * (10.0 if order.count("method") == 2 and order[-1] == "method" else 1.0)) if order[-1] == "method" else 3.0

    monkeypatch.setattr(runner, "run", run)
    out = tmp_path / "g"
    assert cli.main(["generate", "--model", "x", "--method", "Neighborhood(window=3)", "--compare", "--steps", "2",
                     "--height", "32", "--width", "32", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert order == ["stock", "method", "method", "stock", "stock", "method"]
    assert "speedup 2.00x (0.20-2.00x over 3 repeats); vs stock: PSNR" in printed and printed.count("calls through") == 1
    assert (out / "patched_0.png").is_file() and (out / "stock_0.png").is_file()


def test_an_interrupt_keeps_what_was_measured():
    """Ctrl-C in repeat 2: the first repeat's outputs and times survive for the report."""
    sets = [compare.Setting(None, caches.parse("FirstBlockCache"))]
    calls, times, outputs, errors = [], {}, {}, {}

    def run_one(key, s, first):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return torch.zeros(1), 1.0 if key == "0" else 0.5

    with pytest.raises(KeyboardInterrupt):
        compare.measure(sets, run_one, 3, times, outputs, errors)
    assert set(outputs) == {"0", "1"} and times == {"0": [1.0], "1": [0.5]}
    assert timing.speedups(times, "0")["1"]["median"] == 2.0


def test_faster_cache_runs_where_the_negative_prompt_is_a_call_of_its_own():
    """FLUX's true CFG runs the negative prompt as a second transformer call: FasterCache's
    unconditional-batch skip (halving a batch) fails there unless is_guidance_distilled is set,
    which ``prepare`` reads from the pipeline; a CFG-batched pipeline keeps diffusers' default."""
    pipe = _tiny_flux()
    loaded = runner.Loaded("diffusion", pipe, None, "tiny", ["a red circle"], call=dict(true_cfg_scale=2.0, negative_prompt=""))
    kw = dict(steps=3, height=32, width=32)
    bare = caches.parse("FasterCache")
    with pytest.raises(IndexError), caches.enabled(pipe, bare):  # diffusers' default on this pipeline
        runner.run(loaded, ["a red circle"], 0, **kw)
    cache = caches.parse("FasterCache")
    caches.prepare(loaded, cache, calibrate=None)
    assert cache.resolved == {"is_guidance_distilled": True}
    with caches.enabled(pipe, cache):
        out, _ = runner.run(loaded, ["a red circle"], 0, **kw)
    assert torch.isfinite(out).all()
