"""Methods: WHAT changes. Each file is one pattern (its paper in the class docstring), loaded on first use
(so ``python -m attnpatch.methods.<file>`` prints its mask without import warnings)."""
import importlib

from .base import Dense, Method, ascii_mask

_FILES = {
    "SinkWindow": "sink_window",
    "Neighborhood": "neighborhood",
    "SlidingTile": "sliding_tile",
    "InwardWindow": "inward_window",
    "Radial": "radial",
    "TopKBlocks": "topk_blocks",
    "Sparse": "schedule",
    "PAG": "pag",
    "SharedAttention": "shared",
    "Power": "power",
    "VerticalSlash": "vertical_slash",
    "Temperature": "temperature",
    "EntropyScale": "temperature",
    "SinkCalibration": "sink_calibration",
    "Quest": "quest",
    "HyperAttention": "hyper",
    "StreamingHeads": "duo",
    "SinkRedistribution": "redistribute",
    "StyleInjection": "style",
}  # public name -> module file


def __getattr__(name):
    if name in _FILES:
        return getattr(importlib.import_module(f".{_FILES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "Dense", "ascii_mask", *_FILES]
