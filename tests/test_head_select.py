"""core's per-group head selection: a group of whole GQA groups keeps GQA (views for one run, each KV head
once otherwise), and a StreamingHeads / per-head profile call equals its reference kernel either way."""
import pytest
import torch

import attnpatch as ap
from attnpatch import core
from attnpatch.site import Site


def test_one_run_of_whole_gqa_groups_is_a_pair_of_slices():
    sel, kv = core._head_select(torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]), 4)
    assert sel == slice(4, 12) and kv == slice(1, 3)
    q, k = torch.randn(1, 16, 8, 4), torch.randn(1, 4, 8, 4)
    assert q[:, sel].data_ptr() == q[:, 4].data_ptr() and k[:, kv].data_ptr() == k[:, 1].data_ptr()  # views


def test_scattered_whole_groups_gather_each_kv_head_once():
    heads = torch.tensor([0, 1, 2, 6, 7, 8])
    sel, kv = core._head_select(heads, 3)
    assert torch.equal(sel, heads) and torch.equal(kv, torch.tensor([0, 2]))


@pytest.mark.parametrize("heads,rep", [([1, 2, 3], 2), ([0, 2], 2), ([3], 4)])
def test_a_partial_group_reads_each_query_heads_kv_head(heads, rep):
    h = torch.tensor(heads)
    sel, kv = core._head_select(h, rep)
    assert torch.equal(sel, h) and torch.equal(kv, h // rep)


@pytest.mark.parametrize("full", [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)], [(0, 1)], [(0, 0), (0, 1), (0, 2), (0, 6), (0, 7), (0, 8)]])
def test_streaming_heads_with_gqa_groups_equals_the_reference(full, monkeypatch):
    """Whole KV groups (a run, two runs) and a partial one: the automatic kernels equal the reference kernel, and
    the retrieval heads equal dense attention while the streaming ones do not."""
    seen = []
    orig = core._head_select
    monkeypatch.setattr(core, "_head_select", lambda h, rep: seen.append(h.tolist()) or orig(h, rep))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 9, 300, 16, generator=g), torch.randn(1, 3, 300, 16, generator=g), torch.randn(1, 3, 300, 16, generator=g)
    site = Site(causal=True, layer=0)
    m = ap.StreamingHeads(full, sink=4, window=32)
    auto = core.run(q, k, v, m, site)
    split = core.run(q, k, v, m, site, backend="sdpa")  # a named backend: one call per group (no merged mask)
    ref = core.run(q, k, v, ap.StreamingHeads(full, sink=4, window=32), site, backend="reference")
    assert (auto - ref).abs().max() < 1e-5 and (split - ref).abs().max() < 1e-5
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    fh = [h for _, h in full]
    other = [h for h in range(9) if h not in fh]
    assert (auto[:, fh] - dense[:, fh]).abs().max() < 1e-5
    assert (auto[:, other] - dense[:, other]).abs().max() > 1e-2
    assert sorted(sum(seen[-2:], [])) == list(range(9))  # the split call went through the groups' selection
