"""SinkWindow with per-(layer, head) windows (``profile=``) and the profile search on an LLM: each head
equals its own uniform SinkWindow (prefill, a chunk after a cache, decode); eviction with a per-head
profile is refused; a profile for another model fails at patch time; the search on a tiny decoder
meets its budget and the written profile runs (decode equals prefill)."""
from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.models import tiny
from attnpatch.tools.profile_search import measure, search

SINKS, WINDOWS = [4, 4, 0, 1, 4, 2], [3, 64, 3, 200, 17, 1]  # 6 query heads over 3 KV heads (GQA 2)
PROFILE = {"sink": torch.tensor([SINKS]), "window": torch.tensor([WINDOWS])}


@pytest.mark.parametrize("Sq,Skv", [(300, 300), (5, 50), (1, 80)], ids=["prefill-blocks", "chunk", "decode"])
def test_each_head_equals_its_own_uniform_sink_window(Sq, Skv):
    g = torch.Generator().manual_seed(Sq)
    q = torch.randn(2, 6, Sq, 32, generator=g)
    k, v = (torch.randn(2, 3, Skv, 32, generator=g) for _ in range(2))
    site = Site(causal=True, q_offset=Skv - Sq)
    out = ap.attend(q, k, v, ap.SinkWindow(block=64, profile=PROFILE), site)
    for h in range(6):
        want = ap.attend(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1],
                         ap.SinkWindow(sink=SINKS[h], window=WINDOWS[h], block=64), site)
        torch.testing.assert_close(out[:, h:h + 1], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ap.attend(q, k, v, ap.SinkWindow(window=3), site), atol=1e-3)


def test_dense_steps_does_not_touch_llm_calls():
    """LLM sites carry no step: SinkWindow's default is 0, and even a fraction leaves the pattern on."""
    assert ap.SinkWindow().dense_steps == 0
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    site = Site(causal=True)
    want = ap.attend(q, k, v, ap.SinkWindow(sink=1, window=4), site)
    torch.testing.assert_close(ap.attend(q, k, v, ap.SinkWindow(sink=1, window=4, dense_steps=0.5), site), want)
    assert not torch.allclose(want, ap.attend(q, k, v, ap.Dense(), site), atol=1e-3)


def test_eviction_with_a_per_head_profile_is_refused():
    with pytest.raises(ValueError, match=r"evict=True, profile=.*use evict=False with the profile"):
        ap.SinkWindow(evict=True, profile={"window": torch.tensor([[8, 16]])})
    assert ap.SinkWindow(evict=True, window=8).kv_policy() is not None  # uniform eviction is unchanged


def test_profile_for_another_model_fails_at_patch_time():
    model = tiny.llm("llama")  # 2 layers x 4 heads
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        ap.patch(model, ap.SinkWindow(profile={"window": torch.tensor([[4, 8, 16], [4, 8, 16]])}))


@pytest.fixture(scope="module")
def llm():
    model = tiny.llm("llama")
    ids = torch.randint(1, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_search_meets_the_budget_and_the_profile_decodes_like_it_prefills(llm, tmp_path):
    model, ids = llm
    run = lambda m: m(ids)  # noqa: E731
    values = [2, 8, 32]
    m = measure(model, run, ap.SinkWindow(sink=1), "window", values)
    assert m["recall"].shape == (3, 2, 4) and (m["density"][1:] >= m["density"][:-1]).all()
    budget = m["density"][1].mean().item()  # uniform window 8
    path = tmp_path / "sw.safetensors"
    res = search(model, run, ap.SinkWindow(sink=1), "window", values, budget=budget, out=path)
    assert res["density"] <= budget + 1e-9 and res["recall"] >= res["uniform"]["recall"] - 1e-9
    method = ap.SinkWindow(sink=1, profile=str(path))
    chosen = torch.tensor(values)[res["choice"]]
    assert torch.equal(method._tables["window"], chosen)
    x = ids[:1]
    with torch.inference_mode(), ap.patch(model, method):
        full = model(x).logits[0, -1]
        out = model(x[:, :-1], use_cache=True)
        step = model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def _bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import profile_search_llm

    return profile_search_llm


def test_benchmark_density_is_the_measured_density(llm):
    """benchmarks/profile_search_llm.py sets the budget and equal-density windows from a closed form:
    it equals the search's measured density (kept / causally visible pairs) for every window."""
    model, ids = llm
    values = [1, 3, 8, 47, 100]
    m = measure(model, lambda mod: mod(ids), ap.SinkWindow(sink=4), "window", values)
    want = torch.tensor([_bench().density(48, 4, w) for w in values], dtype=torch.float64)
    torch.testing.assert_close(m["density"].mean((1, 2)), want)
    per_head = torch.tensor([[3, 47, 8, 1]])
    torch.testing.assert_close(_bench().density(48, 4, per_head), want[[1, 3, 2, 0]].mean().item())


def test_output_error_probe_leaves_the_forward_dense(llm):
    """The output-error criterion watches dense attention: logits unchanged, the widest window (all keys
    at this length) has zero error and the narrowest some."""
    model, ids = llm
    probe = _bench()._ErrorProbe([2, 64])
    with torch.no_grad():
        want = model(ids).logits
        with ap.patch(model, probe):
            got = model(ids).logits
    torch.testing.assert_close(got, want)
    err = torch.stack([probe.err[layer] / probe.norm[layer] for layer in sorted(probe.err)], 1)  # (values, layers, heads)
    assert err.shape == (2, 2, 4) and (err[1] < 1e-12).all() and (err[0] > 1e-4).all()


def test_a_window_covering_every_query_plans_plain_causal_attention():
    """A head whose window reaches every key its queries may see (a profile's widest windows at a short
    context) plans None: exact, and no masked kernel; one token short of that it keeps its mask."""
    q, k = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 40, 16)
    site = Site(causal=True, q_offset=32)
    assert ap.SinkWindow(window=40).plan(q, k, site) is None
    assert ap.SinkWindow(window=39).plan(q, k, site) is not None
    assert ap.SinkWindow(window=64).plan(torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16), Site(causal=True)) is None
