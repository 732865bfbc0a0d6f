"""Per-head parameter search under a global density budget (MoA-style elastic spans), written as a
profile that ``profile=`` loads.

One dense run of the model records, for every candidate value of one parameter of a sparse method
(e.g. ``Neighborhood`` ``window`` in 3, 5, 7, 9), the dense attention mass each (layer, head) keeps
(recall) and the pairs it keeps (density), from the same chunked probabilities as
``attnpatch.tools.capture``. The choice per (layer, head) maximises the summed recall with the mean
density at most ``budget``: a multiple-choice knapsack, solved on its convex hull by a Lagrange
multiplier (each cell takes the value maximising recall - lam * density; bisection on lam)::

    from attnpatch.tools.profile_search import search
    res = search(pipe, lambda p: p(prompts), Neighborhood(), "window", [3, 5, 7, 9], budget=0.3,
                 out="nbhd.safetensors")
    ap.patch(pipe, Neighborhood(profile="nbhd.safetensors"))
"""
from __future__ import annotations

import dataclasses

import torch

from .. import api
from ..methods.base import Dense
from ..methods.observe import Observed
from ..methods.schedule import Sparse, save_profile
from ..site import Site
from .capture import _chunk_starts, _probs, _recall


class _Candidates:
    """Watcher over dense attention: every candidate's recall / density per layer from one softmax."""

    def __init__(self, methods: list, rows: int | None, chunk_bytes: int):
        self.methods, self.rows, self.chunk_bytes = methods, rows, chunk_bytes
        self.acc: list[dict[int, dict]] = [{} for _ in methods]

    def __call__(self, q, k, site: Site, groups) -> None:
        if site.kind == "cross" or site.decode:
            return
        with torch.no_grad():
            plans = [m.head_plans(q, k, site) for m in self.methods]
            B, H, Sq, _ = q.shape
            kw = k.to(torch.promote_types(q.dtype, torch.float32))
            c = max(1, min(Sq, self.chunk_bytes // (B * H * k.shape[2] * kw.element_size())))
            for i0 in _chunk_starts(Sq, c, self.rows):
                p, vis = _probs(q, kw, i0, min(Sq, i0 + c), site, q.shape[-1] ** -0.5)
                for acc, groups_v in zip(self.acc, plans):
                    _recall(acc.setdefault(site.layer, {}), p, vis, i0, site, groups_v)


def measure(model_or_pipe, run, method: Sparse, param: str, values: list, *, rows: int | None = None,
            chunk_bytes: int = 1 << 26) -> dict:
    """{"recall", "density"}: (values, layers, heads) tensors, and "layers", from one dense run of
    ``run(model_or_pipe)``. Candidates run their pattern on every step and layer (no dense schedule)."""
    if not isinstance(method, Sparse):
        raise TypeError(f"profile search needs a sparse method with profile= support (Neighborhood, SlidingTile, Radial, "
                        f"TopKBlocks, SinkWindow, ...), got {type(method).__name__}")
    cands = [dataclasses.replace(method, profile=None, dense_steps=0, dense_layers=(), **{param: v}) for v in values]
    watch = _Candidates(cands, rows, chunk_bytes)
    with api.patch(model_or_pipe, Observed(Dense(), watch)):
        run(model_or_pipe)
    layers = sorted(watch.acc[0])
    if not layers:
        raise ValueError("no self / joint attention call was seen: nothing to search")

    def table(key, norm):
        return torch.stack([torch.stack([a[l][key] / a[l][norm] for l in layers]) for a in watch.acc])  # (V, L, H)

    return dict(recall=table("recall_kept", "recall_rows"), density=table("recall_pairs", "recall_visible"), layers=layers)


def choose(recall: torch.Tensor, density: torch.Tensor, budget: float, iters: int = 60) -> torch.Tensor:
    """(layers, heads) index of the chosen value per cell: maximum summed recall with mean density <= budget
    (on the convex hull of each cell's (density, recall) points). Raises when even the sparsest choice
    is over the budget."""
    if density.amin(0).mean() > budget + 1e-12:
        raise ValueError(f"budget {budget} is below the sparsest candidates' mean density {density.amin(0).mean():.4f}")

    def pick(lam):
        return (recall - lam * density).argmax(0)  # (L, H)

    def mean_density(idx):
        return density.gather(0, idx[None]).mean()

    lo, hi = 0.0, 1.0
    while mean_density(pick(hi)) > budget:  # a multiplier large enough to meet the budget
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_density(pick(mid)) > budget else (lo, mid)
    return pick(hi)


def uniform_at(recall: torch.Tensor, density: torch.Tensor, budget: float) -> int | None:
    """Index of the densest single value for every cell whose mean density stays within the budget."""
    ok = [v for v in range(density.shape[0]) if density[v].mean() <= budget + 1e-12]
    return max(ok, key=lambda v: density[v].mean().item()) if ok else None


def search(model_or_pipe, run, method: Sparse, param: str, values: list, budget: float, *, out=None,
           rows: int | None = None) -> dict:
    """Measure, choose and (``out``) write the profile; returns the tables, the chosen values and the
    searched vs uniform recall / density on the measuring run."""
    m = measure(model_or_pipe, run, method, param, values, rows=rows)
    idx = choose(m["recall"], m["density"], budget)
    vals = torch.tensor([list(v) if isinstance(v, tuple) else v for v in values])
    table = vals[idx]  # (L, H) or (L, H, axes)
    L = max(m["layers"]) + 1
    full = torch.zeros((L,) + tuple(table.shape[1:]), dtype=table.dtype)
    full[:] = vals[m["density"].mean((1, 2)).argmin()]  # layers never seen keep the sparsest value
    full[m["layers"]] = table
    got = lambda t: t.gather(0, idx[None])[0].mean().item()  # noqa: E731
    u = uniform_at(m["recall"], m["density"], budget)
    res = dict(tables={param: full}, recall=got(m["recall"]), density=got(m["density"]), measured=m, choice=idx,
               uniform=None if u is None else dict(value=values[u], recall=m["recall"][u].mean().item(),
                                                    density=m["density"][u].mean().item()))
    if out is not None:
        save_profile(out, method, res["tables"])
    return res
