"""``attnpatch compare``: stock attention and every method setting on the same prompts and seed,
written to a report folder: report.md, report.json, an output grid, a speed-vs-quality scatter
plot, the attention-mask pictures, and a static index.html that shows them."""
from __future__ import annotations

import html
import json
import math
import textwrap
from pathlib import Path

import torch

from .._extras import require
from ..site import Site
from ..tools.page import IMAGES_LOADED, figures
from ..tools.quality import psnr, ssim


def to_pil(img: torch.Tensor, scale: int = 1):
    from PIL import Image

    a = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(a)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save_output(out: torch.Tensor, path: Path, video_format: str = "gif") -> list[Path]:
    """Images -> PNG per item; videos -> GIF (or PNG frames) per item. Returns the files."""
    files = []
    for i, x in enumerate(out):
        if x.dim() == 3:
            p = path.with_name(f"{path.stem}_{i}.png")
            to_pil(x).save(p)
        elif video_format == "png":
            p = path.with_name(f"{path.stem}_{i}")
            p.mkdir(parents=True, exist_ok=True)
            for t, f in enumerate(x):
                to_pil(f).save(p / f"frame_{t:03d}.png")
        elif video_format == "mp4":
            raise ValueError("MP4 output needs imageio-ffmpeg, which is not a dependency; use --video-format gif or png")
        else:
            p = path.with_name(f"{path.stem}_{i}.gif")
            frames = [to_pil(f) for f in x]
            frames[0].save(p, save_all=True, append_images=frames[1:], duration=120, loop=0)
        files.append(p)
    return files


def grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 2) -> None:
    """One row per setting (label, outputs (N, 3, H, W) or middle frames of videos)."""
    from PIL import Image, ImageDraw

    tiles = [[to_pil(x if x.dim() == 3 else x[x.shape[0] // 2], scale) for x in out] for _, out in rows]
    w, h = tiles[0][0].size
    label_w = 260
    sheet = Image.new("RGB", (label_w + w * max(map(len, tiles)), h * len(tiles)), "white")
    d = ImageDraw.Draw(sheet)
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        d.text((4, r * h + 4), _wrap(label, 40), fill="black")
        for c, t in enumerate(row):
            sheet.paste(t, (label_w + c * w, r * h))
    sheet.save(path)


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


def mask_picture(plan, site: Site, S: int, path: Path, size: int = 256) -> None:
    """The plan's keep mask (batch row 0, head 0) as a black / white PNG, at most ``size`` px."""
    from PIL import Image

    from ..plan import materialise_mask

    keep = materialise_mask(plan.with_site(site.causal, site.q_offset), 1, 1, S, S, "cpu")
    keep = torch.ones(S, S) if keep is None else keep.expand(1, 1, S, S)[0, 0].float()
    if S > size:
        keep = torch.nn.functional.adaptive_avg_pool2d(keep[None, None], size)[0, 0]
    Image.fromarray(((1 - keep) * 255).byte().numpy()).resize((size, size), Image.NEAREST).save(path)


def scatter(rows: list[dict], quality: str, path: Path) -> None:
    """Speed vs quality, one marker per setting (shape by kind: stock, cache, method, both; the
    speedup's min-max over the repeats as a bar), the frontier as a dashed line, named in a
    legend below the axes (labels at the points overlapped where settings land close together)."""
    require("matplotlib", what="the compare report's speed-quality plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = (lambda v: min(v, 60.0)) if quality == "psnr" else (lambda v: v)
    rows = [r for r in rows if r.get(quality) is not None and r.get("speedup") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    colors, markers = plt.get_cmap("tab10").colors, {"stock": "*", "cache": "s", "method": "o", "method + cache": "D"}
    for i, r in enumerate(rows):
        x, err = r["speedup"], [[r["speedup"] - r.get("speedup_min", r["speedup"])], [r.get("speedup_max", r["speedup"]) - r["speedup"]]]
        ax.errorbar(x, cap(r[quality]), xerr=err if r.get("repeats", 1) > 1 else None, color=colors[i % 10],
                    marker=markers.get(r.get("kind"), "o"), ms=6, lw=0.8, capsize=2,
                    label=textwrap.fill(f"{r['setting']} [{r.get('kind', '?')}]", 88, subsequent_indent="    "))
    front = frontier(rows, quality)
    if len(front) > 1:
        ax.plot([r["speedup"] for r in front], [cap(r[quality]) for r in front], color="grey", ls="--", lw=1, zorder=0,
                label="frontier (no other setting both faster and closer to stock)")
    pts = rows
    ax.set_xlabel("speedup vs stock attention (median of repeats; bars: min-max)")
    ax.set_ylabel({"psnr": "PSNR vs stock (dB, capped at 60)", "agreement": "token agreement with stock",
                   "judged": "judged (fraction of caption attributes right)"}[quality])
    ax.axvline(1.0, color="grey", lw=0.8)
    fig.tight_layout()
    if pts:
        _legend_below(fig, ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_below(fig, ax) -> None:
    """Grow the figure by the legend's height and put the legend under the axes, inside the figure."""
    leg = fig.legend(*ax.get_legend_handles_labels(), loc="lower left", fontsize=7, frameon=False, borderaxespad=0.3)
    fig.canvas.draw()
    box = leg.get_window_extent()
    fig.set_figwidth(max(fig.get_figwidth(), box.width / fig.dpi + 0.2))  # a very long label: a wider figure, not a cut one
    h, extra = fig.get_figheight(), box.height / fig.dpi + 0.1  # inches
    fig.set_figheight(h + extra)
    for a in fig.axes:  # same size in inches as laid out, moved up by the legend's height
        box = a.get_position()
        a.set_position([box.x0, (extra + box.y0 * h) / (h + extra), box.width, box.height * h / (h + extra)])


def quality_of(kind: str, out, ref, judge=None) -> dict:
    """Quality vs stock's output of the same seed: PSNR and SSIM (images, videos) or token
    agreement (LLMs); with ``judge`` (the fixtures' pixel judge) also the fraction judged right."""
    if kind == "diffusion":
        q = dict(psnr=psnr(out, ref), ssim=ssim(out.flatten(0, -4), ref.flatten(0, -4)))
        if judge is not None:
            q["judged"] = judge(out)
        return q
    from .runner import token_agreement

    return dict(agreement=token_agreement(out, ref))


def judge_for(model: str, prompts: list[str]):
    """The builtin fixtures' pixel judge as ``outputs -> fraction of caption attributes read back
    right`` (only those each caption names), or None for other models / captions it cannot read."""
    if model not in ("flux-shapes", "wan-shapes"):
        return None
    from ..models import shapes

    wants = [{k: v for k, v in shapes._parse(p).items() if v is not None} for p in prompts]
    if not all(wants):
        return None
    fn = shapes.judge if model == "flux-shapes" else shapes.judge_clip

    def judge(out) -> float:
        scores = [[v for k, v in fn(o.float().clamp(0, 1), p).items() if k in w] for o, p, w in zip(out, prompts, wants)]
        return sum(sum(s) / len(s) for s in scores if s) / len(scores)

    return judge


def _beats(a: dict, b: dict, q: str) -> bool:
    """``a`` at least as fast and at least as good as ``b``, and strictly better in one of them."""
    return (a["speedup"] >= b["speedup"] and a[q] >= b[q]) and (a["speedup"] > b["speedup"] or a[q] > b[q])


def frontier(rows: list[dict], q: str = "psnr") -> list[dict]:
    """The speed-quality (Pareto) frontier: rows no other row beats, slowest first."""
    pts = [r for r in rows if r.get("speedup") is not None and r.get(q) is not None]
    return sorted((r for r in pts if not any(_beats(o, r, q) for o in pts)), key=lambda r: r["speedup"])


def _at(r: dict, q: str) -> str:
    v = r[q]
    qual = ("identical to stock" if math.isinf(v) else f"{v:.1f} dB") if q == "psnr" else f"{q.replace('agreement', 'token agreement')} {v:.3f}"
    spread = f", {r['speedup_min']:.2f}-{r['speedup_max']:.2f}x over {r['repeats']} repeats" if r.get("repeats", 1) > 1 else ""
    return f"{r['setting']} ({r['speedup']:.2f}x{spread}; {qual})"


def statement(rows: list[dict], q: str = "psnr") -> str:
    """In words, from the numbers: which settings are on the frontier, and whether a method or a
    method + cache beats the best caches alone (faster at equal-or-better quality, or better
    quality at equal-or-better speed); true whichever way it comes out."""
    front = frontier(rows, q)
    what = {"psnr": "PSNR vs stock", "agreement": "token agreement with stock", "judged": "judged caption accuracy"}.get(q, q)
    good = "well judged" if q == "judged" else "close to stock"  # judged: read from the pixels, not vs stock
    text = [f"On the speed-quality frontier (speedup; {what}; no other setting is both at least as fast and at least as "
            f"{good}): "
            + "; ".join(_at(r, q) for r in front) + "."]
    pts = [r for r in rows if r.get("speedup") is not None and r.get(q) is not None]
    wide = max((r["speedup_max"] / r["speedup_min"] for r in pts if r.get("repeats", 1) > 1 and r["speedup_min"] > 0), default=1)
    if wide > 1.5:  # the load changed under the runs: say so before any speed claim is read
        text.append(f"Caution: a speedup varied {wide:.1f}x between repeats (the machine's load changed); rerun on a quiet "
                    "machine or with more --repeats before trusting small speed differences.")
    ours = [r for r in pts if r.get("kind", "").startswith("method")]  # with or without cache / coarse-to-fine
    best = frontier([r for r in pts if r.get("kind") == "cache"], q)
    if not best:
        faster = [r["setting"] for r in ours if r["speedup"] > 1]
        text.append("No diffusers cache was compared. " + (f"Faster than stock: {', '.join(faster)}." if faster
                                                             else "No method setting was faster than stock."))
        return " ".join(text)
    text.append("Best caches alone (no other cache beats them): " + "; ".join(_at(c, q) for c in best) + ".")
    ahead = [(o, c) for c in best for o in ours if _beats(o, c, q)]
    if not ours:
        text.append("No method was compared.")
    elif not ahead:
        text.append("No method or method + cache is ahead of them: each is slower at equal-or-better "
                    f"{what} or lower in {what} at equal-or-better speed, or both.")
    for o, c in ahead:
        noisy = o["speedup"] > c["speedup"] and o.get("speedup_min", o["speedup"]) <= c.get("speedup_max", c["speedup"])
        text.append(f"Ahead of {c['setting']}: {_at(o, q)}" + (" (its speed lead is within the spread of the repeats)"
                                                               if noisy else "") + ".")
    return " ".join(text)


def write(folder: Path, meta: dict, rows: list[dict], kind: str, images: dict) -> None:
    """report.json, report.md and index.html in ``folder`` (pictures already there)."""
    (folder / "report.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    cols = ["setting", "kind", "seconds", "speedup", "spread", "density", "recall"] + (
        ["psnr", "ssim"] + (["judged"] if any("judged" in r for r in rows) else []) if kind == "diffusion" else ["agreement"])
    cols += [c for c in ("color", "shape", "place", "copies") if any(c in r for r in rows)]  # --refine-from's pixel judge
    rows_shown = [dict(r, spread=spread(r)) for r in rows]

    def fmt(v):
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    md = [f"# attnpatch compare: {meta['model']}", "", meta.get("statement", ""), "", f"{meta['note']}", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows_shown]
    md += [""] + [f"- {r['setting']}: failed: {r['error']}" for r in rows if "error" in r]
    md += [""] + [f"![{k}]({v})" for k, v in images.items()]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows_shown)
    imgs = figures(images)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnpatch compare: {html.escape(meta['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:1em;vertical-align:top}} img{{max-width:900px;image-rendering:pixelated}}</style></head>
<body><h1>attnpatch compare: {html.escape(meta['model'])}</h1><p>{html.escape(meta.get('statement', ''))}</p>
<p>{html.escape(meta['note'])}</p>
<table><tr>{head}</tr>{body}</table>{imgs}
{IMAGES_LOADED}</body></html>
"""
    (folder / "index.html").write_text(page)


def spread(r: dict) -> str | None:
    """The speedup's min-max over the repeats, or None with one repeat (no spread claimed)."""
    return f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if r.get("repeats", 1) > 1 else None
