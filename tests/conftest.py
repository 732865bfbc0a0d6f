import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (its language
    # functions are built for one mode at import); it only matters to tests/test_triton.py,
    # as the triton kernel never runs on CPU unless named.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
