"""Report on the trained fixtures (attnpatch.models): sample grids, caption-following accuracy,
training curves, and the learned attention (mass vs spatial / temporal distance, sink share per
layer) of the trained transformers next to randomly initialised ones of the same architecture.

    python benchmarks/fixtures.py                               # committed weights
    python benchmarks/fixtures.py --retrained-flux DIR --retrained-wan DIR   # also a fresh training run

Writes benchmarks/results/fixtures.{md,json} and pictures in benchmarks/results/fixtures/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.models import fixtures, shapes  # noqa: E402
from attnpatch.methods.probe import AttentionStats  # noqa: E402
from common import machine, write  # noqa: E402

FLUX_CAPTIONS = ["a large red circle at the top left", "a large green square at the top right", "a large blue triangle in the center",
                 "a large yellow circle at the bottom left", "a small white square at the bottom right", "a large magenta triangle on the left",
                 "a large cyan square on the right", "a small orange circle at the top", "a large red triangle at the bottom",
                 "a large blue circle at the bottom right", "a small green triangle in the center", "a large white circle at the top"]
WAN_CAPTIONS = ["a large red square moving right", "a large blue circle moving left", "a large yellow triangle moving down",
                "a large green circle moving up"]


def _label(img: torch.Tensor, text: str, scale: int):
    """PIL image of (3, H, W) in [0, 1], upscaled, with ``text`` under it."""
    from PIL import Image, ImageDraw

    a = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (im.width, im.height + 24), "white")
    canvas.paste(im, (0, 0))
    d = ImageDraw.Draw(canvas)
    words = text.replace("a ", "", 1).split()
    d.text((2, im.height + 1), " ".join(words[:3]), fill="black")
    d.text((2, im.height + 12), " ".join(words[3:]), fill="black")
    return canvas


def grid_png(imgs, captions, path: Path, cols: int = 6, scale: int = 2):
    from PIL import Image

    tiles = [_label(i, c, scale) for i, c in zip(imgs, captions)]
    w, h = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (w * cols, h * rows), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, (i // cols) * h))
    sheet.save(path)


def flux_images(pipe, captions, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = pipe(captions, generator=g, output_type="pt").images  # (N, 3, 64, 64) in [0, 1]
    return out


def wan_clips(pipe, captions, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = pipe(captions, generator=g, output_type="pt").frames  # (N, T, 3, H, W) in [0, 1]
    return torch.as_tensor(out)


def accuracy(judged: list[dict]) -> dict:
    return {k: sum(j[k] for j in judged) / len(judged) for k in judged[0]}


def video_files(clips: torch.Tensor, captions, stem: Path, scale: int = 3):
    """A GIF whose frames are a row of clips, and a PNG strip (one row per clip)."""
    from PIL import Image

    frames = []
    for t in range(clips.shape[1]):
        row = [_label(clips[i, t], captions[i], scale) for i in range(len(captions))]
        im = Image.new("RGB", (sum(r.width for r in row), row[0].height), "white")
        for i, r in enumerate(row):
            im.paste(r, (i * r.width, 0))
        frames.append(im)
    frames[0].save(stem.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=150, loop=0)
    strip = torch.cat([torch.cat(list(clips[i]), -1) for i in range(len(captions))], -2)  # (3, N*H, T*W)
    grid_png([strip], [""], stem.with_name(stem.name + "_frames.png"), cols=1, scale=scale)


def attention(pipe, captions, kind: str) -> dict:
    """Locality and sink statistics of the trained transformer and a random-init one."""
    comps = (fixtures.flux_components if kind == "flux" else fixtures.wan_components)(seed=0)
    out = {}
    for name, transformer in (("trained", pipe.transformer), ("random", comps["transformer"])):
        p = type(pipe)(**{**pipe.components, "transformer": transformer})
        p.set_progress_bar_config(disable=True)
        stats = AttentionStats()
        with ap.patch(p, stats):
            call = flux_images if kind == "flux" else wan_clips
            call(p, captions)
        out[name] = dict(locality=stats.locality(), summary=stats.summary())
    return out


def plot_attention(att: dict, kind: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = ["spatial"] + (["temporal"] if kind == "wan" else [])
    fig, axes = plt.subplots(1, len(axes_names) + 1, figsize=(5 * (len(axes_names) + 1), 3.8))
    for ax, name in zip(axes, axes_names):
        for which, style in (("trained", "-"), ("random", ":")):
            for layer, d in att[which]["locality"].items():
                ax.plot(d[name], style, marker="o", ms=3, label=f"{which} layer {layer}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"{name} distance (tokens{', same frame' if kind == 'wan' and name == 'spatial' else ''})")
        ax.set_ylabel("attention per key / uniform")
        ax.set_title(f"{kind}: attention vs {name} distance")
    axes[0].legend(fontsize=6, ncol=2)
    ax = axes[-1]
    for i, which in enumerate(("trained", "random")):
        s = att[which]["summary"]
        ax.bar([l + 0.4 * i for l in s], [v["sink"] for v in s.values()], width=0.4, label=which)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the most-attended key")
    ax.set_title("sink mass per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(logs: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, log in logs.items():
        for ax, key, field in ((axes[0], "vae", "mse"), (axes[1], "denoiser", "loss")):
            y = torch.tensor([r[field] for r in log[key]])
            k = min(50, len(y))
            smooth = torch.nn.functional.avg_pool1d(y[None, None], k, 1)[0, 0]
            ax.plot(range(k - 1, len(y)), smooth, label=name)
    axes[0].set_title("autoencoder reconstruction MSE")
    axes[1].set_title("denoiser rectified-flow loss (50-step mean)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


def evaluate(kind: str, folder, out_dir: Path, tag: str, n: int) -> dict:
    """Samples, accuracy and generation time of one trained folder."""
    load = fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes
    pipe = load(folder)
    res = {"folder": str(folder or fixtures.WEIGHTS / f"{kind}-shapes")}
    if kind == "flux":
        imgs, res["seconds_12_images"] = _timed(flux_images, pipe, FLUX_CAPTIONS)
        grid_png(imgs, FLUX_CAPTIONS, out_dir / f"flux_samples_{tag}.png")
        _, caps = shapes.images(n, seed=4242)
        gen = torch.cat([flux_images(pipe, caps[i:i + 16], seed=i) for i in range(0, n, 16)])
        res["accuracy"] = accuracy([shapes.judge(g, c) for g, c in zip(gen, caps)])
    else:
        clips, res["seconds_4_clips"] = _timed(wan_clips, pipe, WAN_CAPTIONS)
        video_files(clips, WAN_CAPTIONS, out_dir / f"wan_samples_{tag}")
        _, caps = shapes.clips(n, seed=4242)
        gen = torch.cat([wan_clips(pipe, caps[i:i + 8], seed=i) for i in range(0, n, 8)])
        res["accuracy"] = accuracy([shapes.judge_clip(g, c) for g, c in zip(gen, caps)])
    res["round_trip"] = round_trip(kind, pipe.vae, n)
    log = Path(res["folder"]) / "train_log.json"
    res["train_log"] = json.loads(log.read_text()) if log.is_file() else None
    return res, pipe


@torch.no_grad()
def round_trip(kind: str, vae, n: int) -> dict:
    """The judge on training data passed through the autoencoder alone (encode, decode): what the
    denoiser can at best express in its latent space."""
    x, caps = (shapes.images if kind == "flux" else shapes.clips)(n, seed=4242)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mode()).sample for i in range(0, n, 16)])
    rec = ((rec.clamp(-1, 1) + 1) / 2).float()
    if kind == "flux":
        return accuracy([shapes.judge(r, c) for r, c in zip(rec, caps)])
    return accuracy([shapes.judge_clip(r.transpose(0, 1), c) for r, c in zip(rec, caps)])


def truth(kind: str, n: int) -> dict:
    """The judge on the training data itself: the ceiling of the accuracy columns."""
    if kind == "flux":
        x, caps = shapes.images(n, seed=4242)
        return accuracy([shapes.judge((i + 1) / 2, c) for i, c in zip(x, caps)])
    x, caps = shapes.clips(n, seed=4242)
    return accuracy([shapes.judge_clip(((v + 1) / 2).transpose(0, 1), c) for v, c in zip(x, caps)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flux", default=None, help="trained FLUX fixture folder (default: committed)")
    p.add_argument("--wan", default=None, help="trained Wan fixture folder (default: committed)")
    p.add_argument("--retrained-flux", default=None, help="a second training run to compare with")
    p.add_argument("--retrained-wan", default=None)
    p.add_argument("--n", type=int, default=48, help="captions judged per model")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fixtures"))
    a = p.parse_args(argv)
    out = Path(a.out)
    pics = out.parent / out.name
    pics.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = {"machine": machine(), "models": {}}
    for kind, folder, again in (("flux", a.flux, a.retrained_flux), ("wan", a.wan, a.retrained_wan)):
        res, pipe = evaluate(kind, folder, pics, "committed", a.n)
        entry = {"committed": res, "truth": truth(kind, a.n)}
        if again:
            entry["retrained"], _ = evaluate(kind, again, pics, "retrained", a.n)
        caps = FLUX_CAPTIONS[:4] if kind == "flux" else WAN_CAPTIONS
        entry["attention"] = attention(pipe, caps, kind)
        plot_attention(entry["attention"], kind, pics / f"attention_{kind}.png")
        data["models"][kind] = entry
    logs = {f"{k} {w}": e[w]["train_log"] for k, e in data["models"].items() for w in ("committed", "retrained")
            if w in e and e[w]["train_log"]}
    plot_training(logs, pics / "training.png")
    for e in data["models"].values():  # the curves are in the plot; keep the JSON small
        for w in ("committed", "retrained"):
            if w in e and e[w]["train_log"]:
                log = e[w].pop("train_log")
                e[w]["train_seconds"], e[w]["final_loss"] = log["seconds"], sum(r["loss"] for r in log["denoiser"][-100:]) / 100
    write(out.parent / "fixtures", "Trained fixtures: samples, caption accuracy, learned attention", INTRO, body(data, pics.name), data)


INTRO = ("Small FLUX- and Wan-architecture models trained here from scratch on procedural data "
         "(`python -m attnpatch.models.train flux|wan`, seed 0, 2 CPU cores), loaded with `attnpatch.models.flux_shapes()` / "
         "`wan_shapes()` as stock diffusers pipelines. Accuracy is read from the pixels by `attnpatch.models.shapes.judge` "
         "(dominant colour, fill ratio of the bounding box, centroid cell; for clips the centroid's motion), on captions "
         "the sample sheets do not use; the `truth` row is the same judge on the training data (its ceiling).")


def body(data: dict, pics: str) -> str:
    lines = []
    for kind, e in data["models"].items():
        lines.append(f"## {kind}\n")
        lines.append("| weights | " + " | ".join(e["truth"]) + " | train time (s) | final loss | generation time (s) |")
        lines.append("|---|" + "---|" * (len(e["truth"]) + 3))
        lines.append("| truth (training data) | " + " | ".join(f"{v:.2f}" for v in e["truth"].values()) + " | - | - | - |")
        for w in ("committed", "retrained"):
            if w in e:
                r = e[w]
                gen = r.get("seconds_12_images", r.get("seconds_4_clips"))
                lines.append(f"| {w} | " + " | ".join(f"{v:.2f}" for v in r["accuracy"].values())
                             + f" | {r.get('train_seconds', 0):.0f} | {r.get('final_loss', 0):.4f} | {gen:.1f} |")
                if "round_trip" in r:
                    lines.append(f"| {w}: autoencoder round trip of the training data | "
                                 + " | ".join(f"{v:.2f}" for v in r["round_trip"].values()) + " | - | - | - |")
        lines.append("")
        what = "12 images" if kind == "flux" else "4 clips of 9 frames"
        lines.append(f"Generation time is for {what} in one call (20 steps with classifier-free guidance).\n")
        if kind == "flux":
            for w in ("committed", "retrained"):
                if w in e:
                    lines.append(f"{w} weights, seed 0:\n\n![{w}]({pics}/flux_samples_{w}.png)\n")
        else:
            for w in ("committed", "retrained"):
                if w in e:
                    lines.append(f"{w} weights, seed 0 (GIF; every frame as a strip below):\n\n![{w}]({pics}/wan_samples_{w}.gif)\n\n"
                                 f"![{w} frames]({pics}/wan_samples_{w}_frames.png)\n")
        att = e["attention"]
        lines.append(f"Learned attention (solid: trained, dotted: random init; per key relative to uniform, log scale):\n\n"
                     f"![attention]({pics}/attention_{kind}.png)\n")
        lines.append("| layer | trained: attention at distance 0 / uniform | random | trained: farthest distance / uniform | random "
                     "| trained sink share | random sink share |")
        lines.append("|---|---|---|---|---|---|---|")
        for layer in att["trained"]["locality"]:
            t, r = att["trained"]["locality"][layer]["spatial"], att["random"]["locality"][layer]["spatial"]
            ts, rs = att["trained"]["summary"][layer]["sink"], att["random"]["summary"][layer]["sink"]
            lines.append(f"| {layer} | {t[0]:.2f} | {r[0]:.2f} | {t[-1]:.2f} | {r[-1]:.2f} | {ts:.3f} | {rs:.3f} |")
        lines.append("")
    lines.append("## Training curves\n\n![training](fixtures/training.png)\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
