"""Patchers: WHERE attention plugs in, one per framework."""
from __future__ import annotations

from .families import supported_text

SUPPORTED = (  # the diffusers families from their table; the transformers ones as patchers/transformers.py lists them
    f"diffusers pipelines and models: {supported_text()}; "
    "transformers decoders: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3"
)


def patch_object(obj, method, backend, layers, counters):
    """Install ``method`` on ``obj``; returns (patched module names, undo callables). Every call
    is counted in ``counters`` (an ``attnpatch.handle.Counters``)."""
    if hasattr(obj, "_orig_mod"):  # torch.compile's OptimizedModule: compiled code would not see the patch
        raise TypeError(f"attnpatch cannot patch a torch.compile'd {type(obj._orig_mod).__name__}: patch before compiling "
                        "(attnpatch.patch(model, ...), then torch.compile(model)), or patch the original module, model._orig_mod")
    mod = type(obj).__module__ or ""
    if mod.startswith("diffusers"):
        from . import diffusers as d

        if hasattr(obj, "components"):
            return d.patch_pipeline(obj, method, backend, layers, counters)
        return d.patch_model(obj, method, backend, layers, counters)
    if mod.startswith("transformers"):
        from . import transformers as t

        return t.patch_model(obj, method, backend, layers, counters)
    raise TypeError(f"attnpatch cannot patch a {type(obj).__name__} ({mod}); supported: {SUPPORTED}")
