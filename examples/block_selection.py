"""Block selection three ways on a FLUX pipeline: TopKBlocks' mean pooling, XAttention's strided
antidiagonal scores with its cumulative-mass threshold, and VMoBA's training-free selection
(similarity threshold, global over the block map, 1-D / 2-D / 3-D partitions cycled over layers).
Same seed as stock attention; prints each setting's block density, dense-attention recall and PSNR.

    python examples/block_selection.py                                 # the trained fixture, offline, CPU
    python examples/block_selection.py black-forest-labs/FLUX.1-dev    # a hub model (or a local folder)
"""
import argparse

import torch

import attnpatch as ap
from attnpatch.methods.observe import Observed
from attnpatch.methods.probe import Recall
from attnpatch.tools.quality import psnr


def settings(block, stride):
    return {
        "mean pooling, top 25 %": ap.TopKBlocks(keep=0.25, block=block, dense_steps=0),
        "XAttention (antidiagonal, mass 0.9)": ap.TopKBlocks(mass=0.9, block=block, score="antidiagonal", stride=stride, dense_steps=0),
        "VMoBA (similarity 0.25, global, cycle)": ap.TopKBlocks(mass=0.25, block=block, score="similarity", scope="global",
                                                               partition="cycle", dense_steps=0),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a FluxPipeline (default: builtin fixture)")
    p.add_argument("--prompt", default="a large red circle at the top left")
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import flux_shapes

        pipe, kw, block, stride = flux_shapes(), {}, 4, 4  # 16x16 tokens: tiles of 4x4, groups of 4 tokens
    else:
        from diffusers import FluxPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = FluxPipeline.from_pretrained(a.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        kw, block, stride = dict(height=1024, width=1024, guidance_scale=3.5), 8, 8  # 64x64 tokens: 8x8 tiles
    if a.steps:
        kw["num_inference_steps"] = a.steps
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(a.prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images

    stock = run()
    for name, method in settings(block, stride).items():
        rec = Recall(max_queries=256)  # the dense attention mass each plan keeps (exact, on sampled rows)
        with ap.patch(pipe, Observed(method, rec)):
            out = run()
        s = rec.summary()
        print(f"{name}: density {s['density']:.3f}, recall {s['recall']:.3f}, PSNR {psnr(out, stock):.1f} dB  ({method})")


if __name__ == "__main__":
    main()
