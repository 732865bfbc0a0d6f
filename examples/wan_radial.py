"""Radial attention on a Wan text-to-video pipeline: stock vs Radial, same seed; prints both
times and the per-frame PSNR / SSIM of the Radial video against the stock one.

    python examples/wan_radial.py                                     # the trained fixture, offline, CPU
    python examples/wan_radial.py Wan-AI/Wan2.1-T2V-1.3B-Diffusers    # a hub model (or a local folder)
"""
import argparse
import time

import torch

import attnpatch as ap
from attnpatch.tools.quality import psnr, ssim


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a WanPipeline (default: builtin fixture)")
    p.add_argument("--prompt", default="a large red square moving right")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="wan_radial.gif")
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import wan_shapes

        pipe, kw = wan_shapes(), {}
        method = ap.Radial(window=1, decay=2.0, dense_frames=0, tile=(4, 4))  # 5x8x8 tokens
    else:
        from diffusers import WanPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = WanPipeline.from_pretrained(a.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        kw = dict(height=480, width=832, num_frames=33)
        method = ap.Radial(window=1, decay=2.0, dense_frames=1, tile=(30, 26))  # 9x30x52 tokens
    if a.steps:
        kw["num_inference_steps"] = a.steps

    def run():
        t = time.perf_counter()
        frames = pipe(a.prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames
        return torch.as_tensor(frames)[0], time.perf_counter() - t  # (T, 3, H, W)

    stock, t_stock = run()
    with ap.patch(pipe, method):
        sparse, t_sparse = run()
    print(f"stock {t_stock:.2f} s, {method} (dense_steps={method.dense_steps}) {t_sparse:.2f} s: "
          f"speedup {t_stock / t_sparse:.2f}x, PSNR {psnr(sparse, stock):.1f} dB, SSIM {ssim(sparse, stock):.3f}")
    from PIL import Image

    frames = [Image.fromarray((torch.cat([s, r], -1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
              for s, r in zip(stock, sparse)]  # each frame: stock | radial
    frames[0].save(a.out, save_all=True, append_images=frames[1:], duration=120, loop=0)
    print(f"wrote {a.out} (left: stock, right: radial)")


if __name__ == "__main__":
    main()
