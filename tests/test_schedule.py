"""Schedules on sparse methods: dense_steps / dense_layers, and per-layer / per-head parameter
tables from a safetensors profile, each checked against running the equivalent plain methods."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.schedule import save_profile


def _qkv(Hq=4, Hkv=2, S=48, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, S, D, generator=g) for h in (Hq, Hkv, Hkv)]


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                            v.repeat_interleave(q.shape[1] // v.shape[1], 1))


def test_dense_steps_and_layers():
    q, k, v = _qkv()
    m = ap.Neighborhood(window=3, dense_steps=2, dense_layers=(1,))
    plain = ap.attend(q, k, v, ap.Neighborhood(window=3), Site(grid=(6, 8)))
    for step, layer, dense in ((0, 0, True), (1, 0, True), (2, 0, False), (5, 1, True), (5, 2, False)):
        out = ap.attend(q, k, v, m, Site(grid=(6, 8), step=step, layer=layer))
        torch.testing.assert_close(out, _sdpa(q, k, v) if dense else plain)
    assert not torch.allclose(plain, _sdpa(q, k, v))  # the window does change the output


def test_dense_steps_fraction_of_the_calls_steps(caplog):
    q, k, v = _qkv()
    plain = ap.attend(q, k, v, ap.Neighborhood(window=3, dense_steps=0), Site(grid=(6, 8)))
    m = ap.Neighborhood(window=3, dense_steps=0.3)
    for step, steps, dense in ((0, 10, True), (2, 10, True), (3, 10, False), (0, 3, False), (5, 20, True), (6, 20, False)):
        out = ap.attend(q, k, v, m, Site(grid=(6, 8), step=step, steps=steps))
        torch.testing.assert_close(out, _sdpa(q, k, v) if dense else plain)
    assert [m.dense_count(n) for n in (1, 4, 10, 28, 50)] == [0, 1, 3, 8, 15]
    # a step count nobody gave (a model patched on its own): sparse, and the log says why
    with caplog.at_level("WARNING", logger="attnpatch"):
        out = ap.attend(q, k, v, ap.Neighborhood(window=3, dense_steps=0.7), Site(grid=(6, 8), step=0))
    torch.testing.assert_close(out, plain)
    assert "step count is unknown" in caplog.text
    assert ap.Neighborhood().dense_steps == ap.methods.schedule.DENSE_STEPS == 0.4  # the documented default
    for bad in (1.0, 1.5, -0.1, -1, True, "2"):
        with pytest.raises(ValueError, match=r"dense_steps=.*fraction of the pipeline's steps"):
            ap.SlidingTile(dense_steps=bad)


def test_per_layer_profile_roundtrip(tmp_path):
    q, k, v = _qkv()
    path = tmp_path / "na.safetensors"
    save_profile(path, ap.Neighborhood(), {"window": torch.tensor([[[3, 3]], [[5, 7]]])})  # (layers, 1, axes)
    m = ap.Neighborhood(profile=path)
    for layer, window in ((0, (3, 3)), (1, (5, 7))):
        want = ap.attend(q, k, v, ap.Neighborhood(window=window), Site(grid=(6, 8), layer=layer))
        torch.testing.assert_close(ap.attend(q, k, v, m, Site(grid=(6, 8), layer=layer)), want)


def test_per_head_profile_runs_head_groups():
    q, k, v = _qkv(Hq=4, Hkv=2)
    m = ap.Neighborhood(profile={"window": torch.tensor([[3, 5, 3, 7]])})  # layer 0: one window per head, GQA 4/2
    out = ap.attend(q, k, v, m, Site(grid=(6, 8)))
    for h, w in enumerate((3, 5, 3, 7)):
        want = ap.attend(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], ap.Neighborhood(window=w), Site(grid=(6, 8)))
        torch.testing.assert_close(out[:, h:h + 1], want)


def test_profile_errors_are_clear(tmp_path):
    path = tmp_path / "na.safetensors"
    save_profile(path, ap.Neighborhood(), {"window": torch.tensor([3, 5])})
    with pytest.raises(ValueError, match="written for Neighborhood, not SlidingTile"):
        ap.SlidingTile(profile=path)
    with pytest.raises(ValueError, match="'size', which is not a parameter of Neighborhood"):
        ap.Neighborhood(profile={"size": torch.tensor([3])})
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="2 layers .* layer 4"):
        ap.attend(q, k, v, ap.Neighborhood(profile=path), Site(grid=(6, 8), layer=4))
    with pytest.raises(ValueError, match="3 heads, the model has 4"):
        ap.attend(q, k, v, ap.Neighborhood(profile={"window": torch.tensor([[3, 5, 7]])}), Site(grid=(6, 8)))
    with pytest.raises(ValueError, match="dense_steps"):
        ap.Radial(dense_steps=-1)
