"""Sparse attention end to end on diffusion transformers.

Speed: one denoiser forward (a few blocks at the real layer dimensions, random weights) with
stock attention vs each sparse method patched in, same process: FLUX.1-dev blocks (3072 wide,
24 heads x 128, 512 text tokens) at 1024^2 and 2048^2, Wan2.1-1.3B blocks (1536 wide, 12 heads,
FFN 8960) at 480x832 with 33 and 81 frames. Reported: block density of the plans, the measured
attention share of the dense forward, the Amdahl bound 1 / ((1 - share) + share * density),
the speedup reached and its fraction of the bound.

Quality: the trained fixtures (attnpatch.models): final images / frames of each method vs stock
attention with the same seed (PSNR, SSIM), and recall, the fraction of the dense attention
mass the plans keep, with image / frame grids.

    python benchmarks/pipelines.py                  # both parts, writes benchmarks/results/pipelines.{md,json}
    python benchmarks/pipelines.py --part quality   # only the trained-model quality part (keeps the other part's rows)
    python benchmarks/pipelines.py --quick          # tiny shapes: a smoke test (writes under the temp folder)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.methods.observe import Observed  # noqa: E402
from attnpatch.methods.probe import Recall  # noqa: E402
from attnpatch.tools.quality import psnr, ssim  # noqa: E402
from common import bench_dtype, machine, out_stem, pick_device, table, timeit, to_device, write  # noqa: E402

NA, STA, RAD, TOPK = ap.Neighborhood, ap.SlidingTile, ap.Radial, ap.TopKBlocks
DENSE_STEPS = ap.methods.schedule.DENSE_STEPS

SPEED = {  # name: (model, latent shape, blocks, methods)
    "flux-1024": ("flux", (128, 128), (1, 1), [NA(window=21, tile=16), STA(tile=16, window=(1, 3)), TOPK(keep=0.25, block=16)]),
    "flux-2048": ("flux", (256, 256), (0, 1), [NA(window=41, tile=16), STA(tile=16, window=3), TOPK(keep=0.125, block=16)]),
    "wan-480p-33f": ("wan", (9, 60, 104), (2,), [NA(window=(3, 15, 25)), STA(tile=(3, 6, 13), window=(1, 3, 3)),
                                                 RAD(window=1, decay=2.0, dense_frames=1, tile=(30, 26)), TOPK(keep=0.15, block=(3, 6, 13))]),
    "wan-480p-81f": ("wan", (21, 60, 104), (1,), [NA(window=(5, 15, 25)), STA(tile=(3, 6, 13), window=(1, 3, 3)),
                                                  RAD(window=1, decay=2.0, dense_frames=1, tile=(30, 26)), TOPK(keep=0.1, block=(3, 6, 13))]),
}
QUICK = {
    "flux-quick": ("flux", (32, 32), (1, 1), [STA(tile=4, window=(1, 3)), TOPK(keep=0.25, block=4)]),
    "wan-quick": ("wan", (3, 16, 16), (1,), [STA(tile=(1, 4, 4), window=(1, 3, 3)), RAD(window=1, tile=(4, 4))]),
}


def flux_model(blocks, quick: bool):
    from diffusers import FluxTransformer2DModel

    dims = dict(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, pooled_projection_dim=32,
                axes_dims_rope=(8, 12, 12)) if quick else dict(num_attention_heads=24, attention_head_dim=128,
                                                               joint_attention_dim=4096, pooled_projection_dim=768,
                                                               axes_dims_rope=(16, 56, 56))
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                                  guidance_embeds=True, **dims)


def flux_inputs(model, latent, text=512):
    from diffusers import FluxPipeline

    h, w = latent[0] // 2, latent[1] // 2
    cfg = model.config
    return dict(hidden_states=torch.randn(1, h * w, cfg.in_channels), encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32),
                txt_ids=torch.zeros(text, 3), return_dict=False)


def wan_model(blocks, quick: bool):
    from diffusers import WanTransformer3DModel

    dims = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64, freq_dim=32) if quick else \
        dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)
    return WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_layers=blocks[0],
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", **dims)


def wan_inputs(model, latent, text=512):
    return dict(hidden_states=torch.randn(1, 16, *latent), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, text, model.config.text_dim), return_dict=False)


def _attention_seconds(model, kind, latent, text, reps, device="cpu", dtype=torch.float32) -> tuple[float, int]:
    """Dense SDPA time of the sparsifiable calls of one forward (joint / self attention), and
    their token count, measured on the same shapes."""
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.attention_head_dim
    if kind == "flux":
        S, calls = latent[0] // 2 * latent[1] // 2 + text, cfg.num_layers + cfg.num_single_layers
    else:
        S, calls = latent[0] * latent[1] // 2 * latent[2] // 2, cfg.num_layers
    q, k, v = (torch.randn(1, H, S, D, device=device, dtype=dtype) for _ in range(3))
    t = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), reps=reps)
    return t * calls, S


class _Density:
    """A watcher for ``Observed``: the block density of each plan (the fraction a kernel computes)."""

    def __init__(self):
        self.densities = []

    def __call__(self, q, k, site, groups):
        if site.kind != "cross":
            self.densities += [1.0 if p is None or p.blocks is None else p.blocks.density() for _, p in groups]


def speed(configs: dict, quick: bool, reps: int, device="cpu") -> list[dict]:
    rows, dtype = [], bench_dtype(device)
    for name, (kind, latent, blocks, methods) in configs.items():
        torch.manual_seed(0)
        model = (flux_model if kind == "flux" else wan_model)(blocks, quick).eval()
        inputs = (flux_inputs if kind == "flux" else wan_inputs)(model, latent, 16 if quick else 512)
        model, inputs = model.to(device, dtype), to_device(inputs, device, dtype)
        with torch.inference_mode():
            dense = timeit(lambda: model(**inputs), reps=reps)
            attn, S = _attention_seconds(model, kind, latent, 16 if quick else 512, reps, device, dtype)
            share = min(attn / dense, 1.0)
            print(f"{name}: {S} tokens, dense forward {dense:.2f} s, attention share {share:.3f}", flush=True)
            for m in methods:
                probe = _Density()
                with ap.patch(model, Observed(m, probe)):
                    t = timeit(lambda: model(**inputs), reps=reps)
                density = sum(probe.densities) / max(1, len(probe.densities))
                bound = 1 / ((1 - share) + share * density)
                row = dict(config=name, tokens=S, blocks="+".join(map(str, blocks)), method=repr(m), density=density,
                           attention_share=share, dense_s=dense, method_s=t, speedup=dense / t, bound=bound,
                           fraction=dense / t / bound)
                print(f"  {row['method']}: density {density:.3f}, {row['speedup']:.2f}x (bound {bound:.2f}x, "
                      f"{row['fraction']:.2f} of it)", flush=True)
                rows.append(row)
        model = inputs = None  # free the blocks before the next config
    return rows


def estimator_cost(quick: bool, device="cpu") -> dict:
    """TopKBlocks' block-score estimation vs dense SDPA at 16K tokens (FLUX-like: 24 heads x 128)."""
    from attnpatch import Site

    grid, H = ((32, 32), 2) if quick else ((128, 128), 24)
    S = grid[0] * grid[1]
    q, k, v = (torch.randn(1, H, S, 128, device=device, dtype=bench_dtype(device)) for _ in range(3))
    m, site = TOPK(keep=0.125, block=16), Site(grid=grid)
    lay = m._layouts.get(site, S, q.device)
    est = timeit(lambda: m.select(m.estimate(q, k, site, lay), lay["forced"]), reps=3)
    dense = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), reps=1)
    row = dict(tokens=S, heads=H, estimate_s=est, dense_s=dense, share=est / dense)
    print(f"TopKBlocks estimator at {S} tokens x {H} heads: {est:.4f} s, {est / dense:.3f} of dense SDPA", flush=True)
    return row


def label(m) -> str:
    return repr(m) + (f" + dense_steps={m.dense_steps}" if hasattr(m, "dense_steps") else "")


SWEEP = (0, 0.1, 0.25, 0.3, 0.4, 0.5)  # dense_steps: fractions of the 20 steps (0.4 is the default)
# The fixtures' grids are small (FLUX 16x16 image tokens, Wan 5x8x8 video tokens), so the methods'
# ~256-token default tiles would cover them (dense): tiles of 4x4 tokens keep 4 tiles per side,
# as the default 16-token tiles do on FLUX at 1024^2 (64x64 tokens).
SCALED = {
    "flux": [NA(window=7, tile=4), STA(tile=4, window=(1, 3)), TOPK(keep=0.25, block=4)],
    "wan": [NA(window=(3, 5, 5)), STA(tile=(1, 4, 4), window=(3, 1, 1)), RAD(window=1, decay=2.0, dense_frames=0, tile=(4, 4)),
            TOPK(keep=0.25, block=(1, 4, 4))],
}
QUALITY = {kind: [dataclasses.replace(m, dense_steps=d) for m in ms for d in SWEEP]
           + ([TOPK(mass=0.9, block=4)] if kind == "flux" else []) + [NA(), STA(), TOPK()] + ([RAD()] if kind == "wan" else [])
           for kind, ms in SCALED.items()}
CAPTIONS = {
    "flux": ["a large red circle at the top left", "a large green square at the top right", "a large blue triangle in the center",
             "a large yellow circle at the bottom left", "a small white square at the bottom right", "a large magenta triangle on the left",
             "a large cyan square on the right", "a small orange circle at the top"],
    "wan": ["a large red square moving right", "a large blue circle moving left", "a large yellow triangle moving down",
            "a large green circle moving up"],
}


def _generate(pipe, kind, captions):
    g = torch.Generator().manual_seed(0)
    if kind == "flux":
        return pipe(captions, generator=g, output_type="pt").images  # (N, 3, H, W)
    return torch.as_tensor(pipe(captions, generator=g, output_type="pt").frames)  # (N, T, 3, H, W)


def judged(kind: str, out, caps) -> float:
    """Fraction of caption attributes (colour / shape / place or motion) the pixel judge reads
    back from the outputs (``attnpatch.models.shapes``)."""
    from attnpatch.models import shapes

    fn = shapes.judge if kind == "flux" else shapes.judge_clip
    scores = [fn(o.float().clamp(0, 1), c) for o, c in zip(out, caps)]
    return sum(sum(s.values()) / len(s) for s in scores) / len(scores)


def quality(out_dir: Path, methods: dict | None = None) -> list[dict]:
    from attnpatch.models import fixtures
    from fixtures import grid_png  # benchmarks/fixtures.py

    rows = []
    for kind, ms in (methods or QUALITY).items():
        pipe = (fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes)()
        caps = CAPTIONS[kind]
        ref = _generate(pipe, kind, caps)
        rows.append(dict(model=kind, method="stock attention", density=1.0, recall=1.0, psnr=float("inf"), ssim=1.0,
                         judged=judged(kind, ref, caps)))
        shown = [ref[:4] if kind == "flux" else ref[:4, ref.shape[1] // 2]]
        names = ["stock attention"]
        for m in ms:
            rec = Recall()
            with ap.patch(pipe, Observed(m, rec)):
                out = _generate(pipe, kind, caps)
            s = rec.summary()
            row = dict(model=kind, method=label(m), density=s["density"], recall=s["recall"], psnr=psnr(out, ref), ssim=ssim(out, ref),
                       judged=judged(kind, out, caps))
            print(f"{kind} {row['method']}: density {row['density']:.3f}, recall {row['recall']:.3f}, PSNR {row['psnr']:.1f} dB, "
                  f"SSIM {row['ssim']:.3f}", flush=True)
            rows.append(row)
            if getattr(m, "dense_steps", 0) in (0, DENSE_STEPS):  # the pictures: no dense steps and the default
                shown.append(out[:4] if kind == "flux" else out[:4, out.shape[1] // 2])
                names.append(label(m))
        imgs = [img for group in shown for img in group]
        caps_shown = [f"{n[:40]}" if i == 0 else "" for n in names for i in range(4)]
        grid_png(imgs, caps_shown, out_dir / f"quality_{kind}.png", cols=4, scale=2)
        with open(out_dir / f"quality_{kind}_rows.txt", "w") as f:
            f.write("\n".join(f"row {i}: {n}" for i, n in enumerate(names)) + "\n")
    return rows


INTRO = (
    "Speed rows: one denoiser forward of a few transformer blocks at the real layer dimensions (random weights, float32, "
    "batch 1, text 512 tokens), stock attention vs the method patched in with `attnpatch.patch(model, method)` (kernel chosen "
    "automatically: `tiles` on this CPU); median of the timed runs after a warm-up, dense and sparse in the same process. "
    "density = block density of the plans (fraction of the score matrix computed, text rows / columns included); "
    "attention share = dense SDPA time of the sparsified calls / dense forward time, measured on the same shapes; "
    "bound = Amdahl bound 1 / ((1 - share) + share x density); fraction = speedup / bound.\n\n"
    "Quality rows: the trained fixtures (`attnpatch.models.flux_shapes()`: 16x16 image tokens + 16 text tokens; "
    "`wan_shapes()`: 5x8x8 video tokens), 20 denoising steps with CFG, seed 0, 8 captions (FLUX) / 4 clips (Wan); PSNR and "
    "SSIM of the final images / every frame against stock attention with the same seed; recall = mean over calls of the "
    "fraction of the dense attention mass the method's plan keeps (its own trajectory); caption attributes judged right = "
    "the pixel judge of `attnpatch.models.shapes` (colour, shape, place / motion) on the outputs, stock attention's own "
    "score first. dense_steps is swept as a fraction of the 20 steps (0.1 = 2 steps, 0.25 = 5, 0.3 = 6, 0.4 = 8, "
    "0.5 = 10); block density and recall count the dense steps. The methods' own tiles (~256 tokens) would cover these "
    "tiny grids, so the sweep uses 4x4-token tiles (4 tiles per side, as the 16-token default tiles on FLUX at 1024^2); "
    "the last rows are the literal defaults.")


def _defaults_summary(rows: list[dict]) -> str:
    """The default schedule's numbers per model, read from the sweep rows."""
    out = [f"**Default schedule** (`dense_steps={DENSE_STEPS}`, the 4x4-token tiles above):"]
    for kind in dict.fromkeys(r["model"] for r in rows):
        want = {f"{m!r} + dense_steps={DENSE_STEPS}" for m in SCALED.get(kind, [])}
        mine = [r for r in rows if r["model"] == kind and r["method"] in want]
        if not mine:
            continue
        stock = next(r["judged"] for r in rows if r["model"] == kind and r["method"] == "stock attention")
        lo = lambda k: min(r[k] for r in mine)  # noqa: E731
        hi = lambda k: max(r[k] for r in mine)  # noqa: E731
        out.append(f"- {kind}: PSNR {lo('psnr'):.1f}-{hi('psnr'):.1f} dB, SSIM {lo('ssim'):.3f}-{hi('ssim'):.3f} vs stock "
                   f"attention; caption attributes judged right {lo('judged'):.2f}-{hi('judged'):.2f} (stock {stock:.2f}); "
                   f"block density {lo('density'):.2f}-{hi('density'):.2f} over the whole generation ({len(mine)} methods).")
    return "\n".join(out)


def render(data: dict) -> str:
    parts = []
    if data.get("speed"):
        parts.append("## Speed: denoiser forward, dense vs sparse\n\n" + table(data["speed"], [
            ("config", "config"), ("tokens", "tokens"), ("blocks", "blocks (double+single / layers)"), ("method", "method"),
            ("density", "block density"), ("attention_share", "attention share"), ("dense_s", "dense (s)"), ("method_s", "patched (s)"),
            ("speedup", "speedup"), ("bound", "Amdahl bound"), ("fraction", "fraction of bound")]))
    if data.get("speed"):
        f = DENSE_STEPS
        rows = [dict(config=r["config"], method=r["method"], speedup=r["speedup"], generation=1 / (f + (1 - f) / r["speedup"]))
                for r in data["speed"]]
        parts.append(f"A whole generation with the default schedule (`dense_steps={f}`: the first {f:.0%} of the steps dense) "
                     f"gains 1 / ({f} + {1 - f:.2f} / speedup) from these measured per-step speedups:\n\n" + table(rows, [
                         ("config", "config"), ("method", "method"), ("speedup", "per sparse step"),
                         ("generation", f"whole generation, dense_steps={f}")]))
    if data.get("estimator"):
        e = data["estimator"]
        parts.append(f"TopKBlocks block-score estimation (mean-pool q / k per tile, tile logits, selection) at {e['tokens']} tokens, "
                     f"{e['heads']} heads x 128: {e['estimate_s'] * 1e3:.1f} ms vs {e['dense_s'] * 1e3:.0f} ms for dense SDPA "
                     f"(**{100 * e['share']:.2f} %** of dense attention).")
    if data.get("quality"):
        parts.append("## Quality on the trained fixtures (vs stock attention, same seed)\n\n" + table(data["quality"], [
            ("model", "model"), ("method", "method"), ("density", "block density"), ("recall", "attention recall"),
            ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("judged", "caption attributes judged right")]))
        parts.append(_defaults_summary(data["quality"]))
        parts.append("Rows of the grids: stock attention first, then each method with dense_steps=0 and with the default "
                     f"dense_steps={DENSE_STEPS}, in table order, then the literal defaults (first 4 captions; Wan: middle frame).\n\n"
                     "![flux](pipelines/quality_flux.png)\n\n![wan](pipelines/quality_wan.png)")
    return "\n\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(SPEED)}")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--models", default="flux,wan", help="quality part: which trained fixtures (others' rows are kept)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test (written under the temp folder)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="speed part only (bf16 on a GPU; writes benchmarks/results/gpu/pipelines_cuda); quality runs on the CPU")
    p.add_argument("--out", default=None, help="output stem; default benchmarks/results/pipelines, under the temp folder for --quick")
    a = p.parse_args(argv)
    a.device = pick_device(p, a.device)
    out = out_stem("pipelines" if a.device == "cpu" else f"gpu/pipelines_{a.device}", a.out, "--quick" if a.quick else None)
    pics = out.parent / out.name
    pics.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    data = {"machine": machine(), "speed": old.get("speed", []), "quality": old.get("quality", []), "estimator": old.get("estimator")}
    if a.part in ("speed", "all"):
        configs = QUICK if a.quick else {k: v for k, v in SPEED.items() if a.configs is None or k in a.configs.split(",")}
        new = speed(configs, a.quick, a.reps, a.device)
        data["speed"] = [r for r in data["speed"] if r["config"] not in configs] + new
        data["estimator"] = estimator_cost(a.quick, a.device)
    if a.part in ("quality", "all"):
        chosen = a.models.split(",")
        new = quality(pics, {k: v for k, v in QUALITY.items() if k in chosen})
        data["quality"] = [r for r in data["quality"] if r["model"] not in chosen] + new
    write(out, "Sparse attention end to end on diffusion transformers", INTRO, render(data), data)


if __name__ == "__main__":
    main()
