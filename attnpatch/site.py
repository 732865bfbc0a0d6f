"""``Site``: one attention call as the model sees it. Built by patchers, read by methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from .checks import ParameterTypeError, check_bool, check_int, check_ints, check_number, fail

KINDS = ("self", "joint", "cross")
ROLES = ("cond", "uncond", "perturbed")


@dataclass(frozen=True)
class Site:
    """Everything a method may know about one attention call.

    Token layout: a call's query sequence is ``text_len`` text tokens and ``prod(grid)`` visual
    tokens (row-major over ``grid``), text first or last. ``Site(grid=(T, H, W))`` is a plain
    video self-attention call and ``Site(causal=True)`` an LLM prefill. Every field is checked
    at construction (integers are integers, ``grid=(8.5, 8)`` is refused, not truncated).
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
    # the family's RoPE as a position shift: rope(x (..., N, D), offsets per axis) -> x with its
    # rotary positions moved by the offsets (FLUX; from the patcher's family row), else None
    rope: Callable | None = field(default=None, compare=False)
    # role of every batch row when a guidance wrapper set them: "cond", "uncond" or "perturbed"
    roles: tuple = ()
    # the model's own index of each head of the call, when the call holds a subset of them (context or
    # tensor parallelism: each rank attends with H / N heads); None: the call's heads are heads 0..H-1
    heads: tuple | None = None
    num_heads: int | None = None  # the model's head count when ``heads`` is set (per-head profiles' rows)
    # head_sum(x): x summed in place over the ranks that split the model's heads with this call (tensor
    # parallelism), so an estimate averaged over heads (``head_mean``) is the one-process estimate; None: no split
    head_sum: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        # every field is checked here, once, so a wrong Site fails where it is built, not deep in a kernel
        s = "Site"
        if self.grid is not None:
            grid = check_ints(s, "grid", self.grid, 1, scalar=False, example=(64, 64),
                              expected="None or 1 to 3 positive integer sizes: (W,), (H, W) or (T, H, W)")
            object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "text_len", check_int(s, "text_len", self.text_len, 0, example=77))
        object.__setattr__(self, "layer", check_int(s, "layer", self.layer, 0, example=3))
        object.__setattr__(self, "q_offset", check_int(s, "q_offset", self.q_offset, 0, example=0,
                                                       expected="an integer >= 0 (the KV-cache length before this call)"))
        for name in ("text_first", "causal", "decode"):
            check_bool(s, name, getattr(self, name))
        for name in ("name", "family"):
            if not isinstance(getattr(self, name), str):
                fail(s, name, getattr(self, name), "a string", '"flux"' if name == "family" else '"blocks.3.attn"',
                     ParameterTypeError)
        if self.kind not in KINDS:
            fail(s, "kind", self.kind, f"one of {KINDS}", '"self"', ParameterTypeError if not isinstance(self.kind, str) else ValueError)
        if self.timestep is not None:
            object.__setattr__(self, "timestep", float(check_number(
                s, "timestep", self.timestep, low=0, high=1, example=0.5,
                expected="None or a float in [0, 1] (the noise level; 1 is pure noise)")))
        if self.step is not None:
            object.__setattr__(self, "step", check_int(s, "step", self.step, 0, example=0))
        if self.steps is not None:
            object.__setattr__(self, "steps", check_int(s, "steps", self.steps, 1, example=28))
        shift = self.kv_shift
        if shift is not None and (not isinstance(shift, torch.Tensor) or shift.dim() != 1 or shift.is_floating_point()):
            fail(s, "kv_shift", self.kv_shift, "None or a (B,) integer tensor", "torch.tensor([0, -3])", ParameterTypeError)
        if self.rope is not None and not callable(self.rope):
            fail(s, "rope", self.rope, "None or a callable rope(x, offsets) -> x", "attnpatch.ops.rope.rope_shift with "
                 "its axes and theta bound", ParameterTypeError)
        roles = self.roles
        if isinstance(roles, str) or not isinstance(roles, (tuple, list)) or any(r not in ROLES for r in roles):
            fail(s, "roles", roles, f"a tuple with one of {ROLES} per batch row", '("uncond", "cond")',
                 ParameterTypeError if not isinstance(roles, (tuple, list)) else ValueError)
        object.__setattr__(self, "roles", tuple(roles))
        if self.heads is not None or self.num_heads is not None:
            n = check_int(s, "num_heads", self.num_heads, 1, example=24,
                          expected="the model's head count (an integer >= 1) whenever heads is set")
            hs = check_ints(s, "heads", self.heads, 0, axes=1 << 16, scalar=False, example=(0, 1, 2),
                            expected="a tuple of the model's head indices, one per head of the call")
            if max(hs) >= n or len(set(hs)) != len(hs):
                fail(s, "heads", self.heads, f"distinct head indices below num_heads={n}", "(0, 1, 2)")
            object.__setattr__(self, "heads", hs)
            object.__setattr__(self, "num_heads", n)
        if self.head_sum is not None and not callable(self.head_sum):
            fail(s, "head_sum", self.head_sum, "None or a callable summing a tensor in place over the ranks",
                 "functools.partial(torch.distributed.all_reduce, group=tp_group)", ParameterTypeError)

    @classmethod
    def trusted(cls, **values) -> "Site":
        """A Site from values a patcher computed (types right by construction), without the checks
        of ``Site(...)``: they cost ~40 us, paid on every attention call otherwise. Users build Sites
        with ``Site(...)``; tests/test_api.py checks both give equal Sites."""
        site = object.__new__(cls)
        fields_ = site.__dict__  # filled whole (frozen: no __setattr__ per field, ~3 us less per attention call)
        fields_.update(_DEFAULTS)
        fields_.update(values)
        if len(fields_) != len(_DEFAULTS):
            raise TypeError(f"Site.trusted: unknown fields {sorted(set(values) - set(_DEFAULTS))}")
        return site

    def model_heads(self, H: int) -> tuple[range | tuple, int]:
        """(the model's index of each of the call's ``H`` heads, the model's head count): per-head
        parameters, profiles and head lists are in the model's numbering, whatever subset a rank holds."""
        if self.heads is None:
            return range(H), H
        if len(self.heads) != H:
            raise ValueError(f"Site.heads names {len(self.heads)} heads but the call has {H}")
        return self.heads, self.num_heads

    def head_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, h, ...) averaged over batch rows and heads: over every rank's heads when the model's
        heads are split across ranks (``head_sum``; every rank must call it, a rank with h = 0 too)."""
        if self.head_sum is None:
            return x.mean((0, 1))
        s = torch.cat([x.sum((0, 1)).flatten().float(), x.new_full((1,), x.shape[0] * x.shape[1], dtype=torch.float)])
        self.head_sum(s)
        return (s[:-1] / s[-1]).view(x.shape[2:]).to(x.dtype)

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


_DEFAULTS = {f.name: f.default for f in fields(Site)}  # every Site field has a plain default
