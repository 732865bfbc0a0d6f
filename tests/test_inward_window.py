"""InwardWindow (FreeSwim) against a float64 loop golden written from FreeSwim's own mask
(``init_mask_flex`` in github.com/WillWu111/FreeSwim, nocache/attention_processor_.py):
with d = train // 2, query row r of n sees key rows [r - d - d_u, r + d + d_b],
d_b = max(0, d - r), d_u = max(0, d + r - n + 1); likewise columns; time dense; text dense."""
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import InwardWindow, Neighborhood, Site
from attnpatch.core import attend


def freeswim_keep(site: Site, S: int, train: tuple) -> torch.Tensor:
    """(S, S) keep mask by loops over tokens, from FreeSwim's formula on the last two axes."""
    grid, T = site.grid, site.text_len
    v0 = T if site.text_first else 0
    n = math.prod(grid)

    def coord(t):
        c = []
        for g in reversed(grid):
            t, x = divmod(t, g)
            c.append(x)
        return c[::-1]

    keep = torch.ones(S, S, dtype=torch.bool)
    for i in range(n):
        ci = coord(i)
        for j in range(n):
            cj, ok = coord(j), True
            for a in range(len(grid) - 2 if len(grid) == 3 else 0, len(grid)):  # a video's time stays dense
                d, r, size = train[a] // 2, ci[a], grid[a]
                lo, hi = r - d - max(0, d + r - size + 1), r + d + max(0, d - r)
                ok &= lo <= cj[a] <= hi
            keep[v0 + i, v0 + j] = ok
    return keep


def golden(q, k, v, keep, factor=1.0):
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 * factor  # (B, H, S, S)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def qkv(S, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, S, 8, generator=g).to(dtype) for _ in range(3)]


CASES = [  # (grid, text_len, text_first, train_grid)
    ((9, 11), 0, True, 4),  # even train grid: FreeSwim's window is 2 * (4 // 2) + 1 = 5
    ((7, 10), 3, True, (3, 5)),  # joint call, text first, odd windows per axis
    ((6, 13), 2, False, 6),  # text last
    ((4, 12), 0, True, 8),  # rows shorter than the window: dense on that axis
    ((3, 5, 7), 2, True, 4),  # video: int train_grid windows the spatial axes only
]


@pytest.mark.parametrize("grid,T,first,train", CASES)
def test_matches_freeswim_mask(grid, T, first, train):
    """FreeSwim's own formula on the reference kernel (every other kernel: the zoo's inward-window rows)."""
    site = Site(grid=grid, text_len=T, text_first=first, kind="joint" if T else "self")
    S = T + math.prod(grid)
    q, k, v = qkv(S)
    per_axis = train if isinstance(train, tuple) else (train,) * len(grid)
    want = golden(q, k, v, freeswim_keep(site, S, per_axis))
    got = attend(q, k, v, InwardWindow(train_grid=train, tile=4), site, backend="reference")
    assert (got.double() - want).abs().max() < 1e-5


def test_is_neighborhood_of_odd_window():
    """The mask is Neighborhood(window=2 * (train // 2) + 1): not Neighborhood(window=train) for an even grid."""
    site = Site(grid=(12, 12))
    q, k, v = qkv(144, 1)
    iw = attend(q, k, v, InwardWindow(train_grid=6), site, backend="reference")
    assert torch.allclose(iw, attend(q, k, v, Neighborhood(window=7, dense_steps=0), site, backend="reference"), atol=1e-6)
    assert not torch.allclose(iw, attend(q, k, v, Neighborhood(window=6, dense_steps=0), site, backend="reference"), atol=1e-3)


def test_default_tiles_and_stride_on_the_tiles_kernel():
    """Default executor tiles (16 x 16, partial blocks on a 20 x 20 grid) and a stride: the tiles
    kernel matches the reference (stride s: query groups of s share the window of their centre)."""
    site = Site(grid=(20, 20), text_len=2, kind="joint")
    q, k, v = qkv(402, 6)
    for m in (InwardWindow(train_grid=6), InwardWindow(train_grid=6, stride=4)):
        ref = attend(q, k, v, m, site, backend="reference")
        assert (attend(q, k, v, m, site, backend="tiles") - ref).abs().max() < 1e-5
    keep = freeswim_keep(site, 402, (6, 6))
    assert (attend(q, k, v, InwardWindow(train_grid=6), site, backend="tiles").double() - golden(q, k, v, keep)).abs().max() < 1e-5


def test_full_steps_without_override_are_dense_and_entropy_scaled():
    """full_every=3, override=False: steps 0, 3, ... run full attention with logits times
    log(S) / log(n_train); the others the window; entropy=False leaves the full steps unscaled."""
    grid, T = (10, 10), 2
    S, n_train = T + 100, T + 25
    q, k, v = qkv(S, 2)
    dense = torch.ones(S, S, dtype=torch.bool)
    window = freeswim_keep(Site(grid=grid, text_len=T, kind="joint"), S, (4, 4))
    m = InwardWindow(train_grid=4, full_every=3, override=False)
    for step, keep, factor in [(0, dense, math.log(S) / math.log(n_train)), (1, window, 1.0), (3, dense, math.log(S) / math.log(n_train))]:
        site = Site(grid=grid, text_len=T, kind="joint", step=step, steps=6)
        got = attend(q, k, v, m, site, backend="reference")
        assert (got.double() - golden(q, k, v, keep, factor)).abs().max() < 1e-5, step
    site = Site(grid=grid, text_len=T, kind="joint", step=0, steps=6)
    got = attend(q, k, v, InwardWindow(train_grid=4, full_every=3, override=False, entropy=False), site, backend="reference")
    assert (got.double() - golden(q, k, v, dense)).abs().max() < 1e-5


@pytest.mark.parametrize("first", [True, False])
def test_override_full_rows_dense_and_text_rows_copied(first):
    """FreeSwim's dual path in a joint call: rows (cond, perturbed); the perturbed (full-branch) row
    attends densely with entropy-scaled logits; the cond (window) row keeps its window output on
    visual queries and takes the full row's outputs on the text queries."""
    grid, T = (9, 9), 3
    S = T + 81
    q, k, v = qkv(S, 4)
    site = Site(grid=grid, text_len=T, text_first=first, kind="joint", step=2, steps=6, roles=("cond", "perturbed"))
    m = InwardWindow(train_grid=4, full_every=2)
    assert m.guidance and m.needs_roles and m.guidance_weight() == 0 and m.guides(4) and not m.guides(3)
    got = attend(q, k, v, m, site, backend="reference").double()
    window = golden(q, k, v, freeswim_keep(site, S, (4, 4)))
    full = golden(q, k, v, torch.ones(S, S, dtype=torch.bool), math.log(S) / math.log(T + 25))
    text = slice(0, T) if first else slice(S - T, S)
    vis = slice(T, S) if first else slice(0, S - T)
    assert (got[1] - full[1]).abs().max() < 1e-5
    assert (got[0, :, text] - full[1, :, text]).abs().max() < 1e-5
    assert (got[0, :, vis] - window[0, :, vis]).abs().max() < 1e-5


def test_override_in_cross_calls_copies_full_rows():
    """A cross call (Wan) under the branch: the cond rows' output is the full rows' output."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    site = Site(kind="cross", grid=(3, 4), step=0, roles=("cond", "perturbed"))
    got = attend(q, k, v, InwardWindow(train_grid=2, full_every=1), site, backend="reference").double()
    full = golden(q, k, v, torch.ones(12, 5, dtype=torch.bool))
    assert (got[0] - full[1]).abs().max() < 1e-5 and (got[1] - full[1]).abs().max() < 1e-5
    assert attend(q, k, v, InwardWindow(train_grid=2, full_every=1), Site(kind="cross", grid=(3, 4), step=0)).shape == q.shape


def test_window_at_training_size_is_dense_and_unscaled():
    """At (or below) the training grid every window covers the grid: stock attention."""
    site = Site(grid=(5, 5), step=0)
    q, k, v = qkv(25, 3)
    for m in (InwardWindow(train_grid=5), InwardWindow(train_grid=5, full_every=1)):
        got = attend(q, k, v, m, site, backend="reference")
        assert (got.double() - golden(q, k, v, torch.ones(25, 25, dtype=torch.bool))).abs().max() < 1e-5


def test_cross_attention_is_dense():
    assert InwardWindow(train_grid=4).plan(torch.zeros(1, 1, 9, 4), torch.zeros(1, 1, 5, 4), Site(kind="cross", grid=(3, 3))) is None


@pytest.mark.parametrize("kwargs,word", [
    (dict(train_grid=0), "train_grid"), (dict(train_grid="16"), "train_grid"), (dict(full_every=-1), "full_every"),
    (dict(full_every=1.5), "full_every"), (dict(entropy=1), "entropy"), (dict(override="yes"), "override"), (dict(stride=0), "stride"), (dict(tile=0), "tile"),
    (dict(dense_steps=1.5), "dense_steps"),
])
def test_bad_parameters_fail_at_construction(kwargs, word):
    with pytest.raises((TypeError, ValueError), match=word):
        InwardWindow(**kwargs)


def test_public_and_refused_on_llms():
    assert ap.InwardWindow is InwardWindow and InwardWindow.llm is False
    assert InwardWindow().dense_steps == 0  # FreeSwim windows every step
