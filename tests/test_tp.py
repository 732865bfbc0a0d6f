"""attnpatch under transformers tensor parallelism (``DistributedConfig(tp_size=2)``: q/k/v_proj colwise,
so rank r attends with query heads [2r, 2r + 2) of 4), on 2 gloo processes (CPU): the parallel output
equals the single-process patched output and differs from stock, per-head profiles and head lists
name the model's heads, data-dependent estimates average over every rank's heads, and unpatch
restores the stock parallel output. The head split is also checked in one process, with threads
as ranks."""
import threading

import pytest
import torch

import attnpatch as ap
from attnpatch import core
from attnpatch.site import Site
from attnpatch.tools import tp_check

pytest.importorskip("transformers")

TOL = 1e-4
# (layers, heads) keep fractions: layer 0 splits the heads by rank (rank 0 keeps everything, so it lacks the
# estimated group), layer 1 groups heads {0, 3} and {1, 2} across ranks
KEEP = {"keep": torch.tensor([[1.0, 1.0, 0.4, 0.4], [0.4, 1.0, 1.0, 0.4]])}
JOBS = [dict(method=ap.SinkWindow(sink=2, window=8)),
        dict(method=ap.SinkWindow(sink=2, window=8, evict=True)),  # a KV-cache policy: each rank trims its heads
        dict(method=ap.Power(local=4, sink=1)),
        dict(method=ap.VerticalSlash(verticals=4, slashes=4, last_q=8, sink=2, window=8)),
        dict(method=ap.TopKBlocks(keep=0.25, block=4)),  # one estimate averaged over all 4 heads: an all-reduce
        dict(method=ap.TopKBlocks(keep=0.5, block=4, profile=KEEP)),
        dict(method=ap.SinkCalibration(heads=[(0, 3)], threshold=0.5)),  # a head only rank 1 holds
        dict(method=ap.SinkCalibration(threshold=0.5), batch=2, pad=5),  # left padding through the mask
        dict(method=ap.TopKBlocks(keep=0.25, block=4), family="qwen3", batch=2, pad=5),
        dict(method=ap.TopKBlocks(keep=0.25, block=4, profile={"keep": torch.tensor([[0.25] * 4 + [1.0] * 4] * 2)}),
             config=dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8))]


@pytest.fixture(scope="module")
def rows():
    return tp_check.check(JOBS, world=2)


def _label(r):
    return f"{r['family']} {r['method']}"


def test_every_job_ran(rows):
    assert len(rows) == len(JOBS)
    failed = [f"{_label(r)}: {r['error']}\n{r.get('where', '')}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)


def test_tp_output_equals_the_single_process_patched_output_and_is_not_stock(rows):
    bad = []
    for r in rows:
        if "error" in r:
            continue
        if not r["par_vs_single"] <= TOL:
            bad.append(f"{_label(r)}: tensor parallel differs from one process by {r['par_vs_single']:.2e}")
        if r["single_vs_stock"] < 1e-3:
            bad.append(f"{_label(r)}: the job does not exercise the method (patched == stock in one process)")
        if r["par_vs_stock"] < 1e-3:
            bad.append(f"{_label(r)}: the parallel output is stock attention's")
        if r["routed"] == 0:
            bad.append(f"{_label(r)}: no call routed through attnpatch")
    assert not bad, "\n".join(bad)


def test_each_rank_names_the_model_heads_of_its_shard(rows):
    for job, r in zip(JOBS, rows):
        if "error" in r:
            continue
        H = job.get("config", {}).get("num_attention_heads", 4)
        for rank, seen in enumerate(r["heads"]):
            want = list(range(rank * H // 2, (rank + 1) * H // 2))
            assert seen and all(v == [want] for v in seen.values()), (_label(r), rank, seen)


def test_unpatch_restores_the_stock_parallel_output(rows):
    for r in rows:
        if "error" not in r:
            assert r["stock_par_vs_stock"] <= TOL and r["restored_vs_stock"] == 0.0, _label(r)


class _Ranks:
    """``n`` threads as ranks: ``head_sum(rank)`` sums a tensor over them in place, as an all-reduce does."""

    def __init__(self, n):
        self.n, self.barrier, self.parts = n, threading.Barrier(n), [None] * n

    def head_sum(self, rank):
        def reduce(t):
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()  # every rank has read the parts before the next call writes them
            t.copy_(total)
        return reduce


def _split_run(method, q, k, v, layer, where, world=2):
    """The call run by ``world`` thread ranks, each with its colwise share of the heads, concatenated."""
    H, Hkv = q.shape[1], k.shape[1]
    ranks, outs, errors = _Ranks(world), [None] * world, []

    def rank(r):
        h, hk = slice(r * H // world, (r + 1) * H // world), slice(r * Hkv // world, (r + 1) * Hkv // world)
        site = Site(layer=layer, heads=tuple(range(H))[h], num_heads=H, head_sum=ranks.head_sum(r), **where)
        try:
            outs[r] = core.run(q[:, h], k[:, hk], v[:, hk], method, site)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("method", [ap.TopKBlocks(keep=0.5, block=4), ap.TopKBlocks(keep=0.5, block=4, profile=KEEP),
                                    ap.SinkCalibration(heads=[(0, 3), (1, 1)], threshold=0.5)], ids=repr)
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("where", [dict(causal=True), dict(grid=(8, 12))], ids=["causal", "grid"])
def test_a_head_split_call_equals_the_whole_call(method, layer, where):
    """Per-head parameters follow the model's head index and estimates average over every rank's heads:
    the split call equals the one-process call (and the method changes the output)."""
    torch.manual_seed(layer)
    q, k, v = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    k[:, :, 9] *= 6  # a non-initial key most queries like: a sink for SinkCalibration
    whole = core.run(q, k, v, method, Site(layer=layer, **where))
    assert (whole - core.run(q, k, v, ap.Dense(), Site(**where))).abs().max() > 1e-3
    assert torch.allclose(_split_run(method, q, k, v, layer, where), whole, atol=1e-5)


def test_a_call_with_fewer_heads_than_the_model_and_no_tp_shard_is_refused():
    """A call holding 2 of 4 heads without a tensor-parallel q_proj: which heads is unknown, so attnpatch
    refuses rather than apply head 0's parameters to another head."""
    from attnpatch.models import tiny
    from attnpatch.patchers import transformers as tp

    model = tiny.llm("llama")
    with ap.patch(model, ap.SinkCalibration(heads=[(0, 3)])):
        attn = model.model.layers[0].self_attn
        q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
        with pytest.raises(RuntimeError, match="not a tensor-parallel DTensor"):
            tp.attention(attn, q, k, k, None, scaling=0.25)


def test_site_head_sum_must_be_callable_and_without_it_head_mean_is_the_plain_mean():
    from attnpatch.checks import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="head_sum"):
        Site(heads=(0,), num_heads=2, head_sum=3)
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(Site().head_mean(x), x.mean((0, 1)))
    doubled = Site(head_sum=lambda t: t.mul_(2)).head_mean(x)  # two equal ranks: sum and count both double
    assert torch.allclose(doubled, x.mean((0, 1)), atol=1e-6)
