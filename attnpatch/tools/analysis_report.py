"""The report of an attention capture: PNG figures (matplotlib) and a static index.html / report.md.

Figures: per (layer, head) heatmaps of normalised entropy, top-key share (sinks) and, on DiTs, the
visual queries' share on text keys; decay curves (attention per pair at each distance over the uniform
value, one curve per layer); where the mass goes over key positions (LLM: the first keys; DiT: the grid);
and the recall of each method's plans per (layer, head), with its density.
"""
from __future__ import annotations

import html
import json
import math
import textwrap
from pathlib import Path

import torch

from .._extras import require
from .capture import TOKEN_EDGES, Capture, decay
from .page import IMAGES_LOADED, figures

DPI = 72


def _plt():
    require("matplotlib", what="the analysis report's figures")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(cap: Capture, key: str) -> torch.Tensor:
    """(L, H) of one summary statistic (NaN where a layer lacks it)."""
    s = cap.summary()
    rows = [s[l].get(key) for l in sorted(s)]
    H = max((len(r) for r in rows if r), default=0)
    return torch.tensor([r + [math.nan] * (H - len(r)) if r else [math.nan] * H for r in rows], dtype=torch.float64)


def heads_figure(cap: Capture, path: Path) -> None:
    """Heatmaps over (layer, head): normalised entropy, top-key share, text share (DiTs)."""
    plt = _plt()
    panels = [("entropy_norm", "entropy / log(visible keys)"), ("top_share", "share of the top key (sink)")]
    if any("text" in v for v in cap.summary().values()):
        panels.append(("text", "visual queries' share on text keys"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    layers = sorted(cap.layers)
    for ax, (key, title) in zip(axes[0], panels):
        t = _table(cap, key)
        im = ax.imshow(t.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="head", ylabel="layer")
        ax.set_yticks(range(len(layers))[:: max(1, len(layers) // 8)], layers[:: max(1, len(layers) // 8)])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def decay_figure(cap: Capture, path: Path) -> list[str]:
    """Decay curves per layer (mean over heads) for each distance axis captured; returns the axes drawn."""
    plt = _plt()
    axes_present = [a for a in ("token", "spatial", "temporal") if any(f"dist_{a}_mass" in acc for acc in cap.layers.values())]
    if not axes_present:
        return []
    fig, axes = plt.subplots(1, len(axes_present), figsize=(4.6 * len(axes_present), 3.6), squeeze=False)
    cmap, layers = plt.get_cmap("plasma"), sorted(cap.layers)
    for ax, axis in zip(axes[0], axes_present):
        for i, l in enumerate(layers):
            r = decay(cap.layers[l], axis)
            if r is None:
                continue
            y = r.nanmean(0)  # mean over heads
            x = (TOKEN_EDGES[: len(y)] + 1).double() if axis == "token" else torch.arange(len(y)).double()
            ok = torch.isfinite(y) & (y > 0)
            ax.plot(x[ok].numpy(), y[ok].numpy(), color=cmap(i / max(1, len(layers) - 1)), lw=1,
                    label=f"layer {l}" if i in (0, len(layers) - 1) else None)
        ax.set_yscale("log")
        if axis == "token":
            ax.set_xscale("log")
        ax.axhline(1, color="gray", lw=0.6, ls="--")
        ax.set(title=f"{axis} decay (1 = uniform)", ylabel="attention per pair / uniform",
               xlabel={"token": "token distance + 1", "spatial": "Chebyshev distance in a frame",
                       "temporal": "frames apart"}[axis])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return axes_present


def keys_figure(cap: Capture, path: Path, first: int = 64) -> str:
    """Where the mass goes over key positions; returns the figure's caption."""
    plt = _plt()
    layers = sorted(cap.layers)
    grid, text_len, text_first = cap.grids[layers[0]]
    fig, caption = (_llm_keys(plt, cap, layers, first) if grid is None
                    else _grid_keys(plt, cap, layers, grid, text_len if text_first else 0))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return caption


def _llm_keys(plt, cap: Capture, layers: list, first: int):
    """Layers x the first keys: the mean attention a key receives from the rows that see it (mean over heads)."""
    rows = [(cap.layers[l]["key_mass"].mean(0) / cap.layers[l]["key_vis"].clamp_min(1))[:first] for l in layers]
    n = min(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    im = ax.imshow(torch.stack([r[:n] for r in rows]).clamp_min(1e-6).log10().numpy(), aspect="auto", cmap="magma",
                   interpolation="nearest")
    ax.set(xlabel="key position", ylabel="layer", title="log10 mean attention a key receives (rows that see it)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig, f"attention received by each of the first {n} key positions (mean over heads), per layer"


def _grid_keys(plt, cap: Capture, layers: list, grid: tuple, v0: int):
    """One small heatmap per layer: each visual key's mass over its uniform share (frames averaged)."""
    cols, N = min(len(layers), 6), math.prod(grid)
    nrows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 1.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        share = cap.layers[l]["key_mass"].mean(0)[v0:v0 + N]
        share = share / share.sum() * N  # 1 = the uniform share of the visual keys' mass
        img = share.view(grid[0], -1, grid[-1]).mean(0) if len(grid) == 3 else share.view(-1, grid[-1])  # (H, W) / (1, W)
        ax.imshow(img.numpy(), cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {l}: max {img.max().item():.1f}", fontsize=7)
    return fig, ("attention each visual key receives over its uniform share of the visual keys' mass (mean over heads"
                 + (" and frames" if len(grid) == 3 else "") + "), per layer: bright spots are sink tokens")


def recall_figure(recalls: dict[str, Capture], path: Path) -> None:
    """Per method: recall over (layer, head), its mean density in the title."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(recalls), figsize=(3.8 * len(recalls), 4.0), squeeze=False)
    for ax, (name, cap) in zip(axes[0], recalls.items()):
        r, d = _table(cap, "recall"), _table(cap, "density")
        im = ax.imshow(r.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        label = "\n".join(textwrap.wrap(name, 48)[:3])
        ax.set(title=f"{label}\nrecall {r.nanmean():.3f} at density {d.nanmean():.3f}", xlabel="head", ylabel="layer")
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def layer_rows(cap: Capture, recalls: dict[str, Capture]) -> list[dict]:
    """One table row per layer: means over heads, the most sink-like head, each method's recall / density."""
    s, rec = cap.summary(), {n: c.summary() for n, c in recalls.items()}
    out = []
    for l, v in s.items():
        top = max(range(len(v["top_share"])), key=v["top_share"].__getitem__)
        row = dict(layer=l, entropy_norm=_mean(v["entropy_norm"]), sink=_mean(v["sink"]),
                   top_head=f"head {top}: key {v['top_key'][top]} gets {v['top_share'][top]:.2f}")
        if "text" in v:
            row["text"] = _mean(v["text"])
        for n, r in rec.items():
            if l in r:
                row[f"recall {n}"], row[f"density {n}"] = _mean(r[l]["recall"]), _mean(r[l]["density"])
        out.append(row)
    return out


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def write(folder: Path, cap: Capture, recalls: dict[str, Capture], meta: dict) -> None:
    """Figures, report.json, report.md and index.html in ``folder``."""
    folder = Path(folder)
    images = {"entropy and sinks per (layer, head)": "heads.png"}
    heads_figure(cap, folder / "heads.png")
    if decay_figure(cap, folder / "decay.png"):
        images["decay of attention with distance, per layer"] = "decay.png"
    images[keys_figure(cap, folder / "keys.png")] = "keys.png"
    if recalls:
        recall_figure(recalls, folder / "recall.png")
        images["recall of each method's plans per (layer, head)"] = "recall.png"
    rows = layer_rows(cap, recalls)
    (folder / "report.json").write_text(json.dumps(dict(meta=meta, layers=rows, summary=cap.summary(),
                                                        recall={n: c.summary() for n, c in recalls.items()}), indent=1))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    md = [f"# attnpatch analyze: {meta['model']}", "", meta.get("note", ""), "", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols)] + ["| " + " | ".join(fmt(r.get(c, "-")) for c in cols) + " |" for r in rows]
    md += [""] + [f"![{k}]({v})" for k, v in images.items()]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, '-'))}</td>" for c in cols) + "</tr>" for r in rows)
    figs = figures(images)
    (folder / "index.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnpatch analyze: {html.escape(meta['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} figure{{display:inline-block;margin:1em;vertical-align:top}}
img{{max-width:1000px}}</style></head>
<body><h1>attnpatch analyze: {html.escape(meta['model'])}</h1><p>{html.escape(meta.get('note', ''))}</p>
{figs}<table><tr>{head}</tr>{body}</table>
{IMAGES_LOADED}</body></html>
""")


def rewrite(folder: Path) -> None:
    """The report of ``folder`` drawn again from its capture.safetensors and recall_<i>.safetensors."""
    folder = Path(folder)
    cap = Capture.load(folder / "capture.safetensors")
    for l, (grid, text_len, _) in cap.grids.items():
        if grid is not None and not text_len:  # no text keys: no text share (runs before it was skipped)
            cap.layers[l].pop("text_mass", None), cap.layers[l].pop("visual_rows", None)
    recalls = {}
    for path in sorted(folder.glob("recall_*.safetensors"), key=lambda p: int(p.stem.split("_")[1])):
        r = Capture.load(path)
        recalls[r.meta.get("method", path.stem)] = r
    write(folder, cap, recalls, cap.meta)
