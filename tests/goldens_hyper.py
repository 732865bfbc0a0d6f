"""Float64 golden of HyperAttention (Han et al. 2023), written from its definition (the method's module
docstring) the way the authors compute it: each piece is attention returning (output, log-sum-exp),
pieces merge by their log-sum-exp, the causal square recurses on halves. Plain loops over rows; the
only things shared with the library are the documented random streams (seed formula, draw shapes)."""
from __future__ import annotations

import math

import torch

MOD = 2**61 - 1


def stream(*ints):
    h = 0
    for x in ints:
        h = (h * 1_000_003 + int(x) + 1) % MOD
    return h


def gray_places(bits):
    """bucket -> its place in the reflected Gray sequence 0, 1, 3, 2, 6, 7, 5, 4, ..."""
    seq = [0, 1]
    for i in range(1, bits):
        seq = seq + [x + 2**i for x in reversed(seq)]
    return {bucket: place for place, bucket in enumerate(seq)}


def merge(a, b):
    """Two (out (n, D), lse (n,)) pieces of the same rows as one softmax."""
    (oa, la), (ob, lb) = a, b
    lse = torch.logaddexp(la, lb)
    wa, wb = torch.exp(la - lse).nan_to_num(0.0), torch.exp(lb - lse).nan_to_num(0.0)
    return oa * wa[:, None] + ob * wb[:, None], lse


def weighted(qi, keys, vals, weights, scale):
    """Attention of one query on (key, weight) terms: (out (D,), lse) of sum_j w_j exp(s_j)."""
    if not keys:
        return torch.zeros(vals.shape[-1], dtype=torch.float64), torch.tensor(-math.inf, dtype=torch.float64)
    s = torch.stack([qi @ keys_j for keys_j in keys]) * scale + torch.log(torch.tensor(weights, dtype=torch.float64))
    lse = torch.logsumexp(s, 0)
    return (torch.exp(s - lse)[:, None] * torch.stack(vals)).sum(0), lse


def hyper_attention(q, k, v, off, causal, block, samples, hashes, min_len, seed, layer=0, pads=None):
    """(B, H, Sq, D) float64 HyperAttention of a call whose first query sits at position ``off``. ``pads``:
    leading pad tokens of each batch row, left out (their query rows: 0): each row is computed alone, on
    its real tokens at their positions."""
    if pads is not None and any(pads):
        out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
        for b, p in enumerate(pads):
            r0 = max(0, p - off)
            out[b:b + 1, :, r0:] = hyper_attention(q[b:b + 1, :, r0:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], off + r0 - p,
                                                   causal, block, samples, hashes, min_len, seed, layer)
        return out
    q, k, v = q.double(), k.double(), v.double()
    B, H, Sq, D = q.shape
    rep, Skv, scale = H // k.shape[1], k.shape[2], D ** -0.5
    w = torch.randn(D, hashes, generator=torch.Generator().manual_seed(stream(seed, layer)), dtype=torch.float64)
    places = gray_places(hashes)

    def place(x):  # Gray place of a vector's bucket
        return places[sum(2**i for i in range(hashes) if float(x.detach() @ w[:, i]) > 0)]

    def exact(b, h, q0, nq, k0, nk, is_causal):
        rows = []
        for i in range(q0, q0 + nq):
            js = [j for j in range(k0, k0 + nk) if not is_causal or j <= i]
            rows.append(weighted(q[b, h, i - off], [k[b, h // rep, j] for j in js], [v[b, h // rep, j] for j in js],
                                 [1.0] * len(js), scale))
        return torch.stack([o for o, _ in rows]), torch.stack([l for _, l in rows])

    def unmasked(q0, nq, k0, nk):
        """{(b, h): (out, lse)} of rows q0.. on keys k0.. without a causal mask."""
        if nq < min_len:
            return {(b, h): exact(b, h, q0, nq, k0, nk, False) for b in range(B) for h in range(H)}
        nb = -(-nk // block)
        draws = None
        if nb > 1 and samples > 0:
            draws = torch.randint(nk, (H, samples), generator=torch.Generator().manual_seed(stream(seed, layer, q0, k0)))
        out = {}
        for b in range(B):
            for h in range(H):
                qs = sorted(range(q0, q0 + nq), key=lambda i: (place(q[b, h, i - off]), i))
                ks = sorted(range(k0, k0 + nk), key=lambda j: (place(k[b, h // rep, j]), j))
                q_blk = {i: p * nb // nq for p, i in enumerate(qs)}
                k_blk = {j: p // block for p, j in enumerate(ks)}
                count = {}
                for t in ([] if draws is None else draws[h].tolist()):  # one draw per head, shared by the rows
                    count[ks[t]] = count.get(ks[t], 0) + 1
                rows = []
                for i in range(q0, q0 + nq):
                    terms = [(j, 1.0) for j in range(k0, k0 + nk) if k_blk[j] == q_blk[i]]
                    terms += [(j, c * nk / samples) for j, c in count.items() if k_blk[j] != q_blk[i]]
                    rows.append(weighted(q[b, h, i - off], [k[b, h // rep, j] for j, _ in terms],
                                         [v[b, h // rep, j] for j, _ in terms], [x for _, x in terms], scale))
                out[b, h] = torch.stack([o for o, _ in rows]), torch.stack([l for _, l in rows])
        return out

    def square(a, n):
        if n <= min_len:
            return {(b, h): exact(b, h, a, n, a, n, True) for b in range(B) for h in range(H)}
        half = (n + 1) // 2
        top, low, left = square(a, half), square(a + half, n - half), unmasked(a + half, n - half, a, half)
        out = {}
        for bh in top:
            o, lse = merge(low[bh], left[bh])
            out[bh] = torch.cat([top[bh][0], o]), torch.cat([top[bh][1], lse])
        return out

    if causal:
        res = square(off, Sq)
        if off:  # the cached keys: an unmasked piece for the whole chunk
            prefix = unmasked(off, Sq, 0, off)
            res = {bh: merge(res[bh], prefix[bh]) for bh in res}
    else:
        res = unmasked(off, Sq, 0, Skv)
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=torch.float64)
    for (b, h), (o, _) in res.items():
        out[b, h] = o
    return out
