"""SinkRedistribution's mechanics on a vision-language model built from a config (part of
benchmarks/redistribution.py): a transformers ``LlavaForConditionalGeneration`` whose language model is
SmolLM2-135M (real weights, real attention sinks) and whose vision tower and projector are a tiny random
CLIP: no trained VLM loads offline, so this shows the wiring and the arithmetic, not a quality gain.

1. Where attnpatch reaches: the LLaVA wrapper (model_type "llava") is refused by the transformers patcher;
   its language model (``vlm.model.language_model``, a LlamaModel) patches, and Dense there is bit-identical.
2. Calibration as VAR does it: magnets by ACT's rule (attention of the text rows after the image above
   ``threshold`` x uniform, layers >= 2), image-centric heads by VAR's rule (visual mass >= summ, magnet
   share of it <= rho), saved as a profile and loaded back.
3. The effect in those heads: the text rows' attention on image tokens, stock vs redistributed
   (T -> T + alpha M exactly), and how far the next-token distribution moves (KL, top-1 agreement).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import attnpatch as ap
from attnpatch.methods.observe import Observed
from attnpatch.methods.redistribute import MagnetScan, load_profile, save_profile

N_IMG, IMAGE_ID = 16, 49151  # 16 image tokens (32 px, 8 px patches); the image placeholder: the vocab's last id
# 6 + 16 + 6 tokens each: MagnetScan averages calls of one layout
PROMPTS = ["User: look at this picture", "User: here is a photo", "User: look at this image", "User: here is a picture"]
QUESTIONS = [" How many objects are there?", " Describe it in one sentence.", " Where is the large square?",
             " What is in the middle?"]


def build_vlm(seed: int = 0):
    """(LLaVA with SmolLM2 as its language model and a tiny random vision tower, tokenizer)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from attnpatch.models import smollm2

    lm, tok = smollm2()
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vc, text_config=lm.config, image_token_index=IMAGE_ID, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    vlm = LlavaForConditionalGeneration(cfg).eval()
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    return vlm, tok


def batch(tok, i: int):
    """(input_ids (1, S), pixel_values, image positions, text-after-image positions) of prompt i."""
    pre, post = tok(PROMPTS[i]).input_ids, tok(QUESTIONS[i]).input_ids
    ids = torch.tensor([pre + [IMAGE_ID] * N_IMG + post])
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i))
    img = list(range(len(pre), len(pre) + N_IMG))
    return ids, px, img, list(range(img[-1] + 1, ids.shape[1]))


@torch.no_grad()
def vlm_mechanics(pics: Path, alpha: float = 0.6, threshold: float = 5.0, rho: float = 0.5, summ: float = 0.2) -> dict:
    vlm, tok = build_vlm()
    lm = vlm.model.language_model
    ids, px, img, after = batch(tok, 0)
    try:
        ap.patch(vlm, ap.Dense())
        wrapper = "patched (unexpected)"
    except TypeError as e:
        wrapper = f"refused: {str(e).split(';')[0]}"
    stock = vlm(input_ids=ids, pixel_values=px).logits
    with ap.patch(lm, ap.Dense()):
        dense_err = (vlm(input_ids=ids, pixel_values=px).logits - stock).abs().max().item()
    # calibration: every prompt has the same layout (same token counts), as MagnetScan needs
    scans, prompts = [], [batch(tok, i) for i in range(len(PROMPTS))]
    same = [p for p in prompts if p[0].shape == ids.shape and p[2] == img]
    scan = MagnetScan(queries=after, from_layer=2)
    with ap.patch(lm, Observed(ap.Dense(), scan)):
        for x, y, _, _ in same:
            vlm(input_ids=x, pixel_values=y)
    magnets = scan.magnets(threshold)
    heads = scan.heads(magnets, img, rho=rho, summ=summ)
    path = Path(tempfile.mkdtemp()) / "var_profile.safetensors"
    save_profile(path, heads, magnets, model_type="llama", threshold=threshold, rho=rho, summ=summ)
    method = ap.SinkRedistribution(heads=path, alpha=alpha, targets=img, queries=after)
    assert load_profile(path)[1] == magnets and method.magnets == tuple(magnets)
    # the text rows' image mass in the chosen heads: T before, T + alpha M after (M: the magnets' mass)
    T = [scan.layer_mass(l)[h, img].sum().item() for l, h in heads]
    M = [scan.layer_mass(l)[h, [j for j in magnets]].sum().item() for l, h in heads]
    kl, agree = [], []
    for x, y, _, _ in same:
        ref = vlm(input_ids=x, pixel_values=y).logits[0, -len(after):].log_softmax(-1)
        with ap.patch(lm, method):
            got = vlm(input_ids=x, pixel_values=y).logits[0, -len(after):].log_softmax(-1)
        kl.append(torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1).mean().item())
        agree.append((got.argmax(-1) == ref.argmax(-1)).float().mean().item())
    n = len(heads)
    res = dict(wrapper=wrapper, dense_max_abs_logit_diff=dense_err, magnets=magnets, image_positions=img,
               heads=[list(p) for p in heads], n_heads=n, total_heads=lm.config.num_hidden_layers * lm.config.num_attention_heads,
               image_mass_before=sum(T) / max(n, 1), magnet_mass=sum(M) / max(n, 1),
               image_mass_after=sum(t + alpha * m for t, m in zip(T, M)) / max(n, 1), kl=sum(kl) / len(kl),
               top1_agree=sum(agree) / len(agree), prompts=len(same), alpha=alpha, threshold=threshold, rho=rho, summ=summ)
    res["md"] = _md(res)
    return res


def _md(r: dict) -> str:
    return "\n".join([
        f"- `ap.patch(llava, ...)`: {r['wrapper']}. `ap.patch(llava.model.language_model, ...)` works: Dense there "
        f"changes the logits by {r['dense_max_abs_logit_diff']:.1e} (bit-identical).",
        f"- Calibration on {r['prompts']} prompts (text rows after the 16 image tokens, layers >= 2): magnets by "
        f"ACT's rule (> {r['threshold']} x uniform): key positions {r['magnets']} (image tokens: {r['image_positions'][0]}.."
        f"{r['image_positions'][-1]}); VAR's image-centric heads (image mass >= {r['summ']}, magnet share <= {r['rho']}): "
        f"{r['n_heads']} of {r['total_heads']}.",
        f"- In those heads, the text rows' attention on image tokens: {r['image_mass_before']:.3f} stock -> "
        f"{r['image_mass_after']:.3f} with alpha={r['alpha']} (magnet mass {r['magnet_mass']:.3f} before).",
        f"- Next-token distributions of the text rows, redistributed vs stock: KL {r['kl']:.4f} nats, top-1 agreement "
        f"{r['top1_agree']:.3f} (random vision tower: no claim about answers).",
    ])
