"""``HyperAttention``: near-linear attention by sorted LSH buckets plus a sampled residual (Han et al. 2023).

Non-causal attention of ``nq`` queries on ``nk`` keys (one problem per batch row and query head; a GQA
query head uses its KV head's keys):

1. sortLSH: ``hashes`` random hyperplanes (shared by every head of a layer) give each query and key
   a bucket ``sum_i 2^i [x . w_i > 0]``; buckets are ranked by their place in the reflected Gray
   code, so neighbouring ranks differ in one hyperplane, and queries and keys are sorted by rank
   (stable: ties keep token order).
2. Block diagonal: sorted keys fall in ``nb = ceil(nk / block)`` blocks of ``block``; the query at
   sorted place p is in block ``p * nb // nq`` (``block`` queries per block when nq == nk); a query
   attends exactly to the keys of its block.
3. Residual: ``samples`` sorted key places drawn uniformly with replacement (when nb > 1; one draw per
   head, shared by the batch rows, so a row's output does not depend on its batch); each draw
   outside the query's block adds its key with weight ``nk / samples``: the softmax numerator and
   denominator are both estimated, i.e. score + log(draws * nk / samples).
   A piece of fewer than ``min_len`` queries (or of at most ``block`` keys: one block) is exact.

Causal (the paper's recursion): a causal square of n tokens is exact when n <= ``min_len``, else it
splits at h = ceil(n / 2) into the two diagonal causal halves (recursively) and the lower-left
unmasked block (the last n - h rows on the first h keys, steps 1-3); the pieces are one softmax (merged by their
log-sum-exp). A chunk of queries after ``q_offset`` cached keys is the unmasked block of those keys
plus the causal square of its own tokens, so a decode call (one query) is exact, as in the paper.
Randomness is seeded: hyperplanes by (seed, layer), the draws of each unmasked block by (seed, layer,
the positions of its first query and first key) through ``stream``; the same call gives the same output.

Differences from the authors' code (insu-han/hyper-attn): buckets are ranked by the inverse of the
Gray code (their ``perm[bin]`` applies the Gray code itself, which a later fork flags as a bug: the
paper sorts so adjacent buckets differ in one bit); odd lengths split at ceil(n / 2) and short last
blocks stay short (they pad with zero tokens, which take softmax mass). Left padding (``Site.kv_shift``)
is left out of every piece: a padded row computes what the row alone computes. The plan carries the pieces
(``Plan.buckets``), which kernels/buckets.py runs at the cost of the blocks and draws (no S x S tensor), and,
for every other kernel, a score table over the (S_q, S_kv) grid built on first use (left-padded batches:
the table only, run by the reference and flex kernels).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..plan import Buckets, Piece, Plan
from ..site import Site
from .base import Method, check_int

_MOD = 2**61 - 1
_EXACT = object()  # _pieces: every piece of the call is exact


def stream(*ints: int) -> int:
    """A generator seed from integers (documented so a golden can reproduce every draw)."""
    h = 0
    for x in ints:
        h = (h * 1_000_003 + int(x) + 1) % _MOD
    return h


@functools.lru_cache(maxsize=64)
def _planes(seed: int, layer: int, D: int, hashes: int) -> torch.Tensor:
    """(hashes, D) float64 random hyperplanes of a layer, seeded by (seed, layer)."""
    g = torch.Generator().manual_seed(stream(seed, layer))
    return torch.randn(D, hashes, generator=g, dtype=torch.float64).t().contiguous()


@functools.lru_cache(maxsize=8)
def _gray_rank(bits: int) -> torch.Tensor:
    """(2^bits,) long: bucket b -> its place in the reflected Gray code (the inverse Gray code)."""
    gray = torch.arange(2**bits)
    gray = gray ^ (gray >> 1)  # place i holds bucket gray[i]
    return torch.empty_like(gray).scatter_(0, gray, torch.arange(2**bits))


@dataclass
class HyperAttention(Method):
    """sortLSH block diagonal plus a uniformly sampled residual; causal by the paper's recursion."""

    source = "HyperAttention: Long-context Attention in Near-Linear Time (Han et al. 2023)"

    block: int = 256
    samples: int = 256
    hashes: int = 7
    min_len: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name, low, example in (("block", 1, 256), ("samples", 0, 256), ("hashes", 1, 7), ("min_len", 1, 4096),
                                   ("seed", 0, 0)):
            setattr(self, name, check_int("HyperAttention", name, getattr(self, name), low, example=example))
        if self.hashes > 16:
            raise ValueError(f"HyperAttention(hashes={self.hashes}): expected at most 16 hyperplanes (2^hashes "
                             "buckets), e.g. HyperAttention(hashes=7)")

    def nodes(self, Sq: int, Skv: int, off: int, causal: bool) -> list[tuple]:
        """The call's pieces as (kind, first row, rows, first key, keys) in absolute positions, kind
        "dense" (exact; causal when rows and keys start together) or "hyper" (steps 1-3)."""
        if not causal:
            return [self._unmasked(off, Sq, 0, Skv)]
        out = [self._unmasked(off, Sq, 0, off)] if off else []
        return out + self._square(off, Sq)

    def _unmasked(self, q0: int, nq: int, k0: int, nk: int) -> tuple:
        exact = nq < self.min_len or nk <= self.block  # the paper's short-call rule; one block holds every key
        return ("dense" if exact else "hyper", q0, nq, k0, nk)

    def _square(self, a: int, n: int) -> list[tuple]:
        if n <= self.min_len:
            return [("dense", a, n, a, n)]
        h = (n + 1) // 2
        return self._square(a, h) + [self._unmasked(a + h, n - h, a, h)] + self._square(a + h, n - h)

    def ranks(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, H, S) Gray-code rank of each token's bucket (x (B, H, S, D))."""
        w = _planes(self.seed, layer, x.shape[-1], self.hashes)  # (hashes, D) float64
        work = torch.promote_types(x.dtype, torch.float32)
        # (hashes, D) @ (D, tokens): with the few hyperplanes as the right operand ((tokens, D) @ (D, 7)) the CPU
        # matmul ran 4-6x slower (1.3-1.9 ms for SmolLM2's 9 heads at 1K, a third of the plan)
        bits = (w.to(x.device, work) @ x.to(work).reshape(-1, x.shape[-1]).t()) > 0  # (hashes, B * H * S)
        bucket = (bits.long() << torch.arange(self.hashes, device=x.device)[:, None]).sum(0)
        return _gray_rank(self.hashes).to(x.device)[bucket].view(x.shape[:-1])

    def _draw(self, rank_q, rank_k, rep: int, node: tuple, layer: int) -> Piece:
        """One unmasked piece's sorted orders and draws (the random part, kept out of the score table so
        a table built inside a kernel's vmap draws nothing), from its queries' / keys' ranks (B, H, nq) /
        (B, H_kv, nk)."""
        _, q0, nq, k0, nk = node
        order_q = torch.sort(rank_q, dim=-1, stable=True).indices  # (B, H, nq) sorted place -> query
        order_k = torch.sort(rank_k, dim=-1, stable=True).indices.repeat_interleave(rep, 1)  # (B, H, nk)
        drawn = None
        if -(-nk // self.block) > 1 and self.samples:
            g = torch.Generator().manual_seed(stream(self.seed, layer, q0, k0))
            # (H, samples) sorted key places, the same for every batch row: a row's output never depends on its batch
            drawn = torch.randint(nk, (rank_q.shape[1], self.samples), generator=g).to(rank_q.device)
        return Piece(q0, nq, k0, nk, order_q=order_q, order_k=order_k, block=self.block, drawn=drawn)

    @staticmethod
    def _table(p: Piece, dtype) -> tuple:
        """(keep, bias) (B, Hq, nq, nk) of one sorted piece: a query's block (bias 0) and the drawn keys
        outside it (bias log(draws * nk / samples)); bias None: 0 everywhere."""
        nq, nk, order_q, order_k = p.nq, p.nk, p.order_q, p.order_k
        B, H = order_q.shape[:2]
        nb = -(-nk // p.block)
        place_q = torch.arange(nq, device=order_q.device).expand_as(order_q)
        place_k = torch.arange(nk, device=order_q.device).expand_as(order_k)
        q_blk = torch.empty_like(order_q).scatter_(-1, order_q, place_q * nb // nq)  # (B, H, nq) block of each query
        k_blk = torch.empty_like(order_k).scatter_(-1, order_k, place_k // p.block)  # (B, H, nk) block of each key
        same = q_blk[..., :, None] == k_blk[..., None, :]  # (B, H, nq, nk)
        if p.drawn is None:
            return same, None
        work = torch.promote_types(dtype, torch.float32)
        drawn = p.drawn.expand(B, H, -1)
        count = torch.zeros(B, H, nk, dtype=work, device=order_q.device).scatter_add_(
            -1, order_k.gather(-1, drawn), torch.ones(drawn.shape, dtype=work, device=order_q.device))  # draws per key
        w = (count.clamp_min(1) * (nk / drawn.shape[-1])).log()  # keys never drawn are not kept: any finite value
        return same | (count > 0)[..., None, :], torch.where(same, 0.0, w[..., None, :])

    def pattern(self, q, k, site: Site) -> tuple | None:
        """(keep (B, Hq, Sq, Skv) bool, score bias of the same shape): the kept keys, 0 in blocks and exact
        pieces, log(draws * nk / samples) on drawn keys; None when every piece is exact. Causality is the
        kernel's (keep may hold future keys). Left padding (``Site.kv_shift``): each row's pieces are those
        of its real tokens alone, in positions."""
        B, Sq, Skv, off = q.shape[0], q.shape[2], k.shape[2], site.q_offset
        if site.causal and off + Sq != Skv:
            raise ValueError(f"{self}: a causal call needs its queries to be the last keys (q_offset {off} + "
                             f"{Sq} queries != {Skv} keys)")
        pads = [0] * B if site.kv_shift is None else (-site.kv_shift).clamp_min(0).tolist()
        parts = []
        for pad in sorted(set(pads)):  # rows with the same padding share one computation
            rows = [b for b in range(B) if pads[b] == pad]
            parts.append((rows, self._rows(q[rows], k[rows], off, min(int(pad), Skv), site)))
        if all(t is None for _, t in parts):
            return None
        if len(parts) == 1:
            return parts[0][1]
        keep = torch.ones(B, q.shape[1], Sq, Skv, dtype=torch.bool, device=q.device)
        bias = torch.zeros(keep.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for rows, t in parts:
            if t is not None:  # None: exact (the kernel applies causality and the model's mask)
                keep[rows], bias[rows] = t
        return keep, bias

    def table(self, q, k, site: Site) -> torch.Tensor | None:
        """The pattern as one (B, Hq, Sq, Skv) score bias, -inf where not kept (inspection), or None."""
        got = self.pattern(q, k, site)
        return None if got is None else got[1].masked_fill(~got[0], float("-inf"))

    def _rows(self, q, k, off: int, pad: int, site: Site) -> tuple | None:
        """The pattern of batch rows with ``pad`` leading pad keys: pieces over their real tokens (query index i
        holds position i + off - pad), pad query rows keep everything (their output is masked by the model)."""
        Sq, Skv = q.shape[2], k.shape[2]
        r0 = min(Sq, max(0, pad - off))  # first real query row
        if r0 == Sq or pad == Skv:
            return None
        nodes = self.nodes(Sq - r0, Skv - pad, off + r0 - pad, site.causal)
        if all(n[0] == "dense" for n in nodes):
            return None
        keep = torch.zeros(q.shape[:3] + (Skv,), dtype=torch.bool, device=q.device)
        bias = torch.zeros(keep.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        keep[:, :, :r0] = True
        _fill(keep, bias, self._node_pieces(q, k, nodes, off - pad, pad, site), q.dtype)  # position p: row p - off + pad
        return keep, bias

    def _node_pieces(self, q, k, nodes, row_at: int, key_at: int, site: Site) -> list:
        """``nodes`` as Pieces in call-local rows / keys: the query at position p is row p - ``row_at``, the key at
        position p is key p + ``key_at``; sorted pieces drawn on their own rows and keys (seeded by positions)."""
        out, ranks = [], []
        for node in nodes:
            kind, q0, nq, k0, nk = node
            r, c = q0 - row_at, k0 + key_at
            if kind == "dense":
                out.append(Piece(r, nq, c, nk, causal=site.causal and q0 == k0))
            else:
                if not ranks:  # a token's rank is its own: hashed once per call, not once per piece
                    ranks += [self.ranks(q, site.layer), self.ranks(k, site.layer)]
                p = self._draw(ranks[0][:, :, r:r + nq], ranks[1][:, :, c:c + nk], q.shape[1] // k.shape[1], node,
                               site.layer)
                out.append(dataclasses.replace(p, q0=r, k0=c))
        return out

    def _pieces(self, q, k, site: Site) -> Buckets | None:
        """The call as ``Plan.buckets`` (kernels/buckets.py: no score table), or None: left padding (a row's
        pieces depend on its padding; the table runs it) or every piece exact."""
        if site.kv_shift is not None and bool((site.kv_shift < 0).any()):
            return None
        off, Sq, Skv = site.q_offset, q.shape[2], k.shape[2]
        if site.causal and off + Sq != Skv:
            return None  # pattern() raises the error
        nodes = self.nodes(Sq, Skv, off, site.causal)
        if all(n[0] == "dense" for n in nodes):
            return _EXACT
        return Buckets(tuple(self._node_pieces(q, k, nodes, off, 0, site)))

    def plan(self, q, k, site: Site) -> Plan | None:
        buckets = self._pieces(q, k, site)
        if buckets is _EXACT:
            return None  # every piece is exact: dense (causal) attention, no table
        if buckets is not None:  # the score table is built only if a kernel other than buckets asks for it
            table: list = []
            shape, dtype = q.shape[:3] + (k.shape[2],), q.dtype

            def got():
                if not table:
                    table.append(_from_pieces(buckets, shape, dtype))
                return table[0]
            return self._table_plan(got, buckets)
        got = self.pattern(q, k, site)
        if got is None:
            return None  # every piece is exact: dense (causal) attention
        return self._table_plan(lambda: got, None)

    def _table_plan(self, got, buckets) -> Plan:
        """The plan whose mask_mod / score_mod read the (keep, bias) table ``got()`` returns."""

        def mask_mod(b, h, q_idx, kv_idx):
            keep = got()[0]
            rows = _grid_rows(keep.shape, b, h, q_idx, kv_idx)
            return keep[:, :, rows] if rows is not None else keep[b, h, q_idx, kv_idx]

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = got()[1]
            rows = _grid_rows(bias.shape, b, h, q_idx, kv_idx)
            return score + (bias[:, :, rows] if rows is not None else bias[b, h, q_idx, kv_idx]).to(score.dtype)

        return Plan(mask_mod=mask_mod, score_mod=score_mod, name=repr(self), buckets=buckets)


def _from_pieces(buckets: Buckets, shape, dtype) -> tuple:
    """(keep, bias) (B, Hq, Sq, Skv) of a call given as pieces (no padding: exact pieces keep every key;
    the kernel applies causality)."""
    dev = next(p.order_q for p in buckets.pieces if p.order_q is not None).device
    keep = torch.zeros(shape, dtype=torch.bool, device=dev)
    bias = torch.zeros(shape, dtype=torch.promote_types(dtype, torch.float32), device=dev)
    _fill(keep, bias, buckets.pieces, dtype)
    return keep, bias


def _fill(keep, bias, pieces, dtype) -> None:
    """Write each piece's pattern into the (B, Hq, Sq, Skv) tables: exact pieces keep every key of theirs (the
    kernel applies causality), sorted ones their blocks and drawn keys with the draws' bias."""
    for p in pieces:
        rows, cols = slice(p.q0, p.q0 + p.nq), slice(p.k0, p.k0 + p.nk)
        if p.order_q is None:
            keep[:, :, rows, cols] = True
            continue
        keep[:, :, rows, cols], b = HyperAttention._table(p, dtype)
        if b is not None:
            bias[:, :, rows, cols] = b


def _grid_rows(shape, b, h, q_idx, kv_idx) -> slice | None:
    """The rows a kernel asks for when its index tensors are the full grids of ``plan.index_grids`` (every
    batch row, head and key; a run of query rows): a view of the table instead of a 4-index gather."""
    B, H, _, Skv = shape
    if (b.shape, h.shape, kv_idx.shape) != ((B, 1, 1, 1), (1, H, 1, 1), (1, 1, 1, Skv)) or q_idx.dim() != 4 \
            or q_idx.shape[:2] + q_idx.shape[3:] != (1, 1, 1):
        return None
    start, n = int(q_idx.reshape(-1)[0]), q_idx.shape[2]
    for idx, first, count in ((b, 0, B), (h, 0, H), (q_idx, start, n), (kv_idx, 0, Skv)):
        if not torch.equal(idx.reshape(-1), torch.arange(first, first + count, device=idx.device)):
            return None
    return slice(start, start + n)


if __name__ == "__main__":
    from ..plan import materialise_mask

    torch.manual_seed(0)
    S = 32
    q, k = torch.randn(1, 1, S, 8), torch.randn(1, 1, S, 8)
    m = HyperAttention(block=4, samples=3, hashes=3, min_len=8)
    keep = materialise_mask(m.plan(q, k, Site(causal=True)).with_site(True, 0), 1, 1, S, S, "cpu")[0, 0]
    print(f"{m} on random q, k (causal, {S} tokens; log(n/m)-weighted samples shown as kept):")
    print("\n".join("".join("#" if x else "." for x in row.tolist()) for row in keep))
