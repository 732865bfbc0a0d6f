"""Guided attention on a FLUX pipeline: no guidance vs PAG vs SoftPAG on one prompt, and a
style-consistent batch with SharedAttention; writes one picture with every row.

    python examples/flux_guidance.py                              # the trained fixture, offline
    python examples/flux_guidance.py black-forest-labs/FLUX.1-dev # a hub model (or a local folder)
"""
import argparse

import torch

import attnpatch as ap


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a FluxPipeline (default: builtin fixture)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="flux_guidance.png")
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import flux_shapes

        pipe, kw, layers = flux_shapes(), {}, [2]
        prompts = ["a large red circle in the center", "a large blue square in the center", "a large green triangle in the center"]
    else:
        from diffusers import FluxPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = FluxPipeline.from_pretrained(a.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        kw, layers = dict(height=1024, width=1024), [r"single_transformer_blocks\.(1[0-9])\."]
        prompts = ["a watercolor painting of a fox", "a watercolor painting of a lighthouse", "a watercolor painting of a bicycle"]
    if a.steps:
        kw["num_inference_steps"] = a.steps

    def run(prompt_list):
        return pipe(prompt_list, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images

    rows = {"no guidance": run(prompts[:1])}
    for name, m in (("PAG(scale=3)", ap.PAG(scale=3.0, layers=layers)), ("SoftPAG(scale=3, soft=0.5)", ap.PAG(scale=3.0, soft=0.5, layers=layers))):
        with ap.patch(pipe, m):
            rows[name] = run(prompts[:1])
    rows["independent batch"] = run(prompts)
    with ap.patch(pipe, ap.SharedAttention(reference=0)):
        rows["SharedAttention(reference=0)"] = run(prompts)
    for name, imgs in rows.items():
        print(f"{name}: {len(imgs)} image(s), mean abs change vs first row {(imgs[0] - rows['no guidance'][0]).abs().mean():.3f}")
    from PIL import Image

    width = max(len(v) for v in rows.values())
    H, W = rows["no guidance"].shape[-2:]
    sheet = torch.ones(3, H * len(rows), W * width)
    for r, imgs in enumerate(rows.values()):
        for c, img in enumerate(imgs):
            sheet[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = img.cpu()
    Image.fromarray((sheet.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(a.out)
    print(f"wrote {a.out} (rows: {', '.join(rows)})")


if __name__ == "__main__":
    main()
