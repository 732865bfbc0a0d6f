"""Attention capture: what every (layer, head) of a model or pipeline attends to, from the queries and
keys its own attention sees (an ``Observed`` watcher), computed in query chunks so no S x S matrix exists.

Per layer and head, summed over calls (prompts, denoising steps, batch rows): query rows, entropy (and
its maximum, log of the visible keys), attention mass per key position (sinks), mass by distance with
the (query, key) pairs at each distance (token distance for LLMs; Chebyshev distance within a frame and
frame distance on a DiT's grid), visual queries' mass on text keys, and, for an observed method, the
dense mass its plans keep (recall) and the pairs they keep (density)::

    from attnpatch.tools.capture import capture
    cap = capture(model, lambda m: m(ids))                          # stock attention, statistics
    cap = capture(pipe, lambda p: p(prompt), method=Radial(), stats=False)   # Radial's recall
    cap.summary()[layer]["entropy"]; cap.save("attention.safetensors")
"""
from __future__ import annotations

import json

import torch

from .. import api
from ..methods.base import Dense, Method
from ..methods.observe import Observed
from ..plan import materialise_mask
from ..site import Site

# lower edges of the token-distance bins: exact to 3, then two bins per octave (4, 6, 8, 12, ...)
TOKEN_EDGES = torch.tensor([0, 1, 2, 3] + sorted({v for e in range(2, 31) for v in (1 << e, 3 << (e - 1))}))


class Capture:
    """A watcher for ``Observed``: accumulates the statistics of every self / joint attention call.

    ``rows``: query rows per call at most (whole chunks, evenly spaced; None: every row);
    ``chunk_bytes``: memory of one chunk of probabilities (B x H x rows x S_kv in the work dtype);
    ``scale``: the softmax scale (None: head_dim ** -0.5, the models' default)."""

    def __init__(self, stats: bool = True, recall: bool = False, rows: int | None = None,
                 chunk_bytes: int = 1 << 26, scale: float | None = None):
        self.stats, self.recall, self.rows, self.chunk_bytes, self.scale = stats, recall, rows, chunk_bytes, scale
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.grids: dict[int, tuple] = {}  # layer -> (grid, text_len, text_first) of its last call
        self.calls = 0

    def __call__(self, q, k, site: Site, groups) -> None:
        if site.kind == "cross" or site.decode or q.shape[2] == 0:
            return
        with torch.no_grad():
            self.record(q, k, site, groups if self.recall else None)

    def record(self, q, k, site: Site, groups=None) -> None:
        """Statistics of one call on (B, H, S_q, D) queries / (B, H_kv, S_kv, D) keys."""
        B, H, Sq, D = q.shape
        Skv = k.shape[2]
        work = torch.promote_types(q.dtype, torch.float32)  # float32 at least; float64 stays float64
        kw = k.to(work)
        scale = D ** -0.5 if self.scale is None else self.scale
        c = max(1, min(Sq, self.chunk_bytes // (B * H * Skv * torch.finfo(work).bits // 8)))
        acc = self.layers.setdefault(site.layer, {})
        self.grids[site.layer] = (site.grid, site.text_len, site.text_first)
        self.calls += 1
        for i0 in _chunk_starts(Sq, c, self.rows):
            i1 = min(Sq, i0 + c)
            p, vis = _probs(q, kw, i0, i1, site, scale)
            if self.stats:
                _stats(acc, p, vis, i0, site)
            if groups is not None:
                _recall(acc, p, vis, i0, site, groups)

    # --- results -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every accumulator stacked over layers: ``"<name>"`` (L, ...), and ``"layers"`` (L,)."""
        layers = sorted(self.layers)
        out = {"layers": torch.tensor(layers, dtype=torch.long)}
        for name in sorted({n for l in layers for n in self.layers[l]}):
            xs = [self.layers[l].get(name) for l in layers]
            ref = next(x for x in xs if x is not None)
            shape = [max(x.shape[d] for x in xs if x is not None) for d in range(ref.dim())]
            out[name] = torch.stack([_pad(x if x is not None else torch.zeros_like(ref), shape) for x in xs])
        return out

    def save(self, path, **meta) -> None:
        """The accumulators as safetensors (float64; ``meta`` and each layer's grid as metadata)."""
        from safetensors.torch import save_file

        info = {k: json.dumps(v) for k, v in meta.items()}
        info["grids"] = json.dumps({str(l): g for l, g in self.grids.items()})
        info["keys"] = json.dumps({str(l): sorted(acc) for l, acc in self.layers.items()})  # what each layer holds
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(path), metadata=info)

    @classmethod
    def load(cls, path) -> "Capture":
        """A capture read back from ``save`` (its accumulators and grids; metadata in ``.meta``)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            t, info = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        cap = cls()
        cap.meta = {k: json.loads(v) for k, v in info.items() if k not in ("grids", "keys")}
        cap.grids = {int(l): (tuple(g[0]) if g[0] else None, g[1], g[2]) for l, g in json.loads(info.get("grids", "{}")).items()}
        keys = json.loads(info.get("keys", "{}"))  # a layer lacking an accumulator was stacked with zeros: drop them
        cap.layers = {int(l): {k: v[i] for k, v in t.items() if k != "layers" and k in keys.get(str(l), t)}
                      for i, l in enumerate(t["layers"].tolist())}
        return cap

    def summary(self) -> dict[int, dict[str, list]]:
        """{layer: {statistic: one value per head}}: entropy (nats per query row), entropy_norm (over
        its maximum, 1 = uniform over the visible keys), sink (mean share of key 0), top_key / top_share
        (the key with the most mass, its share), text (visual queries' share on text keys), recall and
        density (an observed method's kept mass and kept pairs)."""
        return {l: summarise(acc) for l, acc in sorted(self.layers.items())}


def summarise(acc: dict[str, torch.Tensor]) -> dict[str, list]:
    out = {}
    if "rows" in acc:
        rows = acc["rows"].item()
        share = acc["key_mass"] / rows  # (H, S_kv): mean attention of a query row on each key
        out.update(entropy=(acc["entropy"] / rows).tolist(), entropy_norm=(acc["entropy"] / acc["entropy_max"]).tolist(),
                   sink=share[:, 0].tolist(), top_key=share.argmax(-1).tolist(), top_share=share.amax(-1).tolist())
        if "text_mass" in acc:
            out["text"] = (acc["text_mass"] / acc["visual_rows"]).tolist()
    if "recall_rows" in acc:
        out.update(recall=(acc["recall_kept"] / acc["recall_rows"]).tolist(),
                   density=(acc["recall_pairs"] / acc["recall_visible"]).tolist())
    return out


def decay(acc: dict[str, torch.Tensor], axis: str) -> torch.Tensor | None:
    """(H, bins) mean probability of a (query, key) pair at each distance of ``axis`` ("token",
    "spatial", "temporal") over the mean probability of any visible pair (on a grid: of any visual
    (query, key) pair, so the text's share does not move the curve): 1 = uniform; NaN where no pair
    falls in the bin."""
    if f"dist_{axis}_mass" not in acc:
        return None
    uniform = acc["rows"] / acc["visible"] if axis == "token" else (acc["visual_mass"] / acc["visual_pairs"])[:, None]
    return acc[f"dist_{axis}_mass"] / acc[f"dist_{axis}_pairs"] / uniform


def capture(model_or_pipe, run, method: Method | None = None, *, stats: bool = True, rows: int | None = None,
            chunk_bytes: int = 1 << 26, scale: float | None = None, layers=None) -> Capture:
    """Patch ``model_or_pipe`` with ``method`` (None: dense attention) watched by a ``Capture``,
    call ``run(model_or_pipe)`` and return the capture. With a method, its recall and density are
    recorded (the run follows its plans); ``stats=False`` skips the other statistics."""
    cap = Capture(stats=stats, recall=method is not None, rows=rows, chunk_bytes=chunk_bytes, scale=scale)
    with api.patch(model_or_pipe, Observed(method if method is not None else Dense(), cap), layers=layers):
        run(model_or_pipe)
    return cap


# --- one chunk of query rows ---------------------------------------------------------------------
def _chunk_starts(Sq: int, c: int, rows: int | None) -> list[int]:
    """Starts of the query chunks: all, or ``rows // c`` of them evenly spaced (whole chunks, so a
    plan's mask is materialised for contiguous rows)."""
    starts = list(range(0, Sq, c))
    if rows is None or rows >= Sq:
        return starts
    n = max(1, rows // c)
    return sorted({starts[round(i * (len(starts) - 1) / max(1, n - 1))] for i in range(n)}) if n > 1 else [starts[len(starts) // 2]]


def _probs(q, k, i0: int, i1: int, site: Site, scale: float):
    """Softmax rows [i0, i1) against every key: p (B, H, c, S_kv); vis (c, S_kv) causal visibility or None."""
    B, H, _, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    c = i1 - i0
    qc = q[:, :, i0:i1].to(k.dtype).reshape(B, Hkv, H // Hkv * c, D)  # (B, Hkv, rep*c, D): a KV group's heads stacked
    s = (qc @ k.transpose(-1, -2) * scale).view(B, H, c, Skv)
    vis = None
    if site.causal:
        vis = torch.arange(Skv, device=q.device)[None] <= torch.arange(i0, i1, device=q.device)[:, None] + site.q_offset
        s = s.masked_fill(~vis, float("-inf"))
    return s.softmax(-1), vis


def _stats(acc: dict, p: torch.Tensor, vis, i0: int, site: Site) -> None:
    B, H, c, Skv = p.shape
    nvis = vis.sum(-1) if vis is not None else torch.full((c,), Skv, device=p.device)  # (c,) visible keys per row
    _add(acc, "rows", torch.tensor([B * c]))
    _add(acc, "visible", B * nvis.sum().view(1))
    _add(acc, "entropy", torch.special.entr(p).sum(-1).sum((0, 2)))  # (H,)
    _add(acc, "entropy_max", B * nvis.double().log().sum().view(1))
    _add(acc, "key_mass", p.sum((0, 2)))  # (H, S_kv)
    _add(acc, "key_vis", B * (vis.sum(0) if vis is not None else torch.full((Skv,), c, device=p.device)))
    pm = p.sum(0)  # (H, c, S_kv) summed over batch rows
    if site.grid is None:
        d = torch.arange(i0, i0 + c, device=p.device)[:, None] + site.q_offset - torch.arange(Skv, device=p.device)[None]
        d = d if site.causal else d.abs()  # (c, S_kv) token distance; negative: not visible
        b = torch.bucketize(d.clamp(min=0), TOKEN_EDGES.to(p.device), right=True) - 1
        _bins(acc, "token", pm, b.masked_fill(d < 0, -1), B)  # (prefix sums per row measured 1.9x slower on CPU)
        return
    _grid_stats(acc, pm, i0, site, B)


def _grid_stats(acc: dict, pm: torch.Tensor, i0: int, site: Site, B: int) -> None:
    """Visual queries of the chunk: mass on text keys, and by spatial / temporal distance to visual keys."""
    H, c, Skv = pm.shape
    v0, nv = site.visual_start, site.visual_len
    a, b = max(i0, v0), min(i0 + c, v0 + nv)  # the chunk's visual rows [a, b)
    if a >= b:
        return
    pv = pm[:, a - i0:b - i0]  # (H, r, S_kv)
    vis_mass = pv[..., v0:v0 + nv]  # (H, r, N)
    if site.text_len:  # joint attention: the visual queries' share on the text keys
        _add(acc, "visual_rows", torch.tensor([B * (b - a)]))
        _add(acc, "text_mass", pv.sum((1, 2)) - vis_mass.sum((1, 2)))
    _add(acc, "visual_mass", vis_mass.sum((1, 2)))  # (H,) mass of visual queries on visual keys
    _add(acc, "visual_pairs", torch.tensor([B * (b - a) * nv]))
    co = _coords(site.grid, pm.device)  # (N, n)
    cq = co[a - v0:b - v0]  # (r, n)
    space = (cq[:, None, -2:] - co[None, :, -2:]).abs().amax(-1)  # (r, N) Chebyshev distance in the frame
    if len(site.grid) == 3:
        other = cq[:, None, 0] != co[None, :, 0]
        _bins(acc, "spatial", vis_mass, space.masked_fill(other, -1), B)
        _bins(acc, "temporal", vis_mass, (cq[:, None, 0] - co[None, :, 0]).abs(), B)
    else:
        _bins(acc, "spatial", vis_mass, space, B)


def _bins(acc: dict, axis: str, pm: torch.Tensor, idx: torch.Tensor, B: int) -> None:
    """Mass (H, bins) of ``pm`` (H, r, S) by bin ``idx`` (r, S) (-1: no bin), and pairs (bins,) per batch row."""
    H = pm.shape[0]
    n = int(idx.max()) + 2  # one spare bin at the end takes the -1 entries
    flat = torch.where(idx < 0, n - 1, idx).reshape(-1)
    mass = torch.zeros(H, n, dtype=pm.dtype, device=pm.device).scatter_add_(1, flat.expand(H, -1), pm.reshape(H, -1))
    _add(acc, f"dist_{axis}_mass", mass[:, :-1])
    _add(acc, f"dist_{axis}_pairs", B * torch.bincount(flat, minlength=n)[:-1])


def _recall(acc: dict, p: torch.Tensor, vis, i0: int, site: Site, groups) -> None:
    """Per head: the probability mass the plan of its group keeps, and the visible pairs it keeps."""
    B, H, c, Skv = p.shape
    kept, pairs = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    nvis = vis.sum() if vis is not None else c * Skv
    for heads, plan in groups:
        idx = torch.arange(H) if heads is None else torch.as_tensor(heads).long().cpu()
        keep = None
        if plan is not None:
            keep = materialise_mask(plan.with_site(site.causal, site.q_offset), B, len(idx), c, Skv, p.device, q_start=i0)
        if keep is None:  # keeps every visible key
            kept[idx] += p[:, idx.to(p.device)].sum((0, 2, 3)).double().cpu()
            pairs[idx] += float(B * nvis)
            continue
        keep = keep.expand(B, len(idx), c, Skv)
        if vis is not None:
            keep = keep & vis
        kept[idx] += (p[:, idx.to(p.device)] * keep).sum((0, 2, 3)).double().cpu()
        pairs[idx] += keep.sum((0, 2, 3)).double().cpu()
    _add(acc, "recall_kept", kept)
    _add(acc, "recall_pairs", pairs)
    _add(acc, "recall_rows", torch.tensor([B * c]))
    _add(acc, "recall_visible", torch.tensor([float(B * nvis)]))


# --- accumulators --------------------------------------------------------------------------------
def _coords(grid: tuple[int, ...], device) -> torch.Tensor:
    """(N, len(grid)) integer coordinates of the row-major visual tokens."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


def _pad(x: torch.Tensor, shape) -> torch.Tensor:
    """``x`` zero-padded at the end of each dimension to ``shape`` (key positions, distance bins grow)."""
    if list(x.shape) == list(shape):
        return x
    pad = [v for d in reversed(range(x.dim())) for v in (0, shape[d] - x.shape[d])]
    return torch.nn.functional.pad(x, pad)


def _add(acc: dict, name: str, x: torch.Tensor) -> None:
    """acc[name] += x in float64 on the CPU, padding both to the larger shape."""
    x = x.detach().double().cpu()
    old = acc.get(name)
    if old is None:
        acc[name] = x.clone()
        return
    shape = [max(a, b) for a, b in zip(old.shape, x.shape)]
    acc[name] = _pad(old, shape) + _pad(x, shape)
