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
_stats = {"patched": set(), "unsupported": set(), "patch_errors": [], "calls": 0}


def _method(framework: str):
    import attnpatch as ap

    if MODE == "dense":
        return ap.Dense()
    spec = os.environ.get("ATTNPATCH_UPSTREAM_SPARSE_" + framework.upper())
    if spec:  # e.g. "Neighborhood(window=10**6, tile=2, dense_steps=0)"
        return eval(spec, {"__builtins__": {}}, vars(ap))
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


def _count_calls() -> None:
    from attnpatch import core

    orig = core.run

    @functools.wraps(orig)
    def run(*args, **kwargs):
        _stats["calls"] += 1
        return orig(*args, **kwargs)

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
    _stats.update(patched=set(), unsupported=set(), patch_errors=[], calls=0)


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
           "patch_errors": _stats["patch_errors"][:5], "attnpatch_calls": _stats["calls"]}
    with open(LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
