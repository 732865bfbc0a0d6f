"""Boolean keep masks as additive biases (0 where kept, -inf elsewhere), the form the fused SDPA kernels
take. On CPU ``masked_fill`` / ``torch.where`` with -inf run at ~1.3 GB/s (1.75 ms for a 9 x 256 x 256 mask,
longer than the 256-token attention call it feeds; SDPA converts a boolean mask the same way); the same
values written as integer bit patterns run ~8x faster: keep - 1 is 0 or all ones, and all ones AND the bit
pattern of -inf is -inf."""
from __future__ import annotations

import functools

import torch

_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.lru_cache(maxsize=8)
def _neg_inf_bits(dtype) -> int:
    return int(torch.tensor(float("-inf"), dtype=dtype).view(_INT[dtype.itemsize]).item())


def additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    """A new tensor of ``keep``'s shape in ``dtype``: 0.0 where ``keep`` is True, -inf where it is False."""
    if keep.device.type != "cpu" or not dtype.is_floating_point or dtype.itemsize not in _INT:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return keep.to(_INT[dtype.itemsize]).sub_(1).bitwise_and_(_neg_inf_bits(dtype)).view(dtype)
