"""Block-granular diagonals (``Lines.block``, ``VerticalSlash(block=...)``: MInference's GPU-kernel granularity)
against a keep-mask written from the definition: a row keeps key j when a kept diagonal o reaches j in some
row of its block (first - o <= j <= last - o), or j is a kept column, and j <= its position."""
import pytest
import torch

import attnpatch as ap
from attnpatch import kernels
from attnpatch.kernels import lines_layout
from attnpatch.kernels.reference import attention
from attnpatch.plan import Lines, Plan, materialise_mask
from attnpatch.site import Site

import goldens_select as GS


def keep_of_blocks(lines: Lines, Sq: int, Skv: int, off: int) -> torch.Tensor:
    """(B, H, Sq, Skv) keep, row by row and diagonal by diagonal."""
    B, H = lines.cols.shape[:2]
    T = min(lines.block, Sq)
    j = torch.arange(Skv)
    keep = torch.zeros(B, H, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cols = torch.isin(j, lines.cols[b, h][lines.cols[b, h] >= 0])
            diags = lines.diags[b, h][lines.diags[b, h] >= 0].tolist()
            for i in range(Sq):
                first, last = i - i % T + off, min(i - i % T + T, Sq) - 1 + off
                row = cols.clone()
                for o in diags:
                    row |= (j >= first - o) & (j <= last - o)
                keep[b, h, i] = row & (j <= i + off)
    return keep


def plan_of(lines: Lines, Sq: int, Skv: int, off: int) -> Plan:
    keep = keep_of_blocks(lines, Sq, Skv, off)
    return Plan(mask_mod=lambda b, h, qi, kv: keep[b, h, qi, kv], causal=True, q_offset=off, lines=lines)


def lines_with_gaps(g, B, H, Skv, nc, block) -> Lines:
    """Offset 0 kept (as every VerticalSlash window) plus offsets a block's width or less apart (one merged
    range per cluster) and far ones, with padding; columns with padding and repeats."""
    near = torch.cat([torch.zeros(B, H, 1, dtype=torch.long), torch.randint(1, min(3 * block, Skv), (B, H, 4), generator=g)], -1)
    far = torch.randint(Skv // 2, Skv, (B, H, 2), generator=g)
    cols = torch.randint(-1, Skv, (B, H, nc), generator=g)
    pad = torch.full((B, H, 1), -1, dtype=torch.long)
    return Lines(torch.cat([cols, cols[..., :1]], -1), torch.cat([near, far, pad], -1), block)


CASES = {  # B, Hq, Hkv, Sq, Skv, D, n_cols, block (Sq not a multiple: a shorter last block)
    "one-head": (1, 1, 1, 75, 75, 16, 4, 16),
    "heads-gqa": (1, 4, 2, 70, 70, 16, 5, 16),
    "batch2-chunk": (2, 3, 1, 41, 90, 16, 6, 8),
    "block-past-rows": (1, 2, 2, 30, 30, 16, 3, 64),
}


@pytest.mark.parametrize("groups", ["cost-model", "per-head", "all-heads"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_block_lines_kernel_matches_the_definition(case, dtype, groups, monkeypatch):
    """Per-head groups (ranges read without a table), several heads (a table dilated over the block) and
    the shorter last block (its merged ranges may hold gaps) all equal the float64 reference on the mask
    written from the definition."""
    B, Hq, Hkv, Sq, Skv, D, nc, block = CASES[case]
    if groups != "cost-model":
        monkeypatch.setattr(lines_layout, "CALL_SCORES", 0 if groups == "per-head" else 10**15)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    lines = lines_with_gaps(g, B, Hq, Skv, nc, block)
    plan = plan_of(lines, Sq, Skv, Skv - Sq)
    assert kernels.get("lines").why_not(q, k, v, plan) is None
    ref = attention(q, k, v, plan)
    got = kernels.get("lines").run(q.to(dtype), k.to(dtype), v.to(dtype), plan)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (got.double() - ref).abs().max() < tol
    assert torch.equal(lines_layout.kept(lines, Sq, Skv - Sq), plan_of(lines, Sq, Skv, Skv - Sq).mask_mod(
        *[torch.arange(n).view(*(n if d == a else 1 for d in range(4))) for a, n in enumerate((B, Hq, Sq, Skv))]).sum((2, 3)))


def test_block_diagonals_keep_a_superset_and_block_one_is_exact():
    """The lines kernel at block 1 equals exact diagonals (row i keeps p_i - j in diags), a larger block
    keeps a strict superset of them, and ``kept`` counts each."""
    g = torch.Generator().manual_seed(3)
    base = lines_with_gaps(g, 1, 2, 60, 3, 8)
    j, p = torch.arange(60), torch.arange(60)[:, None]
    exact = torch.stack([torch.isin(p - j, base.diags[0, h]) | torch.isin(j, base.cols[0, h][base.cols[0, h] >= 0])
                         for h in range(2)])[None] & (j <= p)
    one, eight = (keep_of_blocks(Lines(base.cols, base.diags, b), 60, 60, 0) for b in (1, 8))
    assert torch.equal(one, exact)
    assert bool((eight & ~exact).any()) and not bool((exact & ~eight).any())
    assert torch.equal(lines_layout.kept(Lines(base.cols, base.diags, 8), 60, 0), eight.sum((2, 3)))


SITES = {  # (B, Hq, Hkv, Sq, Skv), site: blocks of positions on the call's rows (lines) or not (mask_mod only)
    "prefill": ((1, 4, 2, 150, 150), Site(causal=True)),
    "chunk-on-a-block": ((1, 3, 1, 70, 134), Site(causal=True, q_offset=64)),
    "chunk-off-blocks": ((1, 3, 1, 70, 130), Site(causal=True, q_offset=60)),
    "left-padding-batch2": ((2, 4, 4, 90, 90), Site(causal=True, kv_shift=torch.tensor([0, -9]))),
}


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("site_id", list(SITES))
def test_vertical_slash_blocks_mask_is_the_definition(site_id, block):
    """VerticalSlash(block=...): its mask_mod (every other kernel) is the float64 golden's definition (blocks of
    positions); where those blocks start at the call's first row its Plan.lines is the same pattern and the
    lines kernel gives the reference's output; elsewhere it has no Plan.lines (the kernel blocks rows from 0)."""
    (B, Hq, Hkv, Sq, Skv), site = SITES[site_id]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, h, s, 32, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    m = ap.VerticalSlash(verticals=5, slashes=4, last_q=8, sink=2, window=3, block=block)
    plan = m.plan(q, k, site).with_site(True, site.q_offset)
    want = materialise_mask(plan, B, Hq, Sq, Skv, "cpu").expand(B, Hq, Sq, Skv)
    exact = ap.VerticalSlash(verticals=5, slashes=4, last_q=8, sink=2, window=3).plan(q, k, site).with_site(True, site.q_offset)
    assert bool((want & ~materialise_mask(exact, B, Hq, Sq, Skv, "cpu")).any())  # the blocks add keys
    if site.kv_shift is None:
        golden = GS.vertical_slash_keep(q, k, site.q_offset, 5, 4, 8, 2, 3, block=block)
        assert all(bool(want[b, h, i, j]) == golden(b, h, i, j) for b in range(B) for h in range(Hq)
                   for i in range(0, Sq, 7) for j in range(Skv))
    aligned = site.kv_shift is None and site.q_offset % block == 0
    assert (plan.lines is not None) == aligned
    if aligned:
        assert plan.lines.block == block and torch.equal(keep_of_blocks(plan.lines, Sq, Skv, site.q_offset), want)
    ref = ap.attend(q, k, v, m, site, backend="reference")
    assert (ap.attend(q, k, v, m, site) - ref).abs().max() < 1e-12
    if aligned:
        assert (ap.attend(q, k, v, m, site, backend="lines") - ref).abs().max() < 1e-12


def test_vertical_slash_blocks_small_prefill_is_its_mask():
    """A prefill whose estimate reads every query (the direct path) keeps the block-granular mask."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 40, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    m = ap.VerticalSlash(verticals=3, slashes=3, last_q=64, sink=1, window=2, block=16)
    plan = m.plan(q, k, Site(causal=True))
    assert plan.direct is not None
    keep = keep_of_blocks(plan.lines, 40, 40, 0)
    ref = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4).masked_fill(~keep, float("-inf")), -1)
    assert (ap.attend(q, k, v, m, Site(causal=True)) - ref @ v.repeat_interleave(2, 1)).abs().max() < 1e-12


def test_vertical_slash_block_is_checked():
    with pytest.raises(ValueError, match="block"):
        ap.VerticalSlash(block=0)
    with pytest.raises(TypeError, match="block"):
        ap.VerticalSlash(block="64")
