"""attnpatch: swap the attention of Hugging Face models for sparse, guided or calibrated variants.

    import attnpatch as ap
    ap.patch(model, ap.SinkWindow(sink=4, window=2048))
    ap.unpatch(model)
"""
from . import kernels, methods
from .api import patch, unpatch
from .core import attend
from .handle import Handle
from .methods import Dense, Method
from .plan import Plan
from .site import Site

__version__ = "0.1.0"


def __getattr__(name):  # every public method (methods._FILES), importable as attnpatch.<Name>
    if name in methods._FILES:
        return getattr(methods, name)
    raise AttributeError(f"module 'attnpatch' has no attribute {name!r}")


__all__ = ["patch", "unpatch", "attend", "Handle", "Site", "Plan", "Method", "Dense", "kernels", *methods._FILES]
