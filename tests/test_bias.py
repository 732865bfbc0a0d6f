"""``ops.bias.additive``: boolean keep masks as additive biases by bit pattern, equal to the masked_fill
definition for every float dtype and layout, and the SDPA kernel's data-dependent masks through it."""
import pytest
import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch.ops.bias import additive
from attnpatch.site import Site


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "expanded", "transposed", "empty rows"])
def test_additive_equals_the_masked_fill_definition(dtype, layout):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 3, 5, 7, generator=g) < 0.5
    if layout == "expanded":
        keep = (torch.rand(5, 7, generator=g) < 0.5).expand(2, 3, 5, 7)
    elif layout == "transposed":
        keep = (torch.rand(2, 3, 7, 5, generator=g) < 0.5).transpose(2, 3)
    elif layout == "empty rows":
        keep[:, :, 1] = False
    got = additive(keep, dtype)
    ref = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
    assert got.dtype == dtype and got.shape == keep.shape
    assert torch.equal(got, ref)


def test_a_data_dependent_masked_plan_on_sdpa_equals_the_reference_kernel():
    """VerticalSlash's per-call mask reaches SDPA as the additive bias; the output equals the reference kernel
    (explicit softmax over the same mask) and differs from dense attention."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 96, 32, generator=g) for _ in range(3))
    m, site = ap.VerticalSlash(verticals=8, slashes=8, last_q=16, window=8), Site(causal=True)
    auto = ap.attend(q, k, v, m, site, backend="sdpa")
    ref = ap.attend(q, k, v, m, site, backend="reference")
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (auto - ref).abs().max() < 1e-5
    assert (auto - dense).abs().max() > 1e-2
