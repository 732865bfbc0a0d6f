"""The ``lines`` kernel's diagonals run apart (kernels/lines.py): offsets of sparse clusters, which a block call
would pay a block of keys per row for (``lines_layout.DIAG_KEYS``), as row-wise products over every row at once,
merged into the blocks' result by the log-sum-exp."""
from __future__ import annotations

import torch

NEG = float("-inf")


def diagonal_part(q, kv: tuple, table: tuple, offs: list, shape: tuple, scale, dst: tuple, scratch) -> None:
    """Merge the diagonals ``offs`` (``layout``'s "apart": sparse clusters left out of the block ranges) into
    ``dst`` = (out, lse) (B, H, Sq, ...), for every row at once: offset o pairs row i with key p_i - o, so its
    scores are a row-wise product of q with k shifted by o (no matmul: one key per row), its values a shifted
    axpy. q (B, H, Sq, D), ``kv`` = (k, v) (B, H_kv, Skv, D) in key order; ``table`` = (the group's Lines, its
    diagonal table: a head keeps o where entry o + T is 0); ``shape`` = (query offset, T); ``scratch(shape)``
    an uninitialised buffer kept between calls. A key that is also one of the head's columns is left to the
    part that computes columns (each key once)."""
    (k, v), (lines, tab), (off, T), (out, lse) = kv, table, shape, dst
    B, H, Sq, D = q.shape
    G, Skv = k.shape[1], k.shape[2]
    qv, ov, lv = q.unflatten(1, (G, H // G)), out.unflatten(1, (G, H // G)), lse.unflatten(1, (G, H // G))
    ks, vs = k[:, :, None], v[:, :, None]  # a KV head's query heads share its shifted rows (GQA: no copy)
    cols = lines.cols.to(q.device)
    colm = None
    if bool((cols >= 0).any()):  # (B, H, Skv + 1): True on the head's columns (padding writes the last slot)
        colm = torch.zeros(B, H, Skv + 1, dtype=torch.bool, device=q.device)
        colm.scatter_(2, torch.where(cols >= 0, cols, Skv), True)
        colm = colm[..., :Skv].unflatten(1, (G, H // G))
    for c0 in range(0, len(offs), 16):  # 16 diagonals' scores per merge: (16, B, H, Sq) at most
        part = [(o, max(0, o - off)) for o in offs[c0:c0 + 16]]  # (offset, first row whose position reaches key 0)
        part = [(o, i0, min(Sq, Skv + o - off) - i0) for o, i0 in part if min(Sq, Skv + o - off) > i0]  # rows i0 .. + n
        if not part:
            continue
        sc = torch.full((len(part), *qv.shape[:-1]), NEG, dtype=q.dtype, device=q.device)
        for t, (o, i0, n) in enumerate(part):
            j0 = i0 + off - o  # the key of row i0
            # the product into a kept buffer, then its sum: 3x linalg.vecdot's speed (a fresh product page-faults)
            prod = torch.mul(qv[..., i0:i0 + n, :], ks[..., j0:j0 + n, :], out=scratch((*qv.shape[:3], n, D)))
            s = torch.sum(prod, -1, out=sc[t, ..., i0:i0 + n]).mul_(scale)  # (B, G, r, n)
            kept = tab[..., o + T].eq(0).unflatten(1, (G, H // G))[..., None]  # (B, G, r, 1): heads keeping o
            hide = ~kept if colm is None else (~kept) | colm[..., j0:j0 + n]
            if bool(hide.any()):
                s.masked_fill_(hide, NEG)
        m = torch.maximum(lv, sc.amax(0))
        m.masked_fill_(m == NEG, 0.0)  # rows with no key in either part: every weight below is 0
        w0, w = (lv - m).exp_(), sc.sub_(m).exp_()
        tot = w.sum(0).add_(w0)
        lv.copy_(tot.log().add_(m))  # rows with no key anywhere: log 0 = -inf, as before
        tot.masked_fill_(tot == 0, 1.0)
        ov.mul_(w0.div_(tot)[..., None])
        w.div_(tot)
        for t, (o, i0, n) in enumerate(part):
            j0 = i0 + off - o
            ov[..., i0:i0 + n, :].addcmul_(w[t, ..., i0:i0 + n, None], vs[..., j0:j0 + n, :])
