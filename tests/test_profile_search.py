"""Per-head profile search (attnpatch.tools.profile_search): the budgeted choice is feasible and no
other feasible choice at its density keeps more recall (brute force); the measured recall is the
chunked capture's; the written profile loads and runs the chosen value per head."""
from __future__ import annotations

import itertools

import pytest
import torch

from attnpatch import Neighborhood
from attnpatch.tools.profile_search import choose, measure, search, uniform_at


def test_choice_meets_the_budget_and_beats_every_choice_no_denser():
    g = torch.Generator().manual_seed(0)
    V, L, H = 3, 2, 2
    density = torch.sort(torch.rand(V, L, H, generator=g, dtype=torch.float64), 0).values
    recall = torch.sort(torch.rand(V, L, H, generator=g, dtype=torch.float64), 0).values  # more keys, more recall
    for budget in (0.3, 0.45, 0.6, 0.8):
        if density[0].mean() > budget:
            with pytest.raises(ValueError, match="below the sparsest"):
                choose(recall, density, budget)
            continue
        idx = choose(recall, density, budget)
        d, r = density.gather(0, idx[None]).mean(), recall.gather(0, idx[None]).mean()
        assert d <= budget + 1e-12
        for combo in itertools.product(range(V), repeat=L * H):
            c = torch.tensor(combo).view(L, H)
            if density.gather(0, c[None]).mean() <= d + 1e-12:
                assert recall.gather(0, c[None]).mean() <= r + 1e-12


def test_heterogeneous_heads_get_different_values_and_beat_uniform():
    """Head 0 is local (a small window keeps its mass), head 1 is global (recall grows with density):
    the search gives head 0 the small window and head 1 the large one; uniform at the same budget keeps less."""
    density = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(3, 1, 1).expand(3, 1, 2)
    recall = torch.tensor([[0.95, 0.1], [0.97, 0.5], [0.99, 0.9]], dtype=torch.float64).view(3, 1, 2)
    idx = choose(recall, density, 0.5)
    assert idx.tolist() == [[0, 2]]
    u = uniform_at(recall, density, 0.5)
    assert u == 1 and recall.gather(0, idx[None]).mean() > recall[u].mean()


@pytest.fixture(scope="module")
def flux():
    from attnpatch.models import tiny

    pipe, kw = tiny.PIPES["flux"]()
    return pipe, (lambda p: tiny.run(p, kw, steps=1))


def test_measure_is_monotone_in_the_window_and_matches_capture(flux):
    pipe, run = flux
    m = measure(pipe, run, Neighborhood(), "window", [1, 3, 5])
    assert (m["density"][1:] >= m["density"][:-1] - 1e-12).all() and (m["recall"][1:] >= m["recall"][:-1] - 1e-9).all()
    assert (m["density"][0] < 1).all()
    from attnpatch.tools.capture import capture

    # layer 0 of a one-step run sees the same q / k whichever method runs: the capture of Neighborhood(window=3)
    cap = capture(pipe, run, method=Neighborhood(window=3, dense_steps=0), stats=False).summary()
    torch.testing.assert_close(torch.tensor(cap[0]["recall"], dtype=torch.float64), m["recall"][1, 0])
    torch.testing.assert_close(torch.tensor(cap[0]["density"], dtype=torch.float64), m["density"][1, 0])


def test_searched_profile_loads_and_runs_the_chosen_window_per_head(flux, tmp_path):
    pipe, run = flux
    path = tmp_path / "nbhd.safetensors"
    res = search(pipe, run, Neighborhood(), "window", [1, 3, 5], budget=0.6, out=path)
    assert res["density"] <= 0.6 + 1e-9
    assert res["uniform"] is None or res["recall"] >= res["uniform"]["recall"] - 1e-9 or res["density"] < res["uniform"]["density"]
    from attnpatch.tools.capture import capture

    cap = capture(pipe, run, method=Neighborhood(profile=str(path), dense_steps=0), stats=False).summary()
    m = res["measured"]
    want = m["recall"].gather(0, res["choice"][None])[0, 0]  # layer 0: the chosen value's recall per head
    torch.testing.assert_close(torch.tensor(cap[0]["recall"], dtype=torch.float64), want)
