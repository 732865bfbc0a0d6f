"""Float64 golden of SinkRedistribution from its definition (VAR's rule), written per row and per key:
full attention probabilities p_ij (causal or not), magnet columns given or found by ACT's rule
(mean over the detection rows of p_ij n_i above the threshold, the strongest max_magnets, among the
candidates, never the first ``first`` keys), then for each chosen row

    p'_ij = (1 - alpha) p_ij (magnets), p_ij (1 + alpha M_i / T_i) (targets less magnets), p_ij (others),

rows with T_i = 0 unchanged; output p' @ v."""
from __future__ import annotations

import torch


def _probs(q, k, b, h, rep, off, is_causal):
    """(Sq, Skv) float64 softmax of head h of batch row b, and the visibility (Sq, Skv)."""
    Sq, Skv, D = q.shape[2], k.shape[2], q.shape[3]
    s = q[b, h].double() @ k[b, h // rep].double().T * D ** -0.5
    vis = torch.ones(Sq, Skv, dtype=torch.bool)
    if is_causal:
        vis = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + off
    return torch.softmax(s.masked_fill(~vis, float("-inf")), -1), vis


def _detect(p, vis, threshold, first, max_magnets, detect_rows, candidates):
    """(magnet key indices, the smallest distance of a ranked column's score to the threshold)."""
    Sq, Skv = p.shape
    rows = list(range(Sq)) if detect_rows is None or Sq <= detect_rows else \
        [Sq - 1 - (r * Sq) // detect_rows for r in range(detect_rows)]
    pd = p.detach()
    col = [sum(float(pd[i, j]) * int(vis[i].sum()) for i in rows) / len(rows) for j in range(Skv)]
    pool = [j for j in range(first, Skv) if candidates is None or j in candidates]
    ranked = sorted(pool, key=lambda j: -col[j])[:max_magnets]
    return [j for j in ranked if col[j] > threshold], min((abs(col[j] - threshold) for j in ranked), default=1.0)


def redistribution(q, k, v, off, is_causal, alpha=0.4, heads=None, magnets=None, targets=None, candidates=None,
                   queries=None, threshold=5.0, first=0, max_magnets=16, detect_rows=None):
    """(output (B, H, Sq, Dv) float64, detection margin, magnet columns found). ``targets`` /
    ``candidates``: key index sets or None; ``queries``: query row indices (None: all)."""
    B, H, Sq, _ = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, Sq, v.shape[3], dtype=torch.float64)
    margins, found = [1.0], 0
    for b in range(B):
        for h in range(H):
            p, vis = _probs(q, k, b, h, rep, off, is_causal)
            if heads is None or h in heads:
                mags = magnets
                if mags is None:
                    mags, margin = _detect(p, vis, threshold, first, max_magnets, detect_rows, candidates)
                    margins.append(margin)
                found += len(mags)
                tgt = [j for j in range(Skv) if j not in mags and (targets is None or j in targets)]
                rows = []  # out of place: autograd runs through this golden (tests/test_grad.py)
                for i in range(Sq):
                    M, T = p[i, mags].sum(), p[i, tgt].sum()
                    if (queries is not None and i not in queries) or T == 0:
                        rows.append(p[i])
                        continue
                    scale = [1 - alpha if j in mags else 1 + alpha * M / T if j in tgt else 1.0 for j in range(Skv)]
                    rows.append(p[i] * torch.stack([torch.as_tensor(x, dtype=p.dtype) for x in scale]))
                p = torch.stack(rows)
            out[b, h] = p @ v[b, h // rep].double()
    return out, min(margins), found
