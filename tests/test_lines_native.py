"""The native lines kernel (kernels/lines_native.c via kernels/native.py) against a float64 golden: SDPA with the plan's
materialised mask, and against the torch ``lines`` kernel; its refusals and the build's reasons."""
import pytest
import torch

import attnpatch as ap
from attnpatch import kernels
from attnpatch.kernels import native
from attnpatch.plan import Lines, Plan, materialise_mask
from attnpatch.site import Site

LIB, WHY = native.library("lines_native")
needs_lib = pytest.mark.skipif(LIB is None, reason=f"native kernel not built here: {WHY}")
KERNEL = kernels.get("lines_native")


def golden(q, k, v, plan):
    """float64 attention under the plan's mask (rows with no key: 0)."""
    B, H, Sq, _ = q.shape
    mask = materialise_mask(plan, B, H, Sq, k.shape[2], "cpu")
    r = H // k.shape[1]
    k, v = k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    s = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


CASES = [  # (B, H, G, Sq, Skv, D, Dv, method)
    (1, 9, 3, 700, 700, 64, 64, ap.VerticalSlash(verticals=40, slashes=40, window=24, last_q=32)),
    (2, 4, 2, 333, 333, 32, 64, ap.VerticalSlash(verticals=17, slashes=30, window=5, last_q=16)),  # rows of a batch differ
    (1, 4, 1, 400, 400, 64, 128, ap.Power(local=16)),  # Dv != D, far powers of two
    (1, 2, 2, 257, 257, 128, 128, ap.VerticalSlash(verticals=8, slashes=64, window=3, last_q=8)),
    (1, 6, 3, 96, 480, 64, 64, ap.VerticalSlash(verticals=24, slashes=24, window=16, last_q=32)),  # a chunk after 384 cached keys
]


@needs_lib
@pytest.mark.parametrize("case", range(len(CASES)))
def test_native_equals_the_float64_golden_and_the_lines_kernel(case):
    B, H, G, Sq, Skv, D, Dv, m = CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = (torch.randn(B, h, s, d, generator=g) for h, s, d in ((H, Sq, D), (G, Skv, D), (G, Skv, Dv)))
    k[:, :, 7] += 3 * q[:, ::H // G, -8:].mean(2)  # a key the last queries like: a vertical the estimate picks
    plan = m.plan(q, k, Site(causal=True, q_offset=Skv - Sq)).with_site(True, Skv - Sq)
    assert plan.lines is not None and KERNEL.why_not(q, k, v, plan) is None
    out = KERNEL.run(q, k, v, plan)
    assert out.dtype == q.dtype and out.shape == (B, H, Sq, Dv)
    torch.testing.assert_close(out.double(), golden(q, k, v, plan), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, kernels.get("lines").run(q, k, v, plan), atol=2e-6, rtol=1e-5)


BLOCK_CASES = {  # B, Hq, Hkv, Sq, Skv, D, n_cols, block
    "tail-block": (1, 4, 2, 300, 300, 64, 5, 64),  # 300 = 4 x 64 + 44: the last block's runs merge at 44
    "batch2-chunk": (2, 3, 1, 200, 264, 64, 6, 16),  # rows at positions 64 ..; rows of a batch differ
    "block-past-rows": (1, 2, 2, 30, 30, 64, 3, 64),  # one block of the call's 30 rows
    "smollm2-heads": (1, 9, 3, 512, 512, 64, 8, 256),
}


@needs_lib
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_granular_diagonals_equal_their_definition(case):
    """Block-granular diagonals (``Lines.block``: a row keeps every key a kept offset reaches from some row of its
    block) against the float64 golden on the mask written key by key from that definition (tests/test_lines_blocks.py),
    with offsets a block or less apart (merged ranges), far ones, padding and repeated columns."""
    from test_lines_blocks import lines_with_gaps, plan_of

    B, Hq, Hkv, Sq, Skv, D, nc, block = BLOCK_CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    plan = plan_of(lines_with_gaps(g, B, Hq, Skv, nc, block), Sq, Skv, Skv - Sq)
    assert KERNEL.why_not(q, k, v, plan) is None
    torch.testing.assert_close(KERNEL.run(q, k, v, plan).double(), golden(q, k, v, plan), atol=2e-6, rtol=1e-5)


@needs_lib
@pytest.mark.parametrize("block", [64, 256])
def test_vertical_slash_blocks_on_the_native_kernel(block):
    """VerticalSlash(block=...)'s own plan (window and slashes as block-granular diagonals, sink and verticals as
    columns) on the native kernel equals the golden of its mask_mod and the torch ``lines`` kernel."""
    g = torch.Generator().manual_seed(block)
    q, k, v = torch.randn(1, 9, 1000, 64, generator=g), torch.randn(1, 3, 1000, 64, generator=g), torch.randn(1, 3, 1000, 64, generator=g)
    plan = ap.VerticalSlash(verticals=30, slashes=30, window=40, last_q=32, block=block).plan(q, k, Site(causal=True))
    plan = plan.with_site(True, 0)
    assert plan.lines.block == block and KERNEL.why_not(q, k, v, plan) is None
    out = KERNEL.run(q, k, v, plan)
    torch.testing.assert_close(out.double(), golden(q, k, v, plan), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, kernels.get("lines").run(q, k, v, plan), atol=2e-6, rtol=1e-5)


@needs_lib
def test_rows_with_no_key_are_zero_and_repeats_count_once():
    """Lines with a column past the first rows and no diagonal: rows before it keep nothing (0, not NaN); a column
    that is also a kept offset's key, and repeated entries, are computed once (equal to the golden)."""
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 64)
    cols = torch.tensor([[[9, 9, -1, 30], [3, 20, 20, 3]]])
    diags = torch.tensor([[[-1, -1], [0, 6]]])  # head 0: columns only; head 1: offsets 0 and 6, columns 3 and 20
    lines = Lines(cols, diags)
    keep = torch.zeros(1, 2, 40, 40, dtype=torch.bool)
    i, j = torch.arange(40)[:, None], torch.arange(40)
    for h in range(2):
        for c in cols[0, h].tolist():
            if c >= 0:
                keep[0, h] |= (j == c) & (j <= i)
        for d in diags[0, h].tolist():
            if d >= 0:
                keep[0, h] |= i - j == d
    plan = Plan(mask_mod=lambda b, h, i, j: keep[b, h, i, j], causal=True, lines=lines)
    out = KERNEL.run(q, k, v, plan)
    assert torch.equal(out[0, 0, :9], torch.zeros(9, 64)) and not out.isnan().any()
    torch.testing.assert_close(out.double(), golden(q, k, v, plan), atol=2e-6, rtol=1e-5)


@needs_lib
@pytest.mark.parametrize("block", [None, 64, 512])  # 512: a block of rows spans two work items (256 rows each)
def test_threads_split_the_work_without_changing_it(monkeypatch, block):
    from attnpatch.kernels import lines_native

    monkeypatch.setattr(lines_native, "THREAD_WORK", 1)  # every thread takes part, however small the call
    q, k = torch.randn(1, 6, 1100, 64), torch.randn(1, 2, 1100, 64)
    plan = ap.VerticalSlash(verticals=64, slashes=64, window=32, block=block).plan(q, k, Site(causal=True)).with_site(True, 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL.run(q, k, k, plan)
        torch.set_num_threads(3)
        three = KERNEL.run(q, k, k, plan)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three)  # each row is computed by one thread, the same way
    torch.testing.assert_close(three.double(), golden(q, k, k, plan), atol=2e-6, rtol=1e-5)


@needs_lib
def test_bfloat16_in_bfloat16_out():
    q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
    plan = ap.Power(local=32).plan(q, k, Site(causal=True)).with_site(True, 0)
    out = KERNEL.run(q.bfloat16(), k.bfloat16(), k.bfloat16(), plan)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), golden(q.bfloat16().float(), k.bfloat16().float(), k.bfloat16().float(), plan),
                               atol=2e-2, rtol=2e-2)


def test_declines_what_it_does_not_compute():
    q, k = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    plan = ap.Power(local=8).plan(q, k, Site(causal=True)).with_site(True, 0)
    assert "float32" in KERNEL.why_not(q.double(), k.double(), k.double(), plan)
    q48 = torch.randn(1, 2, 64, 48)
    assert "head dims" in KERNEL.why_not(q48, q48, q48, ap.Power(local=8).plan(q48, q48, Site(causal=True)).with_site(True, 0))
    assert "mask" in KERNEL.why_not(q, k, k, plan, torch.ones(1, 1, 64, 64, dtype=torch.bool))
    assert "line structure" in KERNEL.why_not(q, k, k, Plan(causal=True))
    block = ap.VerticalSlash(verticals=4, slashes=4, window=8, block=12).plan(q, k, Site(causal=True)).with_site(True, 0)
    assert "not a multiple of 8" in KERNEL.why_not(q, k, k, block)  # an 8-row block of the C code would span two
    q60 = q[:, :, :12]  # one block of 12 rows: the call's rows, no 8-row block spans two
    one = ap.VerticalSlash(verticals=4, slashes=4, window=8, block=12).plan(q60, k[:, :, :12], Site(causal=True))
    assert KERNEL.why_not(q60, k[:, :, :12], k[:, :, :12], one.with_site(True, 0)) is None
    g = q.clone().requires_grad_()
    assert "backward" in KERNEL.why_not(g, k, k, plan)


def test_the_build_says_why_it_cannot(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPATCH_NATIVE", "0")
    assert native._build("lines_native") == (None, "native kernels are off (ATTNPATCH_NATIVE=0)")
    monkeypatch.setenv("ATTNPATCH_NATIVE", "1")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    lib, why = native._build("lines_native")
    assert lib is None and "no C compiler" in why
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path))
    lib, why = native._build("lines_native")
    assert lib is None and "failed" in why and not list(tmp_path.rglob("*.so"))


@needs_lib
def test_a_declined_native_kernel_falls_back_to_lines(monkeypatch):
    q, k = torch.randn(1, 9, 512, 64), torch.randn(1, 3, 512, 64)
    plan = ap.Power(local=16).plan(q, k, Site(causal=True)).with_site(True, 0)
    kernels.invalidate()
    monkeypatch.setitem(native._LOADED, "lines_native", (None, "off in this test"))
    try:
        assert kernels.select(q, k, k, plan).name != "lines_native"
        with pytest.raises(RuntimeError, match="off in this test"):
            kernels.select(q, k, k, plan, backend="lines_native")
    finally:
        kernels.invalidate()


def test_computed_counts_each_blocks_ranges_and_columns():
    """``computed`` (the benchmark's column) against a loop over the kernel's blocks, and never below the kept scores."""
    from attnpatch.kernels import lines_native
    from attnpatch.kernels.lines_layout import kept

    q, k = torch.randn(2, 4, 203, 32), torch.randn(2, 2, 203, 32)
    plan = ap.VerticalSlash(verticals=12, slashes=20, window=16, last_q=16).plan(q, k, Site(causal=True)).with_site(True, 0)
    lay = lines_native.layout(plan.lines, 203)
    R, total = lines_native.ROWS, 0
    rp, cp, dp = lay["run_ptr"].tolist(), lay["col_ptr"].tolist(), lay["diag_ptr"].tolist()
    assert dp[-1] > 0 and rp[-1] > 0  # both kinds: lone offsets (one key per row) and key ranges
    for h in range(8):
        runs = list(zip(lay["run_a"][rp[h]:rp[h + 1]].tolist(), lay["run_b"][rp[h]:rp[h + 1]].tolist()))
        cols, lone = lay["cols"][cp[h]:cp[h + 1]].tolist(), lay["diags"][dp[h]:dp[h + 1]].tolist()
        for p0 in range(0, 203, R):
            pl = min(p0 + R, 203) - 1
            width = sum(pl - a + 1 - max(0, p0 - b) for a, b in runs if a <= pl) + sum(c <= pl for c in cols) \
                + sum(d <= pl for d in lone)
            total += (pl - p0 + 1) * width
    assert lines_native.computed(plan.lines, 203, 0, 203) == total / 8
    assert total / 8 >= float(kept(plan.lines, 203, 0).float().mean())


def test_computed_counts_block_granular_ranges():
    """``computed`` of block-granular diagonals (a shorter last block, a chunk after cached keys) against a loop over
    the kernel's 8-row blocks and their T-block's ranges, and never below the kept scores."""
    from attnpatch.kernels import lines_native
    from attnpatch.kernels.lines_layout import kept
    from test_lines_blocks import lines_with_gaps

    g = torch.Generator().manual_seed(4)
    Sq, Skv, T = 300, 364, 64
    lines = lines_with_gaps(g, 1, 3, Skv, 4, T)
    br, lay = lines_native.block_runs(lines, Sq, Skv), lines_native.layout(lines, Skv)
    R, off, total = lines_native.ROWS, Skv - Sq, 0
    for h in range(3):
        cols = lay["cols"][lay["col_ptr"][h]:lay["col_ptr"][h + 1]].tolist()
        for i0 in range(0, Sq, R):
            b0 = i0 // T * T
            P0, P1, p0, pl = b0 + off, min(b0 + T, Sq) - 1 + off, i0 + off, min(i0 + R, Sq) - 1 + off
            ptr, ra, rb = ("tail_ptr", "tail_a", "tail_b") if b0 >= br["tail0"] else ("run_ptr", "run_a", "run_b")
            runs = zip(br[ra][br[ptr][h]:br[ptr][h + 1]].tolist(), br[rb][br[ptr][h]:br[ptr][h + 1]].tolist())
            width = sum(max(0, min(P1 - a, pl) + 1 - max(P0 - b, 0)) for a, b in runs) + sum(c <= pl for c in cols)
            total += (pl - p0 + 1) * width
    assert br["tail0"] == 256 and lines_native.computed(lines, Sq, off, Skv) == total / 3
    assert total / 3 >= float(kept(lines, Sq, off).float().mean())


@needs_lib
@pytest.mark.parametrize("method", [ap.VerticalSlash(verticals=64, slashes=64, window=64), ap.Power(local=64),
                                    ap.VerticalSlash(verticals=64, slashes=64, window=64, block=64)], ids=repr)
def test_the_automatic_choice_never_asks_for_the_mask(method):
    """VerticalSlash (exact and block-granular) and Power at 2K on SmolLM2's heads: choosing and running the automatic
    kernel (a line kernel) never asks the plan's mask_mod for a whole (S_q, S_kv) grid (the way to an S x S mask: made to
    fail here; the tiles kernel's cost estimate reads it tile by tile for Power's block structure); it equals the golden."""
    import dataclasses

    g = torch.Generator().manual_seed(7)
    S = 2048
    q, k, v = torch.randn(1, 9, S, 64, generator=g), torch.randn(1, 3, S, 64, generator=g), torch.randn(1, 3, S, 64, generator=g)
    plan = method.plan(q, k, Site(causal=True)).with_site(True, 0)
    asked = []

    def guarded(b, h, qi, kv):
        n = torch.broadcast_shapes(torch.as_tensor(qi).shape, torch.as_tensor(kv).shape).numel()
        asked.append(n)
        if n >= S * S:
            raise AssertionError("the (S_q, S_kv) mask was asked for")
        return plan.mask_mod(b, h, qi, kv)

    blind = dataclasses.replace(plan, mask_mod=guarded)
    kernels.invalidate()
    kernel = kernels.select(q, k, v, blind)
    assert kernel.name in ("lines_native", "lines")
    assert isinstance(method, ap.Power) == bool(asked)  # only Power's tiles estimate reads tiles (the guard is live)
    torch.testing.assert_close(kernel.run(q, k, v, blind).double(), golden(q, k, v, plan), atol=2e-6, rtol=1e-5)
