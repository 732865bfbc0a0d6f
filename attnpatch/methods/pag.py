"""``PAG``: perturbed-attention guidance (Ahn et al. 2024) and its soft, head-level variant
(SoftPAG / HeadHunter, 2025), for any patched pipeline.

The denoiser wrapper (``attnpatch.pipelines.guidance``) appends perturbed copies of the
conditional rows; in the chosen layers (and heads) their self-attention map becomes the
identity: every visual query returns its own value (in joint attention the image-to-image block
becomes the identity, image-to-text and the text rows are unchanged, as diffusers' PAG
processors do). ``soft < 1`` interpolates the output toward it:
``out = (1 - soft) * attention + soft * identity``. The guided prediction is
``cond + scale * (cond - perturbed)`` on top of the pipeline's own classifier-free guidance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..plan import Plan
from ..site import Site
from .base import Method


def load_heads(path) -> dict[int, list[int]]:
    """A head-selection profile (``save_heads``): {layer: [heads]}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != "pag-heads" or "heads" not in f.keys():
            raise ValueError(f"{path} is not a PAG head profile (expected tensor 'heads' (n, 2) written by save_heads)")
        pairs = f.get_tensor("heads")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{path}: tensor 'heads' must be (n, 2) (layer, head) pairs, got {tuple(pairs.shape)}")
    out: dict[int, list[int]] = {}
    for layer, head in pairs.tolist():
        out.setdefault(int(layer), []).append(int(head))
    return out


def save_heads(path, heads: dict | list, **metadata) -> None:
    """Write {layer: [heads]} or [(layer, head), ...] as a profile ``PAG(heads=path)`` loads."""
    from safetensors.torch import save_file

    pairs = [(l, h) for l, hs in heads.items() for h in hs] if isinstance(heads, dict) else list(heads)
    meta = {"kind": "pag-heads", **{k: str(v) for k, v in metadata.items()}}
    save_file({"heads": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)}, str(path), metadata=meta)


@dataclass
class PAG(Method):
    """Perturbed-attention guidance; ``soft < 1`` is SoftPAG; ``heads`` restricts it to heads."""

    source = "Perturbed-Attention Guidance (Ahn et al. 2024); HeadHunter / SoftPAG (2025)"
    guidance = True  # the patchers install the denoiser wrapper for methods with this flag

    scale: float = 3.0
    layers: object = None  # None: every self / joint layer; ints (block ordinals) or regexes on module names
    heads: object = None  # None: all heads; [h, ...] in every chosen layer; {layer: [h, ...]}; or a profile path
    soft: float = 1.0
    steps: object = None  # None: every denoising step; else the step indices guided
    _heads: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise ValueError(f"PAG(scale={self.scale!r}) must be a number")
        if not 0.0 <= float(self.soft) <= 1.0:
            raise ValueError(f"PAG(soft={self.soft!r}) must be in [0, 1] (1: identity attention, 0: no perturbation)")
        if isinstance(self.layers, (int, str)):
            self.layers = [self.layers]
        if self.heads is None or isinstance(self.heads, dict):
            self._heads = self.heads
        elif isinstance(self.heads, (list, tuple, range)):
            self._heads = {None: [int(h) for h in self.heads]}
        else:
            self._heads = load_heads(self.heads)
            if self.layers is None:
                self.layers = sorted(self._heads)  # a profile names its layers
        if self.steps is not None:
            self.steps = frozenset(int(s) for s in self.steps)

    @property
    def active(self) -> bool:
        """False when the guidance cannot change anything (scale 0 or soft 0): no extra rows."""
        return self.scale != 0 and self.soft != 0

    def guides(self, step: int | None) -> bool:
        return self.active and (self.steps is None or step is None or step in self.steps)

    def _layer_chosen(self, site: Site) -> bool:
        if self.layers is None:
            return True
        return any(site.layer == l if isinstance(l, int) else re.search(l, site.name) is not None for l in self.layers)

    def heads_at(self, layer: int, n_heads: int) -> list[int] | None:
        """Perturbed heads at ``layer`` (None: all)."""
        if self._heads is None:
            return None
        hs = self._heads.get(layer, self._heads.get(None, []))
        bad = [h for h in hs if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"PAG(heads=...) names head(s) {bad} at layer {layer}, but the model has {n_heads} heads")
        return hs

    def plan(self, q, k, site: Site) -> Plan | None:
        rows = [i for i, r in enumerate(site.roles) if r == "perturbed"]
        if not rows or site.kind == "cross" or q.shape[2] != k.shape[2] or not self._layer_chosen(site):
            return None
        heads = self.heads_at(site.layer, q.shape[1])
        if heads is not None and not heads:
            return None
        v0, n = (site.visual_start, site.visual_len) if site.grid else (0, q.shape[2])
        soft = float(self.soft)

        def output(out, q, k, v, scale):
            S = q.shape[2]
            keep = torch.ones(S, S, dtype=torch.bool, device=q.device)
            keep[v0:v0 + n, v0:v0 + n] = torch.eye(n, dtype=torch.bool, device=q.device)  # image block: identity
            idx = torch.tensor(rows, device=q.device)
            hs = slice(None) if heads is None else torch.tensor(heads, device=q.device)
            rep = q.shape[1] // k.shape[1]
            kk, vv = k[idx].repeat_interleave(rep, 1)[:, hs], v[idx].repeat_interleave(rep, 1)[:, hs]
            ident = F.scaled_dot_product_attention(q[idx][:, hs], kk, vv, attn_mask=keep, scale=scale)
            cur = out[idx][:, hs]
            mixed = ident if soft == 1.0 else (1 - soft) * cur + soft * ident
            out = out.clone()
            sub = out[idx]
            sub[:, hs] = mixed.to(out.dtype)
            out[idx] = sub
            return out

        return Plan(output=output, name=repr(self))


if __name__ == "__main__":
    print("PAG perturbed rows at a joint site (2 text tokens first, 2x3 image): '#' attended")
    S = 8
    keep = torch.ones(S, S, dtype=torch.bool)
    keep[2:, 2:] = torch.eye(6, dtype=torch.bool)
    print("\n".join("".join("#" if x else "." for x in row.tolist()) for row in keep))
