"""Pick the heads for ``SinkCalibration`` (ACT) on a few prompts and save a safetensors profile:

    python -m attnpatch.tools.calibrate --out act.safetensors            # SmolLM2-135M, offline
    python -m attnpatch.tools.calibrate --model HuggingFaceTB/SmolLM2-360M --out act.safetensors

Every (layer, head) is tried alone: calibrated in that head only, does the mean next-token loss
on the prompts drop? Heads that help most (up to ``--max-heads``) form the profile, kept only if
calibrating them together helps too; ``SinkCalibration(heads=path)`` loads it and checks the
model it is patched into against the profile's model type and shape.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import api
from ..methods.sink_calibration import PROFILE_KIND, SinkCalibration

PROMPTS = [
    "The library opens at nine in the morning and closes at six in the evening. On weekends it is open only until noon, "
    "so most students come during the week to read, study and borrow books for their classes.",
    "To make a simple tomato soup, cook chopped onions in a little oil, add tomatoes, water and salt, and let everything "
    "simmer for twenty minutes. Then blend the soup until it is smooth and serve it hot with bread.",
    "The train to the coast leaves every hour from the central station. The journey takes about two hours, and tickets "
    "are cheaper if you buy them online a few days before you travel.",
    "Many birds fly south in autumn because food becomes hard to find when the weather turns cold. In spring they return "
    "to the same places to build their nests and raise their young.",
]


@torch.no_grad()
def loss(model, batch) -> float:
    return model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.item()


def calibrate(model, tok, prompts=PROMPTS, threshold: float = 5.0, beta: float = 0.4, max_heads: int = 16,
              progress: bool = True) -> dict:
    """{"heads": [(layer, head), ...], "base": loss, "calibrated": loss, "per_head": {...}}."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    base = loss(model, batch)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    gains = {}
    for l, h in tqdm([(l, h) for l in range(L) for h in range(H)], desc="calibrating heads", disable=not progress):
        with api.patch(model, SinkCalibration(heads=[(l, h)], threshold=threshold, beta=beta), layers=[l]):
            gains[(l, h)] = base - loss(model, batch)
    best = [p for p, g in sorted(gains.items(), key=lambda x: -x[1]) if g > 0][:max_heads]
    calibrated = base
    if best:
        with api.patch(model, SinkCalibration(heads=best, threshold=threshold, beta=beta)):
            calibrated = loss(model, batch)
        if calibrated >= base:
            best = []
            calibrated = base
    return dict(heads=best, base=base, calibrated=calibrated, per_head={f"{l}.{h}": g for (l, h), g in gains.items()},
                threshold=threshold, beta=beta)


def save(path, model, result: dict) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    meta = dict(kind=PROFILE_KIND, model_type=cfg.model_type, model=str(getattr(cfg, "_name_or_path", "")),
                num_layers=str(cfg.num_hidden_layers), num_heads=str(cfg.num_attention_heads),
                threshold=str(result["threshold"]), beta=str(result["beta"]), base_loss=str(result["base"]),
                calibrated_loss=str(result["calibrated"]))
    save_file({"heads": torch.tensor(result["heads"], dtype=torch.long).reshape(-1, 2)}, str(path), metadata=meta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2", help="builtin:smollm2, a hub id or a local folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threshold", type=float, default=5.0)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--max-heads", type=int, default=16)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    a = p.parse_args(argv)
    if a.out.exists() and not a.force:
        p.exit(2, f"error: {a.out} exists; pass --force to overwrite it\n")
    if a.model == "builtin:smollm2":
        from ..models import smollm2

        model, tok = smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(a.model).eval(), AutoTokenizer.from_pretrained(a.model)
    r = calibrate(model, tok, threshold=a.threshold, beta=a.beta, max_heads=a.max_heads)
    save(a.out, model, r)
    print(f"{len(r['heads'])} heads, loss {r['base']:.4f} -> {r['calibrated']:.4f}; wrote {a.out}")


if __name__ == "__main__":
    main()
