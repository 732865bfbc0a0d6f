"""``StyleInjection``: style transfer without optimisation (Style Injection in Diffusion, Chung et al.,
CVPR 2024; the authors' code is StyleID). Three passes over the same denoising schedule:

1. ``record("style")``: the style image's inversion; every patched self / joint attention call
   keeps its visual keys and values, per (layer, timestep).
2. ``record("content")``: the content image's inversion; every call keeps its visual queries.
3. ``record(None)`` (inject): the transfer pass, started from the content's inverted latent AdaIN-ed
   toward the style's (``attnpatch.tools.invert.adain``). At timestep t each call's visual keys and
   values are the style's from t, and its visual queries are
   ``T * (query_keep * q_content + (1 - query_keep) * q)``: the authors' query preservation
   (gamma weighs the content's recorded query, 1 - gamma the transfer pass's own) and attention
   temperature (the scores times T; T > 1 sharpens the attention the key swap has blurred).

Recorded features, not a batched run: the paper takes them from the inversion trajectories, which
the transfer pass does not retrace, and recording keeps the transfer pass at batch 1. Text tokens
of joint attention (FLUX) keep their own queries, keys and values: only the image is restyled. Which
layers take part is ``patch(..., layers=...)`` (the paper: the UNet decoder's self-attention).
``attnpatch.tools.invert.style_transfer(pipe, content, style)`` runs the three passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan
from ..site import Site
from .base import Method, check_number

PHASES = ("style", "content", None)  # None: inject


@dataclass
class StyleInjection(Method):
    """The content pass attends with the style pass's keys / values (recorded at the same step)."""

    source = "Style Injection in Diffusion (Chung et al., CVPR 2024; StyleID)"
    llm = False  # an image method: refused in a causal decoder

    query_keep: float = 0.75  # gamma: weight of the content's recorded query
    temperature: float = 1.5  # T: visual rows' scores times T

    def __post_init__(self):
        self.query_keep = check_number("StyleInjection", "query_keep", self.query_keep, low=0, high=1, example=0.75)
        self.temperature = check_number("StyleInjection", "temperature", self.temperature, low=0, low_open=True,
                                        example=1.5)
        self.phase = None
        self.bank: dict = {}  # (layer, module name) -> {timestep: {"q" | "k" | "v": (B, H, N, D)}}

    def record(self, phase: str | None) -> "StyleInjection":
        """Set what the next calls do: ``"style"`` / ``"content"`` record, None injects."""
        if phase not in PHASES:
            raise ValueError(f"StyleInjection.record(phase={phase!r}): expected one of {PHASES}")
        self.phase = phase
        return self

    def clear(self) -> None:
        """Forget every recorded feature (a pipeline call's reset() keeps them: they outlive passes)."""
        self.bank.clear()

    def plan(self, q, k, site: Site) -> Plan | None:
        if site.kind == "cross" or k.shape[2] != q.shape[2]:
            return None  # the paper swaps self-attention only; cross-attention stays the model's
        v0, n = (site.visual_start, site.visual_len) if site.grid else (0, q.shape[2])
        vis, layer = slice(v0, v0 + n), (site.layer, site.name)
        t = site.timestep if site.timestep is not None else site.step
        if self.phase is not None:
            return Plan(transform=self._recorder(layer, t, vis), name=f"{self!r} recording {self.phase}")
        feats = self._features(layer, t, site)
        return Plan(transform=self._injector(feats, vis), name=repr(self))

    def _recorder(self, layer, t, vis):
        names = ("k", "v") if self.phase == "style" else ("q",)

        def transform(q, k, v):  # keeps copies, returns the call's inputs: the pass itself is stock attention
            slot = self.bank.setdefault(layer, {}).setdefault(t, {})
            for name, x in zip("qkv", (q, k, v)):
                if name in names:
                    slot[name] = x[:, :, vis].detach().clone()
            return q, k, v
        return transform

    def _features(self, layer, t, site: Site) -> dict:
        """The slot recorded at this layer and the nearest timestep (within 1e-3: the inversion feeds
        the denoiser the same schedule the pipeline does, rounded its own way), with q, k and v."""
        slots, key = self.bank.get(layer, {}), t
        if t is not None:
            near = [s for s in slots if s is not None and abs(s - t) <= 1e-3]
            key = min(near, key=lambda s: abs(s - t)) if near else t
        slot = slots.get(key)
        if slot is None or not {"q", "k", "v"} <= slot.keys():
            have = "nothing" if slot is None else f"only {sorted(slot)}"
            raise KeyError(f"StyleInjection at {site.name or f'layer {site.layer}'}, timestep {t}: {have} recorded; "
                           "record the style's and the content's inversions first (record('style'), record('content')) "
                           "at the same steps, or use attnpatch.tools.invert.style_transfer")
        return slot

    def _injector(self, feats: dict, vis: slice):
        gamma, T = self.query_keep, self.temperature

        def transform(q, k, v):
            work = torch.promote_types(q.dtype, torch.float32)
            qc, ks, vs = (feats[n].to(q.device) for n in "qkv")  # (1 | B, H, N, D)
            _check_shapes(qc, ks, vs, q[:, :, vis], k[:, :, vis], v[:, :, vis])
            qn, kn, vn = q.clone(), k.clone(), v.clone()  # fresh tensors: autograd keeps its saved inputs intact
            mixed = gamma * qc.to(work) + (1 - gamma) * q[:, :, vis].to(work)
            qn[:, :, vis] = (T * mixed).to(q.dtype)  # one rounding, as the authors' query * T
            kn[:, :, vis] = ks.to(k.dtype).expand(k.shape[0], -1, -1, -1)
            vn[:, :, vis] = vs.to(v.dtype).expand(v.shape[0], -1, -1, -1)
            return qn, kn, vn
        return transform


def _check_shapes(qc, ks, vs, q, k, v) -> None:
    """Recorded features fit the call: same heads, tokens and head dims; a batch of 1 or the call's."""
    for name, got, want in (("queries", qc, q), ("keys", ks, k), ("values", vs, v)):
        if got.shape[1:] != want.shape[1:] or got.shape[0] not in (1, want.shape[0]):
            raise ValueError(f"StyleInjection: recorded {name} {tuple(got.shape)} do not fit this call's visual {name} "
                             f"{tuple(want.shape)}: content and style must be inverted at the transfer's size and heads")


if __name__ == "__main__":  # the mask (dense: the method changes queries, keys and values, not the pattern)
    from .base import ascii_mask

    site = Site(grid=(3, 4), text_len=2, kind="joint", timestep=0.5)
    m = StyleInjection().record("style")
    m.plan(torch.zeros(1, 1, 14, 4), torch.zeros(1, 1, 14, 4), site).transform(*(torch.zeros(1, 1, 14, 4),) * 3)
    m.record("content").plan(torch.zeros(1, 1, 14, 4), torch.zeros(1, 1, 14, 4), site).transform(
        *(torch.zeros(1, 1, 14, 4),) * 3)
    print(ascii_mask(m.record(None), site, 14))
