"""Guided attention on the trained FLUX fixture: no guidance vs PAG vs SoftPAG vs PAG on heads
chosen by HeadHunter, and a shared-attention batch vs an independent one, with a measured
effect for each.

    python benchmarks/guidance.py      # writes benchmarks/results/guidance.{md,json} and pictures

Metrics (read from pixels by attnpatch.models.shapes.judge): caption accuracy (colour, shape,
place) on held-out captions; heads are selected on a different caption set. Shared attention:
similarity of each non-reference image to the reference image (SSIM, and the distance between
their foreground colours), independent vs shared batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.models import fixtures, shapes  # noqa: E402
from attnpatch.tools.headhunter import hunt  # noqa: E402
from attnpatch.tools.quality import ssim  # noqa: E402
from common import machine, table, write  # noqa: E402
from fixtures import grid_png  # noqa: E402

SHOW = ["a large red circle at the top left", "a large green square at the top right", "a large blue triangle in the center",
        "a small yellow circle at the bottom left", "a large white square at the bottom right", "a small magenta triangle on the left"]
SHARED = ["a large red circle in the center", "a large blue square in the center", "a large green triangle in the center",
          "a large yellow circle in the center"]


def generate(pipe, caps, seed=0):
    return torch.cat([pipe(caps[i:i + 16], generator=torch.Generator().manual_seed(seed + i), output_type="pt").images
                      for i in range(0, len(caps), 16)])


def accuracy(imgs, caps) -> dict:
    j = [shapes.judge(i, c) for i, c in zip(imgs, caps)]
    acc = {k: sum(x[k] for x in j) / len(j) for k in j[0]}
    acc["all"] = sum(all(x.values()) for x in j) / len(j)
    return acc


def fg_color(img) -> torch.Tensor:
    fg = (img - shapes.BACKGROUND).abs().amax(0) > 0.25
    return img[:, fg].median(1).values if fg.sum() > 3 else torch.full((3,), shapes.BACKGROUND)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="held-out captions for the accuracy columns")
    p.add_argument("--hunt-n", type=int, default=16, help="captions the head search scores on")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "guidance"))
    a = p.parse_args(argv)
    out = Path(a.out)
    pics = out.parent / out.name
    pics.mkdir(parents=True, exist_ok=True)
    pipe = fixtures.flux_shapes()
    _, held = shapes.images(a.n, seed=777)
    _, dev = shapes.images(a.hunt_n, seed=778)

    def score(imgs):
        return accuracy(imgs, dev)["all"]

    found = hunt(pipe, lambda p: generate(p, dev), score, rounds=a.rounds, scale=3.0, out=pics / "pag_heads.safetensors")
    methods = {
        "no guidance (CFG 4 only)": None,
        "PAG(scale=3, layers=[2])": ap.PAG(scale=3.0, layers=[2]),
        "PAG(scale=3, all layers)": ap.PAG(scale=3.0),
        "SoftPAG(scale=3, soft=0.5, all layers)": ap.PAG(scale=3.0, soft=0.5),
        f"PAG(scale=3, heads=HeadHunter {found['heads']})": ap.PAG(scale=3.0, heads=pics / "pag_heads.safetensors"),
    }
    rows, shown = [], []
    for name, m in methods.items():
        ctx = ap.patch(pipe, m) if m is not None else None
        try:
            if ctx:
                ctx.__enter__()
            acc = accuracy(generate(pipe, held), held)
            shown.append(generate(pipe, SHOW))
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        rows.append(dict(method=name, **acc))
        print(rows[-1], flush=True)
    grid_png([i for s in shown for i in s], [c if r == 0 else "" for r in range(len(shown)) for c in SHOW],
             pics / "pag_grid.png", cols=len(SHOW), scale=2)
    # shared attention: a batch with reference 0, independent vs shared
    indep = generate(pipe, SHARED)
    with ap.patch(pipe, ap.SharedAttention(reference=0)):
        shared = generate(pipe, SHARED)
    sim = []
    for name, imgs in (("independent batch", indep), ("SharedAttention(reference=0)", shared)):
        ref = imgs[0]
        s = sum(ssim(imgs[i:i + 1], ref[None]) for i in range(1, len(imgs))) / (len(imgs) - 1)
        c = sum((fg_color(imgs[i]) - fg_color(ref)).norm().item() for i in range(1, len(imgs))) / (len(imgs) - 1)
        sim.append(dict(batch=name, ssim_to_reference=s, color_distance_to_reference=c))
        print(sim[-1], flush=True)
    grid_png(list(indep) + list(shared), SHARED + [""] * len(SHARED), pics / "shared_grid.png", cols=len(SHARED), scale=3)
    data = dict(machine=machine(), pag=rows, heads=found, shared=sim)
    body = ("## PAG / SoftPAG / selected heads\n\nCaption accuracy on %d held-out captions (judge: colour, shape, place; "
            "`all` = every attribute right). Heads chosen by `attnpatch.tools.headhunter.hunt` on %d other captions, "
            "objective = that accuracy, %d greedy rounds over all %d (layer, head) pairs; history: %s.\n\n" %
            (a.n, a.hunt_n, a.rounds, 6 * 4, found["history"]))
    body += table(rows, [("method", "guidance"), ("color", "colour"), ("shape", "shape"), ("place", "place"), ("all", "all")])
    body += "\n\nRows: the guidance settings in table order; columns: six captions, seed 0.\n\n![pag](guidance/pag_grid.png)\n\n"
    body += "## Shared attention\n\nFour captions of different colours and shapes; image 0 is the reference. Similarity of images 1-3 to it:\n\n"
    body += table(sim, [("batch", "batch"), ("ssim_to_reference", "SSIM to reference"),
                        ("color_distance_to_reference", "foreground colour distance to reference (RGB)")])
    body += "\n\nTop row: independent batch; bottom row: shared attention.\n\n![shared](guidance/shared_grid.png)\n"
    intro = ("The trained FLUX-architecture fixture (`attnpatch.models.flux_shapes()`, 64x64, 20 steps, true CFG 4), "
             "guidance patched with `attnpatch.patch(pipe, method)`; every row uses the same seeds.")
    write(out, "Guided attention on the trained FLUX fixture", intro, body, data)


if __name__ == "__main__":
    main()
