"""``Sparse``: the base of every sparse method, carrying its schedule as data
(the same schedule on every sparse method):

- ``dense_steps=n``: the first n denoising steps of every pipeline call run dense (by the step
  index the pipeline's own scheduler loop gives, reset per call); a float ``0 <= f < 1`` is a
  fraction: the first ``floor(f * steps)`` of the call's ``num_inference_steps``. The default,
  ``DENSE_STEPS = 0.4``, was chosen on the trained fixtures (``benchmarks/results/pipelines.md``):
  the smallest fraction of the sweep at which every method kept stock attention's caption
  accuracy on FLUX with PSNR >= 25 dB; ``dense_steps=0`` makes every step sparse. A model patched
  on its own (not through its pipeline) does not know the step count, so a fraction there runs
  every step sparse and logs that once;
- ``dense_layers=(0, 1, ...)``: these layers always run dense (a tuple, list or range of layer
  indices; a bare int is refused as ambiguous: ``(4,)`` is layer 4, ``range(4)`` the first 4);
- ``profile=``: per-layer or per-head parameter tables, a dict of tensors or a safetensors file
  written by ``save_profile``. A table is named after the parameter; shape (layers,) gives a
  scalar per layer, (layers, heads) one per head, (layers, heads, axes) a per-axis tuple per
  head; heads = 1 means the same for every head. Heads with equal parameters run together
  (one plan per group). Every value of every table is validated when the method is built.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from .._log import log_once
from ..checks import read_safetensors
from ..site import Site
from .base import Method, ParameterTypeError, check_indices, fail

DENSE_STEPS = 0.4  # default dense_steps: the first 40 % of a pipeline call's steps run dense


def save_profile(path, method: "Sparse", tables: dict) -> None:
    """Write ``tables`` (parameter name -> tensor (layers, [heads,] [axes])) for ``method``'s
    class to a safetensors file; ``load`` checks the class and parameter names."""
    from safetensors.torch import save_file

    _check_tables(type(method), tables, "given to save_profile")
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tables.items()}, str(path), metadata={"method": type(method).__name__})


def _how(cls) -> str:
    return (f"write one with attnpatch.methods.schedule.save_profile(path, {cls.__name__}(), {{parameter name: "
            "tensor (layers,), (layers, heads) or (layers, heads, axes)}) or pass that dict as profile=")


def _check_tables(cls, tables: dict, source: str) -> None:
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("dense_steps", "dense_layers", "profile")}
    for k, t in tables.items():
        if k not in names:
            raise ValueError(f"{cls.__name__} profile {source} sets {k!r}, which is not a parameter of {cls.__name__}; "
                             f"parameters: {sorted(names)}; {_how(cls)}")
        if torch.as_tensor(t).dim() not in (1, 2, 3):
            raise ValueError(f"{cls.__name__} profile {source}: table {k!r} must be (layers,), (layers, heads) or "
                             f"(layers, heads, axes); got {tuple(torch.as_tensor(t).shape)}; {_how(cls)}")


def _load(cls, profile) -> tuple[dict, str]:
    """(tables, where they came from) of a dict or a safetensors file written by save_profile."""
    if isinstance(profile, dict):
        tables, source = {k: torch.as_tensor(v) for k, v in profile.items()}, "(a dict)"
    else:
        source = repr(str(profile))
        expected = f"a safetensors file of per-layer / per-head {cls.__name__} parameter tables"
        tables, meta = read_safetensors(profile, f"{cls.__name__}(profile={profile!r})", expected, _how(cls))
        written = meta.get("method") or (f"a {meta['kind']} profile" if "kind" in meta else None)
        if written is None:
            raise ValueError(f"{cls.__name__} profile {source} has no 'method' metadata: it was not written by "
                             f"save_profile (model weights? another tool's file?); expected {expected}; {_how(cls)}")
        if written != cls.__name__:
            raise ValueError(f"{cls.__name__} profile {source} was written for {written}, not {cls.__name__}; "
                             f"pass it to {written}(profile=...) or {_how(cls)}")
    _check_tables(cls, tables, source)
    return tables, source


@dataclass
class Sparse(Method):
    """A sparse method with a schedule; subclasses implement ``plan``."""

    dense_steps: int | float = field(default=DENSE_STEPS, kw_only=True, repr=False)
    dense_layers: tuple = field(default=(), kw_only=True, repr=False)
    profile: object = field(default=None, kw_only=True, repr=False)

    def __post_init__(self):
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0 or (isinstance(d, float) and d >= 1):
            fail(self.name, "dense_steps", d, "a step count (an integer >= 0) or a fraction of the pipeline's steps "
                 "(a float in [0, 1)); for dense attention everywhere use Dense()", 4,
                 ParameterTypeError if isinstance(d, bool) or not isinstance(d, (int, float)) else ValueError)
        # a bare int is refused: next to dense_steps=4 (the first 4 steps) it could mean layer 4 or the first 4 layers
        self.dense_layers = check_indices(self.name, "dense_layers", self.dense_layers)
        self._tables, self._source = None, None
        if self.profile is not None:
            self._tables, self._source = _load(type(self), self.profile)
            self._check_values()
        self._variants: dict = {}

    def _check_values(self) -> None:
        """Every (layer, head) parameter set of the profile is valid together (checked now, not
        at the first forward of the layer that uses it)."""
        tables = self._tables.values()
        heads = {t.shape[1] for t in tables if t.dim() > 1} - {1}
        if len(heads) > 1:
            raise ValueError(f"{self.name} profile {self._source}: the tables disagree on the number of heads "
                             f"({sorted(heads)}); {_how(type(self))}")
        combos = {tuple(sorted(v.items())) for layer in range(min(t.shape[0] for t in tables))
                  for v in self._values(layer, max(heads, default=1))}
        for combo in combos:
            try:
                dataclasses.replace(self, profile=None, **dict(combo))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.name} profile {self._source} holds {dict(combo)}, which is not a valid "
                                 f"parameter set: {e}") from e

    def bind_model(self, model) -> None:
        """Check a profile against the model it is patched into, where its config names the
        layers and heads (transformers): a table for another model fails at patch time."""
        cfg = getattr(model, "config", None)
        L, H = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
        if self._tables is None or not isinstance(L, int) or not isinstance(H, int):
            return
        for name, t in self._tables.items():
            if t.shape[0] < L or (t.dim() > 1 and t.shape[1] not in (1, H)):
                heads = f"{t.shape[1]} heads" if t.dim() > 1 else "no head axis"
                raise ValueError(f"{self.name} profile {self._source}: table {name!r} has {t.shape[0]} layers and "
                                 f"{heads}, but this model has {L} layers x {H} heads (a table needs a row per layer "
                                 f"and 1 or {H} heads); {_how(type(self))}")

    def dense_count(self, steps: int | None) -> int:
        """How many first steps run dense in a pipeline call of ``steps`` steps (None: unknown)."""
        d = self.dense_steps
        if isinstance(d, int):
            return d
        if steps is None:
            if d > 0:
                log_once(logging.WARNING, f"{self.name}: dense_steps={d} is a fraction of the pipeline's steps, but the "
                                          "step count is unknown (the model was patched on its own, not through its "
                                          "pipeline): every step runs sparse; patch the pipeline or give an integer")
            return 0
        return math.floor(d * steps + 1e-9)

    def layer_free(self) -> bool:
        return not self.dense_layers and self._tables is None  # the layer picks dense layers and profile rows

    some_static = True  # a data-dependent subclass's dense steps and layers are fixed by the Site (static_at)

    def static_at(self, q, k, site: Site) -> bool:
        return self.dense_at(site)

    def dense_at(self, site: Site) -> bool:
        """True where the schedule says dense."""
        if site.layer in self.dense_layers:
            return True
        return site.step is not None and site.step < self.dense_count(site.steps)

    def _variant(self, values: dict) -> "Sparse":
        key = tuple(sorted(values.items()))
        if key not in self._variants:
            self._variants[key] = dataclasses.replace(self, profile=None, **values)  # validated by __post_init__
        return self._variants[key]

    def _values(self, layer: int, heads: int) -> list[dict] | None:
        """Parameter overrides for each head at ``layer`` (None: no profile)."""
        if self._tables is None:
            return None
        out = [{} for _ in range(heads)]
        for name, t in self._tables.items():
            if layer >= t.shape[0]:
                raise ValueError(f"{self.name} profile {self._source} has {t.shape[0]} layers for {name!r}, but layer "
                                 f"{layer} was called: a table needs one row per layer of this model; "
                                 f"{_how(type(self))}")
            row = t[layer]  # (), (heads | 1,) or (heads | 1, axes)
            if row.dim() and row.shape[0] not in (1, heads):
                raise ValueError(f"{self.name} profile {self._source} table {name!r} has {row.shape[0]} heads, the model "
                                 f"has {heads}: give one value per head or 1 for all; {_how(type(self))}")
            for h in range(heads):
                v = row if not row.dim() else row[h if row.shape[0] > 1 else 0]
                out[h][name] = tuple(v.tolist()) if v.dim() else v.item()
        return out

    def head_plans(self, q, k, site: Site):
        """``[(head indices or None, Plan | None)]``: the plans of this call by head group."""
        if self.dense_at(site):
            return [(None, None)]
        idx, total = site.model_heads(q.shape[1])
        values = self._values(site.layer, total)
        if values is None:
            return [(None, self.plan(q, k, site))]
        split = site.head_sum is not None  # estimates average over every rank's heads: every rank plans every group
        if site.heads is not None and not split:  # a rank's subset of the model's heads (context / tensor parallelism)
            values = [values[h] for h in idx]
        groups: dict = {}
        for h, v in enumerate(values):
            groups.setdefault(tuple(sorted(v.items())), []).append(h)
        if len(groups) == 1:
            return [(None, self._variant(values[0]).plan(q, k, site))]
        if split:  # the model's head groups in the call's positions; a group this rank lacks plans on 0 heads
            mine = {h: i for i, h in enumerate(idx)}
            groups = {key: [mine[h] for h in heads if h in mine] for key, heads in groups.items()}
        rep = q.shape[1] // k.shape[1]
        out = []
        for key, heads in groups.items():
            idx = torch.tensor(heads, dtype=torch.long, device=q.device)
            plan = self._variant(dict(key)).plan(q[:, idx], k[:, idx // rep], site)
            if heads:
                out.append((idx, plan))
        return out
