"""pytest plugin (``-p attnpatch_upstream_plugin``): patch every diffusers / transformers model the
upstream tests build, then record per test what was patched and how many attention calls went
through attnpatch.

Mode from ``ATTNPATCH_UPSTREAM_MODE``: ``stock`` (no patching, records outcomes only), ``dense``
(``attnpatch.Dense()``), ``sparse`` (a covering sparse method: every key kept, so outputs must
equal stock; the block-sparse / mask paths still run). Records go as JSON lines to
``ATTNPATCH_UPSTREAM_LOG``.

Models are patched when their outermost ``__init__`` returns (a model built inside another
model's ``__init__`` is part of it, so it is not patched on its own) and again after
``from_pretrained`` / ``from_config`` (the loaders may reset the attention implementation).
"""
from __future__ import annotations

import functools
import json
import os
import threading

import pytest

MODE = os.environ.get("ATTNPATCH_UPSTREAM_MODE", "stock")
LOG = os.environ.get("ATTNPATCH_UPSTREAM_LOG")
_tls = threading.local()
_stats = {"patched": set(), "unsupported": set(), "patch_errors": [], "calls": 0, "max_err": 0.0, "mismatch": [],
          "ref_errors": [], "checked": 0}


class _Names(dict):
    """attnpatch's public names for eval (its methods load lazily, so they are not in vars())."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __missing__(self, key):
        return getattr(self.module, key)


def _method(framework: str):
    import attnpatch as ap

    if MODE == "dense":
        return ap.Dense()
    spec = os.environ.get("ATTNPATCH_UPSTREAM_SPARSE_" + framework.upper())
    if spec:  # e.g. "Neighborhood(window=10**6, tile=2, dense_steps=0)"
        return eval(spec, {"__builtins__": {}}, _Names(ap))
    if framework == "transformers":  # causal A-shape whose window covers every key
        return ap.SinkWindow(sink=4, window=10**6, block=16)
    return ap.Neighborhood(window=10**6, dense_steps=0)  # window wider than any grid axis: dense pattern


def _apply(model) -> None:
    import attnpatch as ap

    framework = "transformers" if type(model).__module__.startswith("transformers") else "diffusers"
    name = type(model).__name__
    try:
        ap.patch(model, _method(framework))
        _stats["patched"].add(name)
    except TypeError as e:  # attnpatch's "cannot patch / does not support" for unsupported models
        _stats["unsupported"].add(name)
        if "support" not in str(e) and "cannot patch" not in str(e):
            _stats["patch_errors"].append(f"{name}: TypeError: {e}")
    except Exception as e:  # noqa: BLE001 - a patch failure is a finding; the test then runs stock
        _stats["patch_errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _wrap_init(cls) -> None:
    orig = cls.__dict__.get("__init__")
    if orig is None or getattr(orig, "_attnpatch_upstream", False):
        return

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        depth = getattr(_tls, "depth", 0)
        _tls.depth = depth + 1
        try:
            orig(self, *args, **kwargs)
        finally:
            _tls.depth = depth
        if depth == 0:  # outermost model construction finished
            _apply(self)

    __init__._attnpatch_upstream = True
    cls.__init__ = __init__


def _wrap_loader(base, name: str) -> None:
    orig = getattr(base, name, None)
    if orig is None:
        return
    func = orig.__func__

    @functools.wraps(func)
    def loader(cls, *args, **kwargs):
        depth = getattr(_tls, "depth", 0)
        _tls.depth = depth + 1  # the construction inside is patched once, here
        try:
            model = func(cls, *args, **kwargs)
        finally:
            _tls.depth = depth
        if depth == 0 and hasattr(model, "named_modules"):
            _apply(model)
        return model

    setattr(base, name, classmethod(loader))


def _install(base) -> None:
    def walk(cls):
        _wrap_init(cls)
        for sub in cls.__subclasses__():
            walk(sub)

    walk(base)
    prev = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if prev is not None:
            prev.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        _wrap_init(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)
    for name in ("from_pretrained", "from_config", "_from_config"):
        if name in base.__dict__:
            _wrap_loader(base, name)


def _reference(q, k, v, site, mask, scale, softcap):
    """Dense attention in float64: what Dense() and a covering pattern must give. torch's own SDPA
    (math path in float64) unless soft-capping asks for the definition written out. GQA by
    repeating kv heads; bool masks keep True, float masks add; causal from the site's offset."""
    import torch
    import torch.nn.functional as F

    q, k, v = (t.detach().double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    Sq, Skv = q.shape[2], k.shape[2]
    keep = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device)  # (Sq, Skv)
    if getattr(site, "causal", False):
        qi = torch.arange(Sq, device=q.device)[:, None] + int(getattr(site, "q_offset", 0) or 0)
        keep = torch.arange(Skv, device=q.device)[None] <= qi
    bias = torch.zeros(Sq, Skv, dtype=torch.float64, device=q.device).masked_fill(~keep, float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask.double()
    live = (bias > float("-inf")).any(-1, keepdim=True)  # rows with at least one key (broadcastable)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if softcap:
        s = q @ k.transpose(-1, -2) * scale
        s = softcap * torch.tanh(s / softcap) + bias
        return torch.softmax(s, -1).nan_to_num(0.0) @ v, live
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).nan_to_num(0.0), live


def _check(out, args, kwargs) -> None:
    """Largest |patched - reference| / (1 + max |reference|) of one call, kept per test."""
    import torch

    q, k, v, _method, site = args[:5]
    try:
        ref, live = _reference(q, k, v, site, kwargs.get("mask"), kwargs.get("scale"), kwargs.get("softcap"))
        diff = (out.detach().double() - ref).abs().masked_fill(~live, 0.0)
        err = float(diff.max()) / (1.0 + float(ref.abs().max()))
        tol = 1e-4 if q.dtype in (torch.float32, torch.float64) else 3e-2
        if q.dtype in (torch.float32, torch.float64):  # the table's max error: full-precision calls
            _stats["max_err"] = max(_stats["max_err"], err)
        if err > tol and len(_stats["mismatch"]) < 3:
            _stats["mismatch"].append(f"{err:.2e} > {tol:g} at q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} "
                                      f"mask={None if kwargs.get('mask') is None else tuple(kwargs['mask'].shape)} "
                                      f"causal={getattr(site, 'causal', None)} offset={getattr(site, 'q_offset', None)}")
    except Exception as e:  # noqa: BLE001 - a shape the reference cannot read: note it, do not fail the test
        if len(_stats["ref_errors"]) < 2:
            _stats["ref_errors"].append(f"{type(e).__name__}: {str(e)[:120]}")


def _count_calls() -> None:
    """Count calls into attnpatch.core.run; in patched modes also compare each output with the
    float64 reference (ATTNPATCH_UPSTREAM_CHECK=0 turns that off)."""
    from attnpatch import core

    orig = core.run
    check = os.environ.get("ATTNPATCH_UPSTREAM_CHECK", "1") != "0"

    @functools.wraps(orig)
    def run(*args, **kwargs):
        _stats["calls"] += 1
        out = orig(*args, **kwargs)
        if check and len(args) >= 5 and _stats["checked"] < 32:  # a few calls per test bound the cost
            _stats["checked"] += 1
            _check(out, args, kwargs)
        return out

    core.run = run


def pytest_configure(config):
    if MODE == "stock":
        return
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    _install(PreTrainedModel)
    _install(ModelMixin)
    _count_calls()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _stats.update(patched=set(), unsupported=set(), patch_errors=[], calls=0, max_err=0.0, mismatch=[],
                  ref_errors=[], checked=0)


def _first_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:300] if crash.message else ""
    if isinstance(report.longrepr, tuple):  # skip: (file, line, reason)
        return str(report.longrepr[2])[:300]
    return str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""


def pytest_runtest_logreport(report):
    if LOG is None:
        return
    failed_phase = report.failed or (report.skipped and report.when != "call")
    if not (report.when == "call" or failed_phase or (report.when == "teardown" and report.failed)):
        return
    outcome = "skipped" if report.skipped else ("failed" if report.failed else "passed")
    if report.when != "call" and report.failed:
        outcome = "error"
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    rec = {"test": report.nodeid, "when": report.when, "outcome": outcome, "duration": round(report.duration, 3),
           "error": _first_line(report) if outcome in ("failed", "error", "skipped") else "",
           "patched": sorted(_stats["patched"]), "unsupported": sorted(_stats["unsupported"]),
           "patch_errors": _stats["patch_errors"][:5], "attnpatch_calls": _stats["calls"],
           "max_err": _stats["max_err"], "mismatch": _stats["mismatch"], "ref_errors": _stats["ref_errors"]}
    with open(LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
