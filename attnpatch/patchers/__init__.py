"""Patchers: WHERE attention plugs in, one per framework."""
from __future__ import annotations

SUPPORTED = (
    "diffusers pipelines and models: Flux, SD3, Wan (2.1 / 2.2), HunyuanVideo, CogVideoX, LTX-Video, Mochi, "
    "Stable Diffusion UNets (attention methods that need no token grid, e.g. PAG); "
    "transformers decoders: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3"
)


def patch_object(obj, method, backend, layers):
    """Install ``method`` on ``obj``; returns (patched module names, undo callables)."""
    mod = type(obj).__module__ or ""
    if mod.startswith("diffusers"):
        from . import diffusers as d

        if hasattr(obj, "components"):
            return d.patch_pipeline(obj, method, backend, layers)
        return d.patch_model(obj, method, backend, layers)
    if mod.startswith("transformers"):
        from . import transformers as t

        return t.patch_model(obj, method, backend, layers)
    raise TypeError(f"attnpatch cannot patch a {type(obj).__name__} ({mod}); supported: {SUPPORTED}")
