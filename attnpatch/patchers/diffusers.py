"""diffusers patcher: marks each attention module of a supported denoiser (its calls then route to
the method) and registers a ``steps.DenoiserHook`` in the model's HookRegistry that derives the
token grid, text segment and timestep of every call (and runs the guidance where the method needs
it). Every per-family fact comes from ``families.FAMILIES``."""
from __future__ import annotations

import functools
import logging
import math

from .. import core
from .._log import log_once
from ..handle import Counters, SharesMethod
from ..site import Site
from . import SUPPORTED, families, guidance, layers as layer_sel, parallel, route, steps
from .families import Family


def family_of(model) -> Family:
    fam = families.family_of(model)
    if fam is None:
        raise TypeError(f"attnpatch does not support {type(model).__name__}; supported: {SUPPORTED}")
    return fam


def _level(grid, S: int):
    """The grid of the UNet level with S tokens (each level halves H and W, rounding up)."""
    if not grid:
        return grid
    h, w = grid
    for _ in range(8):
        if h * w == S:
            return (h, w)
        h, w = -(-h // 2), -(-w // 2)
    return None


class _Call(SharesMethod):
    """One patched attention module: its hooks mark the module's forward as attnpatch's (a
    ``route.Frame``); the routers then turn each primitive call into a Site and run the method."""

    def __init__(self, method, backend, layer: int, name: str, state: steps.ModelState, counters: Counters,
                 routes: route.Routes):
        self.method, self.backend, self.layer, self.name, self.state = method, backend, layer, name, state
        self.counters, self.routes = counters, routes

    @route.eager  # dynamo would trace the processor check (lru_cache ignored) and break on the contextvar
    def pre(self, module, args, kwargs):
        """Forward pre-hook. The processor may have changed since patch (``set_attn_processor``,
        an adapter loader, ``fuse_qkv_projections``): route whichever one runs now, or say why not."""
        proc = type(module.processor)
        reason = route.unsupported(proc)
        if reason:
            self.hand_back(reason)
            return
        self.routes.add(proc.__module__)
        route.enter(self)

    @route.eager
    def post(self, module, args, kwargs, output):
        """Forward hook, run even when forward raises."""
        route.leave(self)

    def hand_back(self, reason: str) -> None:
        self.counters.hand_back(reason, self.name)

    def _roles(self, frame, B: int) -> tuple:
        roles = self.state.roles
        if not roles or B == len(roles):
            return roles
        if B == 1 and self.state.family.row_calls:  # e.g. Mochi's processor: one batch row per call, in order
            frame.row += 1
            return (roles[frame.row - 1],) if frame.row <= len(roles) else ()
        log_once(logging.WARNING, f"{self.name}: attention batch {B} does not match the {len(roles)} rows the guidance set")
        return ()

    def site(self, Sq: int, Skv: int, causal: bool, roles: tuple = (), heads=None, num_heads=None,
             head_sum=None) -> tuple[Site | None, str]:
        """``(Site, "")`` for a visual call, else ``(None, why it is not one)``."""
        st = self.state
        grid = _level(st.grid, Sq) if st.family.multires else st.grid
        n = math.prod(grid) if grid else 0
        text_len, kind = 0, "self"
        if Sq != Skv:
            kind = "cross"
            if n and Sq != n:
                if not n or Sq * parallel.degree(st.parallel) != n:
                    return None, "text queries attending to other keys"
                grid = None  # context parallelism without a Ulysses exchange: this rank's shard of the visual queries
        elif n and Sq > n:
            kind, text_len = "joint", Sq - n
        elif n and Sq < n:
            return None, "text-only self-attention"  # e.g. a text refiner
        return Site.trusted(grid=grid, text_len=text_len, text_first=st.family.text_first, causal=causal,
                    layer=self.layer, name=self.name, kind=kind, family=st.family.name,
                    timestep=st.timestep, step=st.tracker.step if st.timestep is not None else None,
                    steps=st.tracker.total if st.timestep is not None else None, roles=roles,
                    rope=st.rope, heads=heads, num_heads=num_heads, head_sum=head_sum), ""

    def run(self, frame, q, k, v, *, mask, scale, causal, heads=None, num_heads=None, head_sum=None):
        """The method's attention of ``(B, H, S, D)`` tensors (``heads``: the model's index of each
        of the H heads, when the call holds a subset), or None: not a call the method applies to."""
        site, why = self.site(q.shape[2], k.shape[2], bool(causal), self._roles(frame, q.shape[0]), heads, num_heads,
                              head_sum)
        if site is None:
            self.counters.skip(why)
            return None
        self.counters.route()
        if self.method.rows_coupled and site.kind == "cross" and site.grid is None and self.state.parallel is not None:
            # this rank's shard of the query rows (no Ulysses exchange: the keys are whole on every rank) and a
            # method whose rows depend on each other: all the rows, then this rank's
            return parallel.all_rows(self.state.parallel, q, mask, lambda q_, m_: core.run(
                q_, k, v, self.method, site, backend=self.backend, mask=m_, scale=scale))
        return core.run(q, k, v, self.method, site, backend=self.backend, mask=mask, scale=scale)


def _attention_modules(model, family: Family, prefix: str = ""):
    """``(layer, full name, module)`` for every attention module; layer = ordinal of its block."""
    out, blocks = [], {}
    for name, m in model.named_modules():
        if not hasattr(m, "processor") or any(name.startswith(s) for s in family.skip):
            continue
        block = name.rsplit(".", 1)[0]  # "transformer_blocks.3.attn" -> "transformer_blocks.3"
        layer = blocks.setdefault(block, len(blocks))
        out.append((layer, prefix + name, m))
    return out


def _check_processors(entries) -> None:
    """Refuse before changing anything when a chosen module's processor cannot be routed."""
    for _, name, m in entries:
        reason = route.unsupported(type(m.processor))
        if reason:
            raise TypeError(f"{name} uses {reason}; restore the default processors first "
                            "(model.set_default_attn_processor(), or set_attn_processor with the family's own processor)")


def _install(entries, make_call) -> tuple[list[str], list]:
    """A pre-forward hook and an always-called forward hook on every attention module in ``entries``."""
    names, undo = [], []
    for layer, name, m in entries:
        call = make_call(layer, name)
        undo.append(m.register_forward_pre_hook(call.pre, with_kwargs=True).remove)
        undo.append(m.register_forward_hook(call.post, with_kwargs=True, always_call=True).remove)
        names.append(name)
    return names, undo


def _uncompiled(model, where: str):
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        raise TypeError(f"{where} is compiled with torch.compile; patch before compiling (attnpatch.patch(...), then "
                        f"torch.compile), or patch the original module {where}._orig_mod")
    return model


def _patch_models(models, method, backend, layers, tracker, counters):
    """``models``: ``(name prefix, model, slot)``; slot 1 is a pipeline's ``transformer_2``."""
    collected = []
    for prefix, model, slot in models:
        fam = family_of(model)
        parallel.check_config(getattr(model, "_parallel_config", None), model)  # ring / no plan: refused before any change
        collected.append((model, fam, slot, _attention_modules(model, fam, prefix)))
    chosen = layer_sel.select([(l, n) for *_, entries in collected for l, n, _ in entries], layers)
    collected = [(model, fam, slot, [e for e in entries if e[1] in chosen]) for model, fam, slot, entries in collected]
    _check_processors([e for *_, entries in collected for e in entries])
    routes = route.Routes()
    names, undo = [], [routes]
    for model, fam, slot, entries in collected:
        state = steps.ModelState(model, fam, tracker, slot)
        n, u = _install(entries, functools.partial(_Call, method, backend, state=state, counters=counters, routes=routes))
        names += n
        undo += u
        if method.guidance or method.needs_roles:
            method.bind_model(model)
        run = guidance.run if method.guidance or method.needs_roles else None
        undo.append(steps.register(model, steps.DenoiserHook(model, method, state, run)))
    return names, undo


def patch_model(model, method, backend, layers, counters: Counters):
    return _patch_models([("", model, 0)], method, backend, layers, steps.StepTracker(method), counters)


def patch_pipeline(pipe, method, backend, layers, counters: Counters):
    names = [n for n in guidance.DENOISERS if getattr(pipe, n, None) is not None]
    models = [(f"{n}.", _uncompiled(getattr(pipe, n), f"pipe.{n}"), int(n == "transformer_2")) for n in names]
    if not models:
        raise TypeError(f"{type(pipe).__name__} has no transformer denoiser attnpatch can patch; supported: {SUPPORTED}")
    names, undo = _patch_models(models, method, backend, layers, steps.StepTracker(method), counters)
    undo.append(guidance.wrap_calls(pipe))
    return names, undo
