"""Whole pipelines of every diffusers family (tiny random components, prompt embeddings, decoded
output): Dense through attnpatch equals stock and unpatch restores it bit for bit, windows that
cover everything equal stock, a narrow window changes the output exactly as the reference kernel
says, and every Site carries the grid the call's latent size implies and the step index."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Method
from attnpatch.models.tiny import PIPE_LAYOUT as EXPECT, PIPES, STEPS, run
from attnpatch.patchers.families import FAMILIES

TINY = [f.name for f in FAMILIES if f.tiny is not None]  # a new row with a tiny pipeline is tested with no edit

COVERING = {  # every window covers the whole grid, so each must equal stock attention
    "neighborhood": lambda: ap.Neighborhood(window=99),
    "sliding_tile": lambda: ap.SlidingTile(tile=99, window=1),
    "topk_blocks": lambda: ap.TopKBlocks(keep=1.0, block=1),
    # band 0 (distance <= 1) 99 tiles wide, band 1 (distance 2) floor(99 / 2) = 49: both cover a
    # 5x7 frame of 1-token tiles, so every key is kept
    "radial": lambda: ap.Radial(window=99, tile=1, dense_frames=0),
}


class Record(Method):
    """Dense attention that remembers every site it was asked about."""

    def __init__(self):
        self.sites = []

    def plan(self, q, k, site):
        self.sites.append(site)
        return None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are a few kilobytes: with two threads on a shared 2-core CPU every op waits on
    the other thread (100x slower), so run the pipelines on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=TINY)
def family(request):
    pipe, kwargs = PIPES[request.param]()
    return request.param, pipe, kwargs, run(pipe, kwargs)


def test_every_row_has_a_worked_out_pipeline_layout():
    assert set(EXPECT) == set(TINY) == set(PIPES)
    assert EXPECT["flux"][0] == (3, 5) and EXPECT["wan"][0] == (3, 5, 7)  # odd, non-square, all axes distinct


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_dense_equals_stock_and_unpatch_restores(family):
    name, pipe, kw, stock = family
    assert torch.isfinite(stock).all() and stock.dim() == (4 if len(EXPECT[name][0]) == 2 else 5)
    assert torch.equal(run(pipe, kw), stock)  # the stock call itself is deterministic
    h = ap.patch(pipe, ap.Dense())
    assert h.modules and all(n.startswith("transformer.") for n in h.modules)
    out = run(pipe, kw)
    ap.unpatch(pipe)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(pipe, kw), stock)
    with ap.patch(pipe, ap.Dense()):
        out = run(pipe, kw)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(pipe, kw), stock)
    assert "progress_bar" not in pipe.__dict__ and not pipe.transformer._forward_pre_hooks
    assert "_Calls" not in {c.__name__ for c in type(pipe).__mro__} and "forward" not in pipe.transformer.__dict__


@pytest.mark.parametrize("method", sorted(COVERING))
def test_covering_window_equals_stock(family, method):
    name, pipe, kw, stock = family
    if method == "radial" and len(EXPECT[name][0]) == 2:
        with ap.patch(pipe, COVERING[method]()), pytest.raises(ValueError, match="Radial needs a video grid"):
            run(pipe, kw)
        return
    with ap.patch(pipe, COVERING[method]()):
        out = run(pipe, kw)
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_narrow_window_changes_output_as_the_reference_says(family):
    name, pipe, kw, stock = family
    narrow = ap.SlidingTile(tile=1, window=1)  # each visual token sees itself (and the text) only
    with ap.patch(pipe, narrow):
        fast = run(pipe, kw)
    with ap.patch(pipe, narrow, backend="reference"):
        ref = run(pipe, kw)
    assert _diff(fast, stock) > 1e-4
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(pipe, kw), stock)


def test_dense_steps_fraction_counts_the_pipelines_steps(family):
    """dense_steps=0.5 is floor(0.5 * num_inference_steps) dense steps on every family."""
    name, pipe, kw, stock = family
    outs = {}
    for d in (0.5, STEPS // 2, 0):
        with ap.patch(pipe, ap.SlidingTile(tile=1, window=1, dense_steps=d)):
            outs[d] = run(pipe, kw)
    assert STEPS // 2 >= 1
    assert torch.equal(outs[0.5], outs[STEPS // 2])
    assert _diff(outs[0.5], outs[0]) > 1e-6 and _diff(outs[0.5], stock) > 1e-6


def test_sites_carry_the_grid_of_the_call_and_the_step(family):
    name, pipe, kw, _ = family
    grid, kinds = EXPECT[name]
    rec = Record()
    with ap.patch(pipe, rec):
        run(pipe, kw)
        first = len(rec.sites)
        run(pipe, kw)
    sites = rec.sites[:first]
    assert {s.kind for s in sites} == kinds
    assert all(s.grid == grid and s.family == name for s in sites), {(s.kind, s.grid) for s in sites}
    steps = [s.step for s in sites]
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(STEPS))
    assert rec.sites[first].step == 0  # a new pipeline call counts from step 0 again
    assert [s.step for s in rec.sites[first:]] == steps
    assert {s.steps for s in rec.sites} == {STEPS}  # the pipeline's num_inference_steps
    ts = [s.timestep for s in sites]
    assert ts == sorted(ts, reverse=True) and 0 <= ts[-1] < ts[0] <= 1


def test_timing_synchronises_cuda_around_every_timed_call(monkeypatch):
    """GPU kernels are asynchronous: each timed call must sit between two device synchronisations
    (emulated here: CUDA reported present and initialised, synchronize recorded)."""
    from attnpatch.tools import timing

    log = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    timing.timeit(lambda: log.append("a"), reps=2, warmup=1)
    assert log == ["a", "sync", "a", "sync", "sync", "a", "sync"]
    log.clear()
    timing.timeit_interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, reps=1, warmup=0)
    assert log == ["sync", "a", "sync", "sync", "b", "sync"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # CPU-only runs never touch CUDA
    log.clear()
    timing.timeit(lambda: log.append("a"), reps=2, warmup=0)
    assert log == ["a", "a"]


def test_speed_quality_plot_names_every_setting_inside_the_figure_without_overlap(monkeypatch, tmp_path):
    """Settings that land close together, and one very long name: every name is drawn whole, inside
    the saved figure, and no two names overlap (labels at the points overlapped and ran off the edge)."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from attnpatch.cli import report

    names = ["stock attention"] + [f"Neighborhood(window=7, stride=1, dilation=1, causal=False, tile=4) + dense_steps={d}"
                                   for d in (0, 0.2, 0.4)] + ["TopKBlocks(keep=0.25, block=4) " + "x" * 160]
    rows = [dict(setting=n, speedup=1.0 + 0.01 * i, psnr=24.0 + 0.05 * i) for i, n in enumerate(names)]
    seen = {}
    save = Figure.savefig

    def spy(fig, path, **kw):  # the layout as saved (plain savefig: no tight bounding box)
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        seen["texts"] = [(t.get_text(), t.get_window_extent(r)) for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
        seen["bbox"], seen["tight"] = fig.bbox, kw.get("bbox_inches")
        return save(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    report.scatter(rows, "psnr", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file() and seen["tight"] is None
    squash = lambda text: "".join(text.split())  # noqa: E731  (labels may be wrapped over lines)
    labels = [(t, b) for t, b in seen["texts"] if any(squash(n)[:12] == squash(t)[:12] for n in names)]
    for n in names:
        whole = lambda t: squash(t) == squash(n) or (squash(t).startswith(squash(n) + "[") and t.endswith("]"))  # noqa: E731
        assert any(whole(t) for t, _ in labels), f"{n!r} not drawn whole"  # (a legend label may add its [kind])
    fig = seen["bbox"]
    for t, b in labels:
        assert b.x0 >= fig.x0 - 0.5 and b.x1 <= fig.x1 + 0.5 and b.y0 >= fig.y0 - 0.5 and b.y1 <= fig.y1 + 0.5, f"{t!r} cut off"
    for i, (t1, b1) in enumerate(labels):
        for t2, b2 in labels[i + 1:]:
            assert not b1.overlaps(b2), f"{t1!r} overlaps {t2!r}"
