"""``SinkRedistribution``: move a fraction of the attention that magnet tokens soak up onto target
tokens, in proportion to the targets' own attention. Attention magnets are RefAM's (Kukleva et al.
2025: stop words, padding and global sinks in DiT joint attention); the rule is VAR's, Visual Attention
Redistribution (Kang et al., ICLR 2025, "See What You Are Told"): in the chosen heads, for query row i
with magnet mass M_i = sum_{j in magnets} p_ij and target mass T_i = sum_{j in targets} p_ij,

    p'_ij = (1 - alpha) p_ij              for magnet keys j,
    p'_ij = p_ij (1 + alpha M_i / T_i)    for target keys j (the removed mass alpha M_i, pro rata),
    p'_ij = p_ij                          for every other key;

rows that see no target (T_i = 0) keep their attention. VAR's code keeps p = 1 - alpha of the sink
attention (p = 0.6) and gives the rest to the non-sink image tokens. Targets default to every
non-magnet key; ``targets="visual"`` gives RefAM / VAR's image-token targets.

Exact and without an S x S bias: out' = out - alpha A_M + alpha M_i A_T / T_i, A_X = sum_{j in X} p_ij v_j,
from the kernel's output, the row log-sum-exp (the kernel's, or recomputed) and a small attention over
the magnet columns plus the smaller of the target set and its complement (A_T = out - A_{not T}).

Magnets: given key positions (``magnets=[...]``), or found per call by ACT's rule (SinkCalibration):
columns whose attention relative to uniform (mean over ``detect_rows`` query rows of p_ij n_i) exceeds
``threshold``, the strongest ``max_magnets``, among ``candidates`` (e.g. "text": padding / stop words).
A profile (safetensors, ``save_profile``) holds the heads and magnet positions a calibration run found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Plan, probs_direct, with_direct
from ..site import Site
from ._sink_scores import _Call, chunks, gather_rows, plain_col, row_lse, sample, small_call, small_ok
from .base import Method, call_heads, check_int, check_number, fail
from .magnets import PROFILE_KIND, MagnetScan, load_profile, save_profile  # noqa: F401  (public here too)
from .sink_calibration import SinkCalibration

SETS = ("text", "visual")
_RECOMPUTE = 0.125  # rows whose target mass is below this get it directly (the difference would amplify rounding)


def _check_set(name, value, allow_none=True):
    if value is None and allow_none or value in SETS:
        return value
    if isinstance(value, (list, tuple, range)) and all(isinstance(x, int) and x >= 0 for x in value):
        return tuple(value)
    fail("SinkRedistribution", name, value, f"None, one of {SETS}, or a list of token positions >= 0", '"visual"')


@dataclass
class SinkRedistribution(Method):
    """Give ``alpha`` of the magnet tokens' attention to the target tokens, pro rata (chosen heads)."""

    source = "RefAM (Kukleva et al. 2025) attention magnets; VAR (Kang et al., ICLR 2025) redistribution"

    heads: object = None  # None: every head; [(layer, head)]; {layer: [heads]}; or a profile path
    alpha: float = 0.4  # fraction of the magnets' attention moved (VAR's p = 1 - alpha)
    magnets: object = None  # None: detected per call; or key indices of the call (a profile's, when heads is a path)
    targets: object = None  # None: every non-magnet key; "visual" / "text" (the site's segment); or key positions
    candidates: object = None  # keys detection may pick: None (any), "text", "visual" or key positions
    queries: object = None  # rows redistributed: None (all), "text", "visual" or query positions
    threshold: float = 5.0
    first: int = 0  # the first keys are never detected (0: BOS / global sinks are magnets too, as VAR's text sinks)
    max_magnets: int = 16
    detect_rows: int | None = 64
    _scan: SinkCalibration | None = field(default=None, init=False, repr=False, compare=False)
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        name = "SinkRedistribution"
        check_number(name, "alpha", self.alpha, low=0, high=1, low_open=True, example=0.4)
        heads = self.heads
        if isinstance(heads, (str, bytes)) or hasattr(heads, "__fspath__"):
            heads, mags, _ = load_profile(heads)
            if self.magnets is None:
                self.magnets = mags
        self.magnets = _check_set("magnets", self.magnets) if self.magnets not in SETS else \
            fail(name, "magnets", self.magnets, "None or a list of key positions", [15])
        self.targets, self.candidates, self.queries = (_check_set(n, getattr(self, n)) for n in ("targets", "candidates", "queries"))
        check_int(name, "max_magnets", self.max_magnets, 1)
        # the detection machinery and head parsing are ACT's (beta unused)
        self._scan = SinkCalibration(heads=heads, threshold=self.threshold, first=self.first, max_sinks=self.max_magnets,
                                     detect_rows=self.detect_rows)

    @property
    def rows_coupled(self) -> bool:  # detected magnets come from column statistics over the call's query rows
        return self.magnets is None

    def bind_model(self, model) -> None:
        self._scan.bind_model(model)

    def heads_at(self, layer: int, H: int) -> list[int]:
        return self._scan.heads_at(layer, H)

    def plan(self, q, k, site: Site) -> Plan | None:
        key = (site.layer, q.shape[1], site.heads, site.q_offset, site.causal, q.device, site.grid, site.text_len,
               site.text_first, site.kind, q.shape[2], k.shape[2])
        got = self._plans.get(key) if site.kv_shift is None else None
        if got is not None and got[0] == id(self):
            return self._small(got[1], q, k, site)
        heads = call_heads(site, q.shape[1], self.heads_at(site.layer, site.model_heads(q.shape[1])[1]))
        plan = self._plan(q.shape[1], heads, site, q.shape[2], k.shape[2], q.device)
        if site.kv_shift is None:
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[key] = (id(self), plan)
        return self._small(plan, q, k, site)

    def _small(self, plan: Plan | None, q, k, site: Site) -> Plan | None:
        """``plan`` with ``Plan.direct`` for a small call that detects its magnets (as SinkCalibration's
        ``_small``): from one score pass over every row, p' by the definition above, times v."""
        if plan is None or self.magnets is not None or not small_ok(q, k, site):
            return plan
        H, Sq, Skv = q.shape[1], q.shape[2], k.shape[2]
        heads = call_heads(site, H, self.heads_at(site.layer, site.model_heads(H)[1]))
        hidx = None if heads == list(range(H)) else torch.tensor(heads, device=q.device)
        tgt, cand = (_tokens(x, site, Skv, 0, q.device, keys=True) for x in (self.targets, self.candidates))
        rows = _tokens(self.queries, site, Sq, site.q_offset, q.device, keys=False)
        p, col = small_call(q, k, site.q_offset, site.causal, self.detect_rows)
        ph, col = (p, col) if hidx is None else (p[:, hidx], col[:, hidx])
        call = _Call(site.q_offset, site.causal, None, None, q.shape[-1] ** -0.5, None, hidx)
        mag, m = self._scan._pick(col if cand is None else col.masked_fill(~cand, 0.0), call)
        if m:
            to = ~mag if tgt is None else tgt & ~mag  # (B, h, Skv) targets less the magnets
            M = (ph * mag[:, :, None, :]).sum(-1, keepdim=True)  # (B, h, Sq, 1) magnet and target mass
            T = (ph * to[:, :, None, :]).sum(-1, keepdim=True)
            gain = 1 + self.alpha * M / T.clamp_min(torch.finfo(T.dtype).tiny)
            w = torch.where(mag[:, :, None, :], 1 - self.alpha, torch.where(to[:, :, None, :], gain, 1.0))
            live = T > 0 if rows is None else (T > 0) & rows[:, None]  # rows without a target, or not chosen: as they were
            ph = torch.where(live, ph * w, ph)
            p = ph if hidx is None else p.index_copy(1, hidx, ph)
        return with_direct(plan, probs_direct(p, k.shape[1], q.dtype))

    def _plan(self, H, heads, site: Site, Sq, Skv, device) -> Plan | None:
        if not heads:
            return None
        hidx = None if heads == list(range(H)) else torch.tensor(heads, device=device)
        keys = lambda spec: _tokens(spec, site, Skv, 0, device, keys=True)  # noqa: E731
        sets = (keys(self.magnets), keys(self.targets), keys(self.candidates),
                _tokens(self.queries, site, Sq, site.q_offset, device, keys=False))
        off, causal, shift = site.q_offset, site.causal, site.kv_shift

        def output(out, q, k, v, scale, mask=None, softcap=None, lse=None):
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return self._redistribute(out, q, k, v, _Call(off, causal, shift, mask, scale, softcap, hidx), sets, lse)

        return Plan(output=output, name=repr(self))

    def _redistribute(self, out, q, k, v, call: _Call, sets, lse=None):
        """Heads ``call.heads`` of ``out`` (the kernel's result) with alpha of the magnets' attention moved."""
        given, tgt, cand, rows = sets
        rep = q.shape[1] // k.shape[1]
        if call.all_heads:
            qh, kh, vh = q, k, v
        else:
            kv_head = call.heads // rep
            qh, kh, vh = q[:, call.heads], k[:, kv_head], v[:, kv_head]  # (B, h, S, D)
            lse, rep = None if lse is None else lse[:, call.heads], 1
        B, h = qh.shape[:2]
        if given is not None:
            mag = given.expand(B, h, -1)
        else:
            mag, lse = self._detect(qh, kh, call, lse, cand)
        if not bool(mag.any()):
            return out
        lse = row_lse(qh, kh, call) if lse is None else lse.nan_to_num(0.0, 0.0, 0.0)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, out))
        base = (out if call.all_heads else out[:, call.heads]).to(torch.promote_types(q.dtype, torch.float32))
        new = _move(self.alpha, base, qh, kh, vh, mag, tgt, lse, call, rep, grad)
        if rows is not None:  # only the chosen query rows move their attention
            new = torch.where(rows[:, None], new, base)
        if call.all_heads:
            return new.to(out.dtype)
        out = out.clone()
        out[:, call.heads] = new.to(out.dtype)
        return out

    def _detect(self, qh, kh, call: _Call, lse, cand):
        """((B, h, Skv) magnet columns by ACT's rule among ``cand``, lse as SinkCalibration's scan returns it)."""
        scan, Sq = self._scan, qh.shape[2]
        rows, idx = sample(Sq, self.detect_rows, qh.device)
        C = Sq if rows is None else len(rows)
        if lse is not None and call.mask is None and call.shift is None and (not call.causal or call.off >= 0) \
                and qh.shape[0] * qh.shape[1] * C * kh.shape[2] <= 1 << 24:
            col, hidden = plain_col(qh, kh, call, lse, rows, idx, self.first), True
        else:
            (col, lse), hidden = scan._columns(qh, kh, call, lse, rows, idx), False
        if cand is not None:
            col = col.masked_fill(~cand, 0.0)
        return scan._pick(col, call, first_hidden=hidden)[0], lse


def _move(alpha, base, qh, kh, vh, mag, tgt, lse, call: _Call, rep, grad):
    """``base`` (B, h, Sq, Dv) with alpha of the magnet columns ``mag`` (B, h, Skv) moved to the targets
    ``tgt`` (Skv,) less the magnets (None: every other key): base - alpha A_M + alpha M A_T / T. The gathered
    columns are the magnets plus the smaller of the targets and their complement (A_T = base - A_notT)."""
    B, h, Sq, _ = qh.shape
    tg = ~mag if tgt is None else tgt & ~mag  # (B, h, Skv) targets that are not magnets
    direct = int(tg.sum(-1).max()) <= int((~tg).sum(-1).max())
    other = tg if direct else ~tg  # the target set, or its complement (the magnets among it)
    cols = mag | other
    m = int(cols.sum(-1).max())
    idx = cols.to(torch.uint8).topk(m, -1, sorted=False).indices  # (B, h, m): each head's columns (then padding)
    kv_head = torch.arange(h, device=qh.device) // rep
    ks, vs = gather_rows(kh, kv_head, idx), gather_rows(vh, kv_head, idx)  # (B, h, m, D)
    w_mag = (mag & cols).gather(2, idx)[:, :, None, :]  # (B, h, 1, m): True at magnet columns
    w_oth = other.gather(2, idx)[:, :, None, :]
    only_mag = bool(w_mag.all())  # every gathered column a magnet (given positions): no weights to apply
    same = tgt is None  # the complement of the targets is the magnets: its sums are the magnets' own
    outs, vw = [], vs.to(torch.promote_types(vs.dtype, torch.float32))
    for s, e in chunks(Sq, B * h * m, False):  # row chunks bound the (rows x m) probabilities' memory
        sc = call.logits(qh[:, :, s:e], ks, s, idx, grad=grad)  # (B, h, c, m), -inf where hidden
        # exact probabilities of these columns (in place without autograd: a fresh tensor per op costs on CPU)
        p = sc.sub_(lse[:, :, s:e, None]).exp_() if not grad else torch.exp(sc - lse[:, :, s:e, None])
        pm = p if only_mag else p * w_mag
        M, a_m, b = pm.sum(-1), pm @ vw, base[:, :, s:e]
        if direct:
            po = p * w_oth
            T, a_t = po.sum(-1), po @ vw
        else:  # the complement's attention: targets are everything else the row sees
            # 1 - (the complement's mass) is rounding noise for a row that sees no target: such rows are found exactly
            po = pm if same else p * w_oth
            sees = _sees(tg, call, s, e)
            T, a_t = torch.where(sees, 1.0 - (M if same else po.sum(-1)), 0.0), b - (a_m if same else po @ vw)
            # A_T / T from a difference loses the kernel's rounding / T (T may even round to 0): rows with little
            # target mass get both directly
            T, a_t = _direct_rows(sees & (T < _RECOMPUTE), T, a_t, qh, kh, vh, tg, lse, call, s, grad)
        live = T > 0
        f = torch.where(live, alpha * M / T.clamp_min(torch.finfo(T.dtype).tiny), 0.0)
        outs.append(b - (alpha * live.to(b.dtype))[..., None] * a_m + f[..., None] * a_t)  # (where(live, alpha, 0) is float32)
    return torch.cat(outs, 2)


def _direct_rows(bad, T, a_t, qh, kh, vh, tg, lse, call: _Call, s, grad):
    """(T, A_T) of chunk rows s.. with the rows any head flags in ``bad`` (B, h, c) recomputed over every target key."""
    r = bad.any(1).any(0).nonzero().squeeze(-1)  # (R,) chunk rows to recompute
    if not len(r):
        return T, a_t
    rows = r + s
    B, h, R, hk = qh.shape[0], qh.shape[1], len(r), kh.shape[1]
    sc = call.logits(qh.index_select(2, rows), kh, int(rows[0]), grad=grad, rows=rows)  # (B, h, R, Skv)
    p = torch.exp(sc - lse.index_select(2, rows)[..., None]) * tg[:, :, None, :].to(sc.dtype)
    a_r = (p.reshape(B, hk, h // hk * R, -1) @ vh.to(p.dtype)).view(B, h, R, -1)  # GQA: each KV head serves its group
    pick = bad.index_select(2, r)
    T = T.index_copy(2, r, torch.where(pick, p.sum(-1), T.index_select(2, r)))
    return T, a_t.index_copy(2, r, torch.where(pick[..., None], a_r, a_t.index_select(2, r)))


def _sees(tg, call: _Call, s, e):
    """(B, h, e - s) whether query rows s..e-1 see any target key ``tg`` (B, h, Skv) (causality, the call's mask)."""
    Skv = tg.shape[-1]
    if call.mask is None:  # the first target key decides
        first = torch.where(tg.any(-1), tg.to(torch.uint8).argmax(-1), Skv)  # (B, h)
        last = torch.arange(s + call.off, e + call.off, device=tg.device) if call.causal else \
            torch.full((e - s,), Skv, device=tg.device)  # (c,): the last key each row sees
        return first[..., None] <= last
    vis = tg[:, :, None, :].expand(-1, -1, e - s, -1)  # (B, h, c, Skv)
    if call.causal:
        pos = torch.arange(s + call.off, e + call.off, device=tg.device)
        vis = vis & (torch.arange(Skv, device=tg.device) <= pos[:, None])
    m = call.mask if call.mask.shape[2] == 1 else call.mask[:, :, s:e]
    return (vis & (m if m.dtype == torch.bool else m > float("-inf"))).any(-1)


def _tokens(spec, site: Site, S: int, off: int, device, keys: bool):
    """(S,) boolean of the tokens ``spec`` names (None: None): "text" / "visual" from the site's layout
    (cross attention: every key is text), or positions (keys: indices; queries: absolute positions)."""
    if spec is None:
        return None
    pos = torch.arange(S, device=device) + off
    if spec in SETS:
        if keys and site.kind == "cross":
            return torch.full((S,), spec == "text", device=device)
        v0, vl = site.visual_start, site.visual_len
        vis = (pos >= v0) & (pos < v0 + vl) if vl else torch.zeros(S, dtype=torch.bool, device=device)
        return vis if spec == "visual" else ~vis
    return torch.isin(pos, torch.tensor(spec, dtype=torch.long, device=device))


if __name__ == "__main__":  # the pattern is dense (no key is skipped); print where the attention moves
    from .base import ascii_mask

    site = Site(grid=(2, 4), text_len=4, kind="joint")
    method = SinkRedistribution(magnets=[2, 3], targets="visual", alpha=0.5)
    print(ascii_mask(method, site, 12))
    q, k, v = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8), torch.eye(12)[None, None]  # v = identity: out = p
    p = method._plan(1, [0], site, 12, 12, "cpu").output(torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1), q, k, v, None)
    print("row 0 before / after (magnets 2, 3; targets 4..11):")
    print(torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1)[0, 0, 0].numpy().round(3), "\n", p[0, 0, 0].numpy().round(3))
