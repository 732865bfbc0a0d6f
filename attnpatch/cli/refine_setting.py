"""``attnpatch compare --refine-from PX``: coarse-to-fine rows (``attnpatch.tools.refine``) next
to the from-noise ones, and a report that leads with what matters above the training size.

With the flag, compare runs stock attention at the full ``--height`` x ``--width`` (the timing
reference), the coarse-to-fine pipeline with stock attention, each setting from noise, and each
setting with coarse-to-fine, all interleaved over ``--repeats``. Quality is read from the pixels,
not compared with stock: above a model's training size stock attention's image is near-blank, so
PSNR against it says nothing. On the builtin fixtures the pixel judge (colour / shape / place of
the caption) and a repetition count (``tools.refine.blobs``) are the quality columns, and the
report's first sentences say, from those numbers, which setting is fastest among those that draw
each caption's subject exactly once at least as well as stock does.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

STRENGTH = 0.7  # FreeSwim's img2img strength: the last 70 % of the noise schedule at full size
ATTRS = ("color", "shape", "place")
NOTE = ("Quality leads with the fixture's pixel judge (colour / shape / place of each caption read back from the "
        "pixels; fraction of captions right) and copies of the subject per caption (connected regions of the "
        "caption's colour: 1 = drawn once, more = repetition, 0 = nothing drawn), not PSNR: PSNR is closeness to stock attention's "
        "image at the full size, and above the training size that image is itself near-blank.")


def add_arguments(p) -> None:
    p.add_argument("--refine-from", type=_size, metavar="PX", help="also run each setting coarse-to-fine: generate "
                   "at PX (the longer side; or HxW), upsample, img2img at the full --height x --width (FreeSwim)")
    p.add_argument("--refine-strength", type=float, metavar="S", help=f"img2img strength of --refine-from (default "
                   f"{STRENGTH}: the last {STRENGTH * 100:.0f}%% of the steps run at full size)")


def _size(text: str):
    """argparse type: ``64`` or ``64x48`` (height x width), positive."""
    import argparse

    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a side in px (64) or HxW (64x48), got {text!r}")
    return vals[0] if len(vals) == 1 else tuple(vals)


@dataclass(frozen=True)
class Refine:
    """What ``--refine-from`` adds to a setting: ``refine()`` instead of one pipeline call."""
    from_size: int | tuple
    strength: float = STRENGTH

    @property
    def label(self) -> str:
        size = "x".join(map(str, self.from_size)) if isinstance(self.from_size, tuple) else self.from_size
        return f"coarse-to-fine from {size}px (strength {self.strength})"

    def run(self, loaded, prompts, seed: int, steps: int | None = None, height=None, width=None, **_):
        """(images (N, 3, H, W) in [0, 1], seconds), like ``runner.run`` (same call defaults, seeded generator)."""
        import torch

        from ..tools.refine import NoImg2Img, refine
        from .runner import UsageError

        t = time.perf_counter()
        kw = dict(loaded.call)
        if steps:
            kw["num_inference_steps"] = steps
        try:
            out = refine(loaded.obj, prompts, height=height, width=width, from_size=self.from_size, strength=self.strength,
                         generator=torch.Generator().manual_seed(seed), output_type="pt", **kw)
        except NoImg2Img as e:
            raise UsageError(str(e)) from None
        return out.images.float().cpu(), time.perf_counter() - t


def check(args) -> Refine | None:
    """The flags' ``Refine``, or a UsageError before anything loads (naming the fix)."""
    from .runner import UsageError, resolve

    if args.refine_from is None:
        if args.refine_strength is not None:
            raise UsageError("--refine-strength sets the img2img strength of --refine-from; add --refine-from PX")
        return None
    if getattr(args, "compare", False):
        raise UsageError("generate --refine-from runs the method coarse-to-fine once; to time it against stock "
                         "attention (from noise and coarse-to-fine) use: attnpatch compare --refine-from")
    src = resolve(args.model)
    if src.is_pipe is False or src.name == "wan-shapes" or getattr(args, "frames", None):
        raise UsageError(f"--refine-from runs a text-to-image pipeline and its img2img counterpart; {args.model} is "
                         "not an image pipeline (drop --refine-from, or use e.g. builtin:flux-shapes)")
    s = STRENGTH if args.refine_strength is None else args.refine_strength
    if not 0 < s <= 1:
        raise UsageError(f"--refine-strength {s}: expected 0 < S <= 1 (the part of the steps run at full size; "
                         f"FreeSwim uses {STRENGTH})")
    if args.height is None or args.width is None:
        raise UsageError("--refine-from PX refines up to the full size: give --height and --width above PX "
                         f"(e.g. --height {3 * _side(args.refine_from)} --width {3 * _side(args.refine_from)})")
    h0, w0 = args.refine_from if isinstance(args.refine_from, tuple) else (None, None)
    big = max(args.height, args.width)
    if (h0 or 0) > args.height or (w0 or 0) > args.width or _side(args.refine_from) >= big:
        raise UsageError(f"--refine-from {_show(args.refine_from)} is not below --height {args.height} x --width "
                         f"{args.width}: the first stage generates at the smaller size (e.g. the model's training size)")
    return Refine(args.refine_from, s)


def _side(size) -> int:
    return max(size) if isinstance(size, tuple) else size


def _show(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, tuple) else str(size)


def expand(sets: list, refine: Refine | None) -> list:
    """``sets`` (compare's Settings) with coarse-to-fine rows: stock attention coarse-to-fine, the
    settings from noise, then each setting coarse-to-fine."""
    if refine is None:
        return sets
    from .setting import Setting

    return [Setting(refine=refine), *sets, *(dataclasses.replace(s, refine=refine) for s in sets)]


def warm(loaded, sets: list, prompts, seed: int, kw: dict) -> None:
    """One short untimed coarse-to-fine run per method (and stock): the img2img pipeline's
    construction and the first stage's plans stay out of the first timed repeat."""
    from .. import api
    from .runner import UsageError

    methods = {str(s.method): s.method for s in sets if s.refine is not None}
    for refine in {s.refine for s in sets if s.refine is not None}:
        for m in methods.values():
            try:
                if m is None:
                    refine.run(loaded, prompts[:1], seed, **{**kw, "steps": 2})
                    continue
                with api.patch(loaded.obj, m):
                    refine.run(loaded, prompts[:1], seed, **{**kw, "steps": 2})
            except UsageError:  # no img2img counterpart: every coarse-to-fine row would fail
                raise
            except (ValueError, RuntimeError, TypeError):
                pass  # the timed run reports it


def finish(loaded, rows: list[dict], shown: list, prompts, args) -> tuple[str, str]:
    """For a ``--refine-from`` run: each row gets the fixture judge's colour / shape / place
    (fraction of captions) and copies of the subject per caption; returns (the report's first sentences, in
    words from those numbers, and the quality key the frontier uses: "judged", or "psnr" for a
    model without a pixel judge)."""
    from . import report

    done = [r for r in rows if "error" not in r]  # ``shown`` holds their outputs, in the same order
    size = f"{args.height}x{args.width} px"
    if report.judge_for(loaded.name, prompts) is None or loaded.name != "flux-shapes" or len(done) != len(shown):
        fast = max(done[1:], key=lambda r: r["speedup"], default=None)
        best = f" Fastest: {fast['setting']} at {_speed(fast)}." if fast else ""
        return (f"At {size}.{best} No pixel judge reads these outputs: quality is PSNR vs stock attention at the full "
                "size, which above a model's training size may itself be a poor image.", "psnr")
    from ..models import shapes
    from ..tools.refine import blobs

    for r, (_, out) in zip(done, shown):
        js = [shapes.judge(o.float().clamp(0, 1), p) for o, p in zip(out, prompts)]
        r.update({a: sum(j[a] for j in js) / len(js) for a in ATTRS})
        r["copies"] = " ".join(str(blobs(o, p)) for o, p in zip(out, prompts))
    return headline(done, size), "judged"


def _csp(r: dict) -> str:
    return "/".join(f"{r[a]:.2g}" for a in ATTRS)


def _speed(r: dict) -> str:
    spread = f", {r['speedup_min']:.2f}-{r['speedup_max']:.2f}x over {r['repeats']} repeats" if r.get("repeats", 1) > 1 else ""
    return f"{r['speedup']:.2f}x stock's speed (stock's time / its time{spread})"


def _once(r: dict) -> bool:
    return all(b == "1" for b in r["copies"].split())


def headline(rows: list[dict], size: str) -> str:
    """The result in words, true whichever way it comes out: the fastest setting that draws every
    caption's subject exactly once and judges at least as well as stock attention, against stock."""
    stock = rows[0]
    score = lambda r: sum(r[a] for a in ATTRS)  # noqa: E731
    text = [f"At {size}, stock attention judges colour/shape/place {_csp(stock)} with copies of the subject per caption "
            f"{stock['copies']} (1 = drawn once)."]
    good = [r for r in rows[1:] if _once(r) and score(r) >= score(stock)]
    if good:
        best = max(good, key=lambda r: r["speedup"])
        slower = " (slower than stock)" if best["speedup"] < 1 else ""
        text.append(f"Fastest setting that draws every caption's subject once and judges at least as well: "
                    f"{best['setting']}: {_speed(best)}{slower}, colour/shape/place {_csp(best)} vs stock {_csp(stock)}.")
    else:
        text.append("No setting draws every caption's subject exactly once while judging at least as well as stock.")
    others = [r for r in rows[1:] if not good or r is not best]
    if others:
        text.append("Others: " + "; ".join(f"{r['setting']}: {r['speedup']:.2f}x, {_csp(r)}, copies {r['copies']}"
                                           for r in others) + ".")
    return " ".join(text)
