"""Sparse attention on a FLUX pipeline: stock attention vs a sparse method, same seed; prints
the time of each and the PSNR / SSIM of the sparse image against the stock one.

    python examples/flux_sparse.py                                   # the trained fixture, offline, CPU
    python examples/flux_sparse.py black-forest-labs/FLUX.1-dev      # a hub model (or a local folder)
"""
import argparse
import time

import torch

import attnpatch as ap
from attnpatch.tools.quality import psnr, ssim


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a FluxPipeline (default: builtin fixture)")
    p.add_argument("--prompt", default="a large red circle at the top left")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="flux_sparse.png")
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import flux_shapes

        pipe, kw = flux_shapes(), {}
        method = ap.SlidingTile(tile=4, window=(1, 3))  # 16x16 tokens: 4x4 tiles, a 1x3 tile window
    else:
        from diffusers import FluxPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = FluxPipeline.from_pretrained(a.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        kw = dict(height=1024, width=1024, guidance_scale=3.5)
        method = ap.SlidingTile(tile=16, window=3)  # 64x64 tokens at 1024^2: 3x3 of 16x16 tiles
    if a.steps:
        kw["num_inference_steps"] = a.steps

    def run():
        t = time.perf_counter()
        img = pipe(a.prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
        return img, time.perf_counter() - t

    stock, t_stock = run()
    with ap.patch(pipe, method):
        sparse, t_sparse = run()
    print(f"stock {t_stock:.2f} s, {method} (dense_steps={method.dense_steps}) {t_sparse:.2f} s: "
          f"speedup {t_stock / t_sparse:.2f}x, PSNR {psnr(sparse, stock):.1f} dB, SSIM {ssim(sparse, stock):.3f}")
    from PIL import Image

    pair = torch.cat([stock[0], sparse[0]], -1).clamp(0, 1)  # (3, H, 2W): stock | sparse
    Image.fromarray((pair * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(a.out)
    print(f"wrote {a.out} (left: stock, right: sparse)")


if __name__ == "__main__":
    main()
