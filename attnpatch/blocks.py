"""``BlockSparse``: the block structure of a plan, the acceleration structure kernels share.

Tokens are first permuted into tile order (``perm``), so every block is a contiguous range
``[bounds[i], bounds[i+1])`` of the permuted sequence. For each query block, ``kv_idx`` (CSR
over ``kv_ptr``) lists the KV blocks with any kept element, ascending, and ``kv_full`` says
which of them are kept entirely. The exact pattern stays the plan's ``mask_mod`` (in original
token indices): partial blocks evaluate it, empty blocks are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class BlockSparse:
    perm: torch.Tensor | None  # (S,) permuted position -> original token index; None: identity
    bounds: torch.Tensor  # (nb + 1,) block boundaries in the permuted sequence
    kv_ptr: torch.Tensor  # (nb + 1,) CSR row pointers over query blocks
    kv_idx: torch.Tensor  # (nnz,) KV block ids, ascending within a row
    kv_full: torch.Tensor  # (nnz,) True where the block pair is kept entirely
    cache: dict = field(default_factory=dict, repr=False)  # per-kernel derived data
    causal: bool = False  # the states and the plan's mask_mod already include causality (prefill, no cache)

    @property
    def num_blocks(self) -> int:
        return self.bounds.numel() - 1

    @property
    def seq_len(self) -> int:
        return int(self.bounds[-1])

    def pair_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query block size, kv block size) of every stored pair."""
        sizes = self.bounds.diff()
        rows = torch.repeat_interleave(torch.arange(self.num_blocks), self.kv_ptr.diff())
        return sizes[rows], sizes[self.kv_idx]

    def density(self) -> float:
        """Fraction of the S x S score matrix inside non-empty blocks: what a block-sparse
        kernel computes, so 1 / density is its ideal speedup over dense attention."""
        qs, ks = self.pair_sizes()
        return float((qs * ks).sum()) / self.seq_len**2

    def perm_on(self, device) -> torch.Tensor | None:
        """The permutation on ``device`` (cached: kernels need it on every call)."""
        return self._on("perm", self.perm, device)

    def inverse_perm_on(self, device) -> torch.Tensor | None:
        """Tile-order position of every original token, on ``device`` (cached)."""
        if self.perm is None:
            return None
        if "inv" not in self.cache:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.perm.numel())
            self.cache["inv"] = inv
        return self._on("inv", self.cache["inv"], device)

    def _on(self, name: str, t: torch.Tensor | None, device) -> torch.Tensor | None:
        if t is None:
            return None
        key = (name, str(device))
        if key not in self.cache:
            self.cache[key] = t.to(device)
        return self.cache[key]

    def runs(self) -> list[tuple[int, int, list[tuple[int, int, bool]]]]:
        """``[(q_start, q_end, [(kv_start, kv_end, full), ...]), ...]`` in permuted token
        positions: adjacent KV blocks of one kind merge into one contiguous run, and adjacent
        query blocks with identical runs merge into one query range (fewer, larger calls)."""
        if "runs" in self.cache:
            return self.cache["runs"]
        b = self.bounds.tolist()
        ptr, idx, full = self.kv_ptr.tolist(), self.kv_idx.tolist(), self.kv_full.tolist()
        out: list = []
        for i in range(self.num_blocks):
            runs: list[list] = []
            for j, f in zip(idx[ptr[i]:ptr[i + 1]], full[ptr[i]:ptr[i + 1]]):
                if runs and runs[-1][1] == b[j] and runs[-1][2] == f:
                    runs[-1][1] = b[j + 1]
                else:
                    runs.append([b[j], b[j + 1], f])
            runs_t = [tuple(r) for r in runs]
            if out and out[-1][1] == b[i] and out[-1][2] == runs_t and all(r[2] for r in runs_t):
                out[-1] = (out[-1][0], b[i + 1], runs_t)  # merge only fully kept rows: masks are per row
            else:
                out.append((b[i], b[i + 1], runs_t))
        self.cache["runs"] = out
        return out


def causal_states(keep_count, bounds: torch.Tensor) -> torch.Tensor:
    """(nb, nb) states of a causal 1-D pattern from ``keep_count(rows (R,), a, b) -> (R, nb)``, the
    number of kept keys of each query row in every key block [a_j, b_j): 0 empty, 1 partial, 2 full."""
    S = int(bounds[-1])
    a, b = bounds[:-1], bounds[1:]
    rows = torch.arange(S)
    counts = keep_count(rows, a, b)  # (S, nb)
    block_of = torch.repeat_interleave(torch.arange(len(a)), b - a)
    kept = torch.zeros(len(a), len(a), dtype=torch.long).index_add_(0, block_of, counts)  # (nb, nb)
    size = (b - a)[:, None] * (b - a)[None, :]
    return torch.where(kept == 0, 0, torch.where(kept == size, 2, 1)).to(torch.uint8)


def overlap(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|[lo, hi) n [a, b)| for rows (R, 1) against blocks (nb,): (R, nb)."""
    return (torch.minimum(hi, b) - torch.maximum(lo, a)).clamp_min(0)


def from_states(state: torch.Tensor, bounds: torch.Tensor, perm: torch.Tensor | None, causal: bool = False) -> BlockSparse:
    """Build the CSR structure from a (nb, nb) block-state matrix: 0 empty, 1 partial, 2 full."""
    nz = state > 0
    kv_ptr = torch.zeros(state.shape[0] + 1, dtype=torch.long)
    kv_ptr[1:] = nz.sum(1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)  # row-major, so columns ascend within a row
    return BlockSparse(perm=perm, bounds=bounds.long(), kv_ptr=kv_ptr, kv_idx=cols, kv_full=state[rows, cols] == 2, causal=causal)
