"""Train the fixtures from scratch, seeded, on the CPU:

    python -m attnpatch.models.train flux --out attnpatch/models/weights/flux-shapes   # ~12 min on 2 cores
    python -m attnpatch.models.train wan  --out attnpatch/models/weights/wan-shapes    # ~22 min on 2 cores

Stage 1 trains the autoencoder on the procedural data (reconstruction + a small KL); its latent
mean / std (per channel for Wan, as Wan's own ``latents_mean`` / ``latents_std``) become the
pipeline's latent normalisation. Stage 2 trains the transformer and both
text encoders together with the rectified-flow objective the pipelines sample with
(x_t = (1 - s) x0 + s noise, target noise - x0, s logit-normal), captions dropped 10 % of the
time so classifier-free guidance works. The folder written is a stock diffusers pipeline
(``FluxPipeline`` / ``WanPipeline``) plus ``train_log.json`` with the loss curves.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import fixtures, shapes

KIND = {  # name: components, data, autoencoder steps / batch / lr / foreground weight, denoiser steps / batch / peak lr /
    # noise-level shift (sigma -> shift * sigma / (1 + (shift - 1) * sigma), as SD3 / Wan), dataset size
    "flux": dict(components=fixtures.flux_components, data=shapes.images, vae_steps=400, vae_batch=16, vae_lr=1e-3, fg_weight=0.0,
                 steps=2400, batch=16, lr=5e-4, sigma_shift=1.0, dataset=8192),
    # video: shape pixels weigh 11x in the autoencoder's loss (with plain MSE on these mostly
    # background clips it learns brightness long before colour); whole 9-frame clips, so every
    # causal chunk of the encoder / decoder is trained (5-frame clips leave the second one untrained).
    # Denoiser: with only cross-attention carrying the caption (no pooled vector as FLUX's), motion is
    # decided at high noise; shifting the training noise there (3, as Wan's own sampling shift) and a
    # 3x peak lr took judged motion from chance (0.22) to 1.0 and colour 0.44 -> 0.75 in the same steps
    "wan": dict(components=fixtures.wan_components, data=shapes.clips, vae_steps=1200, vae_batch=4, vae_lr=2e-3, fg_weight=10.0,
                steps=2400, batch=16, lr=1.5e-3, sigma_shift=3.0, dataset=4096),
}


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _encode(vae, x, sample: bool):
    dist = vae.encode(x).latent_dist
    return dist.sample() if sample else dist.mode(), dist


def train_vae(vae, data, steps: int, batch: int, seed: int, log: list, lr: float = 1e-3, fg_weight: float = 0.0) -> None:
    """Reconstruction (MSE, shape pixels weighted ``1 + fg_weight``) + a small KL."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bg = shapes.BACKGROUND * 2 - 1
    for step in (bar := tqdm(range(steps), desc="autoencoder")):
        x, _ = data(batch, seed=seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        z, dist = _encode(vae, x, sample=True)
        rec = vae.decode(z).sample
        kl = dist.kl().mean() / x[0].numel()
        if fg_weight:
            w = 1 + fg_weight * ((x - bg).abs().amax(1, keepdim=True) > 0.05).float()
            loss = ((rec - x).square() * w).mean() / w.mean() + 1e-3 * kl
        else:
            loss = F.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(dict(step=step, mse=F.mse_loss(rec, x).item(), kl=kl.item()))
        bar.set_postfix(mse=f"{log[-1]['mse']:.4f}")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, data, seed: int, n: int):
    """``(latents (n, ...), captions)``: a fixed training set encoded once by the trained
    autoencoder (its posterior mean); encoding per step would cost as much as a denoiser step."""
    zs, caps = [], []
    for i in tqdm(range(0, n, 64), desc="encoding"):
        x, c = data(64, seed=seed * 1_000_003 + 900_000 + i)
        zs.append(_encode(vae, x, sample=False)[0])
        caps += c
    return torch.cat(zs), caps


def _flux_step(c, lat, caps, sigma, noise):
    """Rectified-flow loss of the FLUX fixture on latents (B, 4, 32, 32)."""
    from diffusers import FluxPipeline

    B, C, H, W = lat.shape
    ids = c["tokenizer"](caps, padding="max_length", max_length=shapes.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    pooled = c["text_encoder"](ids).pooler_output  # (B, 32)
    text = c["text_encoder_2"](ids).last_hidden_state  # (B, 16, 64)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * lat + sigma.view(-1, 1, 1, 1) * noise
    packed = FluxPipeline._pack_latents(x_t, B, C, H, W)  # (B, H/2*W/2, 4C)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, lat.device, lat.dtype)
    txt_ids = torch.zeros(shapes.MAX_TOKENS, 3)
    pred = c["transformer"](hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                            img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    target = FluxPipeline._pack_latents(noise - lat, B, C, H, W)
    return F.mse_loss(pred, target)


def _wan_step(c, lat, caps, sigma, noise):
    """Rectified-flow loss of the Wan fixture on latents (B, 4, 5, 16, 16)."""
    t = c["tokenizer"](caps, padding="max_length", max_length=shapes.MAX_TOKENS, truncation=True, return_tensors="pt")
    text = c["text_encoder"](t.input_ids, t.attention_mask).last_hidden_state
    lens = t.attention_mask.sum(1)
    text = text * (torch.arange(text.shape[1])[None, :] < lens[:, None])[..., None]  # zeros past the caption, as WanPipeline
    s = sigma.view(-1, 1, 1, 1, 1)
    pred = c["transformer"](hidden_states=(1 - s) * lat + s * noise, timestep=sigma * 1000,
                            encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred, noise - lat)


def train_denoiser(c, kind: str, lats, captions, steps: int, batch: int, seed: int, log: list, lr: float = 5e-4,
                   sigma_shift: float = 1.0) -> None:
    step_fn = _flux_step if kind == "flux" else _wan_step
    params = [p for k in ("transformer", "text_encoder", "text_encoder_2") if k in c for p in c[k].parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for m in ("transformer", "text_encoder", "text_encoder_2"):
        if m in c:
            c[m].train()
    for step in (bar := tqdm(range(steps), desc=f"{kind} denoiser")):
        idx = torch.randint(len(lats), (batch,), generator=g)
        lat, caps = lats[idx], [captions[i] for i in idx.tolist()]
        caps = [cap if keep else "" for cap, keep in zip(caps, (torch.rand(batch, generator=g) > 0.1).tolist())]
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, as SD3 / FLUX training
        sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)  # > 1: more training at high noise
        noise = torch.randn(lat.shape, generator=g)
        for pg in opt.param_groups:
            pg["lr"] = _lr(step, steps, lr)
        loss = step_fn(c, lat, caps, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append(dict(step=step, loss=loss.item()))
        bar.set_postfix(loss=f"{sum(r['loss'] for r in log[-50:]) / len(log[-50:]):.4f}")
    for m in c.values():
        if isinstance(m, torch.nn.Module):
            m.eval()


def train(kind: str, out: Path, seed: int = 0, steps: int | None = None, vae_steps: int | None = None, force: bool = False,
          dataset: int | None = None, lr: float | None = None, sigma_shift: float | None = None):
    from diffusers import FluxPipeline, WanPipeline

    spec = KIND[kind]
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to overwrite it")
    torch.manual_seed(seed)
    c = spec["components"](seed)
    lr, sigma_shift = lr or spec["lr"], sigma_shift or spec["sigma_shift"]
    log = dict(kind=kind, seed=seed, lr=lr, sigma_shift=sigma_shift, vae=[], denoiser=[], threads=torch.get_num_threads())
    t0 = time.perf_counter()
    train_vae(c["vae"], spec.get("vae_data", spec["data"]), vae_steps or spec["vae_steps"], spec["vae_batch"], seed, log["vae"], spec["vae_lr"],
              spec["fg_weight"])
    lats, caps = encode_dataset(c["vae"], spec["data"], seed, dataset or spec["dataset"])
    if kind == "flux":
        mean, std = lats.mean(), lats.std()
        c["vae"].register_to_config(shift_factor=mean.item(), scaling_factor=1.0 / std.item())
    else:  # per channel, as Wan's own latents_mean / latents_std (WanPipeline decodes z * std + mean)
        mean, std = lats.mean((0, 2, 3, 4), keepdim=True), lats.std((0, 2, 3, 4), keepdim=True)
        c["vae"].register_to_config(latents_mean=mean.flatten().tolist(), latents_std=std.flatten().tolist())
    log["vae_seconds"] = time.perf_counter() - t0
    train_denoiser(c, kind, (lats - mean) / std, caps, steps or spec["steps"], spec["batch"], seed, log["denoiser"], lr,
                   sigma_shift)
    log["seconds"] = time.perf_counter() - t0
    pipe = (FluxPipeline if kind == "flux" else WanPipeline)(**c)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(KIND))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="denoiser steps (default: the committed run's)")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--dataset", type=int, help="training-set size (default: the committed run's)")
    p.add_argument("--lr", type=float, help="denoiser peak learning rate (default: the committed run's)")
    p.add_argument("--sigma-shift", type=float, help="noise-level shift of the denoiser's training (default: the committed run's)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    a = p.parse_args(argv)
    try:
        print(train(a.kind, a.out, a.seed, a.steps, a.vae_steps, a.force, a.dataset, a.lr, a.sigma_shift))
    except FileExistsError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
