"""``PAG``: perturbed-attention guidance (Ahn et al. 2024) and its soft, head-level variant
(SoftPAG / HeadHunter, 2025), for any patched pipeline.

The denoiser wrapper (``attnpatch.patchers.guidance``) appends perturbed copies of the
conditional rows; in the chosen layers (and heads) their self-attention map becomes the
identity: every visual query returns its own value (in joint attention the image-to-image block
becomes the identity, image-to-text and the text rows are unchanged, as diffusers' PAG
processors do). ``soft < 1`` interpolates the output toward it:
``out = (1 - soft) * attention + soft * identity``. The guided prediction is
``cond + scale * (cond - perturbed)`` on top of the pipeline's own classifier-free guidance.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..plan import Part, Plan
from ..site import Site
from ..checks import as_int, read_safetensors
from .base import Method, ParameterTypeError, call_heads, check_indices, check_int, check_number, fail


def load_heads(path) -> dict[int, list[int]]:
    """A head-selection profile (``save_heads``): {layer: [heads]}."""
    expected = "a PAG head profile: a safetensors file with metadata kind='pag-heads' and a tensor 'heads' (n, 2) of (layer, head) pairs"
    how = "write one with attnpatch.methods.pag.save_heads(path, {layer: [heads]}) or python -m attnpatch.tools.headhunter"
    tensors, meta = read_safetensors(path, f"PAG(heads={path!r})", expected, how)
    if meta.get("kind") != "pag-heads" or "heads" not in tensors:
        found = meta.get("kind") or (f"a {meta['method']} profile" if "method" in meta else "no attnpatch metadata")
        raise ValueError(f"{path} is not a PAG head profile (found: {found}); expected {expected}; {how}")
    pairs = tensors["heads"]
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point() or (pairs < 0).any():
        raise ValueError(f"{path}: tensor 'heads' must be (n, 2) integer (layer, head) pairs >= 0, got "
                         f"{pairs.dtype} {tuple(pairs.shape)}; {how}")
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


def _layers(layers) -> list:
    """``PAG(layers=...)`` as a list of block ordinals (ints >= 0) and regexes on module names."""
    expected = "None, a block ordinal (int >= 0), a regex on module names, or a list of them"
    items = [layers] if isinstance(layers, (int, str)) and not isinstance(layers, bool) else layers
    if not isinstance(items, (list, tuple, range)):
        fail("PAG", "layers", layers, expected, '["transformer_blocks.1"]', ParameterTypeError)
    for item in items:
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as e:
                fail("PAG", "layers", layers, f"{expected} (the regex {item!r} does not compile: {e})", '["blocks.1"]')
        else:
            check_int("PAG", "layers", item, 0, expected=expected, example='[2, "transformer_blocks.1"]')
    return list(items)


def _head_dict(heads: dict) -> dict[int, list[int]]:
    """``PAG(heads={layer: [heads]})`` checked: integer layers and heads >= 0."""
    out = {}
    for layer, hs in heads.items():
        ints = None if isinstance(hs, (str, bytes)) else [as_int(h) for h in hs] if isinstance(hs, (list, tuple, range, set)) else None
        if as_int(layer) is None or ints is None or None in ints or as_int(layer) < 0 or min(ints, default=0) < 0:
            fail("PAG", "heads", heads, "{layer: [heads]}: integer layers and head indices >= 0", "{3: [0, 2]}",
                 ParameterTypeError)
        out[as_int(layer)] = ints
    return out


@dataclass
class PAG(Method):
    """Perturbed-attention guidance; ``soft < 1`` is SoftPAG; ``heads`` restricts it to heads."""

    source = "Perturbed-Attention Guidance (Ahn et al. 2024); HeadHunter / SoftPAG (2025)"
    llm = False  # guides a diffusion denoiser: the transformers patcher refuses it at patch time
    guidance = True  # the patchers install the denoiser wrapper for methods with this flag
    needs_roles = True  # guidance implies it: the wrapper sets the batch roles of every call

    scale: float = 3.0
    layers: object = None  # None: every self / joint layer; ints (block ordinals) or regexes on module names
    heads: object = None  # None: all heads; [h, ...] in every chosen layer; {layer: [h, ...]}; or a profile path
    soft: float = 1.0
    steps: object = None  # None: every denoising step; else the step indices guided
    _heads: dict | None = field(default=None, init=False, repr=False)
    # identity plans per (image start, image length): one mask_mod per layout, so kernels that cache or
    # compile per mask_mod (flex's BlockMask cache, its compiled graphs) reuse them across calls
    _identity: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.scale = check_number("PAG", "scale", self.scale, example=3.0)
        self.soft = check_number("PAG", "soft", self.soft, low=0, high=1, example=0.5,
                                 expected="a number in [0, 1] (1: identity attention, 0: no perturbation)")
        self.layers = None if self.layers is None else _layers(self.layers)
        if self.heads is None:
            self._heads = None
        elif isinstance(self.heads, dict):
            self._heads = _head_dict(self.heads)
        elif isinstance(self.heads, (str, os.PathLike)):
            self._heads = load_heads(self.heads)
            if self.layers is None:
                self.layers = sorted(self._heads)  # a profile names its layers
        else:
            self._heads = {None: list(check_indices("PAG", "heads", self.heads, what="head indices",
                                                    example="[0, 2]"))}
        if self.steps is not None:  # a bare int is refused: steps=3 could mean step 3 or the first 3 steps
            self.steps = frozenset(check_indices("PAG", "steps", self.steps, what="denoising step indices",
                                                 example="range(10)"))

    @property
    def active(self) -> bool:
        """False when the guidance cannot change anything (scale 0 or soft 0): no extra rows."""
        return self.scale != 0 and self.soft != 0

    def guides(self, step: int | None) -> bool:
        return self.active and (self.steps is None or step is None or step in self.steps)

    def guidance_weight(self) -> float:
        return self.scale

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
        heads = call_heads(site, q.shape[1], self.heads_at(site.layer, site.model_heads(q.shape[1])[1]))
        if heads is not None and not heads:
            return None
        image = (site.visual_start, site.visual_len) if site.grid else (0, q.shape[2])
        if image not in self._identity:
            self._identity[image] = _identity_plan(*image, f"{self!r} perturbed")
        part = Part(rows=tuple(rows), plan=self._identity[image], heads=None if heads is None else tuple(heads),
                    weight=float(self.soft))
        return Plan(parts=(part,), name=repr(self))


def _identity_plan(v0: int, n: int, name: str) -> Plan:
    """The perturbed attention: the image block [v0, v0 + n) becomes the identity (each image query
    sees its own image key); text rows and text columns stay."""
    def identity(b, h, q_idx, kv_idx):
        image = (q_idx >= v0) & (q_idx < v0 + n) & (kv_idx >= v0) & (kv_idx < v0 + n)
        return ~image | (q_idx == kv_idx)

    return Plan(mask_mod=identity, name=name)


if __name__ == "__main__":
    print("PAG perturbed rows at a joint site (2 text tokens first, 2x3 image): '#' attended")
    S = 8
    keep = torch.ones(S, S, dtype=torch.bool)
    keep[2:, 2:] = torch.eye(6, dtype=torch.bool)
    print("\n".join("".join("#" if x else "." for x in row.tolist()) for row in keep))
