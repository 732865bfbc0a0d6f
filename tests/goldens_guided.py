"""Float64 goldens of guided (PAG, SharedAttention) and calibrated (SinkCalibration, Temperature,
EntropyScale) methods, from their papers' definitions."""
from __future__ import annotations

import math

import torch

from goldens import NEG, attention, coords


# ---- guided ---------------------------------------------------------------------------------

def pag(q, k, v, site, perturbed_rows, heads=None, soft=1.0):
    """PAG: perturbed rows (chosen heads) see, from an image query, the text keys and only its own
    image key (identity on the image-image block); text rows are unchanged. SoftPAG mixes."""
    S = q.shape[2]
    cs, _ = coords(site, S)
    dense = attention(q, k, v, lambda b, h, i, j: True)
    ident = attention(q, k, v, lambda b, h, i, j: cs[i] is None or cs[j] is None or i == j)
    out = dense.clone()
    for b in perturbed_rows:
        for h in range(q.shape[1]):
            if heads is None or h in heads:
                out[b, h] = (1 - soft) * dense[b, h] + soft * ident[b, h]
    return out


def adain(x, ref, eps=1e-5):
    """x (H, N, D) to ref's per (head, channel) mean / std over tokens (unbiased std + eps, as the
    library; StyleAligned writes sqrt(var + eps))."""
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True) + eps
    rmu, rsd = ref.mean(1, keepdim=True), ref.std(1, keepdim=True) + eps
    return (x - mu) / sd * rsd + rmu


def shared(q, k, v, site, roles, reference=0, use_adain=True):
    """SharedAttention: in each role group, every non-reference image attends to its own keys plus
    the reference image's visual keys / values, after AdaIN of its visual q, k toward the reference."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, S, D = q.shape
    rep = H // k.shape[1]
    cs, _ = coords(site, S)
    vis = [i for i in range(S) if cs[i] is not None]
    out = attention(q, k, v, lambda b, h, i, j: True)
    roles = roles or ("cond",) * B
    for role in dict.fromkeys(roles):
        rows = [b for b in range(B) if roles[b] == role]
        if len(rows) < 2:
            continue
        ref = rows[reference]
        for b in rows:
            if b == ref:
                continue
            qb, kb = q[b].clone(), k[b].clone()
            if use_adain:
                qb[:, vis] = adain(q[b][:, vis], q[ref][:, vis])
                kb[:, vis] = adain(k[b][:, vis], k[ref][:, vis])
            for h in range(H):
                keys = torch.cat([kb[h // rep], k[ref, h // rep, vis]])
                vals = torch.cat([v[b, h // rep], v[ref, h // rep, vis]])
                out[b, h] = torch.softmax(qb[h] @ keys.T * D ** -0.5, -1) @ vals
    return out


# ---- calibrated -----------------------------------------------------------------------------

def sink_calibration(q, k, v, off, is_causal, heads=None, threshold=5.0, beta=0.4, first=1, max_sinks=16, detect_rows=None):
    """ACT: in the chosen heads, columns j >= ``first`` whose mean over queries of p_ij * n_i
    (attention relative to uniform) exceeds ``threshold`` (the strongest ``max_sinks``) get their
    attention scaled by beta and the rows renormalised: log(beta) added to their scores. The mean
    runs over every query, or with ``detect_rows`` = R < Sq over rows Sq - 1 - floor(r Sq / R), r < R."""
    B, H, Sq, D = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    bias = torch.zeros(B, H, Sq, Skv, dtype=torch.float64)
    vis = [[(not is_causal) or j <= i + off for j in range(Skv)] for i in range(Sq)]
    margins = []
    for b in range(B):
        for h in (range(H) if heads is None else heads):
            col = [0.0] * Skv
            rows = range(Sq) if detect_rows is None or Sq <= detect_rows else \
                [Sq - 1 - (r * Sq) // detect_rows for r in range(detect_rows)]
            for i in rows:
                s = torch.tensor([float(q[b, h, i].detach().double() @ k[b, h // rep, j].detach().double()) * D ** -0.5
                                  if vis[i][j] else NEG for j in range(Skv)])
                p, n = torch.softmax(s, 0).tolist(), sum(vis[i])
                for j in range(Skv):
                    col[j] += p[j] * n / len(rows)
            ranked = sorted((j for j in range(first, Skv)), key=lambda j: -col[j])[:max_sinks]
            margins += [abs(col[j] - threshold) for j in ranked]
            for j in ranked:
                if col[j] > threshold:
                    bias[b, h, :, j] = math.log(beta)
    keep = torch.tensor(vis).expand(B, H, Sq, Skv)
    return attention(q, k, v, keep, bias=bias), min(margins), int((bias != 0).any(2).sum())


def score_scaled(q, k, v, off, is_causal, factor):
    """Softmax of scores times ``factor(n)`` (n: keys the query sees), causal or not."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    qs = q.double().clone()
    for i in range(Sq):  # scaling a query row scales every score of that row
        qs[:, :, i] *= factor(min(i + off + 1, Skv) if is_causal else Skv)
    return attention(qs, k, v, (lambda b, h, i, j: j <= i + off) if is_causal else (lambda b, h, i, j: True))
