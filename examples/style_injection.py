"""Style transfer without optimisation (Style Injection in Diffusion) on a FLUX pipeline: generate a
content image and a style image, then restyle the content in one call; writes content | style | result.

    python examples/style_injection.py                                # the trained fixture, offline
    python examples/style_injection.py black-forest-labs/FLUX.1-dev   # a hub model (or a local folder)

``attnpatch.tools.invert.style_transfer(pipe, content, style)`` inverts both images with the reversed flow
ODE (DDIM inversion on UNet pipelines) while ``StyleInjection`` records the style's keys / values and the
content's queries, then samples from the content's noise, AdaIN-ed toward the style's, with them injected.
Content and style can be any images of the pipeline's size (PIL or (B, 3, H, W) tensors in [0, 1]).
"""
import argparse

import torch

import attnpatch as ap
from attnpatch.tools.invert import style_transfer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a FluxPipeline (default: builtin fixture)")
    p.add_argument("--steps", type=int, default=50, help="inversion and transfer steps (the paper: 50)")
    p.add_argument("--query-keep", type=float, default=0.75)
    p.add_argument("--temperature", type=float, default=1.5)
    p.add_argument("--out", default="style_injection.png")
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import flux_shapes

        pipe, kw, layers = flux_shapes(), {}, None  # every layer: 6 blocks of 256 tokens
        prompts = ["a large red circle at the top left", "a large blue square in the center"]
    else:
        from diffusers import FluxPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = FluxPipeline.from_pretrained(a.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        # recorded features cost layers x steps x 3 x tokens x width: a few late single blocks at 512 px
        # (4 x 50 x 3 x 1024 tokens x 3072 x 2 bytes = 3.8 GB); untested here (no hub weights offline)
        kw, layers = dict(height=512, width=512), ["transformer.single_transformer_blocks.3[4-7].attn"]
        prompts = ["a photo of a lighthouse on a cliff", "a watercolor painting of flowers, loose blue and orange washes"]
    content, style = (pipe(c, generator=torch.Generator().manual_seed(i), output_type="pt", **kw).images
                      for i, c in enumerate(prompts))
    method = ap.StyleInjection(query_keep=a.query_keep, temperature=a.temperature)
    out = style_transfer(pipe, content, style, method, layers=layers, num_inference_steps=a.steps, output_type="pt",
                         **kw).images
    layers = len(method.bank)
    print(f"recorded {layers} attention layers x {a.steps} steps; result mean colour {out[0].mean((1, 2)).tolist()}")
    from PIL import Image

    sheet = torch.cat([content[0], style[0], out[0]], 2).cpu()  # (3, H, 3 W): content | style | result
    Image.fromarray((sheet.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(a.out)
    print(f"wrote {a.out} (content | style | result)")


if __name__ == "__main__":
    main()
