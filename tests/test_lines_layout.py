"""The planning half of the ``lines`` kernel (kernels/lines_layout.py) against its definitions: the kept count,
the layout built block by block, and the head grouping against every candidate's full layout."""
import pytest
import torch

from attnpatch.kernels import lines_layout
from attnpatch.plan import Lines
from lines_tables import CASES, keep_of, random_lines


@pytest.mark.parametrize("case", list(CASES))
def test_kept_counts_the_mask(case):
    """``lines.kept`` (what benchmarks/llm.py reports as the kept fraction) equals the count of the mask by
    definition, with padding, repeats, offsets and columns on kept diagonals."""
    B, Hq, Hkv, Sq, Skv, D, nc, nd, near, block = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)) + 1)
    lines = random_lines(g, B, Hq, Skv, nc, nd, near)
    assert torch.equal(lines_layout.kept(lines, Sq, Skv - Sq), keep_of(lines, Sq, Skv, Skv - Sq).sum((2, 3)))


def _layout_by_loops(lines, Sq, Skv, off, T, diag_keys=lines_layout.DIAG_KEYS):
    """The layout by its definition, block by block and range by range: offset clusters (gaps over T split),
    those whose n offsets cost less elementwise (n * diag_keys < width + T) apart, each other cluster's key
    range per block, the columns a block's rows see outside its ranges."""
    d = sorted(set(lines.diags[lines.diags >= 0].tolist()))
    clusters = []
    for x in d:
        if clusters and x - clusters[-1][1] <= T:
            clusters[-1][1] = x
        else:
            clusters.append([x, x])
    apart = [x for lo, hi in clusters if sum(lo <= y <= hi for y in d) * diag_keys < hi - lo + T for x in d if lo <= x <= hi]
    clusters = [[lo, hi] for lo, hi in clusters if not any(lo <= x <= hi for x in apart)]
    ranges, area = [], 0
    for i0 in range(0, Sq, T):
        p0, p1 = i0 + off, min(i0 + T, Sq) - 1 + off
        rs = [(max(0, p0 - hi), min(Skv, p1 + 1 - lo)) for lo, hi in clusters]
        rs = [(x, y) for x, y in rs if x < y]
        area += (p1 - p0 + 1) * sum(y - x for x, y in rs)
        ranges.append(rs)
    B, H, nc = lines.cols.shape
    free = torch.zeros(len(ranges), B, H, nc, dtype=torch.bool)
    for blk, rs in enumerate(ranges):
        last = min((blk + 1) * T, Sq) - 1 + off
        for b in range(B):
            for h in range(H):
                seen = set()
                for c, j in enumerate(sorted(lines.cols[b, h].tolist())):
                    if j >= 0 and j not in seen and j <= last and not any(x <= j < y for x, y in rs):
                        free[blk, b, h, c] = True
                    seen.add(j)
    diagonal = sum(1 for o in apart for i in range(Sq) if 0 <= i + off - o < Skv)
    return ranges, area, free, apart, diagonal


@pytest.mark.parametrize("diag_keys", [None, 4])
@pytest.mark.parametrize("seed", range(7))
def test_layout_equals_its_definition(seed, diag_keys, monkeypatch):
    """``lines_layout.layout`` (array arithmetic over blocks x offset clusters) against the same layout built
    block by block: ranges in order, area, calls, the free columns (with padding, repeats, offsets, queries
    past the keys) and whole-range plans (no free columns)."""
    g = torch.Generator().manual_seed(seed)
    B, H = 1 + seed % 2, 1 + seed % 3
    Skv = int(torch.randint(20, 120, (1,), generator=g))
    Sq = int(torch.randint(1, Skv, (1,), generator=g)) if seed in (0, 3) else Skv  # 0, 3: queries at an offset
    off, T = Skv - Sq, (4, 8, 16)[seed % 3]
    near = None if seed % 2 else 6
    lines = random_lines(g, B, H, Skv, 5, 7, near)
    if seed == 5:  # a window that holds every causal key: one whole range per block
        lines = Lines(lines.cols, torch.arange(Skv).expand(B, H, Skv))
    if seed == 6:  # far offsets only: the first blocks have no range (no call), their columns are free
        lines = Lines(lines.cols, torch.randint(Skv // 2, Skv, (B, H, 3), generator=g))
    if diag_keys:
        monkeypatch.setattr(lines_layout, "DIAG_KEYS", diag_keys)
    lay = lines_layout.layout(lines, Sq, Skv, off, T)
    ranges, area, free, apart, diagonal = _layout_by_loops(lines, Sq, Skv, off, T, lines_layout.DIAG_KEYS)
    assert lines_layout.block_ranges(lay) == ranges and lay["area"] == area
    assert lay["apart"] == apart and lay["diagonal"] == diagonal
    assert lay["calls"] == sum(map(bool, ranges)) + bool(free.any())
    if seed == 5:
        assert lay["free"] is None and lay["vertical"] == 0
    else:
        assert torch.equal(lay["free"], free) and lay["vertical"] == int(free.sum()) * T


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("call_scores", [1, 200, 10**4])
def test_head_grouping_is_the_exhaustive_choice(seed, call_scores, monkeypatch):
    """``groups`` stops summing a candidate's bound once it reaches the best cost so far and lays out only
    candidates that can win: its choice is the argmin over every candidate's full layout (all heads, one group
    per KV head, one per query head; equal costs: the fewest groups), on random and banded line tables at call
    costs that favour each (checked: every candidate wins somewhere in this grid)."""
    monkeypatch.setattr(lines_layout, "CALL_SCORES", call_scores)
    g = torch.Generator().manual_seed(seed)
    H, G, S, T = 8, 2, 160, 16
    lines = random_lines(g, 1, H, S, 5, 6, near=None if seed % 2 else 12)
    if seed % 3 == 2:  # a KV head's query heads share their offsets: a group per KV head computes no more than one per head
        lines = Lines(lines.cols, lines.diags[:, ::H // G].repeat_interleave(H // G, 1))
    costs = {}
    for n in (1, G, H):
        r = H // n
        subs = [Lines(lines.cols[:, i * r:(i + 1) * r], lines.diags[:, i * r:(i + 1) * r]) for i in range(n)]
        costs[n] = sum(lines_layout._cost(lines_layout.layout(s, S, S, 0, T), r) for s in subs)
    want = min(costs, key=lambda n: (costs[n], n))
    assert len(lines_layout.groups(Lines(lines.cols, lines.diags), G, S, S, 0, T)) == want
