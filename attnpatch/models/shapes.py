"""Procedural data for the trained fixtures: coloured shapes on a dark background with
captions ("a large red circle at the top left"), and clips of a shape moving across the frame
("a green square moving right"). Everything is a pure function of a seed; rendering is
vectorised torch, so a batch of 64 images costs a few milliseconds."""
from __future__ import annotations

import torch

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.85, 0.9), "magenta": (0.9, 0.15, 0.85), "white": (0.95, 0.95, 0.95), "orange": (1.0, 0.55, 0.05),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {  # name -> (row, col) centre in [0, 1]
    "at the top left": (0.25, 0.25), "at the top": (0.25, 0.5), "at the top right": (0.25, 0.75),
    "on the left": (0.5, 0.25), "in the center": (0.5, 0.5), "on the right": (0.5, 0.75),
    "at the bottom left": (0.75, 0.25), "at the bottom": (0.75, 0.5), "at the bottom right": (0.75, 0.75),
}
SIZES = {"small": 0.11, "large": 0.2}  # half-size as a fraction of the side
MOTIONS = {"moving right": (0.0, 1.0), "moving left": (0.0, -1.0), "moving down": (1.0, 0.0), "moving up": (-1.0, 0.0)}
BACKGROUND = 0.08

WORDS = sorted({w for names in (COLORS, SHAPES, PLACES, SIZES, MOTIONS) for n in names for w in n.split()} | {"a"})
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
MAX_TOKENS = 16


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the caption vocabulary (appends ``</s>``),
    used as both the CLIP-slot and the T5-slot tokenizer of the pipelines."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", VOCAB["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_TOKENS)


def _draw(shape: torch.Tensor, cy, cx, r, size: int) -> torch.Tensor:
    """Soft masks (B, size, size) of circles / squares / triangles (shape ids 0 / 1 / 2)
    centred at (cy, cx) with half-size r, all in pixels, anti-aliased over one pixel."""
    y = torch.arange(size).view(1, -1, 1) + 0.5
    x = torch.arange(size).view(1, 1, -1) + 0.5
    cy, cx, r = cy.view(-1, 1, 1), cx.view(-1, 1, 1), r.view(-1, 1, 1)
    dy, dx = y - cy, x - cx
    circle = r - torch.sqrt(dy**2 + dx**2)
    square = r - torch.maximum(dy.abs(), dx.abs())
    # upward triangle: inside the base (dy <= r) and the two slanted sides
    triangle = torch.minimum(r - dy, (dy + r - 2 * dx.abs()) / 2.236 * 1.0)
    sdf = torch.where(shape.view(-1, 1, 1) == 0, circle, torch.where(shape.view(-1, 1, 1) == 1, square, triangle))
    return sdf.clamp(-0.5, 0.5) + 0.5


def _attrs(n: int, g: torch.Generator):
    color = torch.randint(len(COLORS), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    size = torch.randint(len(SIZES), (n,), generator=g)
    return color, shape, size


def images(n: int, seed: int, size: int = 64):
    """``(images (n, 3, size, size) in [-1, 1], captions)``."""
    g = torch.Generator().manual_seed(seed)
    color, shape, sz = _attrs(n, g)
    place = torch.randint(len(PLACES), (n,), generator=g)
    centres = torch.tensor(list(PLACES.values()))[place] * size  # (n, 2)
    centres = centres + (torch.rand(n, 2, generator=g) - 0.5) * 0.08 * size
    r = torch.tensor(list(SIZES.values()))[sz] * size * (0.9 + 0.2 * torch.rand(n, generator=g))
    mask = _draw(shape, centres[:, 0], centres[:, 1], r, size)  # (n, H, W)
    rgb = torch.tensor(list(COLORS.values()))[color].view(n, 3, 1, 1)
    img = BACKGROUND + mask[:, None] * (rgb - BACKGROUND)
    caps = [f"a {list(SIZES)[s]} {list(COLORS)[c]} {SHAPES[h]} {list(PLACES)[p]}"
            for c, h, s, p in zip(color.tolist(), shape.tolist(), sz.tolist(), place.tolist())]
    return img * 2 - 1, caps


def clips(n: int, seed: int, frames: int = 9, size: int = 32):
    """``(videos (n, 3, frames, size, size) in [-1, 1], captions)``: a shape crossing the frame."""
    g = torch.Generator().manual_seed(seed)
    color, shape, sz = _attrs(n, g)
    motion = torch.randint(len(MOTIONS), (n,), generator=g)
    d = torch.tensor(list(MOTIONS.values()))[motion]  # (n, 2) unit direction (dy, dx)
    start = 0.5 - 0.3 * d + (torch.rand(n, 2, generator=g) - 0.5) * 0.3 * (1 - d.abs())  # enter from one side
    t = torch.linspace(0, 1, frames)
    pos = (start[:, None] + 0.6 * d[:, None] * t[None, :, None]) * size  # (n, T, 2)
    r = torch.tensor(list(SIZES.values()))[sz] * size
    mask = _draw(shape.repeat_interleave(frames), pos[..., 0].flatten(), pos[..., 1].flatten(),
                 r.repeat_interleave(frames), size).view(n, frames, size, size)
    rgb = torch.tensor(list(COLORS.values()))[color].view(n, 3, 1, 1, 1)
    vid = BACKGROUND + mask[:, None] * (rgb - BACKGROUND)
    caps = [f"a {list(SIZES)[s]} {list(COLORS)[c]} {SHAPES[h]} {list(MOTIONS)[m]}"
            for c, h, s, m in zip(color.tolist(), shape.tolist(), sz.tolist(), motion.tolist())]
    return vid * 2 - 1, caps


FILL = {"circle": 0.785, "square": 1.0, "triangle": 0.5}  # shape area / bounding-box area


def _parse(caption: str) -> dict:
    words = caption.split()
    out = dict(color=next((w for w in words if w in COLORS), None), shape=next((w for w in words if w in SHAPES), None))
    out["place"] = next((p for p in sorted(PLACES, key=len, reverse=True) if caption.endswith(p)), None)
    out["motion"] = next((m for m in MOTIONS if caption.endswith(m)), None)
    return out


def _read(img: torch.Tensor) -> dict | None:
    """What one image (3, H, W) in [0, 1] shows: colour, shape, centre (row, col) in [0, 1]."""
    fg = (img - BACKGROUND).abs().amax(0) > 0.25  # (H, W)
    if fg.sum() < 4:
        return None
    rgb = img[:, fg].median(1).values
    color = min(COLORS, key=lambda c: (torch.tensor(COLORS[c]) - rgb).square().sum().item())
    ys, xs = fg.nonzero(as_tuple=True)
    fill = fg.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
    shape = min(FILL, key=lambda k: abs(FILL[k] - fill))
    H, W = fg.shape
    return dict(color=color, shape=shape, centre=((ys.float().mean() + 0.5) / H, (xs.float().mean() + 0.5) / W))


def judge(image: torch.Tensor, caption: str) -> dict:
    """Does a generated image (3, H, W) in [0, 1] follow its caption? {"color": bool, "shape":
    bool, "place": bool}, read from pixels (dominant colour, fill ratio, centroid cell)."""
    want, got = _parse(caption), _read(image.float())
    if got is None:
        return dict(color=False, shape=False, place=False)
    place = min(PLACES, key=lambda p: sum((a - b) ** 2 for a, b in zip(PLACES[p], got["centre"])))
    return dict(color=got["color"] == want["color"], shape=got["shape"] == want["shape"], place=place == want["place"])


def judge_clip(video: torch.Tensor, caption: str) -> dict:
    """Same for a clip (T, 3, H, W) in [0, 1]: colour and shape on the middle frame, motion from
    the centroid's displacement between the first and last frames where the shape is seen."""
    want = _parse(caption)
    seen = [r for r in (_read(f.float()) for f in video) if r is not None]
    if len(seen) < 2:
        return dict(color=False, shape=False, motion=False)
    mid = seen[len(seen) // 2]
    dy, dx = (seen[-1]["centre"][i] - seen[0]["centre"][i] for i in range(2))
    d = (0.0, float(torch.sign(dx))) if abs(dx) > abs(dy) else (float(torch.sign(dy)), 0.0)
    return dict(color=mid["color"] == want["color"], shape=mid["shape"] == want["shape"], motion=MOTIONS[want["motion"]] == d)


if __name__ == "__main__":  # write a sample sheet: python -m attnpatch.models.shapes out.png
    import sys

    from PIL import Image

    x, caps = images(16, 0)
    grid = ((x.clamp(-1, 1) + 1) * 127.5).byte().view(4, 4, 3, 64, 64).permute(0, 3, 1, 4, 2).reshape(256, 256, 3)
    Image.fromarray(grid.numpy()).save(sys.argv[1] if len(sys.argv) > 1 else "shapes.png")
    print("\n".join(caps))
