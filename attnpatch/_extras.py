"""Optional dependencies: each heavy piece sits behind a pip extra, and using it without the
extra raises an ImportError that names the extra to install (``import attnpatch`` needs torch only)."""
from __future__ import annotations

import importlib.util

EXTRAS = {  # module -> the extra that installs it
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "diffusers",
    "matplotlib": "cli",
}


def require(*modules: str, what: str) -> None:
    """Raise ImportError naming ``pip install 'attnpatch[<extra>]'`` when a module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRAS.get(m, "cli") for m in missing})
        raise ImportError(f"{what} needs {', '.join(missing)}, which is not installed: "
                          f"pip install 'attnpatch[{','.join(extras)}]'")
