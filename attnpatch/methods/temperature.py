"""``Temperature`` and ``EntropyScale``: logit scaling. ``Temperature(tau)`` divides every score
by tau (per layer with ``layers``); ``EntropyScale(train_len)`` multiplies the scores of a query
that sees n keys by max(1, log n / log train_len), keeping attention entropy at its training
level when generating beyond the training length or resolution (Selective Attention; YaRN's
log-n scaling; entropy-invariant attention)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..plan import Plan
from ..site import Site
from ._grid import Memo
from .base import Method, check_indices, check_int, check_number


@dataclass
class Temperature(Method):
    """Scores divided by ``tau`` (in ``layers`` only, when given: layer indices, or one int)."""

    source = "Selective Attention (2024); Style Injection in Diffusion (temperature)"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)

    tau: float = 1.0
    layers: tuple | None = None

    def __post_init__(self):
        self.tau = check_number("Temperature", "tau", self.tau, low=0, low_open=True, example=0.9)
        if self.layers is not None:  # an int is that one layer, as in patch(..., layers=3) and PAG(layers=3)
            self.layers = check_indices("Temperature", "layers", self.layers, single=True, example=(2, 3))
        self._plans = Memo(8)

    def layer_free(self) -> bool:
        return self.layers is None

    def plan(self, q, k, site: Site) -> Plan | None:
        if self.tau == 1.0 or (self.layers is not None and site.layer not in self.layers):
            return None
        # one Plan per tau (its repr is most of a 64-token call's planning time); folds into the
        # softmax scale: SDPA speed
        return self._plans.get((self.tau, self.layers), lambda: Plan(q_scale=1.0 / self.tau, name=repr(self)))


@dataclass
class EntropyScale(Method):
    """Scores times max(1, log n / log train_len), n = keys the query sees."""

    source = "Entropy-invariant attention scaling (log-n scaling; Selective Attention)"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)

    train_len: int = 4096

    def __post_init__(self):
        self.train_len = check_int("EntropyScale", "train_len", self.train_len, 2, example=4096,
                                   expected="an integer >= 2 (the training length or tokens per image)")
        self._plans = Memo()

    def layer_free(self) -> bool:
        return True

    def plan(self, q, k, site: Site) -> Plan | None:
        if k.shape[2] <= self.train_len:
            return None  # within the training length every factor is 1
        # the factors depend only on this key: one Plan per key, for every layer and step
        shift = None if site.kv_shift is None else tuple(site.kv_shift.tolist())
        key = (self.train_len, q.shape[2], k.shape[2], site.q_offset, site.causal, q.device, shift)
        return self._plans.get(key, lambda: self._plan(q, k, site, shift))

    def _plan(self, q, k, site: Site, shift=None) -> Plan:
        Skv, off, base = k.shape[2], site.q_offset, math.log(self.train_len)
        if shift is None and (not site.causal or q.shape[2] == 1):  # every row sees the same n keys: one factor
            n = Skv if not site.causal else min(off + 1, Skv)
            return Plan(q_scale=max(1.0, math.log(n) / base), name=repr(self))
        if site.causal:
            n = (torch.arange(q.shape[2], dtype=torch.float64) + off + 1).clamp_max(Skv)  # key slots each row sees
        else:
            n = torch.full((q.shape[2],), float(Skv), dtype=torch.float64)
        n = n.view(1, 1, -1, 1)
        if shift is not None:  # left padding (kv_shift = -pad): the pad slots are not keys the row sees
            n = (n + torch.tensor(shift, dtype=torch.float64).view(-1, 1, 1, 1)).clamp_min(1.0)
        factor = (n.log() / base).clamp_min(1.0)  # (1 | B, 1, Sq, 1)
        return Plan(q_scale=factor.to(q.device), name=repr(self))  # scales q's rows: SDPA speed
