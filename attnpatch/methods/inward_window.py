"""``InwardWindow``: FreeSwim's inward sliding window for generating above the training resolution.

FreeSwim (Wu et al. 2025, arXiv:2511.14712, code github.com/WillWu111/FreeSwim,
``nocache/attention_processor_.py: init_mask_flex``): each visual query keeps its training-scale
receptive field. With ``d = train // 2`` per spatial axis, query row ``r`` of an ``n``-row grid
sees key rows ``[r - d - max(0, d + r - n + 1), r + d + max(0, d - r)]``: a window of ``2d + 1``
centred on the query and shifted inward at the borders so it is always full (dense on an axis
no longer than the window). Time stays dense, as in the paper. Text stays dense both ways (the
paper's Wan cross-attention is dense).

The mask equals ``Neighborhood(window=2 * (train // 2) + 1)`` on the spatial axes. What FreeSwim
adds is its full-attention branch (``nocache/`` and ``cache/`` in its code): the pipeline runs a
second copy of the conditional latents with dense self-attention, and the window copy's
cross-attention output is overridden by the full copy's (the full copy's own prediction is
discarded); the cached variant refreshes the branch every ``cache_steps`` steps on the
conditional pass only. Here ``full_every=k`` with ``override=True`` does that on the refresh steps
(step % k == 0) through the denoiser wrapper that PAG uses (extra rows, guidance scale 0): the
extra rows attend densely (logits times ``log n / log n_train`` when ``entropy``); a cross call's
conditional rows take the full rows' output, and a joint call (FLUX: text in the sequence, no
cross-attention) takes the full rows' text-token outputs, so the window copy's text stream is the
full copy's. Between refresh steps the window runs alone (no cached reuse: the wrapper gives no
batch roles there). ``override=False`` runs the refresh steps fully dense instead.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..plan import Plan
from ..site import Site
from . import _grid
from .base import check_bool, check_int, check_ints
from .schedule import Sparse


@dataclass
class InwardWindow(Sparse):
    """The training grid's window, shifted inward at borders; FreeSwim's full branch every ``full_every`` steps."""

    source = "FreeSwim: Revisiting Sliding-Window Attention for Training-Free Ultra-High-Resolution Video Generation (2025)"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)
    llm = False  # needs a visual token grid: the transformers patcher refuses it at patch time

    train_grid: int | tuple = 16  # training-resolution tokens per axis; an int sets the spatial (last two) axes
    full_every: int = 0  # steps with step % full_every == 0 run the full branch; 0: never
    override: bool = True  # the branch overrides text / cross outputs (FreeSwim); False: those steps run dense
    entropy: bool = True  # full steps scale logits by log(n) / log(n_train) (FreeSwim scales for the larger grid)
    stride: int | tuple = 1  # query groups sharing one window (GNA); 1 is FreeSwim's per-token window
    tile: int | tuple | None = None  # executor tile per axis; default: about 256 tokens (16 x 16), the stride if larger
    dense_steps: int | float = field(default=0, kw_only=True, repr=False)  # FreeSwim windows every step

    def __post_init__(self):
        n = "InwardWindow"
        self.train_grid = check_ints(n, "train_grid", self.train_grid, 1, example=16,
                                     expected="the training grid in tokens: an integer >= 1 (spatial axes) or one per grid axis")
        self.full_every = check_int(n, "full_every", self.full_every, 0, example=5,
                                    expected="an integer >= 0 (every k-th step runs full attention; 0: never)")
        self.override = check_bool(n, "override", self.override, example=True)
        self.entropy = check_bool(n, "entropy", self.entropy, example=True)
        # protocol flags per instance: only the override needs the wrapper's extra rows
        # (guidance_weight stays 0: the wrapper returns the cond rows unchanged, the full prediction is dropped)
        self.guidance = self.needs_roles = self.full_every > 0 and self.override
        self.stride = check_ints(n, "stride", self.stride, 1, example=1)
        if self.tile is not None:
            self.tile = check_ints(n, "tile", self.tile, 1, example=8)
        super().__post_init__()  # after the parameters: a profile's values are checked against them
        self._plans = _grid.PlanCache(self._build)

    def windows(self, grid: tuple) -> tuple:
        """Per-axis window ``2 * (train // 2) + 1`` (FreeSwim's ``d = train // 2``); an int
        train_grid leaves a video's time axis dense (window = its length)."""
        nd = len(grid)
        if isinstance(self.train_grid, tuple):
            train = _grid.per_axis(self.train_grid, nd, "train_grid", "InwardWindow")
        else:
            train = tuple(g if a < nd - 2 else self.train_grid for a, g in enumerate(grid))
        return tuple(min(n, 2 * (t // 2) + 1) for n, t in zip(grid, train))

    def _build(self, site: Site, S: int, device) -> Plan:
        grid = site.grid
        w = self.windows(grid)
        s = tuple(min(a, b) for a, b in zip(_grid.per_axis(self.stride, len(grid), "stride", "InwardWindow"), w))
        keeps = [_grid.na_keep(n, ww, ss) for n, ww, ss in zip(grid, w, s)]
        base = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}[len(grid)]  # as Neighborhood: tiles of ~256 tokens
        tile = _grid.per_axis(self.tile, len(grid), "tile", "InwardWindow") if self.tile else \
            tuple(min(n, ss if ss > 1 else b) for n, ss, b in zip(grid, s, base))
        axes = [_grid.axis_tiling(n, t) for n, t in zip(grid, tile)]
        return _grid.separable_plan(site, S, keeps, axes, device, repr(self))

    def full_at(self, site: Site) -> bool:
        return self.full_every > 0 and site.step is not None and site.step % self.full_every == 0

    def guides(self, step: int | None) -> bool:
        """The denoiser wrapper adds the full branch's rows at the refresh steps."""
        return self.guidance and step is not None and step % self.full_every == 0

    def _factor(self, site: Site, S: int) -> float:
        """Full-branch logit factor: log(S) / log(training tokens) when entropy and S is larger."""
        n_train = math.prod(self.windows(site.grid)) + site.text_len if site.grid else S
        return math.log(S) / math.log(n_train) if self.entropy and S > n_train > 1 else 1.0

    def _override(self, site: Site, S: int, rows: slice | None):
        """Plan.output: the full rows attend densely; the conditional rows take their ``rows``
        outputs (None: all, a cross call)."""
        pairs = list(zip([i for i, r in enumerate(site.roles) if r == "cond"],
                         [i for i, r in enumerate(site.roles) if r == "perturbed"]))
        factor = 1.0 if rows is None else self._factor(site, S)

        def output(out, q, k, v, scale):
            full = torch.tensor([p for _, p in pairs], device=q.device)
            rep = q.shape[1] // k.shape[1]
            base = q.shape[-1] ** -0.5 if scale is None else scale
            dense = torch.nn.functional.scaled_dot_product_attention(  # (R, H, Sq, Dv)
                q[full], k[full].repeat_interleave(rep, 1), v[full].repeat_interleave(rep, 1), scale=base * factor)
            out = out.clone()
            out[full] = dense.to(out.dtype)
            for j, (c, _) in enumerate(pairs):
                out[c, :, rows or slice(None)] = dense[j, :, rows or slice(None)].to(out.dtype)
            return out

        return output

    def plan(self, q, k, site: Site) -> Plan | None:
        dual = self.guidance and "perturbed" in site.roles
        if site.kind == "cross":  # dense; under the branch, the window rows take the full rows' output
            return Plan(output=self._override(site, q.shape[2], None), name=f"{self!r} override") if dual else None
        site = _grid.site_grid(site, q, k, self.name)
        if site is None:
            return None
        S = q.shape[2]
        if self.full_at(site) and not self.override:
            factor = self._factor(site, S)
            return None if factor == 1.0 else Plan(q_scale=factor, name=f"{self!r} full step")
        plan = self._plans.get(site, S, q.device)
        if not dual or not site.text_len:
            return plan
        T, text = site.text_len, (slice(0, site.text_len) if site.text_first else slice(S - site.text_len, S))
        return dataclasses.replace(plan, output=self._override(site, S, text), name=f"{self!r} override ({T} text rows)")


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(InwardWindow(train_grid=4), Site(grid=(1, 9)), 9))
    print(ascii_mask(InwardWindow(train_grid=(3, 3)), Site(grid=(4, 6), text_len=2, kind="joint"), 26))
