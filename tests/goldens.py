"""Float64 goldens: every public method's attention written from its documented definition
(METHODS.md, the method docstrings, the papers), with plain loops over positions and grid
coordinates. Nothing here reads a plan or a ``mask_mod``: each golden builds its own keep mask
(and, for data-dependent methods, its own selection) and runs softmax attention in float64.
Tensors are (B, H, S, D); GQA keys / values are shared by H_q / H_kv consecutive query heads."""
from __future__ import annotations

import math

import torch

NEG = float("-inf")


def attention(q, k, v, keep, scale=None, bias=None):
    """Softmax attention in float64. ``keep(b, h, i, j) -> bool`` or a (B, H, Sq, Skv) bool
    tensor; ``bias`` an optional additive (B, H, Sq, Skv) score term."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Sq, D = q.shape
    rep, Skv = H // k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h // rep].T * scale  # (Sq, Skv)
            if bias is not None:
                s = s + bias[b, h]
            m = keep[b, h] if torch.is_tensor(keep) else torch.tensor(
                [[bool(keep(b, h, i, j)) for j in range(Skv)] for i in range(Sq)])
            out[b, h] = torch.softmax(s.masked_fill(~m, NEG), -1) @ v[b, h // rep]
    return out


def causal(rule, off):
    """keep(b, h, i, j) of a causal rule on absolute query position p = i + off."""
    return lambda b, h, i, j: j <= i + off and rule(i + off, j)


# ---- token layout: text tokens and row-major visual grid coordinates -----------------------

def coords(site, S):
    """Per token: None for text, else its grid coordinate tuple (row-major over the grid)."""
    grid = site.grid or (S - site.text_len,)
    v0 = site.text_len if site.text_first else 0
    out = [None] * S
    for t in range(math.prod(grid)):
        c, r = [], t
        for n in reversed(grid):
            r, x = divmod(r, n)
            c.append(x)
        out[v0 + t] = tuple(reversed(c))
    return out, grid


def grid_keep(site, S, axis_rule):
    """keep over a self / joint call: text dense both ways, visual pairs by ``axis_rule(a, n, ci, cj)``
    on every axis a (a product pattern)."""
    cs, grid = coords(site, S)

    def keep(b, h, i, j):
        if cs[i] is None or cs[j] is None:
            return True
        return all(axis_rule(a, n, cs[i][a], cs[j][a]) for a, n in enumerate(grid))
    return keep


def window_start(centre, w, n):
    """First index of a ``w``-wide window centred on ``centre``, shifted inward to fit in [0, n)."""
    return max(0, min(centre - w // 2, n - w))


def per_axis(x, a):
    return x[a] if isinstance(x, tuple) else x


# ---- sparse: static patterns ----------------------------------------------------------------

def sink_window(sink, window):
    return lambda p, j: j < sink or p - j < window


def power(local, sink):
    """PowerAttention: local window, every power-of-two distance, and the sink tokens."""
    def rule(p, j):
        d = p - j
        return d < local or j < sink or (d > 0 and 2 ** round(math.log2(d)) == d)
    return rule


def neighborhood(window, stride=1, dilation=1):
    """NATTEN GNA per axis: same dilation group; the window of the stride group's centre query,
    shifted inward at the borders; a window covering the whole group is dense."""
    def rule(a, n, ci, cj):
        w, s, d = per_axis(window, a), per_axis(stride, a), per_axis(dilation, a)
        if ci % d != cj % d:
            return False
        n_g = len(range(ci % d, n, d))
        x, y = ci // d, cj // d
        if w >= n_g:
            return True
        leader = (x // s) * s + s // 2
        start = window_start(leader, w, n_g)
        return start <= y < start + w
    return rule


def tile_window(ti, tj, w, nt):
    """Key tile tj inside the ``w`` tiles centred on query tile ti (shifted inward), of nt tiles."""
    if w <= 0:
        return False
    if w >= nt:
        return True
    start = window_start(ti, w, nt)
    return start <= tj < start + w


def sliding_tile(tile, window):
    """STA: tiles of ``tile`` tokens per axis; the ``window`` tiles centred on the query's tile."""
    def rule(a, n, ci, cj):
        t, w = per_axis(tile, a), per_axis(window, a)
        return tile_window(ci // t, cj // t, w, math.ceil(n / t))
    return rule


def radial_keep(site, S, window, decay, dense_frames, tile, sink_queries=True):
    """Radial (documented form): sink frames dense both ways; else band r = floor(log2 d) of the
    frame distance d (0 for d <= 1); per spatial axis a tile window of width largest-odd <=
    w0 / decay**r (w0 = window, or the whole frame), none below 1. ``sink_queries=False`` is the
    authors' code (radial_attn/attn_mask.py: ``if j == 0`` on the key frame only): queries of the
    sink frame follow the decay pattern like any other."""
    cs, grid = coords(site, S)

    def width(nt, w0, r):
        w0 = 2 * nt - 1 if w0 is None else w0
        w = math.floor(w0 / decay ** r + 1e-9)
        return w if w % 2 else w - 1

    def keep(b, h, i, j):
        if cs[i] is None or cs[j] is None:
            return True
        (fi, yi, xi), (fj, yj, xj) = cs[i], cs[j]
        if fj < dense_frames or (sink_queries and fi < dense_frames):
            return True
        d, r = abs(fi - fj), 0
        while 2 ** (r + 1) <= d:
            r += 1
        for a, (ci, cj) in enumerate(((yi, yj), (xi, xj))):
            t, n = per_axis(tile, a), grid[1 + a]
            w0 = None if window is None else per_axis(window, a)
            if not tile_window(ci // t, cj // t, width(math.ceil(n / t), w0, r), math.ceil(n / t)):
                return False
        return True
    return keep


# ---- sparse: data dependent -----------------------------------------------------------------

def top_blocks(est_row, forced_row, keep=None, mass=None, allowed=None):
    """Kept key blocks of one query block: the forced ones, then by estimated mass, either until
    ``ceil(keep * allowed)`` blocks in all or while the mass taken so far is below ``mass``."""
    cand = [j for j in range(len(est_row)) if allowed is None or allowed[j]]
    kept = [j for j in cand if forced_row[j]]
    rest = sorted((j for j in cand if not forced_row[j]), key=lambda j: -est_row[j])
    if mass is not None:
        acc = sum(est_row[j] for j in kept)
        for j in rest:
            if acc >= mass:
                break
            kept.append(j)
            acc += est_row[j]
    else:
        budget = max(1, math.ceil(keep * len(cand) - 1e-9))
        kept += rest[:max(0, budget - len(kept))]
    return set(kept)


def block_estimate(q, k, q_groups, k_groups, allowed=None):
    """(nq, nk) estimated attention share per block pair, averaged over batch and heads: softmax over
    key blocks of mean(q) . mean(k) * scale + log |key block|."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    nq, nk = len(q_groups), len(k_groups)
    est = torch.zeros(nq, nk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pq = torch.stack([q[b, h, g].double().mean(0) for g in q_groups])
            pk = torch.stack([k[b, h // rep, g].double().mean(0) for g in k_groups])
            logit = pq @ pk.T * D ** -0.5 + torch.tensor([math.log(len(g)) for g in k_groups], dtype=torch.float64)
            if allowed is not None:
                logit = logit.masked_fill(~allowed, NEG)
            est += torch.softmax(logit, -1)
    return est / (B * H)


def topk_grid_keep(q, k, site, keep=None, mass=None, block=None, local=0):
    """TopKBlocks on a grid: tiles of ``block`` per axis (default ~256 tokens), estimate, keep."""
    S = q.shape[2]
    cs, grid = coords(site, S)
    base = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}[len(grid)]
    tile = tuple(per_axis(block, a) if block else min(n, base[a]) for a, n in enumerate(grid))
    tiles = sorted({tuple(c[a] // tile[a] for a in range(len(grid))) for c in cs if c is not None})
    tid = {t: n for n, t in enumerate(tiles)}
    of = [None if c is None else tid[tuple(c[a] // tile[a] for a in range(len(grid)))] for c in cs]
    groups = [[i for i in range(S) if of[i] == t] for t in range(len(tiles))]
    est = block_estimate(q, k, groups, groups)
    forced = [[max(abs(x - y) for x, y in zip(ta, tb)) <= local for tb in tiles] for ta in tiles]
    kept = [top_blocks(est[t].tolist(), forced[t], keep, mass) for t in range(len(tiles))]
    return lambda b, h, i, j: of[i] is None or of[j] is None or of[j] in kept[of[i]]


def topk_causal_keep(q, k, off, keep=None, mass=None, block=256, local=0):
    """TopKBlocks causal: key blocks of ``block``; query rows grouped by the block of their own
    position; the first block and the max(1, local) blocks before the own one always kept."""
    Sq, Skv = q.shape[2], k.shape[2]
    nk = math.ceil(Skv / block)
    qb_of = [(i + off) // block for i in range(Sq)]
    qbs = sorted(set(qb_of))
    q_groups = [[i for i in range(Sq) if qb_of[i] == g] for g in qbs]
    k_groups = [list(range(c * block, min(Skv, (c + 1) * block))) for c in range(nk)]
    allowed = torch.tensor([[c <= g for c in range(nk)] for g in qbs])
    est = block_estimate(q, k, q_groups, k_groups, allowed)
    kept = {}
    for r, g in enumerate(qbs):
        forced = [c == 0 or c >= g - max(1, local) for c in range(nk)]
        kept[g] = top_blocks(est[r].tolist(), forced, keep, mass, allowed[r].tolist())
    return causal(lambda p, j: j // block in kept[p // block], off)


def vertical_slash_keep(q, k, off, verticals, slashes, last_q, sink, window, forced_in_budget=False):
    """MInference vertical-slash: per (row, head), softmax of the last ``last_q`` queries (causal);
    vertical score = column sum, slash score = sum along each diagonal offset p - j; keep the top
    ``verticals`` columns, top ``slashes`` offsets, sink and local window (causal).
    ``forced_in_budget``: the authors' code (``vertical[..., :30] = inf``, ``slash[..., -100:] = inf``
    before ``topk``): the sink columns and window diagonals count inside the two budgets."""
    B, H, Sq, D = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    L = min(last_q, Sq)
    tables = {}
    for b in range(B):
        for h in range(H):
            vert, slash = [0.0] * Skv, [0.0] * Skv
            for i in range(Sq - L, Sq):
                p = i + off
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h // rep, j].double()) * D ** -0.5 for j in range(p + 1)])
                a = torch.softmax(s, 0).tolist()
                for j in range(p + 1):
                    vert[j] += a[j]
                    slash[p - j] += a[j]
            if forced_in_budget:
                vert = [math.inf if j < sink else x for j, x in enumerate(vert)]
                slash = [math.inf if o < window else x for o, x in enumerate(slash)]
            top_v = set(sorted(range(Skv), key=lambda j: -vert[j])[:verticals])
            top_s = set(sorted(range(Skv), key=lambda o: -slash[o])[:slashes])
            tables[b, h] = top_v, top_s

    def keep(b, h, i, j):
        p = i + off
        top_v, top_s = tables[b, h]
        return j <= p and (j in top_v or (p - j) in top_s or j < sink or p - j < window)
    return keep


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

def sink_calibration(q, k, v, off, is_causal, heads=None, threshold=5.0, beta=0.4, first=1, max_sinks=16):
    """ACT: in the chosen heads, columns j >= ``first`` whose mean over queries of p_ij * n_i
    (attention relative to uniform) exceeds ``threshold`` (the strongest ``max_sinks``) get their
    attention scaled by beta and the rows renormalised: log(beta) added to their scores."""
    B, H, Sq, D = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    bias = torch.zeros(B, H, Sq, Skv, dtype=torch.float64)
    vis = [[(not is_causal) or j <= i + off for j in range(Skv)] for i in range(Sq)]
    margins = []
    for b in range(B):
        for h in (range(H) if heads is None else heads):
            col = [0.0] * Skv
            for i in range(Sq):
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h // rep, j].double()) * D ** -0.5
                                  if vis[i][j] else NEG for j in range(Skv)])
                p, n = torch.softmax(s, 0).tolist(), sum(vis[i])
                for j in range(Skv):
                    col[j] += p[j] * n / Sq
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
