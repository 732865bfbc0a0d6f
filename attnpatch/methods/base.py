"""``Method``: WHAT changes. One override, ``plan(q, k, site) -> Plan | None`` (None = dense).

Everything else a method may ask of a patcher is declared here, with its default, so patchers
read plain attributes (never ``getattr`` probes) and write nothing back onto a method:

- ``llm`` (class attribute, default True): the method can run in a transformers causal decoder;
  False for methods that need a visual token grid or a denoiser's batch (refused at patch time).
- ``guidance`` (default False): the diffusers patcher wraps the denoiser to append perturbed rows.
- ``needs_roles`` (default False): attention calls must know their CFG batch roles
  (``Site.roles``); ``guidance`` implies it.
- ``bind_model(model)``: called once by a patcher at patch time (check a profile against the
  model, keep a model fact such as FLUX's RoPE); default no-op.
- ``guides(step)`` / ``guidance_weight()`` (for ``guidance`` methods): whether the denoiser wrapper
  adds the perturbed rows at this step (default: every step), and the weight s of
  ``cond + s * (cond - perturbed)`` (default 0: the perturbed prediction is dropped).
- ``kv_policy()``: a KV-cache policy the transformers patcher applies to the model's cache
  (``SinkWindow(evict=True)``), or None (default) to leave the cache as it is.
"""
from __future__ import annotations

import threading
import weakref
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
    what is expected and an example.

    The protocol flags below are class attributes (not dataclass fields: no annotation), so they
    are never parameters; see the module docstring for what each asks of a patcher."""

    llm = True  # runs in a transformers causal decoder
    guidance = False  # the diffusers patcher wraps the denoiser to add perturbed rows
    needs_roles = False  # attention calls must know their CFG batch roles (guidance implies it)
    # the output of a query row depends on other query rows (statistics over the call's rows, as
    # SinkCalibration's column means): a call split by query rows across ranks is gathered first
    rows_coupled = False
    # plan(q, k, site) depends only on the method's parameters, the Site's compared fields and q / k's shapes,
    # dtype and device (never on their values, a count of calls or other state): core then remembers the kernel
    # call of each (Site, shapes) and repeats it without asking again (attnpatch/core.py, ``_remember``);
    # setting a parameter forgets those calls
    plans_by_site = False
    # a data-dependent method some of whose calls are not (``static_at``: a schedule's dense step or layer, a grid of
    # one tile): core remembers those calls as it does for ``plans_by_site``
    some_static = False

    def static_at(self, q: torch.Tensor, k: torch.Tensor, site: Site) -> bool:
        """For ``some_static``: True when this call's plan follows from the parameters, ``site`` and the shapes
        alone, as a ``plans_by_site`` method's always does (``layer_free`` then says whether the layer matters).
        core asks only after a call planned None (dense): the data-independent calls of such methods all do."""
        return False

    def layer_free(self) -> bool:
        """For ``plans_by_site``: True when the plan ignores ``Site.layer`` and ``Site.name`` too, so a call
        remembered at one layer serves every layer (a step of a pipeline, a forward of an LLM)."""
        return False

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            _CALLS.pop(id(self), None)

    def bind_model(self, model) -> None:
        """Called once by a patcher at patch time with the patched model; default: nothing."""

    def guides(self, step: int | None) -> bool:
        """For ``guidance`` methods: the denoiser wrapper adds perturbed rows at ``step``."""
        return self.guidance

    def guidance_weight(self) -> float:
        """For ``guidance`` methods: s in ``cond + s * (cond - perturbed)``; 0 drops the rows' prediction."""
        return 0.0

    def kv_policy(self):
        """The KV-cache policy the transformers patcher applies (an object with the interface of
        ``attnpatch.methods.sink_window.SinkEviction``), or None: the patcher's default, ``KeepAll``
        (every key, appended in place)."""
        return None

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


# id(method) -> (weak reference to it, {call key: kernel call}) of ``plans_by_site`` methods, kept here and not on
# the method (a method object carries its parameters and plan caches only); bounded, a dead reference never matches
_CALLS: dict = {}
_CALLS_METHODS = 64


def remembered_calls(method: Method, create: bool = False) -> dict | None:
    """The kernel calls core remembered for ``method`` (``plans_by_site``); a new empty table when ``create``."""
    got = _CALLS.get(id(method))
    if got is not None and got[0]() is method:
        return got[1]
    if not create:
        return None
    if len(_CALLS) >= _CALLS_METHODS:
        _CALLS.clear()
    calls: dict = {}
    key = id(method)

    def forget(ref):  # the method is gone: drop its calls (their plans hold masks) unless the id serves a newer one
        if _CALLS.get(key, (None,))[0] is ref:
            _CALLS.pop(key, None)

    _CALLS[key] = (weakref.ref(method, forget), calls)
    return calls


@dataclass
class Dense(Method):
    """The identity method: stock attention through attnpatch's kernels."""

    source = "-"


def call_heads(site: Site, H: int, model_heads) -> list[int] | None:
    """The call's head positions (0..H-1) of the model heads listed in ``model_heads`` (None: all
    heads, returned as None). Under context / tensor parallelism a call holds a subset of the model's
    heads (``Site.heads``): a head list in the model's numbering selects those the call holds."""
    if model_heads is None:
        return None
    idx, _ = site.model_heads(H)
    if site.heads is None:
        return list(model_heads)
    wanted = set(model_heads)
    return [i for i, h in enumerate(idx) if h in wanted]


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


class KeepAll:
    """The KV-cache policy the transformers patcher gives a method without one of its own (``kv_policy()`` None):
    every key stays (the logits are the stock cache's) and the cache layer appends in place
    (``kv_cache.PolicyLayer._append``: buffers with room to grow once decoding starts). Why: transformers'
    ``DynamicLayer`` copies the whole cache on every update (``torch.cat``): at 32K on SmolLM2 shapes that copy moved
    2,880 MB a token, against the 45 MB SinkWindow(4, 1024)'s decode step reads and the 1,440 MB dense attention reads
    (benchmarks/results/decode.md). ``optional``: the method is the same without it, so a cache type the patcher
    cannot take (a static or quantized cache) is left as it is and ``patch(..., layers=...)`` stays allowed."""

    evicts = False
    optional = True

    def __init__(self):
        self._lock = threading.Lock()
        self._layers: dict = {}  # layer -> (tokens seen, bytes per token) of its latest update

    def retain(self, keys, values):
        return keys, values

    def observe(self, layer: int, state: dict, keys: torch.Tensor) -> None:
        """Nothing is kept beside the keys."""

    def record(self, layer: int, seen: int, held: float, token_bytes: int) -> None:
        with self._lock:
            self._layers[layer] = (seen, token_bytes)

    def stats(self) -> dict:
        """``{"evicted": 0, "before": bytes, "after": bytes}``: the cache is kept whole."""
        with self._lock:
            kv = sum(seen * b for seen, b in self._layers.values())
        return {"evicted": 0, "before": kv, "after": kv}

    def __deepcopy__(self, memo):  # a deep copy of a patched model counts its own cache from zero
        new = memo[id(self)] = KeepAll()
        return new

    def __repr__(self) -> str:
        return "KeepAll()"
