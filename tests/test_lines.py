"""The ``lines`` kernel (Plan.lines: whole key columns and diagonals, kernels/lines.py) against the float64
reference on random structures, and VerticalSlash's Lines against its own mask_mod."""
import pytest
import torch

import attnpatch as ap
from attnpatch import kernels
from attnpatch.kernels import cost
from attnpatch.kernels import lines as lines_mod
from attnpatch.kernels import lines_layout, native
from attnpatch.kernels.reference import attention
from attnpatch.plan import Lines, Plan, materialise_mask
from attnpatch.site import Site
from lines_tables import CASES, keep_of, random_lines


def plan_of(lines: Lines, Sq: int, Skv: int, off: int) -> Plan:
    keep = keep_of(lines, Sq, Skv, off)
    return Plan(mask_mod=lambda b, h, qi, kv: keep[b, h, qi, kv], causal=True, q_offset=off, lines=lines)


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


def test_the_cost_model_ranks_lines_before_a_materialised_mask(monkeypatch):
    """On the committed CPU constants a VerticalSlash plan at 1024 tokens (SmolLM2 heads) is estimated
    cheaper by lines than by SDPA with its (S, S) mask, and select runs lines where the native kernel declines
    (lines_native first where it builds)."""
    c = cost.constants("cpu", 1)
    q, k = torch.randn(1, 9, 1024, 64), torch.randn(1, 3, 1024, 64)
    plan = ap.VerticalSlash().plan(q, k, Site(causal=True)).with_site(True, 0)
    assert cost.estimate("lines", c, q, k, k, plan) < cost.estimate("sdpa", c, q, k, k, plan)
    assert cost.estimate("lines", c, q, k, k, Plan(causal=True)) == float("inf")
    built = native.library("lines_native")[0] is not None  # where it builds, the cheaper of the two by the model
    cheaper = min(("lines_native", "lines"), key=lambda n: cost.estimate(n, c, q, k, k, plan))
    assert kernels.select(q, k, k, plan).name == (cheaper if built else "lines")
    monkeypatch.setitem(native._LOADED, "lines_native", (None, "off in this test"))
    kernels.invalidate()
    assert kernels.select(q, k, k, plan).name == "lines"
    kernels.invalidate()


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
