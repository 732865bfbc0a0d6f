"""The per-model runtime of the diffusers patcher: denoising step tracking from the timestep the
transformer receives, and ``DenoiserHook``, the diffusers ``ModelHook`` (registered in the model's
``HookRegistry``) that reads each forward's grid and timestep and, for methods that need it, runs
the guidance (``guidance.run``). Being in the registry, diffusers' own hooks compose with it:
``cache_context`` tells it which CFG branch a call is, ``reset_stateful_hooks`` resets it."""
from __future__ import annotations

import copy
import inspect
import threading

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..handle import SharesMethod
from .route import eager

NAME = "attnpatch"  # the hook's name in the model's HookRegistry
_COPY = "_attnpatch_copy"  # forward kwarg: the call is a deep copy's (see DenoiserHook.pre_forward)


class StepTracker(SharesMethod):
    """Counts denoising steps: a new noise level is a new step; a level above the last one is a
    new generation (``method.reset()``). Pipelines also call ``reset()`` at the start of a call.
    Classifier-free guidance run as two forwards at one timestep stays one step."""

    def __init__(self, method):
        self.method = method
        self.step = 0
        self.total: int | None = None  # the pipeline call's step count, when a pipeline says it
        self.last: float | None = None
        self.calls = 0  # denoiser calls at the current step (guidance: the first is the cond one)

    def reset(self, total: int | None = None) -> None:
        if total is not None:
            self.total = int(total)
        self.step, self.last, self.calls = 0, None, 0
        self.method.reset()

    def update(self, t: float) -> None:
        if self.last is not None and t > self.last + 1e-9:
            self.reset()
        elif self.last is not None and t != self.last:
            self.step += 1
            self.calls = 0
        self.last = t


def _per_thread(name: str, default):
    """An attribute kept per thread: two threads running one model each see their own call's facts."""
    return property(lambda self: getattr(self._local, name, default), lambda self, v: setattr(self._local, name, v))


class ModelState:
    """Per-forward facts of one patched model, written by its ``DenoiserHook``."""

    grid = _per_thread("grid", None)
    timestep = _per_thread("timestep", None)
    roles = _per_thread("roles", ())  # batch-row roles set by the guidance around forward
    call = _per_thread("call", None)  # (pipeline, its bound call arguments) while a patched pipeline runs

    def __init__(self, model, family, tracker: StepTracker, slot: int = 0):
        self.family = family  # the model's row of attnpatch.patchers.families
        self.tracker = tracker
        self.slot = slot  # which denoiser of its pipeline (1: transformer_2), for per-denoiser CFG scales
        self.rope = family.rope(model) if family.rope is not None else None  # Site.rope of its calls
        self.params = list(inspect.signature(model.forward).parameters)  # positional order of forward's arguments
        self._local = threading.local()
        self.parallel, self.text_sharded = None, False  # the model's ParallelConfig, as _read_inputs last saw it

    def __deepcopy__(self, memo):  # a deep copy of the model: its own tracker, no call in flight
        new = object.__new__(ModelState)
        memo[id(self)] = new
        new.family, new.params, new.slot, new._local = self.family, self.params, self.slot, threading.local()
        new.rope, new.parallel, new.text_sharded = self.rope, None, False
        new.tracker = copy.deepcopy(self.tracker, memo)
        return new

    def bind(self, args, kwargs) -> dict:
        return {**dict(zip(self.params, args)), **kwargs}

    def read(self, model, bound: dict) -> None:
        """Grid and timestep of this forward; advances the step tracker."""
        self.grid = self.family.grid(model, bound)
        if self.tracker.total is None and self.call is not None:  # the pipeline sets it before its loop
            n = getattr(self.call[0], "num_timesteps", None)
            self.tracker.total = int(n) if n else None
        t = bound.get("timestep")
        if t is not None:
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            t = min(max(t / self.family.t_scale, 0.0), 1.0)
            t = 1.0 - t if self.family.t_inverted else t
            self.tracker.update(t)
        self.timestep = t


class _Branch(StateManager):
    """Receives the pipeline's ``cache_context`` ("cond", "uncond", "cond_uncond"): diffusers sets
    it on every StateManager of a stateful hook in the model's registry."""

    def __init__(self):
        super().__init__(BaseState)
        self.name = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name


class DenoiserHook(SharesMethod, ModelHook):
    """attnpatch's hook on one denoiser. ``run`` is what the forward does (plain, or guided)."""

    _is_stateful = True  # so diffusers hands it the cache context and resets it

    def __init__(self, model, method, state: ModelState, run=None):
        super().__init__()
        self.model, self.method, self.state, self.run = model, method, state, run
        self.branch = _Branch()

    def pre_forward(self, module, *args, **kwargs):
        if module is not self.model:  # a deep copy's forward: diffusers' chain still names this hook
            kwargs[_COPY] = module
            return args, kwargs
        return args, kwargs  # the inputs were read by _read_inputs, before every hook of the registry

    def new_forward(self, module, *args, **kwargs):
        twin = kwargs.pop(_COPY, None)
        if twin is not None:  # run the copy's own hook on the copy
            hook = HookRegistry.check_if_exists_or_initialize(twin).get_hook(NAME)
            args, kwargs = hook.pre_forward(twin, *args, **kwargs)
            return hook.new_forward(twin, *args, **kwargs)
        if self.run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.run(self, args, kwargs)

    def reset_state(self, module):
        self.branch.reset()
        self.branch.name = None
        return module


def register(model, hook: DenoiserHook):
    """Register ``hook`` in ``model``'s HookRegistry and ``_read_inputs`` as a forward pre-hook;
    returns the undo, which leaves the model as it was (no ``forward`` attribute, no registry unless
    one was there before)."""
    had_registry, had_forward = hasattr(model, "_diffusers_hook"), "forward" in model.__dict__
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, NAME)
    return _Unregister(model, had_registry, had_forward, model.register_forward_pre_hook(_read_inputs, with_kwargs=True))


@eager  # under torch.compile: the grid and timestep are Python numbers read off tensors (.item())
def _read_inputs(module, args, kwargs):
    """Grid and timestep of this forward, read from the inputs as the caller passed them: a torch
    forward pre-hook runs before the registry's chain, so hooks that rewrite the inputs (diffusers'
    context-parallel split hooks shard ``img_ids`` and ``hidden_states``) never hide the global
    layout, whether they were registered before or after attnpatch's."""
    registry = module.__dict__.get("_diffusers_hook")
    hook = registry.hooks.get(NAME) if registry is not None else None
    if hook is not None:  # a deep copy's registry holds the copy's own hook and state
        hook.state.read(module, hook.state.bind(args, kwargs))
        config = getattr(module, "_parallel_config", None)
        if config is not hook.state.parallel:  # parallelism enabled (once per model, before or after the patch)
            from .parallel import check_config, text_sharded

            check_config(config, module)
            hook.state.parallel, hook.state.text_sharded = config, text_sharded(module)


def _remove(registry) -> None:
    """``registry.remove_hook(NAME)``, keeping a hook registered above ours with its own
    ``new_forward`` (FasterCache's denoiser hook) in the chain: diffusers 0.42's remove_hook
    overwrites that hook's ``forward`` (its new_forward) with what ours wrapped, so it would
    silently stop running; it must instead call what ours wrapped as its ``original_forward``."""
    order = registry._hook_order
    if NAME not in order:
        return
    i = order.index(NAME)
    above = registry._fn_refs[i + 1] if i + 1 < len(order) else None
    below = registry._fn_refs[i].original_forward  # ours has a new_forward: this is what it wrapped
    saved = above.forward if above is not None else None
    registry.remove_hook(NAME, recurse=False)
    if above is not None and above.original_forward is not None:
        above.forward, above.original_forward = saved, below


class _Unregister:
    def __init__(self, model, had_registry: bool, had_forward: bool, reader):
        self.model, self.had_registry, self.had_forward, self.reader = model, had_registry, had_forward, reader

    def __call__(self) -> None:
        m = self.model
        self.reader.remove()
        registry = m.__dict__.get("_diffusers_hook")
        if registry is None:
            return
        _remove(registry)
        if registry.hooks:
            return  # others' hooks (e.g. FirstBlockCache) stay, in their order
        fwd = m.__dict__.get("forward")
        if not self.had_forward and getattr(fwd, "__self__", None) is m and fwd.__func__ is type(m).forward:
            del m.__dict__["forward"]  # the registry left the bound method behind: drop it
        if not self.had_registry:
            del m.__dict__["_diffusers_hook"]
