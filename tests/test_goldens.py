"""Every row of the zoo (tests/zoo.py: every public method x representative parameters, sites and
shapes) x every registered kernel and automatic selection x float32 / bfloat16 (x the GPU where there
is one), against the row's float64 golden written from the method's definition, never from the
plan's own ``mask_mod``. The reference kernel must match the golden to 1e-10 on float64 inputs; every
other kernel keeps the flash-attn rule: its error against the golden is at most twice that of the
reference kernel on the same dtype (plus a floor: 1e-6 float32, 1e-3 bfloat16)."""
from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from zoo import ZOO, covered, golden, inputs, public_methods

TOL64 = 1e-10
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (kernel, dtype): the reference on float64 against the golden; every other kernel (and selection) on
# float32 and bfloat16 against the same-dtype reference's error
RUNS = [("reference", torch.float64)] + [(k, d) for k in [*ap.kernels.names(), "auto"] if k != "reference" for d in FLOOR]
RUN_IDS = [f"{k}-{ {torch.float64: 'fp64', torch.float32: 'fp32', torch.bfloat16: 'bf16'}[d]}" for k, d in RUNS]

_cache: dict = {}


def _setup(case):
    """(site, float64 inputs, golden) of a row, built once."""
    if case.id not in _cache:
        site, (q, k, v) = inputs(case)
        _cache[case.id] = site, (q, k, v), golden(case, q, k, v, site)
        if case.xfail:  # the golden is the paper's, not what the library computes: other kernels are held to the reference
            _cache[case.id, "reference"] = ap.attend(q, k, v, case.method, site, backend="reference")
    return _cache[case.id]


def _run(q, k, v, method, site, backend):
    try:
        return ap.attend(q, k, v, method, site, backend=None if backend == "auto" else backend).cpu()
    except RuntimeError as e:
        if str(e).startswith(f"backend {backend!r} cannot run"):
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,dtype", RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("case", ZOO, ids=[c.id for c in ZOO])
def test_golden(case, backend, dtype, device, monkeypatch, request):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")  # compiled flex: test_sparse.py (a compile per shape is minutes)
    if case.xfail and backend == "reference":
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.xfail))
    site, qkv, want = _setup(case)
    q, k, v = (x.to(device, dtype) for x in qkv)
    out = _run(q, k, v, case.method, site, backend)
    assert out.dtype == dtype and out.shape == want.shape
    err = (out.double() - want).abs().max().item()
    if backend == "reference":
        assert err <= TOL64, f"{case.id}: reference differs from the golden by {err}"
        return
    ref = ap.attend(q, k, v, case.method, site, backend="reference").cpu().double()
    err_ref = (ref - want).abs().max().item()
    if case.xfail:  # measured against the float64 reference (the golden's own check is the xfail above)
        want = _cache[case.id, "reference"]
        err, err_ref = (out.double() - want).abs().max().item(), (ref - want).abs().max().item()
    assert err <= 2 * err_ref + FLOOR[dtype], f"{case.id} on {backend}: error {err} vs {dtype} reference {err_ref}"


def test_every_public_method_has_a_zoo_row():
    """A public method without a zoo row (and golden) fails here, loudly, instead of going untested."""
    missing = public_methods() - set().union(*map(covered, ZOO))
    assert not missing, f"no zoo row (tests/zoo.py) for {sorted(missing)}: add one with its golden"


@pytest.mark.parametrize("power_of_two", [False, True], ids=["48-72-80", "16-64"])
def test_every_public_method_runs_both_kinds_of_head_dim(power_of_two):
    """Kernels pad or tile head dims: each method is checked at a head dim such as 48, 72 or 80; and
    at a power of two, the only head dims flex and triton run (else they would never see the method)."""
    seen = set().union(*(covered(c) for c in ZOO if bool(c.shape[-1] & (c.shape[-1] - 1)) != power_of_two))
    assert not public_methods() - seen, sorted(public_methods() - seen)


def test_zoo_ids_are_unique():
    ids = [c.id for c in ZOO]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)

