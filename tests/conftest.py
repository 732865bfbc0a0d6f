import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (its language
    # functions are built for one mode at import); it only matters to tests/test_triton.py,
    # as the triton kernel never runs on CPU unless named.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# measured kernel choice (attnpatch/kernels/tune.py) times the first calls of a static plan: kernel choices in
# tests stay the cost model's, deterministic; tests/test_tune.py switches it on
os.environ.setdefault("ATTNPATCH_TUNE", "0")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _classes_on_small_calls(request, monkeypatch):
    """kernels/classes.py refuses classes of few rows (a speed rule: small calls run below the dense rate);
    a test that names that kernel as its backend checks its exactness on the small calls of the zoo too."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "classes" in (params.get("kernel"), params.get("backend")):
        from attnpatch.kernels import classes

        monkeypatch.setattr(classes, "MIN_ROWS", 1)
        monkeypatch.setattr(classes, "MAX_CLASSES", 1 << 20)


def pytest_collection_modifyitems(config, items):
    """Tests that run on a CUDA device when there is one carry the ``cuda`` marker, so a GPU machine
    runs exactly them with ``pytest -m cuda`` (benchmarks/gpu.sh): the triton kernel's tests and every
    parametrised case whose id names the cuda device (the zoo's goldens, kernels, fuzz, grad)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and any(v == "cuda" for v in callspec.params.values() if isinstance(v, str))
        if on_cuda or item.path.name == "test_triton.py":
            item.add_marker(pytest.mark.cuda)
