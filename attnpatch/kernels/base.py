"""The ``Kernel`` interface and the input checks every kernel shares."""
from __future__ import annotations

import torch

from ..plan import Plan


class Kernel:
    """Computes attention on ``(B, H, S, D)`` tensors for a ``Plan``.

    ``mask`` is the model's own mask (padding, causal from the framework): boolean (True =
    keep) or additive float, broadcastable to ``(B, H_q, S_q, S_kv)``. GQA: ``H_q = n * H_kv``.
    """

    name = "kernel"

    def why_not(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, mask=None) -> str | None:
        """None when this kernel can run the call, else the reason it cannot."""
        return None


    def run(self, q, k, v, plan: Plan, *, mask=None, scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prepared(self, q, k, v, plan: Plan, scale: float | None = None):
        """A callable (q, k, v) -> ``run(q, k, v, plan, scale=scale)`` for later calls of this shape without
        a mask, with this kernel's per-call checks already done, or None (core then calls ``run``)."""
        return None

    def release(self) -> int:
        """Drop the buffers this kernel keeps for reuse in the calling thread; bytes released."""
        return 0

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError naming the problem when q, k, v are not valid ``(B, H, S, D)`` inputs."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{n} must be a 4-D tensor (B, H, S, D), got {got}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them, e.g. k.to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}: move them, e.g. k.to(q.device)")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for GQA; "
            "pass (B, H, S, D) tensors, not (B, S, H, D)"
        )


def check_mask(mask, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise ValueError unless ``mask`` is None or a boolean / float tensor on q's device that
    broadcasts to ``(B, H_q, S_q, S_kv)``."""
    if mask is None:
        return
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor broadcastable to (B, H_q, S_q, S_kv) = {want}, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be boolean (True = keep) or additive float, got {mask.dtype}: use mask.bool()")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q on {q.device}: move it, e.g. mask.to(q.device)")
    shape = tuple(mask.shape)
    if mask.dim() > 4 or any(m not in (1, w) for m, w in zip(shape[::-1], want[::-1])):
        raise ValueError(f"mask of shape {shape} does not broadcast to (B, H_q, S_q, S_kv) = {want}; "
                         "pass e.g. (B, 1, S_q, S_kv) or (S_q, S_kv)")


def check_scale(scale) -> None:
    """Raise ValueError unless ``scale`` is None or a positive finite real number."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive number (the score multiplier, default 1/sqrt(head_dim)), got {scale!r}")


def needs_grad(*tensors) -> bool:
    """True when autograd records this call: a kernel without backward must not run it."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


CORE_STEPS = ("transform", "extra_kv", "output", "parts")  # applied around every kernel by attnpatch.core


def core_step_why_not(plan: Plan) -> str | None:
    """Why a kernel is not handed ``plan`` as it is: the steps attnpatch.core applies around every
    kernel (the same for all of them) are still in it."""
    if plan.transform is None and plan.extra_kv is None and plan.output is None and not plan.parts:
        return None  # the common case, checked on every call: no loop
    for f in CORE_STEPS:
        if getattr(plan, f):
            return f"plan.{f} is applied around the kernel by attnpatch.core: call attnpatch.attend"
    return None


def block_sparse_why_not(q, k, v, plan: Plan, mask) -> str | None:
    """Why a block-sparse kernel (tiles, triton) cannot run a call, or None."""
    bs = plan.blocks
    if bs is None:
        return "plan has no block structure"
    if mask is not None:
        return "an external attention mask (e.g. text padding) is not supported"
    if plan.score_mod is not None:
        return "plan.score_mod is not supported"
    reason = core_step_why_not(plan)
    if reason:
        return reason
    if plan.causal and not (bs.causal and plan.q_offset == 0):
        return "causal plans need a causal block structure (prefill without a cache)"
    if not (q.shape[2] == k.shape[2] == bs.seq_len):
        return f"sequence lengths ({q.shape[2]}, {k.shape[2]}) differ from the block layout ({bs.seq_len})"
    if not bs.kv_full.all() and plan.mask_mod is None:
        return "partial blocks need the plan's mask_mod"
    return None
