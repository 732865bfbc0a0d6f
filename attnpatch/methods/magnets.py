"""SinkRedistribution's calibration and profiles: ``MagnetScan`` (an ``Observed`` watcher that finds magnet
keys by ACT's rule and VAR's image-centric heads) and the safetensors profile that stores them
(``save_profile`` / ``load_profile``; ``SinkRedistribution(heads=path)`` reads it)."""
from __future__ import annotations

import torch

from ..site import Site
from ._sink_scores import _Call, key_mass

PROFILE_KIND = "redistribution"


def save_profile(path, heads, magnets=None, **meta) -> None:
    """Write a SinkRedistribution profile: (layer, head) pairs and, optionally, magnet key positions."""
    from safetensors.torch import save_file

    tensors = {"heads": torch.tensor([list(p) for p in heads], dtype=torch.int64).reshape(-1, 2)}
    if magnets is not None:
        tensors["magnets"] = torch.tensor(sorted(magnets), dtype=torch.int64)
    save_file(tensors, str(path), metadata={"kind": PROFILE_KIND, **{k: str(v) for k, v in meta.items()}})


def load_profile(path) -> tuple[list, list | None, dict]:
    """([(layer, head)], magnet positions or None, metadata) of a profile written by ``save_profile``."""
    from ..checks import read_safetensors

    expected = (f"a SinkRedistribution profile: safetensors with metadata kind={PROFILE_KIND!r}, a tensor 'heads' (n, 2) "
                "of (layer, head) pairs and optionally 'magnets' (m,) key positions")
    how = "write one with attnpatch.methods.redistribute.save_profile(path, heads, magnets)"
    tensors, meta = read_safetensors(path, f"SinkRedistribution(heads={path!r})", expected, how)
    if meta.get("kind") != PROFILE_KIND or "heads" not in tensors:
        raise ValueError(f"{path} is not a SinkRedistribution profile (kind={meta.get('kind')!r}); expected {expected}; {how}")
    heads = [tuple(p) for p in tensors["heads"].reshape(-1, 2).tolist()]
    mags = tensors["magnets"].tolist() if "magnets" in tensors else None
    return heads, mags, meta


class MagnetScan:
    """A calibration watcher (``Observed(Dense(), scan)``): per (layer, head), the mean attention of the query
    rows at positions ``queries`` (None: every row) on each key. ``magnets(threshold)``: keys whose attention
    relative to uniform, averaged over layers >= ``from_layer`` and heads, exceeds the threshold (ACT's rule);
    ``heads(magnets, visual, rho, summ)``: VAR's image-centric heads, whose rows give at least ``summ`` of their
    attention to the ``visual`` keys and at most ``rho`` of that to visual magnets. Calls of one shape only."""

    def __init__(self, queries=None, from_layer: int = 0):
        self.queries, self.from_layer, self.mass = queries, from_layer, {}  # layer -> [sum of (H, Skv), calls]

    def __call__(self, q, k, site: Site, groups=None) -> None:
        Sq = q.shape[2]
        rows = torch.arange(Sq, device=q.device) if self.queries is None else \
            torch.tensor([i - site.q_offset for i in self.queries if 0 <= i - site.q_offset < Sq], device=q.device)
        if not len(rows):
            return
        call = _Call(site.q_offset, site.causal, site.kv_shift, None, q.shape[-1] ** -0.5, None)
        m = key_mass(q, k, call, rows).mean(0)  # (H, Skv)
        acc = self.mass.setdefault(site.layer, [torch.zeros_like(m), 0])
        acc[0], acc[1] = acc[0] + m, acc[1] + 1

    def layer_mass(self, layer: int) -> torch.Tensor:
        total, n = self.mass[layer]
        return total / n

    def magnets(self, threshold: float) -> list[int]:
        ms = [self.layer_mass(l) for l in sorted(self.mass) if l >= self.from_layer]
        score = torch.stack(ms).mean((0, 1)) * ms[0].shape[-1]  # (Skv,) attention relative to uniform
        return (score > threshold).nonzero().flatten().tolist()

    def heads(self, magnets, visual, rho: float = 0.5, summ: float = 0.2) -> list[tuple[int, int]]:
        out = []
        for l in sorted(x for x in self.mass if x >= self.from_layer):
            m = self.layer_mass(l)  # (H, Skv)
            vis = m[:, list(visual)].sum(-1)
            sink = m[:, [j for j in magnets if j in set(visual)]].sum(-1)
            out += [(l, h) for h in range(m.shape[0]) if vis[h] >= summ and sink[h] <= rho * vis[h]]
        return out
