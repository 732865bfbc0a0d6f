"""``layers=`` selection shared by every patcher: ints match ``Site.layer``, strings are
fnmatch patterns on module names (``"transformer_blocks.1*.attn"``)."""
from __future__ import annotations

import fnmatch


def select(entries: list[tuple[int, str]], layers) -> set[str]:
    """Names of the ``(layer, name)`` entries chosen by ``layers`` (None: all)."""
    if layers is None:
        return {name for _, name in entries}
    if isinstance(layers, (int, str)):
        layers = [layers]
    try:
        wanted = list(layers)
    except TypeError:
        raise TypeError(f"layers must be an int, a name pattern, or a list / range of them; got {layers!r}") from None
    known = sorted({layer for layer, _ in entries})
    chosen: set[str] = set()
    for w in wanted:
        if isinstance(w, bool) or not isinstance(w, (int, str)):
            raise TypeError(f"layers entries must be ints or name patterns, got {w!r}")
        hit = {n for layer, n in entries if (layer == w if isinstance(w, int) else fnmatch.fnmatchcase(n, w))}
        if not hit:
            span = f"{known[0]}..{known[-1]}" if known else "none"
            sample = ", ".join(n for _, n in entries[:4])
            raise ValueError(f"layers entry {w!r} matches no attention layer; layer indices are {span}, names look like {sample}")
        chosen |= hit
    return chosen
