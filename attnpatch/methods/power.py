"""``Power``: PowerAttention (2025). Causal; query i sees key j iff i - j < ``local`` or i - j is
a power of two, so d layers reach 2^d tokens back; the first ``sink`` tokens stay visible.
The plan carries the pattern as a mask_mod (every kernel, the goldens) and as ``Plan.lines`` (diagonals
0 .. local - 1 and the powers of two, the sink columns), which the ``lines`` kernel runs at the cost of
what is kept, with no (S_q, S_kv) mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import causal_states, default_tiles, from_states, overlap
from ..plan import Lines, Plan
from ..site import Site
from ._grid import Memo
from .base import Method, check_int

# a tiles block structure is planned only up to this prefill length: the cost model's refined tile stats of
# it took 0.3 s at 2K tokens, 9 s at 4K, 35 s at 16K (2-core CPU), where Plan.lines runs the pattern anyway
BLOCKS_MAX = 2048


@dataclass
class Power(Method):
    """Local window plus keys at power-of-two distances (causal)."""

    source = "PowerAttention: Exponentially Scaling of Receptive Fields (2025)"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)

    local: int = 64
    sink: int = 4

    def __post_init__(self):
        self.local = check_int("Power", "local", self.local, 1, example=64)
        self.sink = check_int("Power", "sink", self.sink, 0, example=4)
        self._plans = Memo()

    def layer_free(self) -> bool:
        return True

    def plan(self, q, k, site: Site) -> Plan:
        if not site.causal:
            raise ValueError("Power is causal (LLM) attention; for image / video models use Neighborhood or Radial")
        if q is None:
            return self._plan(site)
        if site.kv_shift is not None:  # per call: the sink columns move with each row's padding
            return self._plan(site, lines=self._lines(q, k, site))
        # without kv_shift the plan depends only on these: one Plan object per key, for every layer and
        # step, so kernels' caches keyed on its mask_mod (sdpa's materialised mask) or its Lines' layout hit
        B, H, S = q.shape[:3]
        prefill = S == k.shape[2] and site.q_offset == 0  # a causal block structure lets tiles skip the future
        key = (self.local, self.sink, site.q_offset, S, k.shape[2], B, H, q.device)
        return self._plans.get(key, lambda: self._plan(site, S if prefill else None, self._lines(q, k, site)))

    def _lines(self, q, k, site: Site) -> Lines | None:
        """The pattern as ``Plan.lines`` (kernels/lines.py runs it at the cost of what is kept, no (S, S) mask):
        diagonals 0 .. local - 1 and the powers of two up to the last row's position, columns = the sink keys
        (moved right by each batch row's left padding). None for one query (decode) or queries past the keys."""
        B, H, Sq = q.shape[:3]
        Skv, off, shift = k.shape[2], site.q_offset, site.kv_shift
        if Sq == 1 or off + Sq > Skv:
            return None
        top = off + Sq - 1  # the largest offset any row has
        powers = [1 << e for e in range(top.bit_length()) if (1 << e) >= self.local and (1 << e) <= top]
        diags = torch.cat([torch.arange(min(self.local, top + 1)), torch.tensor(powers, dtype=torch.long)])
        sink = torch.arange(min(self.sink, Skv)).expand(B, -1)  # (B, ns) key indices of positions 0 .. sink - 1
        if shift is not None:  # key j holds position j + shift[b]
            sink = sink - shift.cpu().view(-1, 1)
            sink = sink.masked_fill((sink < 0) | (sink >= Skv), -1)
        cols = sink if sink.shape[1] else torch.full((B, 1), -1)
        dev = q.device
        return Lines(cols.to(dev)[:, None].expand(B, H, -1), diags.to(dev).expand(B, H, -1))

    def blocks(self, S: int):
        """Causal block structure of a prefill of S tokens (the executor's default 1-D tile); None
        when one block would hold everything."""
        block = default_tiles((S,), (None,))[0]
        if S <= block:
            return None
        bounds = torch.cat([torch.arange(0, S, block), torch.tensor([S])])
        local, sink = self.local, self.sink
        powers = 2 ** torch.arange(max(1, (S - 1).bit_length()))  # distances 1, 2, 4, ... < S

        def count(rows, a, b):  # kept keys of row i in each block [a, b)
            r = rows[:, None]
            w_lo, s_hi = (r - local + 1).clamp_min(0), torch.clamp(r + 1, max=sink)
            near = overlap(w_lo, r + 1, a, b) + overlap(torch.zeros_like(r), s_hi, a, b) \
                - overlap(w_lo, torch.minimum(s_hi, r + 1), a, b)  # local window and sink, counted once
            j = r - powers[None, :]  # (R, P) keys at power-of-two distances
            far = (j >= 0) & (powers[None, :] >= local) & (j >= sink)  # those not in the window or the sink
            blk = torch.bucketize(j.clamp_min(0), b, right=True)
            return near.index_put_((torch.nonzero(far)[:, 0], blk[far]), torch.ones(()).long().expand(int(far.sum())),
                                   accumulate=True)

        return from_states(causal_states(count, bounds), bounds, None, causal=True)

    def _plan(self, site: Site, prefill: int | None = None, lines: Lines | None = None) -> Plan:
        local, sink, off, shift = self.local, self.sink, site.q_offset, site.kv_shift

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            power = (d > 0) & ((d & (d - 1)) == 0)
            pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute position: left padding is negative
            return ((d < local) | power | ((pos < sink) & (pos >= 0))) & (d >= 0)

        blocks = self.blocks(prefill) if prefill and prefill <= BLOCKS_MAX and shift is None else None
        return Plan(mask_mod=mask_mod, blocks=blocks, name=repr(self), static=shift is None, lines=lines)


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(Power(local=3, sink=1), Site(causal=True), 24))
