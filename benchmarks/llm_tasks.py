"""The quality half of benchmarks/llm.py on the real SmolLM2-135M-Instruct: perplexity on Python's
documentation text, passkey retrieval, SinkCalibration on the offline cloze set, and Temperature in
``generate`` (wall time against stock, in turn within every repetition)."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

import torch

import attnpatch as ap
from common import RESULTS


def doc_text() -> str:
    """Long English text shipped with Python: the language reference topics of pydoc."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


QUALITY_METHODS = lambda: {  # noqa: E731
    "dense": None,
    "SinkWindow(sink=4, window=1024)": ap.SinkWindow(sink=4, window=1024),
    "SinkWindow(sink=4, window=256)": ap.SinkWindow(sink=4, window=256),
    "TopKBlocks(keep=0.25, block=256)": ap.TopKBlocks(keep=0.25, block=256),
    "VerticalSlash(512, 512)": ap.VerticalSlash(verticals=512, slashes=512, window=256),
    "Power(local=256)": ap.Power(local=256),
    # sparse from 1K tokens (its default min_len=4096 is exact dense below 4K)
    "HyperAttention(block=256, samples=256, min_len=1024)": ap.HyperAttention(block=256, samples=256, min_len=1024),
    # the paper patches only the final layers (its perplexity rises with every layer patched); on SmolLM2 the
    # last half is the sensitive one (2K: 28.8 vs 12.8 for the first half, 27.0 for all 30)
    "HyperAttention(block=256, samples=256, min_len=1024), layers 15-29":
        (ap.HyperAttention(block=256, samples=256, min_len=1024), range(15, 30)),
    "HyperAttention(block=256, samples=256, min_len=1024), layers 0-14":
        (ap.HyperAttention(block=256, samples=256, min_len=1024), range(0, 15)),
    # benchmarks/duo.py's retrieval-head profile: those heads full, the others sink + window
    "StreamingHeads(duo, sink=4, window=256)": ap.StreamingHeads(str(RESULTS / "duo_heads.safetensors"), sink=4, window=256),
    "SinkCalibration(smollm2_act)": ap.SinkCalibration(heads=str(RESULTS / "smollm2_act.safetensors")),
}  # Quest's prefill is dense by definition (its pages select keys for decode): its perplexity is dense's


def _with(model, method, fn):
    """fn() with ``method`` patched in (None: stock; a (method, layers) pair: those layers only)."""
    if method is None:
        return fn()
    method, layers = method if isinstance(method, tuple) else (method, None)
    with ap.patch(model, method, layers=layers):
        return fn()


@torch.no_grad()
def perplexity(model, tok, lengths, only=None) -> list[dict]:
    """Rows (tokens, method, perplexity); ``only``: these QUALITY_METHODS names (None: all)."""
    ids = tok(doc_text(), return_tensors="pt").input_ids
    rows = []
    for n in lengths:
        x = ids[:, :n]
        for name, m in QUALITY_METHODS().items():
            if only is not None and name not in only:
                continue
            loss = _with(model, m, lambda: model(x, labels=x).loss.item())
            rows.append(dict(tokens=n, method=name, perplexity=math.exp(loss)))
            print(rows[-1], flush=True)
    return rows


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tok, length: int, depth: float, key: int) -> str:
    head = "There is an important number hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    n_fill = max(0, length - len(tok(head + needle + tail).input_ids))
    per = len(tok(FILLER).input_ids)
    filler = FILLER * (n_fill // per + 1)
    words = tok(filler).input_ids[:n_fill]
    cut = int(len(words) * depth)
    return head + tok.decode(words[:cut]) + needle + tok.decode(words[cut:]) + tail


@torch.no_grad()
def passkey(model, tok, lengths, depths=(0.1, 0.5, 0.9)) -> list[dict]:
    rows = []
    keep = ("dense", "SinkWindow(sink=4, window=1024)", "TopKBlocks(keep=0.25, block=256)", "VerticalSlash(512, 512)")
    for n in lengths:
        for name, m in QUALITY_METHODS().items():
            if name not in keep:
                continue
            hits = 0
            for i, d in enumerate(depths):
                key = 10000 + (7919 * (n + i)) % 89999
                ids = tok(passkey_prompt(tok, n, d, key), return_tensors="pt").input_ids
                out = _with(model, m, lambda: model.generate(ids, max_new_tokens=8, do_sample=False))
                hits += str(key) in tok.decode(out[0, ids.shape[1]:])
            rows.append(dict(tokens=n, method=name, accuracy=hits / len(depths)))
            print(rows[-1], flush=True)
    return rows


def calibration(model, tok, out_dir: Path) -> list[dict]:
    from attnpatch.models import cloze
    from attnpatch.tools import calibrate

    r = calibrate.calibrate(model, tok)
    path = out_dir / "smollm2_act.safetensors"
    calibrate.save(path, model, r)
    rows = [dict(model="SmolLM2-135M-Instruct (stock)", heads=0, cloze_accuracy=cloze.accuracy(model, tok), calibration_loss=r["base"])]
    with ap.patch(model, ap.SinkCalibration(heads=path)):
        acc = cloze.accuracy(model, tok)
    rows.append(dict(model=f"+ SinkCalibration (profile {path.name})", heads=len(r["heads"]), cloze_accuracy=acc,
                     calibration_loss=r["calibrated"]))
    for row in rows:
        print(row, flush=True)
    return rows


@torch.inference_mode()
def temperature_generate(model, tok, tau: float, new: int, reps: int) -> list[dict]:
    """Wall time of a greedy ``generate`` of ``new`` tokens: stock, patched with Dense() (attnpatch's
    own routing) and with Temperature(tau), taken in turn within every repetition (order rotating,
    one warm-up each). A score-only plan must run at SDPA speed: no per-shape compiles as the key
    length grows every step. Ratios to stock per repetition: median, min, max."""
    ids = tok(doc_text()[:400], return_tensors="pt").input_ids[:, :64]
    settings = {"stock": None, "Dense()": ap.Dense(), repr(ap.Temperature(tau=tau)): ap.Temperature(tau=tau)}

    def run(method) -> float:
        with ap.patch(model, method) if method is not None else contextlib.nullcontext():
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            return time.perf_counter() - t

    for method in settings.values():  # warm-up
        run(method)
    names = list(settings)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(settings[name]))
            print(f"rep {r} {name}: {times[name][-1]:.2f} s", flush=True)
    rows = []
    for name in names:
        ratios = sorted(t / s for s, t in zip(times["stock"], times[name]))
        rows.append(dict(method=name, prompt_tokens=ids.shape[1], new_tokens=new, reps=reps, seconds=statistics.median(times[name]),
                         ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1]))
        print(rows[-1], flush=True)
    return rows
