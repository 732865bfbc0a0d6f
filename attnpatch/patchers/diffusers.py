"""diffusers patcher: wraps each attention processor of a supported denoiser and derives the
token grid, text segment and timestep for every call from a model-level pre-forward hook."""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .. import core
from .._log import log_once
from ..handle import Counters, SharesMethod, pop_attr
from .steps import StepTracker
from ..site import Site
from . import SUPPORTED, layers as layer_sel, route


def _latent(p_t: str | None, p: str, layout: str) -> Callable:
    """Grid from a latent ``hidden_states`` whose dims are named by ``layout`` (e.g. "BCTHW")."""

    def grid(model, args):
        x = args["hidden_states"]
        dims = dict(zip(layout, x.shape))  # e.g. {"B": 1, "C": 16, "T": 5, "H": 8, "W": 8}
        cfg = model.config
        ps = getattr(cfg, p)
        ph, pw = (ps[-2], ps[-1]) if isinstance(ps, (tuple, list)) else (ps, ps)
        spatial = (dims["H"] // ph, dims["W"] // pw)
        if "T" not in dims:
            return spatial
        pt = ps[0] if isinstance(ps, (tuple, list)) else (getattr(cfg, p_t, None) or 1) if p_t else 1
        return (math.ceil(dims["T"] / pt), *spatial)

    return grid


def _flux_grid(model, args):
    ids = args.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.dim() == 3 else ids  # (S_img, 3): (frame, row, col); legacy 3-D ids are batched
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    H, W = int(rows.max()) + 1, int(cols.max()) + 1
    if H * W != ids.shape[0] or not torch.equal(rows * W + cols, torch.arange(H * W, device=ids.device)):
        log_once(logging.INFO, f"flux: img_ids ({ids.shape[0]} tokens) are not one row-major grid; no grid given to methods")
        return None
    return (H, W)


def _unet_grid(model, args):
    x = args.get("sample")
    return None if x is None else tuple(x.shape[-2:])  # (H, W) of the latent; deeper levels are derived per call


def _ltx_grid(model, args):
    cfg = model.config
    f, h, w = args.get("num_frames"), args.get("height"), args.get("width")
    if None in (f, h, w):
        return None
    return (f // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)


@dataclass(frozen=True)
class Family:
    name: str
    text_first: bool  # where joint attention puts the text segment
    grid: Callable  # (model, bound forward args) -> grid tuple or None
    t_scale: float = 1000.0  # the transformer's timestep / t_scale = noise level in [0, 1]
    t_inverted: bool = False  # Mochi counts time up: noise level = 1 - t / t_scale
    skip: tuple = ()  # module-name prefixes whose attention never touches visual tokens
    multires: bool = False  # UNets: attention at several resolutions, each level halves the grid (ceil)


FAMILIES = {
    "FluxTransformer2DModel": Family("flux", True, _flux_grid, t_scale=1.0),
    "SD3Transformer2DModel": Family("sd3", False, _latent(None, "patch_size", "BCHW")),
    "WanTransformer3DModel": Family("wan", True, _latent(None, "patch_size", "BCTHW")),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuan_video", False, _latent("patch_size_t", "patch_size", "BCTHW"), skip=("context_embedder.",)
    ),
    "CogVideoXTransformer3DModel": Family("cogvideox", True, _latent("patch_size_t", "patch_size", "BTCHW")),
    "LTXVideoTransformer3DModel": Family("ltx", True, _ltx_grid),
    "MochiTransformer3DModel": Family("mochi", False, _latent(None, "patch_size", "BCTHW"), t_inverted=True),
    "UNet2DConditionModel": Family("unet", True, _unet_grid, multires=True),
}


def family_of(model) -> Family:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise TypeError(f"attnpatch does not support {type(model).__name__}; supported: {SUPPORTED}")


def _per_thread(name: str, default):
    """An attribute kept per thread: two threads running one model each see their own call's facts."""
    return property(lambda self: getattr(self._local, name, default), lambda self, v: setattr(self._local, name, v))


class _ModelState:
    """Per-forward facts of one patched model, written by its pre-forward hook."""

    grid = _per_thread("grid", None)
    timestep = _per_thread("timestep", None)
    roles = _per_thread("roles", ())  # batch-row roles set by a guidance wrapper around forward

    def __init__(self, model, family: Family, tracker: StepTracker):
        self.family = family
        self.tracker = tracker
        self.params = list(inspect.signature(model.forward).parameters)  # positional order of forward's arguments
        self._local = threading.local()

    def __deepcopy__(self, memo):  # a deep copy of the model: its own tracker, no call in flight
        new = object.__new__(_ModelState)
        memo[id(self)] = new
        new.family, new.params, new._local = self.family, self.params, threading.local()
        new.tracker = copy.deepcopy(self.tracker, memo)
        return new

    def pre_forward(self, model, args, kwargs):
        bound = {**dict(zip(self.params, args)), **kwargs}
        self.grid = self.family.grid(model, bound)
        t = bound.get("timestep")
        if t is not None:
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            t = min(max(t / self.family.t_scale, 0.0), 1.0)
            t = 1.0 - t if self.family.t_inverted else t
            self.tracker.update(t)
        self.timestep = t


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

    def __init__(self, method, backend, layer: int, name: str, state: _ModelState, counters: Counters,
                 routes: route.Routes):
        self.method, self.backend, self.layer, self.name, self.state = method, backend, layer, name, state
        self.counters, self.routes = counters, routes

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

    def post(self, module, args, kwargs, output):
        """Forward hook, run even when forward raises."""
        route.leave(self)

    def hand_back(self, reason: str) -> None:
        self.counters.hand_back(reason, self.name)

    def _roles(self, frame, B: int) -> tuple:
        roles = self.state.roles
        if not roles or B == len(roles):
            return roles
        if B == 1:  # Mochi's processor attends one batch row at a time, in order
            frame.row += 1
            return (roles[frame.row - 1],) if frame.row <= len(roles) else ()
        log_once(logging.WARNING, f"{self.name}: attention batch {B} does not match the {len(roles)} rows the guidance set")
        return ()

    def site(self, Sq: int, Skv: int, causal: bool, roles: tuple = ()) -> tuple[Site | None, str]:
        """``(Site, "")`` for a visual call, else ``(None, why it is not one)``."""
        st = self.state
        grid = _level(st.grid, Sq) if st.family.multires else st.grid
        n = math.prod(grid) if grid else 0
        text_len, kind = 0, "self"
        if Sq != Skv:
            kind = "cross"
            if n and Sq != n:
                return None, "text queries attending to other keys"
        elif n and Sq > n:
            kind, text_len = "joint", Sq - n
        elif n and Sq < n:
            return None, "text-only self-attention"  # e.g. a text refiner
        return Site(grid=grid, text_len=text_len, text_first=st.family.text_first, causal=causal,
                    layer=self.layer, name=self.name, kind=kind, family=st.family.name,
                    timestep=st.timestep, step=st.tracker.step if st.timestep is not None else None,
                    steps=st.tracker.total if st.timestep is not None else None, roles=roles), ""

    def run(self, frame, q, k, v, *, mask, scale, causal):
        site, why = self.site(q.shape[2], k.shape[2], bool(causal), self._roles(frame, q.shape[0]))
        if site is None:
            self.counters.skip(why)
            return None
        self.counters.route()
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


def _patch_models(models, method, backend, layers, tracker, counters, pipe=None):
    collected = []
    for prefix, model in models:
        fam = family_of(model)
        collected.append((model, fam, _attention_modules(model, fam, prefix)))
    chosen = layer_sel.select([(l, n) for *_, entries in collected for l, n, _ in entries], layers)
    collected = [(model, fam, [e for e in entries if e[1] in chosen]) for model, fam, entries in collected]
    _check_processors([e for *_, entries in collected for e in entries])
    routes = route.Routes()
    names, undo = [], [routes]
    for model, fam, entries in collected:
        state = _ModelState(model, fam, tracker)
        n, u = _install(entries, functools.partial(_Call, method, backend, state=state, counters=counters, routes=routes))
        names += n
        undo += u
        undo.append(model.register_forward_pre_hook(state.pre_forward, with_kwargs=True).remove)
        if getattr(method, "guidance", False) or getattr(method, "needs_roles", False):
            from . import guidance

            undo.append(guidance.install(model, method, state, tracker, pipe))
    return names, undo


def patch_model(model, method, backend, layers, counters: Counters):
    return _patch_models([("", model)], method, backend, layers, StepTracker(method), counters)


class _ProgressBar(SharesMethod):
    """Stands in for ``pipe.progress_bar``, which every pipeline opens once per call with its step
    count: each pipeline call restarts the step tracker."""

    def __init__(self, orig, tracker: StepTracker):
        self.orig, self.tracker, self.method = orig, tracker, tracker.method

    def __call__(self, *args, **kwargs):
        total = kwargs.get("total")
        if total is None and args and hasattr(args[0], "__len__"):
            total = len(args[0])  # progress_bar(iterable)
        self.tracker.reset(total)
        return self.orig(*args, **kwargs)


def patch_pipeline(pipe, method, backend, layers, counters: Counters):
    names = [n for n in ("transformer", "transformer_2", "unet") if getattr(pipe, n, None) is not None]
    models = [(f"{n}.", _uncompiled(getattr(pipe, n), f"pipe.{n}")) for n in names]
    if not models:
        raise TypeError(f"{type(pipe).__name__} has no transformer denoiser attnpatch can patch; supported: {SUPPORTED}")
    tracker = StepTracker(method)
    names, undo = _patch_models(models, method, backend, layers, tracker, counters, pipe)
    pipe.progress_bar = _ProgressBar(pipe.progress_bar, tracker)
    undo.append(functools.partial(pop_attr, pipe, "progress_bar"))
    return names, undo
