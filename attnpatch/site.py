"""``Site``: one attention call as the model sees it. Built by patchers, read by methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KINDS = ("self", "joint", "cross")


@dataclass(frozen=True)
class Site:
    """Everything a method may know about one attention call.

    Token layout: a call's query sequence is ``text_len`` text tokens and ``prod(grid)`` visual
    tokens (row-major over ``grid``), text first or last. ``Site(grid=(T, H, W))`` is a plain
    video self-attention call and ``Site(causal=True)`` an LLM prefill.
    """

    grid: tuple[int, ...] | None = None  # visual grid (W,), (H, W) or (T, H, W); None: no grid
    text_len: int = 0  # text tokens in the query sequence (joint attention)
    text_first: bool = True  # text segment before (True) or after (False) the visual tokens
    causal: bool = False  # key j visible to query i only if j <= i + q_offset
    layer: int = 0  # block index in the model (transformers: ``layer_idx``)
    name: str = ""  # module name inside the model, e.g. "transformer_blocks.3.attn"
    kind: str = "self"  # "self", "joint" (text + visual in one sequence) or "cross"
    family: str = ""  # model family the patcher recognised, e.g. "flux", "llama"
    timestep: float | None = None  # denoising time in [0, 1]; 1 is pure noise
    step: int | None = None  # denoising step index within the current pipeline call
    steps: int | None = None  # denoising steps of the current pipeline call (None: not known)
    q_offset: int = 0  # key index of query 0 (KV-cache length before this call)
    # (B,) key index j holds absolute position j + kv_shift[b]: -left padding, or the tokens a
    # rolling (sliding-window) cache has dropped; None means 0
    kv_shift: torch.Tensor | None = field(default=None, compare=False)
    decode: bool = False  # LLM decode (one new query token per row)
    # role of every batch row when a guidance wrapper set them: "cond", "uncond" or "perturbed"
    roles: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Site.kind must be one of {KINDS}, got {self.kind!r}")
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if not 1 <= len(grid) <= 3 or min(grid) < 1:
                raise ValueError(f"Site.grid must be 1 to 3 positive sizes, got {self.grid!r}")
            object.__setattr__(self, "grid", grid)
        if self.text_len < 0:
            raise ValueError(f"Site.text_len must be >= 0, got {self.text_len}")

    @property
    def visual_len(self) -> int:
        """Number of visual tokens (0 without a grid)."""
        return math.prod(self.grid) if self.grid else 0

    @property
    def visual_start(self) -> int:
        """Index of the first visual token in the query sequence."""
        return self.text_len if self.text_first else 0

    @property
    def prefill(self) -> bool:
        return self.causal and not self.decode
