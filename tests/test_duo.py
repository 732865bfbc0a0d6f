"""StreamingHeads (retrieval heads full, the rest SinkWindow) and the retrieval-head scoring tool.
Exactness of the per-head pattern is the zoo's (tests/zoo.py streaming-heads-* rows, float64 goldens)."""
from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.duo import load_heads, save_heads
from attnpatch.methods.observe import Observed
from attnpatch.models import tiny
from attnpatch.tools.retrieval_heads import _Scorer, top_heads

C = Site(causal=True)


def _qk(Hq=4, Hkv=2, S=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, Hq, S, 8, generator=g), torch.randn(1, Hkv, S, 8, generator=g)


def test_head_plans_split_by_layer():
    m = ap.StreamingHeads([(1, 0), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)], sink=2, window=5)
    q, k = _qk()
    none = m.head_plans(q, k, C)  # layer 0 has no retrieval heads: one SinkWindow plan for all
    assert len(none) == 1 and none[0][0] is None and none[0][1].name.startswith("SinkWindow")
    assert m.head_plans(q, k, Site(causal=True, layer=2)) == [(None, None)]  # all heads full: plain dense, no mask
    (d, dp), (r, rp) = m.head_plans(q, k, Site(causal=True, layer=1))
    assert d.tolist() == [0, 3] and dp is None
    assert r.tolist() == [1, 2] and rp.name == "SinkWindow(sink=2, window=5)"


def test_tensor_parallel_heads_use_model_numbering():
    """A rank holding model heads (2, 3) keeps model head 3 full: its call position 1."""
    m = ap.StreamingHeads([(0, 3)], sink=1, window=3)
    q, k = _qk(Hq=2, Hkv=1)
    (d, _), (r, _) = m.head_plans(q, k, Site(causal=True, heads=(2, 3), num_heads=4))
    assert d.tolist() == [1] and r.tolist() == [0]


def test_profile_round_trip(tmp_path):
    path = tmp_path / "heads.safetensors"
    save_heads(path, [(3, 1), (0, 2)], torch.rand(4, 3), seed=1)
    assert load_heads(path) == [(0, 2), (3, 1)]
    assert ap.StreamingHeads(str(path)).full_heads(3) == {1}
    from attnpatch.methods.pag import save_heads as pag_heads

    pag_heads(tmp_path / "pag.safetensors", [(0, 1)])
    with pytest.raises(ValueError, match="not a retrieval-head profile"):
        ap.StreamingHeads(str(tmp_path / "pag.safetensors"))


@pytest.mark.parametrize("heads", [[(0, -1)], [(0,)], [("a", 1)], [(True, 1)], [(0.5, 1)]])
def test_bad_heads_refused(heads):
    with pytest.raises((TypeError, ValueError), match="StreamingHeads"):
        ap.StreamingHeads(heads)


def test_kv_tokens_counts_kv_groups():
    """Two retrieval query heads of one GQA group keep one KV head whole, not two."""
    m = ap.StreamingHeads([(0, 0), (0, 1), (1, 5)], sink=4, window=100)
    # 2 layers x 2 KV heads (rep 3): layer 0 group 0 and layer 1 group 1 full, 2 others keep 4 + 99
    assert m.kv_tokens(2, 6, 2, 1000) == 2 * 1000 + 2 * 103
    assert m.kv_tokens(2, 6, 2, 50) == 4 * 50  # a context under the window: everything is kept


def test_decode_matches_prefill_on_tiny_llm():
    """Mixed heads through the transformers patcher: the last row of a prefill equals decoding that
    token after a cache of the rest (streaming heads slice their sink + window keys at decode)."""
    model = tiny.llm("llama")
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    m = ap.StreamingHeads([(0, 1), (1, 0), (1, 1)], sink=2, window=6)
    with torch.inference_mode(), ap.patch(model, m):
        full = model(ids).logits[0, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=out.past_key_values, use_cache=True).logits[0, -1]
        uni = None
    with torch.inference_mode(), ap.patch(model, ap.SinkWindow(sink=2, window=6)):
        uni = model(ids).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, uni, atol=1e-3)  # the retrieval heads do see past the window


def test_scorer_counts_copy_steps():
    """Head 0 points at the needle token being copied (score 1); head 1 at the first token (score 0)."""
    ids = torch.tensor([10, 11, 20, 21, 22, 12, 13, 20, 21, 22])  # needle [2, 5), answer from 7
    S = ids.numel()
    k = torch.eye(S)[None, None] * 10  # key j: one-hot j
    q = torch.zeros(1, 2, S, S)
    for r, src in zip((6, 7, 8), (2, 3, 4)):
        q[0, 0, r, src] = 1.0
        q[0, 1, r, 0] = 1.0
    scorer = _Scorer()
    scorer.task = (ids, (2, 5), 7)
    scorer(q, k, Site(causal=True, layer=3), [])
    assert scorer.hits[3].tolist() == [3, 0] and scorer.steps[3] == 3


def test_scorer_on_tiny_llm_every_layer():
    model = tiny.llm("llama")
    scorer = _Scorer()
    ids = torch.randint(1, 97, (24,), generator=torch.Generator().manual_seed(1))
    ids[-4:] = ids[5:9]  # the needle [5, 9) copied at the end
    scorer.task = (ids, (5, 9), 20)
    with torch.inference_mode(), ap.patch(model, Observed(ap.Dense(), scorer)):
        model(ids[None])
    assert sorted(scorer.hits) == [0, 1] and all(h.shape == (4,) for h in scorer.hits.values())
    assert all(scorer.steps[l] == 4 for l in (0, 1))


def test_top_heads_whole_kv_groups():
    s = torch.zeros(2, 6)
    s[1, 4] = 0.9  # group 1 (heads 3-5) of layer 1
    s[0, 0] = 0.5  # group 0 of layer 0
    assert top_heads(s, 1, kv_heads=2) == [(1, 3), (1, 4), (1, 5)]
    assert top_heads(s, 2) == [(0, 0), (1, 4)]  # per query head
    assert len(top_heads(s, 0.5, kv_heads=2)) == 6  # half of the 4 groups


def _split(m, q, k, v, site):
    """Each head group through its own plan, as core.run does without merging (the reference)."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for heads, plan in m.head_plans(q, k, site):
        got = ap.core._run_plan(q[:, heads], k[:, heads // rep], v[:, heads // rep], plan, site, "reference",
                                None, None, None)
        out[:, heads] = got
    return out


def test_small_head_groups_run_as_one_merged_call_equal_to_the_split():
    """At 64 tokens the cost model merges StreamingHeads' full and streaming heads into one masked call
    (StreamingHeads' groups are static); the output equals each group through its own plan."""
    from attnpatch import merge_heads

    m = ap.StreamingHeads([(1, 0), (1, 3)], sink=2, window=5)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g) for h in (4, 2, 2))
    site = Site(causal=True, layer=1)
    groups = m.head_plans(q, k, site)
    assert m.head_plans(q, k, site) is groups  # static: the same list, found by identity
    plan = merge_heads.merged(groups, q, k, v, site, None, None)
    assert plan is not None and plan.static and "merged" in plan.name
    got = ap.core.run(q, k, v, m, site)
    ref = _split(m, q, k, v, site)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    assert (got[:, [1, 2]] - dense[:, [1, 2]]).abs().max() > 1e-3  # streaming heads are not dense
    torch.testing.assert_close(got[:, [0, 3]], dense[:, [0, 3]], atol=1e-5, rtol=1e-5)


def test_merge_is_refused_for_a_mask_a_backend_or_a_non_static_plan():
    from attnpatch import merge_heads

    m = ap.StreamingHeads([(1, 0)], sink=2, window=5)
    q, k = _qk(Hq=4, Hkv=4, S=32)
    site = Site(causal=True, layer=1)
    groups = m.head_plans(q, k, site)
    assert merge_heads.merged(groups, q, k, k, site, torch.ones(32, 32, dtype=torch.bool), None) is None
    assert merge_heads.merged(groups, q, k, k, site, None, "reference") is None
    moving = [(h, None if p is None else __import__("dataclasses").replace(p, static=False)) for h, p in groups]
    assert merge_heads.merged(moving, q, k, k, site, None, None) is None
