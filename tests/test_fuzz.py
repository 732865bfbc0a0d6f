"""Fuzz: every method of the zoo (tests/zoo.py) x every capable kernel x random shapes, against the
float64 reference kernel (which tests/test_goldens.py holds to each method's definition; the reference
kernel itself is not fuzzed against itself).

A seeded generator draws each case: odd lengths, 1-3-D grids with or without a text segment, GQA,
head sizes that are not powers of two (and a v head size unlike q's), float32 / bfloat16 / float16 /
float64, (B, S, H, D) transposed views, padding masks, decode / chunked-prefill offsets, and inputs
that require grad. Each kernel that accepts the call (and the kernel selection picks) must satisfy the
flash-attn rule: max error against float64 <= 2 x the same-dtype reference's error + a small floor;
with requires_grad, the q / k / v gradients too.

CI runs ``ATTNPATCH_FUZZ_N`` cases (default 250, about a minute on 2 cores) with a fixed seed. The
longer run is one command:

    ATTNPATCH_FUZZ_N=2000 python -m pytest tests/test_fuzz.py

(``ATTNPATCH_FUZZ_SEED`` picks another seed; a failure names its case index and seed to replay it.)
"""
import math
import os
import random
from dataclasses import replace

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, kernels
from zoo import ZOO

N = int(os.environ.get("ATTNPATCH_FUZZ_N", "250"))
SEED = int(os.environ.get("ATTNPATCH_FUZZ_SEED", "1616"))
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}  # absolute floor under the 2x rule
GRAD_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-9}  # gradients are checked for these input dtypes
# the zoo's rows whose batch is free to vary (a guidance row's batch is its CFG role layout: test_goldens.py)
ENTRIES = [c for c in ZOO if not c.site.roles]
# triton runs on CPU only in its interpreter (slow, and tests/test_triton.py covers it); the reference
# is the oracle here, so it is not a kernel under test
KERNELS = [n for n in kernels.names() if (n != "triton" or torch.cuda.is_available()) and n != "reference"]


def _site(r: random.Random, method, site: Site):
    """(site, Sq, Skv) for one draw of ``method``'s family of calls."""
    if site.causal:  # LLM: prefill, decode, or a chunk after a cache
        Skv = r.randint(1, 70)
        Sq = r.choice([Skv, 1, r.randint(1, Skv)])
        return replace(site, q_offset=Skv - Sq, decode=False), Sq, Skv
    if isinstance(method, ap.methods.Sparse) or site.kind == "joint" or site.grid is not None:
        nd = len(site.grid) if site.grid else r.randint(1, 3)  # a row's per-axis parameters fix its grid's axes
        grid = tuple(r.randint(2 if nd > 1 else 3, 9 if nd < 3 else 5) for _ in range(nd))
        if isinstance(method, ap.Radial):
            grid = (r.randint(2, 4), 2 * r.randint(1, 3), 2 * r.randint(1, 3))  # frames, tiles of 2
        text = r.choice([0, 0, r.randint(1, 6)])
        kind = "joint" if text else "self"
        s = Site(grid=grid, text_len=text, text_first=r.random() < 0.5, kind=kind)
        S = math.prod(grid) + text
        return s, S, S
    Sq = r.randint(1, 60)
    return site, Sq, r.choice([Sq, r.randint(1, 60)])  # dense: self or cross lengths


def draw(i: int):
    """Case ``i`` of the seeded stream (the same on every machine)."""
    r = random.Random(SEED * 100_003 + i)
    name, method, site0, shape = ENTRIES[r.randrange(len(ENTRIES))][:4]
    site, Sq, Skv = _site(r, method, site0)
    Hkv = r.choice([1, 2])
    Hq = Hkv * r.choice([1, 2, 3])
    if getattr(method, "profile", None) is not None or getattr(method, "heads", None) is not None:  # per-head: fixed heads
        Hq, Hkv = shape[1], r.choice([h for h in (1, 2) if shape[1] % h == 0])
    D = r.choice([8, 16, 24, 32, 40, 64])
    Dv = D if r.random() < 0.8 else r.choice([8, 24, 48])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    return dict(name=name, method=method, site=site, B=r.choice([1, 2]), Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv, D=D, Dv=Dv,
                dtype=dtype, transposed=r.random() < 0.3, padding=r.random() < 0.2 and Skv > 4,
                grad=r.random() < 0.3 and dtype in GRAD_FLOOR, seed=r.randrange(2**31))


def _tensors(c):
    g = torch.Generator().manual_seed(c["seed"])

    def make(h, s, d):
        x = torch.randn(c["B"], s, h, d, generator=g, dtype=torch.float64)  # (B, S, H, D) as diffusers holds them
        x = x.to(c["dtype"])
        return x.transpose(1, 2) if c["transposed"] else x.transpose(1, 2).contiguous()

    q, k, v = make(c["Hq"], c["Sq"], c["D"]), make(c["Hkv"], c["Skv"], c["D"]), make(c["Hkv"], c["Skv"], c["Dv"])
    mask = None
    if c["padding"]:  # the last batch row is left-padded
        mask = torch.ones(c["B"], 1, 1, c["Skv"], dtype=torch.bool)
        mask[-1, ..., : c["Skv"] // 3] = False
    return q, k, v, mask


def _check(c, kernel, q, k, v, mask, exact, same):
    """The flash-attn rule for ``kernel`` (None: selection's pick) on forward and, with grad, backward."""
    leaves = [t.detach().requires_grad_(c["grad"]) for t in (q, k, v)]
    try:
        out = ap.attend(*leaves, c["method"], c["site"], backend=kernel, mask=mask)
    except RuntimeError as e:
        if kernel is not None and str(e).startswith(f"backend {kernel!r} cannot run"):
            return False  # the kernel says why not: selection would pass it over
        raise
    assert out.shape == (c["B"], c["Hq"], c["Sq"], c["Dv"]) and out.dtype == c["dtype"]
    err = (out.double() - exact[0]).abs().max().item()
    err_ref = (same[0].double() - exact[0]).abs().max().item()
    assert err <= 2 * err_ref + FLOOR[c["dtype"]], ("forward", err, err_ref)
    if c["grad"]:
        got = torch.autograd.grad(out, leaves, exact[2].to(c["dtype"]))
        for n, g, e, s in zip("qkv", got, exact[1], same[1]):
            err, err_ref = (g.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
            assert torch.isfinite(g).all() and err <= 2 * err_ref + GRAD_FLOOR[c["dtype"]], (f"grad {n}", err, err_ref)
    return True


def _reference(c, q, k, v, mask):
    """(out, grads, upstream grad) of the whole call (the method's core steps included) through the
    reference kernel, in q's dtype."""
    leaves = [t.detach().requires_grad_(c["grad"]) for t in (q, k, v)]
    out = ap.attend(*leaves, c["method"], c["site"], backend="reference", mask=mask)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype)) if c["grad"] else None
    return out, grads, go


@pytest.mark.parametrize("i", range(N))
def test_fuzz(i, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")  # compiled flex: one compile per shape (test_sparse.py)
    monkeypatch.setattr(kernels.classes, "MIN_ROWS", 1)  # its class-size floor is a speed rule: check it on small calls
    monkeypatch.setattr(kernels.classes, "MAX_CLASSES", 1 << 20)
    c = draw(i)
    q, k, v, mask = _tensors(c)
    exact = _reference(c, q.double(), k.double(), v.double(), mask)
    same = _reference(c, q, k, v, mask)
    for kernel in [None] + KERNELS:
        try:
            _check(c, kernel, q, k, v, mask, exact, same)
        except AssertionError as e:
            raise AssertionError(f"case {i} (seed {SEED}) {_describe(c)} kernel {kernel or 'auto'}: {e}") from None


def _describe(c) -> str:
    keys = ("name", "site", "B", "Hq", "Hkv", "Sq", "Skv", "D", "Dv", "dtype", "transposed", "padding", "grad")
    return ", ".join(f"{k}={c[k]}" for k in keys)
