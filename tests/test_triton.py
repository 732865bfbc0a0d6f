"""The Triton block-sparse kernel, on CPU under TRITON_INTERPRET=1 at small sizes, against the
float64 reference; on a CUDA GPU the same tests run natively."""
import math
import os

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, kernels
from attnpatch.kernels.reference import attention as reference

pytest.importorskip("triton", reason="pip install triton (the test extra has it)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_fwd = None


@pytest.fixture(autouse=True)
def _interpret():
    """On CPU, conftest.py set TRITON_INTERPRET=1 before triton's first import."""
    global triton_fwd
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
    import attnpatch.kernels.triton_fwd as mod

    triton_fwd = mod


CASES = [
    ("na-partial", ap.Neighborhood(window=(3, 5)), Site(grid=(7, 11))),
    ("sta-joint", ap.SlidingTile(tile=(4, 4), window=(1, 3)), Site(grid=(8, 12), text_len=5, kind="joint")),
    ("radial", ap.Radial(window=1, tile=2, dense_frames=1), Site(grid=(5, 4, 6))),
    ("na-3d-dilated", ap.Neighborhood(window=(3, 3, 3), dilation=(1, 2, 1), causal=(True, False, False)), Site(grid=(4, 6, 5))),
]


def _qkv(S, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, S, D, generator=g).to(DEVICE), torch.randn(1, Hkv, S, D, generator=g).to(DEVICE),
            torch.randn(1, Hkv, S, D, generator=g).to(DEVICE))


def _assert_near_float64(q, k, v, method, site, plan):
    """The Triton kernel's error vs the float64 reference is at most twice the float32 reference's."""
    exact = reference(q.double(), k.double(), v.double(), plan)
    same = reference(q, k, v, plan).double()
    out = ap.attend(q, k, v, method, site, backend="triton")
    err, err_ref = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(case):
    _, method, site = case
    S = site.visual_len + site.text_len
    q, k, v = _qkv(S, seed=S)
    _assert_near_float64(q, k, v, method, site, method.plan(q, k, site).with_site(False, 0))


def test_lse_and_fused_biases():
    """Output and log-sum-exp with per-row and per-column biases against explicit math."""
    method, site = ap.SlidingTile(tile=(4, 4), window=(3, 1)), Site(grid=(8, 12))
    S, D = 96, 32
    q, k, v = _qkv(S, Hq=2, Hkv=2, D=D, seed=3)
    plan = method.plan(q, k, site)
    layout = triton_fwd.uniform_layout(plan.blocks, 16, plan.mask_mod, q.device)
    rb, cb = torch.randn(1, 2, S, device=DEVICE), torch.randn(1, 2, S, device=DEVICE)
    perm = plan.blocks.perm.to(DEVICE)
    qt, kt, vt = (t.index_select(2, perm).contiguous() for t in (q, k, v))
    out, lse = triton_fwd.block_sparse_attention(qt, kt, vt, layout, None, rb, cb)
    keep = plan.mask_mod(None, None, perm[:, None], perm[None, :])  # tile order
    s = (qt.double() @ kt.double().transpose(-1, -2)) / math.sqrt(D) + rb.double()[..., None] + cb.double()[..., None, :]
    s = s.masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ vt.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_uniform_layout_agrees_with_mask(case):
    """Re-cut into 16-token blocks: empty pairs keep nothing, full pairs keep everything, and
    each partial pair's bit mask is the exact mask."""
    _, method, site = case
    S = site.visual_len + site.text_len
    q = torch.zeros(1, 1, S, 16)
    plan = method.plan(q, q, site)
    lay = triton_fwd.uniform_layout(plan.blocks, 16, plan.mask_mod, "cpu")
    perm = torch.arange(S) if plan.blocks.perm is None else plan.blocks.perm
    keep = plan.mask_mod(None, None, perm[:, None], perm[None, :])  # (S, S) tile order
    nu = lay["nu"]
    pad = torch.zeros(nu * 16, nu * 16, dtype=torch.bool)
    pad[:S, :S] = keep
    blocks = pad.view(nu, 16, nu, 16).permute(0, 2, 1, 3)  # (nu, nu, 16, 16)
    ptr, idx, mid = lay["kv_ptr"].long(), lay["kv_idx"].long(), lay["mask_id"].long()
    listed = torch.zeros(nu, nu, dtype=torch.bool)
    for u in range(nu):
        for j in range(ptr[u], ptr[u + 1]):
            w = idx[j]
            listed[u, w] = True
            if mid[j] < 0:
                valid = torch.zeros(16, 16, dtype=torch.bool)
                valid[: max(0, min(16, S - u * 16)), : max(0, min(16, S - w * 16))] = True
                assert blocks[u, w][valid].all()
            else:
                assert torch.equal(lay["masks"][mid[j]].bool()[: min(16, S - u * 16), : min(16, S - w * 16)],
                                   blocks[u, w][: min(16, S - u * 16), : min(16, S - w * 16)])
    assert not blocks[~listed].any()


def test_triton_not_chosen_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE == "cuda":
        pytest.skip("a GPU is present")
    q, k, v = _qkv(96)
    plan = ap.SlidingTile(tile=4, window=1).plan(q, k, Site(grid=(8, 12)))
    assert "CUDA" in kernels.get("triton").why_not(q, k, v, plan)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        ap.attend(q, k, v, ap.SlidingTile(tile=4, window=1), Site(grid=(8, 12)), backend="triton")


def test_triton_neighborhood_matches_natten():
    natten = pytest.importorskip("natten")
    import warnings

    grid, window, stride, dilation, causal = (7, 9), (3, 5), (2, 1), (1, 1), (True, False)
    S, H, D = 63, 2, 16
    q, k, v = _qkv(S, Hq=H, Hkv=H, D=D, seed=11)
    out = ap.attend(q, k, v, ap.Neighborhood(window=window, stride=stride, dilation=dilation, causal=causal),
                    Site(grid=grid), backend="triton")
    to = lambda t: t.cpu().transpose(1, 2).reshape(1, *grid, H, D)  # (B, H, S, D) -> (B, *grid, H, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = natten.na2d(to(q), to(k), to(v), kernel_size=window, stride=stride, dilation=dilation, is_causal=causal)
    torch.testing.assert_close(out.cpu(), ref.reshape(1, S, H, D).transpose(1, 2), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [ap.SinkWindow(sink=3, window=70, block=64), ap.TopKBlocks(keep=0.5, block=64)],
                         ids=["sinkwindow", "topk"])
def test_triton_causal_prefill(method):
    """Causal block structures (LLM prefill) through the Triton kernel."""
    q, k, v = _qkv(200, seed=5)
    site = Site(causal=True)
    plan = method.plan(q, k, site).with_site(True, 0)
    assert plan.blocks is not None and plan.blocks.causal
    _assert_near_float64(q, k, v, method, site, plan)


@pytest.mark.parametrize("grid,block", [((5, 7), (2, 3)), ((21, 15), (10, 7))], ids=["small-tiles", "tiles-over-a-chunk"])
def test_triton_tile_pooling_matches_torch_estimator(grid, block):
    """TopKBlocks' fused pooling (CUDA path) equals the torch index_add path, also for tiles of more
    tokens than the kernel reads at once (70 > 32) and ragged edge tiles."""
    from attnpatch.ops.triton_pool import tile_means

    S = math.prod(grid)
    m, site = ap.TopKBlocks(keep=0.3, block=block), Site(grid=grid)
    q = torch.randn(2, 3, S, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    lay = m._layouts.get(site, S, q.device)
    want = torch.zeros(2, 3, lay["sizes"].numel(), 16, device=q.device).index_add_(2, lay["tile_of"], q) / lay["sizes"].to(q.device)[:, None]
    torch.testing.assert_close(tile_means(q, lay["order"], lay["bounds"]), want, atol=1e-5, rtol=1e-5)


def test_float32_dots_stay_float32_unless_tf32_is_allowed():
    """Triton's float32 tl.dot defaults to TF32 on GPUs (~1e-3 error): the kernel asks for IEEE float32
    products like PyTorch's own attention, unless the user allowed TF32 matmuls. The setting is changed
    through torch's public setter and restored by hand (torch 2.13's cuBLAS module attributes cannot be
    monkeypatched: undoing the patch raised)."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_fwd.dot_precision(torch.float32) == "ieee"
        assert triton_fwd.dot_precision(torch.bfloat16) == "tf32"  # 16-bit inputs: the setting is ignored
        torch.backends.cuda.matmul.allow_tf32 = True  # the legacy switch sets the same flag
        assert triton_fwd.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert triton_fwd.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_bfloat16():
    """bf16: on a GPU within the flash-attn rule (twice the same-dtype reference's error + 1e-3); under the
    CPU interpreter (which computes bf16 wrongly, errors ~1e8) refused in why_not, so never selected."""
    method, site = ap.Neighborhood(window=(3, 5)), Site(grid=(7, 11))
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(77, seed=7))
    plan = method.plan(q, k, site).with_site(False, 0)
    if DEVICE == "cpu":
        assert "interpreter" in kernels.get("triton").why_not(q, k, v, plan)
        assert kernels.select(q, k, v, plan).name != "triton"
        return
    exact = reference(q.double(), k.double(), v.double(), plan)
    same = reference(q, k, v, plan).double()
    out = ap.attend(q, k, v, method, site, backend="triton")
    err, err_ref = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)
