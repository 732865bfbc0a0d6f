"""``sdpa``: PyTorch's dense ``scaled_dot_product_attention``, with a plan's mask_mod and
causality materialised as a boolean mask when they cannot be expressed as ``is_causal``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import Plan, materialise_mask, fold_q_scale
from .base import Kernel, core_step_why_not



class SDPA(Kernel):
    name = "sdpa"

    def why_not(self, q, k, v, plan, mask=None):
        if plan.score_mod is not None:
            return "plan.score_mod cannot be expressed as an SDPA mask"
        return core_step_why_not(plan)


    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)  # a no-op after core.run folded it
        B, Hq, Sq, _ = q.shape
        Skv = k.shape[2]
        gqa = Hq != k.shape[1]
        plain_causal = plan.causal and plan.mask_mod is None and mask is None
        if plain_causal and plan.q_offset == 0:
            # upper-left aligned causal is exactly SDPA's is_causal: no mask tensor, fastest path
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if plain_causal and Sq == 1 and plan.q_offset >= Skv - 1:
            plan = Plan()  # a single decode query sees the whole cache
        keep = materialise_mask(plan, B, Hq, Sq, Skv, q.device)  # (B|1, Hq|1, Sq, Skv)
        attn_mask = mask
        if keep is not None:
            if mask is None or mask.dtype == torch.bool:
                attn_mask = keep if mask is None else keep & mask
            else:
                attn_mask = mask.masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
