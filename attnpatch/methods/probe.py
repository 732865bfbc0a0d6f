"""Measuring: ``AttentionStats``, a method; ``Recall``, a watcher of another method (through
``attnpatch.methods.observe.Observed``).

``AttentionStats``: patched like any method, it leaves attention dense
(its plan is None) and accumulates, per layer, where the softmax mass of the visual queries
goes: to visual keys at each grid distance, to text keys, and to the single most-attended key
(the sink). Used by the fixtures report and the quality benchmarks.

    stats = AttentionStats()
    with ap.patch(pipe, stats):
        pipe(prompt)
    stats.locality()   # {layer: {"spatial": [...], "temporal": [...]}}, 1.0 = uniform
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .base import Method
from ..site import Site


def _coords(grid: tuple[int, ...], device) -> torch.Tensor:
    """(N, len(grid)) integer coordinates of the row-major visual tokens."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


@dataclass
class AttentionStats(Method):
    """Dense attention that records attention-mass statistics per layer (self / joint calls)."""

    max_queries: int = 1024  # visual query rows sampled per call (evenly spaced), to bound cost
    data: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)), repr=False)

    source = "-"

    def plan(self, q, k, site: Site):
        if site.kind == "cross" or not site.grid or q.shape[2] != k.shape[2]:
            return None
        self._record(q, k, site)
        return None

    @torch.no_grad()
    def _record(self, q, k, site: Site) -> None:
        B, H, S, D = q.shape
        v0, nv = site.visual_start, site.visual_len
        rows = torch.linspace(v0, v0 + nv - 1, min(nv, self.max_queries), device=q.device).round().long()
        kk = k.repeat_interleave(H // k.shape[1], 1).float()  # GQA: (B, H, S, D)
        p = torch.softmax(q[:, :, rows].float() @ kk.transpose(-1, -2) * D**-0.5, -1)  # (B, H, R, S)
        d = self.data[site.layer]
        d["rows"] += B * H * len(rows)
        d["text"] += (p.sum((0, 1, 2)).sum() - p[..., v0:v0 + nv].sum()).item()
        d["sink"] += p.mean(2).amax(-1).sum().item() * len(rows)  # top key's share, per (b, h)
        c = _coords(site.grid, q.device)
        cq, cv = c[rows - v0], c  # (R, n), (N, n)
        pv = p[..., v0:v0 + nv].sum((0, 1))  # (R, N) summed over batch and heads
        space = (cq[:, None, -2:] - cv[None, :, -2:]).abs().amax(-1)  # Chebyshev distance in the frame
        if len(site.grid) == 3:
            space = space.masked_fill(cq[:, None, 0] != cv[None, :, 0], -1)  # spatial: same frame only
            self._bin(d, "temporal", (cq[:, None, 0] - cv[None, :, 0]).abs(), pv, B * H)
        self._bin(d, "spatial", space, pv, B * H)
        d["keys"] = S

    @staticmethod
    def _bin(d, name: str, dist: torch.Tensor, pv: torch.Tensor, mult: int) -> None:
        ok = dist >= 0
        mass = torch.bincount(dist[ok], weights=pv[ok].double())
        pairs = torch.bincount(dist[ok])
        for i in range(len(mass)):
            d[(name, "mass", i)] += mass[i].item()
            d[(name, "pairs", i)] += pairs[i].item() * mult  # pv sums mult (batch, head) rows

    def reset(self) -> None:  # statistics accumulate over calls; clear() forgets them
        pass

    def clear(self) -> None:
        self.data.clear()

    def locality(self) -> dict:
        """{layer: {"spatial": r, "temporal": r}}: r[i] = mean attention probability of a
        (query, key) pair at distance i, times the number of keys (1.0 everywhere = uniform)."""
        out = {}
        for layer, d in sorted(self.data.items()):
            out[layer] = {}
            for name in ("spatial", "temporal"):
                n = 1 + max((x[2] for x in d if isinstance(x, tuple) and x[0] == name), default=-1)
                if n:
                    out[layer][name] = [d[(name, "mass", i)] / max(d[(name, "pairs", i)], 1) * d["keys"] for i in range(n)]
        return out

    def summary(self) -> dict:
        """{layer: {"sink": share of the most-attended key, "text": share of text keys}}."""
        return {layer: {"sink": d["sink"] / d["rows"], "text": d["text"] / d["rows"]} for layer, d in sorted(self.data.items())}


class Recall:
    """A watcher for ``Observed``: per call of the observed method, the fraction of the dense
    attention mass its plan keeps (recall) and the plan's block density; the generation follows
    the sparse plans. Exact (materialises the S x S probabilities): meant for small models and
    benchmarks. ``rec = Recall(); ap.patch(pipe, Observed(method, rec)); ...; rec.summary()``."""

    def __init__(self, max_queries: int = 512):
        self.max_queries = max_queries
        self.records: list = []

    def __call__(self, q, k, site: Site, groups) -> None:
        if site.kind == "cross":
            return
        for heads, plan in groups:
            qq = q if heads is None else q[:, heads]
            kk = k if heads is None else k[:, heads // (q.shape[1] // k.shape[1])]
            self._record(qq, kk, site, plan)

    @torch.no_grad()
    def _record(self, q, k, site: Site, plan) -> None:
        from ..plan import materialise_mask

        B, H, S, D = q.shape
        if plan is None or plan.mask_mod is None:
            self.records.append(dict(layer=site.layer, step=site.step, recall=1.0, density=1.0))
            return
        rows = torch.linspace(0, S - 1, min(S, self.max_queries), device=q.device).round().long()
        kk = k.repeat_interleave(H // k.shape[1], 1).float()
        p = torch.softmax(q[:, :, rows].float() @ kk.transpose(-1, -2) * D**-0.5, -1)  # (B, H, R, Skv)
        keep = materialise_mask(plan.with_site(site.causal, site.q_offset), 1, 1, S, k.shape[2], q.device)[..., rows, :]
        density = plan.blocks.density() if plan.blocks is not None else keep.float().mean().item()
        self.records.append(dict(layer=site.layer, step=site.step, recall=(p * keep).sum(-1).mean().item(), density=density))

    def summary(self) -> dict:
        """Mean recall and density over all recorded calls."""
        n = max(1, len(self.records))
        return dict(recall=sum(r["recall"] for r in self.records) / n, density=sum(r["density"] for r in self.records) / n,
                    calls=len(self.records))
