"""diffusers context parallelism: attnpatch runs inside Ulysses attention.

``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` shards every denoiser
input along the sequence (the model's ``_cp_plan``); each attention call then runs diffusers'
templated Ulysses attention: an all-to-all gives every rank the whole sequence for H / N heads,
an attention op runs, a second all-to-all gives the output back. attnpatch hands diffusers its own
op, so each rank runs the method on the global sequence of its heads:

- the global token order is rank-interleaved (``[txt_0, img_0, txt_1, img_1, ...]`` for FLUX's
  joint attention, where both segments are sharded); the op gathers it into the model's own order
  (text, then the row-major grid), runs the method, and scatters the output back. A segment the
  plan does not shard (Wan's text in cross-attention) arrives as N identical copies: the method
  sees one, and every copy of a query gets its output;
- the Site names the model heads the rank holds (``Site.heads``), so per-head parameters,
  profiles and head lists index the model's heads; the grid and timestep come from the model's
  unsharded inputs (``steps._read_inputs``);
- data-dependent methods estimate on what the rank holds: every head's whole sequence, so a
  per-head estimate equals the single-process one; an estimate averaged over heads (TopKBlocks)
  sums over the Ulysses group (``Site.head_sum``, one all-reduce).

Ring and unified attention (``ring_degree > 1``) split each call's keys across ranks; they are
refused with ``RING`` rather than run dense.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

RING = ("attnpatch runs under diffusers' Ulysses context parallelism only: ContextParallelConfig(ulysses_degree=N) "
        "with ring_degree=1. Ring and unified attention split each attention call's keys across ranks, so a method's "
        "pattern would have to be merged chunk by chunk; rather than run them dense, attnpatch refuses them. Use "
        "ContextParallelConfig(ulysses_degree=N) (N dividing the head count), or unpatch for stock ring attention")
ANYTHING = ("attnpatch does not run under ContextParallelConfig(ulysses_anything=True) (uneven shards); use "
            "ulysses_anything=False with a sequence length and head count divisible by ulysses_degree")


def no_plan(model) -> str:
    return (f"attnpatch runs context parallelism through diffusers' own context-parallel plans (a model class's _cp_plan: "
            f"FluxTransformer2DModel, WanTransformer3DModel, LTXVideoTransformer3DModel among the families it supports); "
            f"{type(model).__name__} has none in this diffusers version (its processors do not all take a parallel_config, "
            "so a plan of your own would leave some attention calls on one rank's shard), and attnpatch refuses it rather than "
            "run a method on part of the sequence. Run this model on one device per sequence (or unpatch)")


def check_config(parallel_config, model=None) -> None:
    """Raise ``RING`` / ``ANYTHING`` for context-parallel configs attnpatch does not run, and
    ``no_plan`` for a model whose class has no diffusers ``_cp_plan``."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return
    if model is not None and getattr(type(model), "_cp_plan", None) is None:
        raise RuntimeError(no_plan(model))
    if cp.ring_degree > 1:
        raise RuntimeError(RING)
    if getattr(cp, "ulysses_anything", False):
        raise RuntimeError(ANYTHING)


def degree(parallel_config) -> int:
    """How many ranks share one sequence under ``parallel_config`` (1 without context parallelism)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp is None else cp.ulysses_degree * cp.ring_degree


def text_sharded(model) -> bool:
    """Whether the context-parallel plan applied to ``model`` (its ``_cp_plan`` or the one passed to
    ``enable_parallelism``, read from the split hooks it installed) shards ``encoder_hidden_states``;
    else every rank holds all of the text, and Ulysses hands each rank N copies of it."""
    for m in model.modules():
        registry = m.__dict__.get("_diffusers_hook")
        for name, hook in (registry.hooks.items() if registry is not None else ()):
            meta = getattr(hook, "metadata", None)
            if name.startswith("cp_input---") and isinstance(meta, dict) and "encoder_hidden_states" in meta:
                return True
    return False


def run(call, frame, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
    """Ulysses attention of ``(B, S_local, H, D)`` tensors with attnpatch's op; ``(B, S_local, H, D)``."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    check_config(parallel_config)
    cp = parallel_config.context_parallel_config
    N, rank = cp.ulysses_degree, cp._ulysses_mesh.get_local_rank()
    H = query.shape[2]
    if H % N:
        raise RuntimeError(f"{call.name}: {H} heads do not split over ulysses_degree={N}; use a degree dividing {H}")
    layout = _Layout(call, N, query.shape[1], key.shape[1])
    order = _head_order(call, layout, H, N, query.shape[3], is_causal)  # the model's heads in rank order, or None
    if order is not None:
        query, key, value = (x[:, :, order] for x in (query, key, value))
    Hl = H // N
    heads = tuple(order[rank * Hl:(rank + 1) * Hl].tolist()) if order is not None else tuple(range(rank * Hl, (rank + 1) * Hl))
    saved = {}
    # estimates averaged over heads (TopKBlocks) sum over the Ulysses group: each rank holds H / N of them
    head_sum = functools.partial(torch.distributed.all_reduce, group=cp._ulysses_mesh.get_group()) if N > 1 else None

    def attend(q, k, v, mask):
        """(B, S_global, Hl, D) -> the same, through the method in the model's token order."""
        if mask is not None and mask.dim() == 4 and mask.shape[1] == H and Hl != H:
            mask = mask[:, list(heads)]  # a per-head mask keeps all H heads: the rank's (diffusers' own op fails here)
        qc, kc, vc, mc = layout.canonical(q, k, v, mask)
        out = call.run(frame, qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), mask=mc, scale=scale,
                       causal=is_causal, heads=heads, num_heads=H, head_sum=head_sum)
        if out is None:  # not a call the method applies to (e.g. text-only): stock attention, as diffusers'
            out = F.scaled_dot_product_attention(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                                 attn_mask=_sdpa_mask(mc, q.shape[0]), scale=scale, is_causal=is_causal)
        return layout.back(out.transpose(1, 2))

    def forward_op(ctx, q, k, v, mask, dropout_p, is_causal_, scale_, enable_gqa_, return_lse, _save_ctx=True,
                   _parallel_config=None):
        if return_lse:
            raise RuntimeError("attnpatch's Ulysses op does not return the log-sum-exp (ring / unified attention "
                               "need it: " + RING + ")")
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            saved["inputs"] = (q, k, v, mask)
        return attend(q, k, v, mask)

    def backward_op(ctx, grad_out):  # recompute through autograd: the method's own backward, exact
        q, k, v, mask = saved.pop("inputs")
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        with torch.enable_grad():
            out = attend(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    out = _templated_context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                False, forward_op=forward_op, backward_op=backward_op,
                                                _parallel_config=parallel_config)
    if order is not None:
        out = out[:, :, torch.argsort(order)]
    return out


def _head_order(call, layout, H: int, N: int, D: int, causal: bool):
    """Heads dealt to ranks by the work of their plans (``balance.order``), remembered per call
    shape and step on the attention module's call object (every rank computes the same order)."""
    st = call.state
    key = (st.grid, layout.Sq_model, layout.Skv_model, H, N, st.tracker.step, st.timestep)
    memo = call.__dict__.setdefault("_head_orders", {})
    if key not in memo:
        from . import balance

        site, _ = call.site(layout.Sq_model, layout.Skv_model, bool(causal))
        work = None if site is None else balance.head_work(call.method, site, H, layout.Sq_model, layout.Skv_model, D)
        if len(memo) > 16:
            memo.clear()
        memo[key] = balance.order(work, N)
    return memo[key]


def all_rows(parallel_config, q, mask, attend):
    """``attend(q, mask)`` on the query rows of every rank (rank r holds rows [r S, (r+1) S) of the
    sequence: diffusers' split hooks shard contiguously), then this rank's rows of the output."""
    cp = parallel_config.context_parallel_config
    group, N = cp._ulysses_mesh.get_group(), cp.ulysses_degree
    rank, S = cp._ulysses_mesh.get_local_rank(), q.shape[2]

    def gather(x, dim):
        parts = [torch.empty_like(x) for _ in range(N)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    if mask is not None and mask.dim() >= 2 and mask.shape[-2] == S and S > 1:
        mask = gather(mask, mask.dim() - 2)
    return attend(gather(q, 2), mask)[:, :, rank * S:(rank + 1) * S]


def _sdpa_mask(mask, B):
    if mask is not None and mask.dim() == 2 and mask.shape[0] == B:  # diffusers' [B, S_kv] key mask
        return mask[:, None, None, :]
    return mask


class _Layout:
    """Where each token of the model's own order sits in Ulysses' rank-interleaved global order."""

    def __init__(self, call, N: int, Sq_local: int, Skv_local: int):
        st = call.state
        n = math.prod(st.grid or ())
        joint = Sq_local == Skv_local and st.grid is not None and Sq_local * N > n
        self.q_idx, self.q_back = _segments(Sq_local, N, n if joint else None, st.family.text_first, call.state.text_sharded)
        if Sq_local == Skv_local:
            self.kv_idx = self.q_idx
        elif call.state.text_sharded:  # cross-attention to sharded text: the ranks' shards in order
            self.kv_idx = None
        else:  # every rank held all of the text: N copies, the first one is the keys
            self.kv_idx = slice(0, Skv_local)
        self.Sq, self.Skv = Sq_local * N, Skv_local * N  # the global (rank-interleaved) lengths
        self.Sq_model = self.Sq if self.q_idx is None else self.q_idx.numel()  # the lengths the method sees
        self.Skv_model = (self.Sq_model if Sq_local == Skv_local else self.Skv if self.kv_idx is None
                          else Skv_local)

    def canonical(self, q, k, v, mask):
        if self.q_idx is not None:
            q = q[:, self.q_idx]
        if self.kv_idx is not None:
            k, v = k[:, self.kv_idx], v[:, self.kv_idx]
        if mask is not None:
            if self.kv_idx is not None and mask.shape[-1] == self.Skv:
                mask = mask[..., self.kv_idx]
            if self.q_idx is not None and mask.dim() >= 3 and mask.shape[-2] == self.Sq:
                mask = mask[..., self.q_idx, :]
        return q, k, v, mask

    def back(self, out):
        return out if self.q_back is None else out[:, self.q_back]


@functools.lru_cache(maxsize=64)  # per call shape: the same indices for every layer and step (never written to)
def _segments(S_local: int, N: int, visual: int | None, text_first: bool, text_sharded: bool):
    """(global index of each token in the model's order, model-order index of each global token);
    (None, None) when the orders agree (a self-attention call over one sharded segment)."""
    if visual is None:
        return None, None
    I_local = visual // N
    if visual % N or I_local > S_local:
        raise RuntimeError(f"context parallelism: {visual} visual tokens do not split over {N} ranks")
    T_local = S_local - I_local
    rank0 = torch.arange(N)[:, None] * S_local  # first global index of each rank's shard
    t_off, i_off = (0, T_local) if text_first else (I_local, 0)
    txt = (rank0 + t_off + torch.arange(T_local)).reshape(-1)  # (N * T_local): the ranks' text rows in order
    img = (rank0 + i_off + torch.arange(I_local)).reshape(-1)
    if not text_sharded:  # each rank held all of the text: rank 0's copy is the text
        txt = txt[:T_local]
    idx = torch.cat([txt, img] if text_first else [img, txt])
    back = torch.empty(S_local * N, dtype=torch.long)
    back[idx] = torch.arange(idx.numel())
    if not text_sharded:  # every copy of a text query gets the output of the one the method saw
        copies = (rank0 + t_off + torch.arange(T_local)).reshape(-1)
        first = (torch.arange(T_local) if text_first else I_local * N + torch.arange(T_local)).repeat(N)
        back[copies] = first
    return idx, back


def enable(model, config, cp_plan=None) -> None:
    """``model.enable_parallelism(config=config)``, also on a machine without an accelerator.
    diffusers 0.42 computes ``rank % torch.accelerator.device_count()`` while resolving the config,
    which divides by zero on a CPU-only machine (gloo); with no accelerator this counts one device
    for that call only (the device it names is then ``cpu:0``; pass your own CPU ``DeviceMesh``
    with dims ("ring", "ulysses") in the config, as ``init_device_mesh("cpu", (1, N),
    mesh_dim_names=("ring", "ulysses"))``)."""
    acc = torch.accelerator
    if acc.device_count() > 0:
        model.enable_parallelism(config=config, cp_plan=cp_plan)
        return
    count = acc.device_count
    acc.device_count = lambda: 1
    try:
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    finally:
        acc.device_count = count
