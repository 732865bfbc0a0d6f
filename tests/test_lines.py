"""The ``lines`` kernel (Plan.lines: whole key columns and diagonals, kernels/lines.py) against the float64
reference on random structures, and VerticalSlash's Lines against its own mask_mod."""
import pytest
import torch

import attnpatch as ap
from attnpatch import kernels
from attnpatch.kernels import cost
from attnpatch.kernels import lines as lines_mod
from attnpatch.kernels import lines_layout
from attnpatch.kernels.reference import attention
from attnpatch.plan import Lines, Plan, materialise_mask
from attnpatch.site import Site


def keep_of(lines: Lines, Sq: int, Skv: int, off: int) -> torch.Tensor:
    """(B, H, Sq, Skv) keep of a Lines by its definition, index by index (no strided views)."""
    B, H = lines.cols.shape[:2]
    p = torch.arange(off, off + Sq)[:, None]  # (Sq, 1) positions
    j = torch.arange(Skv)[None, :]
    keep = torch.zeros(B, H, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cols = lines.cols[b, h][lines.cols[b, h] >= 0]
            diags = lines.diags[b, h][lines.diags[b, h] >= 0]
            keep[b, h] = torch.isin(j, cols).expand(Sq, Skv) | torch.isin(p - j, diags)
    return keep & (j <= p)


def plan_of(lines: Lines, Sq: int, Skv: int, off: int) -> Plan:
    keep = keep_of(lines, Sq, Skv, off)
    return Plan(mask_mod=lambda b, h, qi, kv: keep[b, h, qi, kv], causal=True, q_offset=off, lines=lines)


def random_lines(g, B, H, Skv, nc, nd, near=None) -> Lines:
    """Random columns and offsets, with padding (-1) and repeats; ``near``: offsets drawn from two bands
    (0 .. near and far ones) so the kernel sees several key ranges per block."""
    cols = torch.randint(-1, Skv, (B, H, nc), generator=g)
    if near is None:
        diags = torch.randint(-1, Skv, (B, H, nd), generator=g)
    else:
        diags = torch.cat([torch.randint(0, near, (B, H, nd - nd // 2), generator=g),
                           torch.randint(Skv // 2, Skv, (B, H, nd // 2), generator=g)], -1)
    return Lines(cols, diags)


CASES = {  # B, Hq, Hkv, Sq, Skv, D, n_cols, n_diags, near, block
    "one-block": (1, 2, 2, 40, 40, 16, 3, 4, None, 64),
    "blocks": (1, 2, 2, 70, 70, 16, 5, 6, None, 16),
    "gqa-chunk": (2, 4, 2, 9, 49, 32, 5, 3, None, 4),
    "batch2-clusters-columns": (2, 3, 1, 90, 90, 16, 6, 8, 5, 16),
    "offset-clusters": (1, 4, 2, 33, 80, 16, 4, 6, 4, 8),
    "gqa-value-dim": (2, 6, 2, 17, 69, (32, 48), 2, 3, None, 8),  # v's head dim differs: no flash kernel
}


def _qkv(g, B, Hq, Hkv, Sq, Skv, D):
    """float64 q, k, v; ``D`` may be (head dim of q and k, head dim of v)."""
    D, Dv = D if isinstance(D, tuple) else (D, D)
    return (torch.randn(B, h, s, d, generator=g, dtype=torch.float64) for h, s, d in ((Hq, Sq, D), (Hkv, Skv, D), (Hkv, Skv, Dv)))


# DIAG_KEYS: the default (no diagonal runs apart at these block sizes), 8 (sparse clusters apart), 1 (every one)
@pytest.mark.parametrize("apart", [None, 8, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_lines_kernel_matches_the_reference(case, dtype, apart, monkeypatch):
    B, Hq, Hkv, Sq, Skv, D, nc, nd, near, block = CASES[case]
    monkeypatch.setattr(lines_mod, "BLOCK", block)
    if apart:
        monkeypatch.setattr(lines_layout, "DIAG_KEYS", apart)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = _qkv(g, B, Hq, Hkv, Sq, Skv, D)
    plan = plan_of(random_lines(g, B, Hq, Skv, nc, nd, near), Sq, Skv, Skv - Sq)
    assert kernels.get("lines").why_not(q, k, v, plan) is None
    ref = attention(q, k, v, plan)  # float64
    got = kernels.get("lines").run(q.to(dtype), k.to(dtype), v.to(dtype), plan)
    assert got.dtype == dtype
    err = (got.double() - ref).abs().max().item()
    if dtype == torch.float64:
        assert err < 1e-12
    else:  # the flash-attn rule: at most twice the same-dtype reference's error (plus a floor)
        same = attention(q.to(dtype), k.to(dtype), v.to(dtype), plan)
        assert err <= 2 * (same.double() - ref).abs().max().item() + 1e-6


@pytest.mark.parametrize("apart", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_calls_split_by_heads_and_row_chunks_give_the_same(case, apart, monkeypatch):
    """A bias cap of one byte: each range runs one KV head's query heads per call and the gathered
    columns one block of rows per call; the output is the reference's all the same."""
    B, Hq, Hkv, Sq, Skv, D, nc, nd, near, block = CASES[case]
    monkeypatch.setattr(lines_mod, "BLOCK", block)
    monkeypatch.setattr(lines_mod, "MAX_BIAS_BYTES", 1)
    if apart:
        monkeypatch.setattr(lines_layout, "DIAG_KEYS", apart)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = _qkv(g, B, Hq, Hkv, Sq, Skv, D)
    plan = plan_of(random_lines(g, B, Hq, Skv, nc, nd, near), Sq, Skv, Skv - Sq)
    assert (kernels.get("lines").run(q, k, v, plan) - attention(q, k, v, plan)).abs().max() < 1e-12


def test_rows_that_see_no_key_are_zero_and_far_columns_merge_once(monkeypatch):
    """No offset 0 and a late column: the first rows keep nothing (zeros, as the reference); a column
    far left of a block's ranges runs in the gathered-column call, and one both in a range and listed
    twice is counted once."""
    monkeypatch.setattr(lines_mod, "BLOCK", 8)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    lines = Lines(torch.tensor([[[12, 12, -1], [30, 2, 2]]]), torch.tensor([[[3, -1], [5, 6]]]))
    plan = plan_of(lines, 40, 40, 0)
    lay = lines_mod.layout(lines, 40, 40, 0, 8)
    assert lay["vertical"] > 0 and lay["clusters"] == 1  # the gathered-column part runs
    got, ref = kernels.get("lines").run(q, k, v, plan), attention(q, k, v, plan)
    assert torch.equal(got[0, 0, :3], torch.zeros(3, 16, dtype=torch.float64))  # rows 0-2: no column, no offset
    assert (got - ref).abs().max() < 1e-12


def test_why_not_sends_what_it_cannot_run_elsewhere():
    q = torch.randn(1, 2, 8, 16)
    lines = Lines(torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(1, 2, 1, dtype=torch.long))
    plan = plan_of(lines, 8, 8, 0)
    kern = kernels.get("lines")
    assert "line structure" in kern.why_not(q, q, q, Plan(causal=True))
    assert "mask" in kern.why_not(q, q, q, plan, torch.ones(8, 8, dtype=torch.bool))
    assert "score_mod" in kern.why_not(q, q, q, Plan(causal=True, lines=lines, score_mod=lambda s, *a: s))
    assert "causal" in kern.why_not(q, q, q, Plan(lines=lines))
    assert "match" in kern.why_not(torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), plan)
    assert kernels.select(q, q, q, plan, mask=torch.ones(8, 8, dtype=torch.bool)).name != "lines"


SITES = {
    "prefill-gqa": ((1, 6, 2, 90, 90), Site(causal=True)),
    "chunk": ((1, 4, 2, 30, 100), Site(causal=True, q_offset=70)),
    "left-padding-batch2": ((2, 4, 4, 80, 80), Site(causal=True, kv_shift=torch.tensor([0, -9]))),
}


@pytest.mark.parametrize("site_id", list(SITES))
def test_vertical_slash_lines_are_its_mask(site_id, monkeypatch):
    """Plan.lines describes exactly the mask_mod every other kernel runs, and the lines kernel gives the
    reference's output on it."""
    (B, Hq, Hkv, Sq, Skv), site = SITES[site_id]
    monkeypatch.setattr(lines_mod, "BLOCK", 16)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, s, 32, generator=g) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    m = ap.VerticalSlash(verticals=5, slashes=4, last_q=8, sink=2, window=3)
    plan = m.plan(q, k, site).with_site(True, site.q_offset)
    assert plan.lines is not None
    want = materialise_mask(plan, B, Hq, Sq, Skv, "cpu").expand(B, Hq, Sq, Skv)
    assert torch.equal(keep_of(plan.lines, Sq, Skv, site.q_offset), want)
    ref = ap.attend(q, k, v, m, site, backend="reference")
    got = ap.attend(q, k, v, m, site, backend="lines")
    assert (got - ref).abs().max() < 1e-5


def test_vertical_slash_that_keeps_every_causal_key_plans_dense():
    """verticals >= the keys (or a window over every offset): the pattern is plain causal attention,
    exactly, so no estimate runs and no mask is built."""
    q = torch.randn(1, 2, 64, 16)
    assert ap.VerticalSlash().plan(q, q, Site(causal=True)) is None  # 256 verticals >= 64 keys
    assert ap.VerticalSlash(verticals=4, slashes=4, window=64).plan(q, q, Site(causal=True)) is None
    assert ap.VerticalSlash(verticals=4, slashes=4, window=8).plan(q, q, Site(causal=True)) is not None


def test_the_cost_model_ranks_lines_before_a_materialised_mask():
    """On the committed CPU constants a VerticalSlash plan at 1024 tokens (SmolLM2 heads) is estimated
    cheaper by lines than by SDPA with its (S, S) mask, and select runs lines."""
    c = cost.constants("cpu", 1)
    q, k = torch.randn(1, 9, 1024, 64), torch.randn(1, 3, 1024, 64)
    plan = ap.VerticalSlash().plan(q, k, Site(causal=True)).with_site(True, 0)
    assert cost.estimate("lines", c, q, k, k, plan) < cost.estimate("sdpa", c, q, k, k, plan)
    assert cost.estimate("lines", c, q, k, k, Plan(causal=True)) == float("inf")
    assert kernels.select(q, k, k, plan).name == "lines"


def test_the_cost_model_keeps_a_tiny_call_on_sdpa():
    """At 64 tokens the lines kernel's fixed work (layout, tables: ~0.3 ms) costs more than one SDPA call
    with the materialised mask: the model says so, and select follows it."""
    c = cost.constants("cpu", 1)
    q, k = torch.randn(1, 9, 64, 64), torch.randn(1, 3, 64, 64)
    plan = ap.VerticalSlash(verticals=16, slashes=16, window=16).plan(q, k, Site(causal=True)).with_site(True, 0)
    assert plan.lines is not None
    assert cost.estimate("sdpa", c, q, k, k, plan) < cost.estimate("lines", c, q, k, k, plan)
    assert kernels.select(q, k, k, plan).name == "sdpa"


def test_a_patched_llama_prefill_runs_lines_and_equals_the_reference():
    """A transformers prefill with no padding reaches the kernel with no mask: lines can run it (named;
    whether the cost model picks it at 300 tokens depends on the thread count: the choice is tested at
    sizes far from the crossover) and the logits equal the reference kernel's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 300))
    m = ap.VerticalSlash(verticals=8, slashes=8, window=8, last_q=16)
    ran = []
    kern = kernels.get("lines")
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kern, "run", lambda *a, _run=kern.run, **kw: ran.append(1) or _run(*a, **kw))
        with ap.patch(model, m, backend="reference"):
            want = model(ids).logits
        with ap.patch(model, m, backend="lines"):
            got = model(ids).logits
    assert len(ran) == 2  # both layers
    assert (got - want).abs().max() < 1e-5


def test_head_groups_split_where_their_diagonals_differ(monkeypatch):
    """Two KV heads whose diagonals lie far apart: with calls free, each group's key ranges come from its own
    heads only (less area than their union; one group per query head would compute no less) and the output is the reference's; with calls dear (at 200
    tokens the saved scores are worth fewer than the extra calls) all heads run together."""
    monkeypatch.setattr(lines_mod, "BLOCK", 16)
    monkeypatch.setattr(lines_layout, "CALL_SCORES", 1)
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(g, 1, 4, 2, 200, 200, 16)
    diags = torch.tensor([[[0, 1, 2], [0, 2, 1], [0, 120, 121], [0, 121, 120]]])  # the same per KV head
    lines = Lines(torch.tensor([[[7], [9], [-1], [3]]]), diags)
    subs = lines_mod.groups(lines, 2, 200, 200, 0, 16)
    assert len(subs) == 2 and [s.diags.shape[1] for s in subs] == [2, 2]
    union = lines_mod.layout(lines, 200, 200, 0, 16)["area"]
    assert sum(lines_mod.layout(s, 200, 200, 0, 16)["area"] for s in subs) < 2 * union
    plan = plan_of(lines, 200, 200, 0)
    assert (kernels.get("lines").run(q, k, v, plan) - attention(q, k, v, plan)).abs().max() < 1e-12
    monkeypatch.setattr(lines_layout, "CALL_SCORES", 10**6)
    assert len(lines_mod.groups(Lines(lines.cols, lines.diags), 2, 200, 200, 0, 16)) == 1  # a fresh cache



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

PEAK = """
import sys, torch, attnpatch as ap
from attnpatch.site import Site
def peak():  # KiB; this process's own high-water mark (ru_maxrss keeps the pytest parent's peak across fork + exec)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])
S = 8192
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, S, 16, generator=g) for h in (2, 1, 1))
site = Site(causal=True)
methods = [ap.Power(local=64), ap.VerticalSlash(verticals=32, slashes=32, window=64)]
for m in methods:  # warm-up at a small size: libraries, kernels' first-use buffers
    ap.attend(q[:, :, :512], k[:, :, :512], v[:, :, :512], m, site, backend="lines")
base = peak()
for m in methods:
    ap.attend(q, k, v, m, site, backend="lines")
    print(peak() - base)
ap.attend(q, k, v, methods[0], site, backend="sdpa")  # the control: the materialised (S, S) mask
print(peak() - base)
"""


def test_the_lines_path_builds_no_s_by_s_tensor():
    """At 8K tokens (2 query heads, 1 KV head) Power and VerticalSlash, plan and kernel, raise the process's
    peak memory by less than S * S / 2 bytes (32 MiB, half an (S, S) boolean mask; measured 3 and 12 MiB: their largest tensors are O(S * block): the estimate's
    (last_q, S) scores, a block's bias), while SDPA with Power's materialised (S, S) mask exceeds it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    power, vslash, control = (int(x) * 1024 for x in out.stdout.split())
    bound = 8192 * 8192 // 2
    assert power < bound and vslash < bound, (power, vslash)
    assert control > bound


@pytest.mark.parametrize("case", list(CASES))
def test_kept_counts_the_mask(case):
    """``lines.kept`` (what benchmarks/llm.py reports as the kept fraction) equals the count of the mask by
    definition, with padding, repeats, offsets and columns on kept diagonals."""
    B, Hq, Hkv, Sq, Skv, D, nc, nd, near, block = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)) + 1)
    lines = random_lines(g, B, Hq, Skv, nc, nd, near)
    assert torch.equal(lines_mod.kept(lines, Sq, Skv - Sq), keep_of(lines, Sq, Skv, Skv - Sq).sum((2, 3)))


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
    """``lines_layout.layout`` (tensor arithmetic over blocks x offset clusters) against the same layout built
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


@pytest.mark.parametrize("Sq, Skv", [(600, 600), (150, 700)])
def test_powers_far_diagonals_run_apart_and_match_the_reference(Sq, Skv):
    """Power(local=16) at 600-700 tokens at the default DIAG_KEYS: its far powers of two (256, 512) are lone
    offsets more than a block apart, so they leave the block ranges and run elementwise, merged into the rows
    they reach (a chunk at an offset too; GQA; the sink columns, which some of those keys are, counted once);
    the output is the float64 reference's."""
    g = torch.Generator().manual_seed(11)
    q, k, v = _qkv(g, 1, 6, 2, Sq, Skv, 16)
    site = Site(causal=True, q_offset=Skv - Sq)
    plan = ap.Power(local=16, sink=300).plan(q, k, site).with_site(True, Skv - Sq)  # sink columns under the diagonals
    lay = lines_layout.layout(plan.lines, Sq, Skv, Skv - Sq, lines_layout.BLOCK)
    assert lay["apart"] == [256, 512] and lay["diagonal"] > 0
    got = kernels.get("lines").run(q, k, v, plan)
    assert (got - attention(q, k, v, plan)).abs().max() < 1e-12


@pytest.mark.parametrize("threads", [1, 2])
def test_long_calls_run_bigger_blocks_and_match_the_reference(threads):
    """From LONG_ROWS queries a CPU call runs exact diagonals in blocks of LONG_BLOCK[threads > 1] rows (128 / 256:
    merged ranges, fewer calls); a chunk at an offset, GQA, scattered columns and diagonals (some apart) give the
    float64 reference's output."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Sq, Skv = lines_layout.LONG_ROWS + 37, lines_layout.LONG_ROWS + 100
        g = torch.Generator().manual_seed(21)
        lines = Lines(torch.randint(-1, Skv, (1, 2, 12), generator=g),
                      torch.cat([torch.arange(40).expand(1, 2, 40), torch.arange(300, 331).expand(1, 2, 31),
                                 torch.randint(0, Skv, (1, 2, 20), generator=g)], -1))  # two clusters, lone offsets
        assert lines_layout.block_rows(lines, Sq, "cpu") == lines_layout.LONG_BLOCK[threads > 1]
        assert lines_layout.block_rows(lines, lines_layout.LONG_ROWS - 1, "cpu") == lines_layout.BLOCK
        window = Lines(lines.cols, torch.arange(40).expand(1, 2, 40))  # one range per block: a bigger one only adds keys
        assert lines_layout.block_rows(window, Sq, "cpu") == lines_layout.BLOCK
        q, k, v = _qkv(g, 1, 2, 1, Sq, Skv, 16)
        plan = plan_of(lines, Sq, Skv, Skv - Sq)
        assert (kernels.get("lines").run(q, k, v, plan) - attention(q, k, v, plan)).abs().max() < 1e-12
    finally:
        torch.set_num_threads(before)
