"""attnpatch under diffusers' Ulysses context parallelism, on 2 gloo processes (CPU): the parallel
output equals the single-process patched output and differs from stock, for every family with a
``_cp_plan``, every sparse, calibrated and guided method, whichever of patch / enable_parallelism
comes first; unpatch restores the stock parallel output; ring attention is refused."""
import pytest
import torch

import attnpatch as ap
from attnpatch.patchers import parallel
from attnpatch.tools import parallel_check as pc

pytest.importorskip("diffusers")

TOL = 1e-4


class RowCoupled(ap.Method):
    """A test method whose cross-attention rows depend on each other (each row minus the mean over the
    call's rows), like SinkCalibration's column statistics: under context parallelism Wan's
    cross-attention holds one rank's query rows, which must be gathered for the one-process result."""

    llm = False
    rows_coupled = True

    def plan(self, q, k, site):
        if site.kind != "cross":
            return None
        return ap.Plan(output=lambda out, q, k, v, scale: out - 0.5 * out.mean(2, keepdim=True), name="row-coupled")
PROFILE = {"window": torch.tensor([[3, 5], [5, 3]])}  # (layers, heads): head 1 differs from head 0


def _methods(family):
    out = [ap.Neighborhood(window=3), ap.SlidingTile(tile=2, window=1), ap.TopKBlocks(keep=0.25, block=2),
           ap.InwardWindow(train_grid=2), ap.Temperature(tau=0.8), ap.EntropyScale(train_len=8), ap.PAG(), ap.PAG(soft=0.5),
           ap.Neighborhood(profile=PROFILE)]
    return out + ([ap.Radial(window=1, tile=2, dense_frames=0)] if family != "flux" else [])


JOBS = [dict(family=f, method=m) for f in pc.FAMILIES for m in _methods(f)]
JOBS += [dict(family=f, method=ap.Neighborhood(window=3), order="before") for f in pc.FAMILIES]
# TopKBlocks averages its block estimate over all heads: the ranks sum theirs (Site.head_sum)
JOBS += [dict(family="wan", method=ap.TopKBlocks(keep=k, block=(1, 2, 2))) for k in (0.5, 0.25)]
JOBS += [dict(family=f, method=ap.TopKBlocks(keep=0.5, block=(2, 2))) for f in ("flux",)]
JOBS += [dict(family=f, method=ap.SharedAttention(), batch=2) for f in pc.FAMILIES]
BALANCE = dict(family="flux", method=ap.Neighborhood(tile=4, profile={"window": torch.tensor([[3, 3, 31, 31]] * 2)}),
               heads=4, side=16)  # heads 2, 3 dense: in order, rank 1 would hold both
JOBS += [BALANCE]
# SinkCalibration's sinks come from all query rows: Wan's cross-attention (query rows sharded, no exchange) gathers them
JOBS += [dict(family=f, method=ap.SinkCalibration(threshold=1.2, detect_rows=None)) for f in pc.FAMILIES]
JOBS += [dict(family="wan", method=ap.SinkCalibration(threshold=1.2, detect_rows=8)), dict(family="wan", method=RowCoupled())]
JOBS += [dict(family="wan22", method=m) for m in (ap.Neighborhood(window=3), ap.PAG())]  # both experts, whole pipeline
JOBS += [dict(family="ltx", method=ap.Neighborhood(window=3), text_mask=True),  # cross-attention with a padded text mask
         dict(family="flux", method=ap.Neighborhood(window=3), ring=True)]


@pytest.fixture(scope="module")
def rows():
    return {(r["family"], r["method"], r["order"], i): r for i, r in enumerate(pc.check(JOBS, world=2))}


def _label(r):
    return f"{r['family']} {r['method']} ({r['order']})"


def test_every_job_ran(rows):
    assert len(rows) == len(JOBS)
    failed = [f"{_label(r)}: {r['error']}\n{r.get('where', '')}" for r in rows.values() if "error" in r]
    assert not failed, "\n".join(failed)


def test_ulysses_output_equals_the_single_process_patched_output_and_is_not_stock(rows):
    bad = []
    for r in rows.values():
        if "par_vs_single" not in r:
            continue
        if r["par_vs_single"] > TOL:
            bad.append(f"{_label(r)}: parallel differs from one process by {r['par_vs_single']:.2e}")
        if r["single_vs_stock"] < 1e-3:
            bad.append(f"{_label(r)}: the job does not exercise the method (patched == stock in one process)")
        if r["par_vs_stock"] < 1e-3:
            bad.append(f"{_label(r)}: the parallel output is stock attention's")
        if r["routed"] == 0 or r["handed_back"]:
            bad.append(f"{_label(r)}: routed {r['routed']}, handed back {r['handed_back']}")
    assert not bad, "\n".join(bad)


def test_unpatch_restores_the_stock_parallel_output(rows):
    for r in rows.values():
        if "restored_vs_stock" not in r:
            continue
        if isinstance(r["stock_par_vs_stock"], str):  # diffusers' own op failed (LTX text mask): say so, not hide it
            assert r["family"] == "ltx" and "stock parallel attention failed" in r["stock_par_vs_stock"]
            continue
        assert r["stock_par_vs_stock"] <= TOL and r["restored_vs_stock"] == 0.0, _label(r)


def test_ring_attention_is_refused_naming_ulysses(rows):
    (r,) = [r for r in rows.values() if r["order"] == "ring"]
    for order in ("refused_after", "refused_before"):
        assert r[order] != "ran" and "Ulysses" in r[order] and "ulysses_degree" in r[order], r[order]


def test_the_rank_interleaved_order_maps_back_to_the_models_order():
    """Brute force: a FLUX-like joint sequence (text first) sharded over 3 ranks, each rank's shard
    [txt_r, img_r], concatenated; the layout's index gives text then image in order, and its
    inverse puts every token back."""
    T, I, N = 6, 12, 3
    model_order = torch.arange(T + I)  # token ids: text 0..5, image 6..17
    shards = [torch.cat([model_order[r * T // N:(r + 1) * T // N], model_order[T + r * I // N:T + (r + 1) * I // N]])
              for r in range(N)]
    glob = torch.cat(shards)
    idx, back = parallel._segments(glob.numel() // N, N, I, True, True)
    assert torch.equal(glob[idx], model_order) and torch.equal(glob[idx][back], glob)
    # text not sharded: each rank holds all of it; the method sees one copy, every copy gets its output
    shards = [torch.cat([model_order[:T], model_order[T + r * I // N:T + (r + 1) * I // N]]) for r in range(N)]
    glob = torch.cat(shards)
    idx, back = parallel._segments(glob.numel() // N, N, I, True, False)
    assert torch.equal(glob[idx], model_order) and torch.equal(glob[idx][back], glob)


def test_a_site_holding_a_subset_of_heads_gets_those_heads_parameters():
    """Site.heads: the per-head profile rows of the model heads the call holds (here head 1 only)."""
    m = ap.Neighborhood(profile={"window": torch.tensor([[3, 7]])})
    q = torch.randn(1, 1, 64, 8)
    local = m.head_plans(q, q, ap.Site(grid=(8, 8), heads=(1,), num_heads=2))
    (_, plan), = local
    want = ap.Neighborhood(window=7).plan(q, q, ap.Site(grid=(8, 8)))
    from attnpatch.plan import materialise_mask

    assert torch.equal(materialise_mask(plan, 1, 1, 64, 64, "cpu"), materialise_mask(want, 1, 1, 64, 64, "cpu"))
    pag = ap.PAG(heads=[1])
    site = ap.Site(grid=(8, 8), heads=(1,), num_heads=2, roles=("perturbed",))
    assert pag.plan(q, q, site).parts[0].heads == (0,)  # model head 1 is the call's head 0
    assert pag.plan(q, q, ap.Site(grid=(8, 8), heads=(0,), num_heads=2, roles=("perturbed",))) is None


def test_uneven_heads_are_dealt_by_work_and_the_output_stays_exact(rows):
    (r,) = [r for (fam, _, _, i), r in rows.items() if JOBS[i] is BALANCE]
    assert r["dealt"] and all(order == [0, 2, 1, 3] for order in r["dealt"]), r["dealt"]  # one dense head per rank
    assert r["par_vs_single"] <= TOL and r["par_vs_stock"] > 1e-3


def test_deal_keeps_h_over_n_heads_per_rank_and_never_does_worse_than_in_order():
    from attnpatch.patchers import balance

    g = torch.Generator().manual_seed(0)
    for H, N in ((8, 2), (24, 4), (40, 8), (12, 3)):
        for _ in range(20):
            work = torch.rand(H, generator=g) ** 3
            ranks = balance.deal(work, N)
            assert sorted(h for hs in ranks for h in hs) == list(range(H)) and {len(hs) for hs in ranks} == {H // N}
            assert balance.imbalance(work, ranks) <= balance.imbalance(work, balance.in_order(H, N)) + 1e-6
    work = torch.tensor([1.0, 1.0, 0.1, 0.1])
    assert balance.order(work, 2).tolist() == [0, 2, 1, 3]
    assert balance.order(torch.ones(4), 2) is None  # even: Ulysses' own order


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox", "mochi", "sd3"])
def test_families_without_a_cp_plan_are_refused_under_context_parallelism(family):
    """diffusers has no _cp_plan for them (enable_parallelism itself asks for one); with a plan of
    the user's own attnpatch refuses at patch time, naming the families that work."""
    from types import SimpleNamespace

    from attnpatch.models import tiny

    model = tiny.model(family)
    assert getattr(type(model), "_cp_plan", None) is None
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=1, ulysses_degree=2))
    with pytest.raises(RuntimeError, match="_cp_plan.*FluxTransformer2DModel"):
        ap.patch(model, ap.Neighborhood(window=3))
