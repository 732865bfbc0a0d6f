"""SinkRedistribution on a FLUX pipeline whose caption is padded far past its training length: the
padding tokens soak up the image queries' attention (attention magnets); moving a share of it back to
the other keys, pro rata, brings the picture back toward the unpadded one.

    python examples/sink_redistribution.py                      # the trained fixture (16 text tokens), offline
    python examples/sink_redistribution.py --pad 128 --alpha 0.8

Magnets here are given as key positions (the caption's padding: FLUX puts text first, so keys
n_tokens..pad-1). Without positions the method finds magnets per call by ACT's rule
(``candidates="text", threshold=...``); for a vision-language model, calibrate heads and magnets with
``attnpatch.methods.redistribute.MagnetScan`` and save them with ``save_profile`` (see
benchmarks/redistribution_vlm.py).
"""
import argparse

import torch

import attnpatch as ap
from attnpatch.tools.quality import psnr


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caption", default="a large red circle at the top left")
    p.add_argument("--pad", type=int, default=64, help="max_sequence_length the caption is padded to")
    p.add_argument("--alpha", type=float, default=0.7, help="share of the padding's attention moved")
    p.add_argument("--out", default="sink_redistribution.png")
    a = p.parse_args()
    from attnpatch.models import flux_shapes, shapes

    pipe = flux_shapes()
    n = len(pipe.tokenizer_2(a.caption).input_ids)  # caption tokens (with </s>); the rest is padding

    def run(L):
        return pipe(a.caption, generator=torch.Generator().manual_seed(0), max_sequence_length=L, output_type="pt").images

    trained, padded = run(shapes.MAX_TOKENS), run(a.pad)
    method = ap.SinkRedistribution(magnets=list(range(n, a.pad)), alpha=a.alpha)  # targets: every other key
    with ap.patch(pipe, method):
        fixed = run(a.pad)
    for name, img in (("padded", padded), ("redistributed", fixed)):
        print(f"{name}: PSNR vs the unpadded picture {psnr(img, trained):.1f} dB, judge {shapes.judge(img[0], a.caption)}")
    from PIL import Image

    row = torch.cat([trained[0], padded[0], fixed[0]], 2).permute(1, 2, 0).mul(255).round().byte().numpy()
    Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST).save(a.out)
    print(f"wrote {a.out}: unpadded ({shapes.MAX_TOKENS} tokens) | padded ({a.pad}) | padded + "
          f"SinkRedistribution(alpha={a.alpha}, magnets=padding keys {n}..{a.pad - 1})")


if __name__ == "__main__":
    main()
