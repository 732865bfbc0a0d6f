"""``Method``: WHAT changes. One override, ``plan(q, k, site) -> Plan | None`` (None = dense)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# re-exported: the check_* helpers every method's __post_init__ validates with
from ..checks import (ParameterTypeError, check_bool, check_indices, check_int, check_ints,  # noqa: F401
                      check_number, fail)
from ..plan import Plan, materialise_mask
from ..site import Site


@dataclass
class Method:
    """Base class of every attention method. Subclasses are dataclasses whose fields are the
    method's parameters; ``__post_init__`` validates every one of them with the ``check_*``
    helpers (``attnpatch.checks``): a wrong value raises ``ValueError`` (a wrong type
    ``ParameterTypeError``, both a TypeError and a ValueError) naming ``Method(param=value)``,
    what is expected and an example."""

    def plan(self, q: torch.Tensor, k: torch.Tensor, site: Site) -> Plan | None:
        return None

    def head_plans(self, q: torch.Tensor, k: torch.Tensor, site: Site) -> list:
        """``[(head indices or None, Plan | None)]``; one group of all heads unless a per-head
        profile splits them (``Sparse``)."""
        return [(None, self.plan(q, k, site))]

    def reset(self) -> None:
        """Forget per-generation state; called at the start of every pipeline call."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass
class Dense(Method):
    """The identity method: stock attention through attnpatch's kernels."""

    source = "-"


def ascii_mask(method: Method, site: Site, Sq: int, Skv: int | None = None, max_cols: int = 96) -> str:
    """The keep-mask of ``method`` at ``site`` as text: '#' attended, '.' skipped (head 0, row 0)."""
    Skv = Sq if Skv is None else Skv
    q = torch.zeros(1, 1, Sq, 1)
    k = torch.zeros(1, 1, Skv, 1)
    plan = method.plan(q, k, site) or Plan()
    keep = materialise_mask(plan.with_site(site.causal, site.q_offset), 1, 1, Sq, Skv, "cpu")
    if keep is None:
        keep = torch.ones(1, 1, Sq, Skv, dtype=torch.bool)
    keep = keep.expand(1, 1, Sq, Skv)[0, 0, :, :max_cols]  # (Sq, min(Skv, max_cols))
    rows = ["".join("#" if x else "." for x in row.tolist()) for row in keep]
    return f"{method} at {site.kind} site, {Sq}x{Skv}:\n" + "\n".join(rows)
