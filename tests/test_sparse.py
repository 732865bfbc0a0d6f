"""Locality methods (Neighborhood, SlidingTile, Radial): Neighborhood through every kernel against
NATTEN itself; block structures against the exact masks they accelerate; plan size, selection and
validation. (SlidingTile / Radial / Neighborhood outputs on every kernel against their float64
goldens: the zoo, tests/zoo.py, run by tests/test_goldens.py.)"""
import math
import warnings

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, kernels
from attnpatch.plan import materialise_mask

natten = pytest.importorskip("natten", reason="NATTEN is the oracle: pip install --no-build-isolation natten==0.21.7")

KERNELS = kernels.names()  # every registered kernel that can run the call (the others say why not: skipped)

# (grid, window, stride, dilation, causal): odd sizes, every combination NATTEN allows
NA_CASES = [
    ((23,), 5, 1, 1, False),
    ((23,), 4, 3, 1, False),
    ((23,), 3, 1, 3, False),
    ((23,), 5, 2, 2, True),
    ((9, 13), (3, 5), 1, 1, False),
    ((9, 13), (3, 3), (3, 3), 1, False),  # blocked
    ((9, 13), (5, 3), (2, 1), (1, 2), (True, False)),
    ((11, 7), 7, 1, 1, False),  # window = one full axis
    ((5, 7, 9), (3, 3, 5), 1, 1, False),
    ((5, 7, 9), (3, 5, 3), (1, 2, 3), (1, 1, 2), (True, False, False)),
]


def _qkv(S, H=2, D=16, B=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


def _natten(q, k, v, grid, window, stride, dilation, causal):
    """NATTEN's naXd on (B, *grid, H, D)."""
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    B, H, S, D = q.shape
    to = lambda t: t.transpose(1, 2).reshape(B, *grid, H, D)  # (B, H, S, D) -> (B, *grid, H, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(to(q), to(k), to(v), kernel_size=window, stride=stride, dilation=dilation, is_causal=causal)
    return out.reshape(B, S, H, D).transpose(1, 2)  # (B, H, S, D)


@pytest.fixture
def eager_flex(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", NA_CASES, ids=lambda c: f"{c[0]}-w{c[1]}-s{c[2]}-d{c[3]}-c{c[4]}")
def test_neighborhood_matches_natten(case, kernel, eager_flex):
    grid, window, stride, dilation, causal = case
    q, k, v = _qkv(math.prod(grid), seed=len(grid))
    method = ap.Neighborhood(window=window, stride=stride, dilation=dilation, causal=causal)
    try:
        out = ap.attend(q, k, v, method, Site(grid=grid), backend=kernel)
    except RuntimeError as e:
        if str(e).startswith(f"backend {kernel!r} cannot run"):
            pytest.skip(str(e))
        raise
    torch.testing.assert_close(out, _natten(q, k, v, grid, window, stride, dilation, causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [NA_CASES[3], NA_CASES[6], NA_CASES[9]], ids=["1d", "2d", "3d"])
def test_compiled_flex_matches_natten(case):
    grid, window, stride, dilation, causal = case
    q, k, v = _qkv(math.prod(grid), seed=7)
    method = ap.Neighborhood(window=window, stride=stride, dilation=dilation, causal=causal)
    out = ap.attend(q, k, v, method, Site(grid=grid), backend="flex")
    torch.testing.assert_close(out, _natten(q, k, v, grid, window, stride, dilation, causal), atol=2e-5, rtol=1e-4)


# block structures of these are checked below; their outputs on every kernel against goldens: tests/zoo.py
METHODS = [
    ("slidingtile-2d", ap.SlidingTile(tile=(4, 4), window=(3, 1)), Site(grid=(9, 13))),
    ("slidingtile-3d-joint", ap.SlidingTile(tile=(2, 4, 4), window=3), Site(grid=(5, 9, 7), text_len=6, kind="joint")),
    ("radial", ap.Radial(window=3, tile=2), Site(grid=(9, 5, 7))),
    ("radial-decay-text-last", ap.Radial(window=(5, 3), decay=1.5, dense_frames=2, tile=(2, 3)),
     Site(grid=(7, 6, 9), text_len=5, text_first=False, kind="joint")),
    ("neighborhood-joint", ap.Neighborhood(window=(3, 5)), Site(grid=(9, 11), text_len=7, kind="joint")),
]


ALL = [(f"na-{i}", ap.Neighborhood(window=c[1], stride=c[2], dilation=c[3], causal=c[4]), Site(grid=c[0]))
       for i, c in enumerate(NA_CASES)] + METHODS


@pytest.mark.parametrize("case", ALL, ids=[a[0] for a in ALL])
def test_block_structure_agrees_with_mask(case):
    """Every empty block has no kept element, every full block is kept entirely, and the
    permutation is a permutation."""
    _, method, site = case
    S = site.visual_len + site.text_len
    q = torch.zeros(1, 1, S, 16)
    plan = method.plan(q, q, site)
    bs = plan.blocks
    perm = torch.arange(S) if bs.perm is None else bs.perm
    assert torch.equal(torch.sort(perm).values, torch.arange(S))
    keep = materialise_mask(plan, 1, 1, S, S, "cpu")[0, 0][perm][:, perm]  # tile order
    b = bs.bounds.tolist()
    state = torch.zeros(bs.num_blocks, bs.num_blocks, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(bs.num_blocks), bs.kv_ptr.diff())
    state[rows, bs.kv_idx] = torch.where(bs.kv_full, 2, 1)
    for i in range(bs.num_blocks):
        for j in range(bs.num_blocks):
            blk = keep[b[i]:b[i + 1], b[j]:b[j + 1]]
            want = 0 if not blk.any() else 2 if blk.all() else 1
            assert state[i, j] == want, (i, j)


def test_slidingtile_is_blocked_neighborhood_on_divisible_grids():
    grid, tile, window = (12, 16), (4, 4), (3, 1)
    site, q = Site(grid=grid), torch.zeros(1, 1, 192, 8)
    st = ap.SlidingTile(tile=tile, window=window).plan(q, q, site)
    na = ap.Neighborhood(window=(12, 4), stride=tile).plan(q, q, site)
    assert torch.equal(materialise_mask(st, 1, 1, 192, 192, "cpu"), materialise_mask(na, 1, 1, 192, 192, "cpu"))


@pytest.mark.parametrize("method", [ap.SlidingTile(tile=(1, 8, 8), window=(3, 3, 3)), ap.Radial(window=5),
                                    ap.Neighborhood(window=(3, 9, 9), tile=(2, 8, 8))], ids=["sta", "radial", "na"])
def test_plan_for_128k_video_never_materialises_the_token_mask(method):
    """A 128K-token plan is built from block tables: no tensor anywhere near S x S is created
    (the dense bool mask would be 17 GB). Checked on every tensor any torch op returns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    site = Site(grid=(32, 64, 64), text_len=512, kind="joint")  # 131,584 tokens
    S = 32 * 64 * 64 + 512
    q = torch.zeros(1, 1, S, 8)
    with Largest() as seen:
        plan = method.plan(q, q, site)
    assert seen.numel < S * 1024, f"a tensor of {seen.numel:,} elements (S^2 = {S * S:,})"  # measured: at most ~96 S
    assert 0 < plan.blocks.density() < 0.5
    assert method.plan(q, q, site) is plan  # cached


def test_selection_prefers_tiles_for_block_sparse_on_cpu():
    site = Site(grid=(16, 16))
    q, k, v = _qkv(256)
    plan = ap.SlidingTile(tile=4, window=1).plan(q, k, site).with_site(False, 0)
    assert kernels.select(q, k, v, plan).name == "tiles"
    assert kernels.select(q, k, v, ap.Plan()).name == "sdpa"
    pad = torch.ones(1, 1, 256, 256, dtype=torch.bool)
    assert kernels.select(q, k, v, plan, mask=pad).name == "sdpa"  # tiles says why not; sdpa can


@pytest.mark.parametrize("bad,match", [
    (lambda: ap.Neighborhood(window=0), r"Neighborhood\(window=0\): window must be an integer .*>= 1"),
    (lambda: ap.SlidingTile(window=2), "must be odd"),
    (lambda: ap.Radial(decay=0.5), "decay"),
    (lambda: ap.Neighborhood(window=3, stride=5).plan(torch.zeros(1, 1, 20, 8), torch.zeros(1, 1, 20, 8), Site(grid=(20,))),
     "must not exceed window"),
    (lambda: ap.Neighborhood(window=(3, 3)).plan(torch.zeros(1, 1, 20, 8), torch.zeros(1, 1, 20, 8), Site(grid=(20,))),
     "has 2 entries but the grid has 1 axes"),
    (lambda: ap.Radial().plan(torch.zeros(1, 1, 20, 8), torch.zeros(1, 1, 20, 8), Site(grid=(4, 5))), "video grid"),
])
def test_bad_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_cross_attention_stays_dense():
    q, k = torch.zeros(1, 1, 20, 8), torch.zeros(1, 1, 7, 8)
    for m in (ap.Neighborhood(window=3), ap.SlidingTile(tile=2), ap.Radial()):
        assert m.plan(q, k, Site(grid=(4, 5), kind="cross")) is None
