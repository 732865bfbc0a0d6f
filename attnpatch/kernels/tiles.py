"""``tiles``: block-sparse attention executed by the dense SDPA kernel.

Tokens are permuted into tile order once (one row gather per tensor); every query range then
attends a few contiguous key ranges (runs), each one SDPA call on *views* (no per-call copies),
merged by their log-sum-exp in float32. Fully kept runs need no mask; partial runs get the
plan's exact mask_mod as an additive mask (cached per plan). Consecutive query ranges whose runs
have the same lengths and move by the same stride (the interior tiles of a sliding window, the
diagonal of a blocked plan) run as one call: the group becomes an extra head axis of strided
views, so per-call overhead is paid once per group. The result is written in tile order and
put back into the original token order by one more row gather. With the plan at hand the runs are
refined first (tile_runs.py): diagonal blocks whose mask is exactly causal run with is_causal and no
mask, partial runs keep only their kept key columns (and join groups where their mask repeats); in a
causal plan, ranges whose keys are scattered split into 64-row ranges, and ranges with several short
runs copy their keys side by side for one masked call.

Query ranges with several runs merge float32 parts (16-bit inputs are widened for those calls:
parts rounded to 16 bits before the merge would double the error). Under autograd (inputs that
require grad, grad mode on) the gathers and the output are fresh tensors and the parts' LSEs come
from the explicit, differentiable path: the reused buffers would be written in place, chaining
each call's graph to the previous one's.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..blocks import BlockSparse
from ..plan import Plan, fold_q_scale
from .cost import work_of
from .base import Kernel, block_sparse_why_not, needs_grad
from ..ops.bias import additive
from ..ops.lse import merge, sdpa_lse, sdpa_lse_math
from .tile_runs import CAUSAL, Group, _gathered_bias, _keep, _tril_bias, groups  # noqa: F401 (groups: tests, cost)


def _partial_bias(plan: Plan, bs: BlockSparse, qs, qe, ks, ke, dtype, device):
    """(additive bias (1|B, 1|H, Lq, Lk), rows with any key (…, Lq)) for one partial run."""
    key = ("bias", qs, qe, ks, ke, dtype, str(device))
    if key not in bs.cache:
        keep = _keep(plan, bs, qs, qe, ks, ke, device)
        bias = additive(keep, dtype)
        bs.cache[key] = (bias, keep.any(-1))
    return bs.cache[key]


# A grouped call allocates its output (and float32 merge temporaries) afresh. glibc serves blocks above
# 32 MB with mmap, so each such allocation page-faults on every call: measured on the 2-core CPU, a fresh
# 40 MB buffer costs 20 ms to fill against 1.3 ms for a reused one. Groups are split below that.
MAX_CALL_BYTES = 16 << 20


def _causal_lse(q, k, v, scale):
    """(out, lse) of causal attention over one diagonal block by a fused kernel, or None where
    none returns its LSE (the caller then applies the causal mask as a bias)."""
    if q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
    if q.device.type == "cuda":
        try:
            out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scale)
            return out, lse[..., : q.shape[2]]
        except RuntimeError:
            return None
    return None


def _view(x: torch.Tensor, start: int, delta: int, n: int, L: int) -> torch.Tensor:
    """Rows ``[start + i*delta, start + i*delta + L)`` of x (B, H, S, D) for i < n, as one 4-D
    view ``(B*H, n, L, D)`` (``(B, H, L, D)`` when n == 1); for n > 1 x's batch must merge with
    its heads (B == 1 or stride(0) == H * stride(1))."""
    if n == 1:
        return x[:, :, start:start + L]
    B, H, _, D = x.shape
    sB, sH, sS, sD = x.stride()
    return x.as_strided((B * H, n, L, D), (sH, delta * sS, sS, sD), x.storage_offset() + start * sS)


class Tiles(Kernel):
    name = "tiles"

    def why_not(self, q, k, v, plan, mask=None):
        return block_sparse_why_not(q, k, v, plan, mask)  # any v head size: LSE parts fall back to the math path


    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)  # a no-op after core.run folded it
        q, k, v, ot, out = self.prepare(q, k, v, plan)
        self.calls(plan, q, k, v, ot, scale)
        return out if out is not None else _to_original(ot, plan.blocks, q.device)

    def release(self) -> int:
        n = 0
        for pool in (_WORKSPACE.__dict__, _OUTPUTS.__dict__):
            n += sum(t.untyped_storage().nbytes() for t in pool.values())
            pool.clear()
        return n

    @staticmethod
    def prepare(q, k, v, plan: Plan):
        """``(q, k, v, ot, out)``: the inputs in tile order with GQA heads repeated (the row gathers;
        unchanged when no permutation or repeat is needed), the buffer ``calls`` writes results to,
        and the final output when ``ot`` already is it (no permutation), else None."""
        bs = plan.blocks
        B, Hq, S, _ = q.shape
        Dv = v.shape[3]
        rep = Hq // k.shape[1]
        perm = bs.perm_on(q.device)
        if needs_grad(q, k, v):
            return _prepare_for_grad(q, k, v, perm, rep)
        if perm is not None or rep > 1:
            q, k, v = (_gather(x, bs, perm, r, slot) for x, r, slot in ((q, 1, "q"), (k, rep, "k"), (v, rep, "v")))
        if perm is None:  # results go straight to their places; (B, S, H, D) in memory as SDPA's own when B == 1
            ot = (_output((B, S, Hq, Dv), q.dtype, q.device).transpose(1, 2) if B == 1 else
                  _output((B, Hq, S, Dv), q.dtype, q.device))
            return q, k, v, ot, ot
        return q, k, v, _workspace("o", (B, Hq, S, Dv), q.dtype, q.device), None  # tile order; one row gather back

    def calls(self, plan: Plan, q, k, v, ot, scale=None) -> None:
        """The SDPA calls of ``plan`` on tile-ordered q, k, v (from ``prepare``), results into ``ot``
        (benchmarks time this alone to separate the calls from the permutation's memory passes)."""
        bs = plan.blocks
        B, Hq = q.shape[:2]
        mergeable = B == 1 or all(x.stride(0) == x.shape[1] * x.stride(1) for x in (q, k, v, ot))
        row_bytes = B * Hq * ot.shape[3] * 4  # per query row of a call's output (float32 when merged)
        for g in groups(bs, plan, q.device, None if bs.causal else work_of(q, ot)):  # work: grid gathers only
            # batch and heads that cannot merge into one view: one call per range; else calls whose
            # outputs stay below MAX_CALL_BYTES
            c = 1 if not mergeable else max(1, MAX_CALL_BYTES // (g.L * row_bytes))
            for i in range(0, g.n, c):
                sub = g if c >= g.n else Group(min(c, g.n - i), g.q0 + i * g.dq, g.dq, g.L,
                                               [(k0 + i * dk, dk, lk, f) for k0, dk, lk, f in g.runs], g.gather)
                self._call(plan, bs, q, k, v, ot, sub, scale)

    @staticmethod
    def _call(plan, bs, q, k, v, ot, g: Group, scale):
        # under autograd the parts' log-sum-exps must be differentiable: the CPU flash kernel's is not
        lse_fn = sdpa_lse_math if needs_grad(q, k, v, ot) else sdpa_lse
        qv = _view(q, g.q0, g.dq, g.n, g.L)
        kv = [(_view(k, k0, dk, g.n, lk), _view(v, k0, dk, g.n, lk), k0, lk, f) for k0, dk, lk, f in g.runs]
        if len(kv) == 1 and kv[0][4]:
            o = F.scaled_dot_product_attention(qv, kv[0][0], kv[0][1], scale=scale, is_causal=kv[0][4] == CAUSAL)
        elif g.gather:  # the runs' keys side by side: one call with their masks, nothing to merge
            kk, vv = (torch.cat([x[i] for x in kv], dim=-2) for i in (0, 1))
            full = all(r[3] is True for r in g.runs)  # a grid window's full tile rows: nothing to mask
            o = F.scaled_dot_product_attention(qv, kk, vv, scale=scale,
                                               attn_mask=None if full else _gathered_bias(plan, bs, g, q.dtype, q.device))
        else:
            if len(kv) > 1 and q.element_size() < 4:  # 16-bit parts rounded before merging: twice one rounding's error
                qv, kv = qv.float(), [(kk.float(), vv.float(), *rest) for kk, vv, *rest in kv]
            parts = []
            for kk, vv, k0, lk, f in kv:
                if f == CAUSAL:
                    part = None if lse_fn is sdpa_lse_math else _causal_lse(qv, kk, vv, scale)
                    parts.append(part or lse_fn(qv, kk, vv, _tril_bias(bs, lk, qv.dtype, q.device), scale))
                elif f:
                    parts.append(lse_fn(qv, kk, vv, None, scale))
                else:  # a group's partial runs share one mask (groups checks): the first range's bias
                    bias, rows = _partial_bias(plan, bs, g.q0, g.q0 + g.L, k0, k0 + lk, qv.dtype, q.device)
                    o, lse = lse_fn(qv, kk, vv, bias, scale)
                    parts.append((o, lse.masked_fill(~rows, float("-inf"))))
            o = merge(parts)
        _view(ot, g.q0, g.dq, g.n, g.L).copy_(o)


def _prepare_for_grad(q, k, v, perm, rep):
    """``prepare`` when autograd records the call: differentiable gathers into fresh tensors and a
    fresh output (reused buffers written in place would chain every call's graph to the last one's)."""
    def order(x, r):  # (B, H, S, D) -> (B, H*r, S, D) contiguous, tile order
        x = x if perm is None else x.index_select(2, perm)
        return (x.repeat_interleave(r, 1) if r > 1 else x).contiguous()

    q, k, v = order(q, 1), order(k, rep), order(v, rep)
    ot = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    return q, k, v, ot, (ot if perm is None else None)


_WORKSPACE = threading.local()


def _workspace(slot: str, shape, dtype, device) -> torch.Tensor:
    """A reused per-thread buffer (one per slot, latest shape): fresh allocations of this size
    cost more in page faults than the copies into them."""
    # inference-mode tensors cannot be written outside inference mode: separate buffers per mode
    key = (slot, tuple(shape), dtype, str(device), torch.is_inference_mode_enabled())
    ws = _WORKSPACE.__dict__
    if key not in ws:
        for old in [k for k in ws if k[0] == slot]:
            del ws[old]
        ws[key] = torch.empty(shape, dtype=dtype, device=device)
    return ws[key]


_OUTPUTS = threading.local()
_KEEP_OUTPUTS = 4  # output buffers kept per thread (latest shapes)


def _output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised output tensor (a view: callers may keep it as long as they like).

    Large fresh CPU allocations page-fault on every call (glibc maps blocks above 32 MB anew each
    time; the kernel zeroes every page): for a 20K-token video latent that costs ~10 % of a 4 %-dense
    attention. So this thread's previous output of the same shape is recycled once nothing but the
    pool holds its storage, i.e. once the caller has dropped every tensor that views it, as a
    caching allocator would; otherwise (and off the CPU) a new one is allocated."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if device.type != "cpu" or use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = _OUTPUTS.__dict__
    key = (tuple(shape), dtype, torch.is_inference_mode_enabled())  # as in _workspace
    buf = pool.pop(key, None)
    # held by the pool's tensor and by the temporary storage object of this check: nobody else
    if buf is None or use_count(buf.untyped_storage()._cdata) != 2:
        buf = torch.empty(shape, dtype=dtype, device=device)
    pool[key] = buf  # most recent last
    while len(pool) > _KEEP_OUTPUTS:
        del pool[next(iter(pool))]
    return buf.view(shape)  # a new tensor on the same storage: the caller's reference counts as a use


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]] | None:
    """x (B, H, S, D) as a 2-D matrix of D-element rows over its storage plus the row strides
    of (B, H, S), when every (b, h, s) vector is such a row; else None."""
    D = x.shape[3]
    sB, sH, sS, sD = x.stride()
    if sD != 1 or any(s % D for s in (sB, sH, sS)):
        return None
    n = 1 + sum((size - 1) * s for size, s in zip(x.shape[:3], (sB, sH, sS))) // D
    return x.as_strided((n, D), (D, 1), x.storage_offset()), (sB // D, sH // D, sS // D)


def _gather(x: torch.Tensor, bs: BlockSparse, perm, rep: int, slot: str) -> torch.Tensor:
    """x (B, H, S, D) in tile order with heads repeated ``rep`` times (GQA), as a contiguous
    reused buffer (B, H*rep, S, D): one index_select over x's rows, whatever x's layout."""
    B, H, S, D = x.shape
    buf = _workspace(slot, (B, H * rep, S, D), x.dtype, x.device)
    r = _rows(x)
    if r is None:
        x = x.contiguous()
        r = _rows(x)
    rows, strides = r
    key = ("rows", (B, H, S), strides, rep, str(x.device))  # k and v usually share it
    idx = bs.cache.get(key)
    if idx is None:
        order = perm if perm is not None else torch.arange(S, device=x.device)
        b = torch.arange(B, device=x.device).view(B, 1, 1) * strides[0]
        h = (torch.arange(H * rep, device=x.device) // rep).view(1, -1, 1) * strides[1]
        idx = (b + h + order.view(1, 1, S) * strides[2]).flatten()
        idx = bs.cache[key] = idx.int() if rows.shape[0] < 2**31 else idx  # int32: half the memory, same speed
    torch.index_select(rows, 0, idx, out=buf.view(-1, D))
    return buf


def _to_original(ot: torch.Tensor, bs: BlockSparse, device) -> torch.Tensor:
    """The tile-ordered result (B, H, S, D) back in original token order, laid out (B, S, H, D)
    in memory like the SDPA kernel's own output (so the caller's reshape to (B, S, H*D) is free)."""
    B, H, S, D = ot.shape
    key = ("unperm", B, H, S, str(device))
    idx = bs.cache.get(key)
    if idx is None:
        inv = bs.inverse_perm_on(device)
        b = torch.arange(B, device=device).view(B, 1, 1) * (H * S)
        h = torch.arange(H, device=device).view(1, 1, H) * S
        idx = (b + inv.view(1, S, 1) + h).flatten()  # (b, s, h) order
        idx = bs.cache[key] = idx.int() if B * H * S < 2**31 else idx
    if ot.requires_grad:  # under autograd: a differentiable gather into a fresh tensor
        return ot.reshape(-1, D).index_select(0, idx).view(B, S, H, D).transpose(1, 2)
    out = _output((B, S, H, D), ot.dtype, device)
    torch.index_select(ot.reshape(-1, D), 0, idx, out=out.view(-1, D))
    return out.transpose(1, 2)
