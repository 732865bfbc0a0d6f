"""diffusers' FirstBlockCache together with Ulysses context parallelism and attnpatch, on gloo
processes (CPU): ``check(jobs, world=2)`` runs each job ``(family, method, threshold)`` on every rank
and returns rank 0's comparison, per denoising step, of

- ``single``: the patched + cached output in one process;
- ``parallel``: the same with ``ContextParallelConfig(ulysses_degree=world)`` (patch, then the
  cache, then ``enable_parallelism``);
- ``full``: the patched output without the cache (one process); ``skipped`` says, per step, where
  the cache reused the tail blocks' residual (the last block did not run).

The steps (``STEPS``) are three calls as a denoising loop makes them: the same latent at two close
timesteps (the first block's residual barely moves: the cache reuses the tail), then a new latent
(it moves: every block runs). diffusers' FirstBlockCache decides on each rank from that rank's
shard, with no collective: the ranks must agree (they do when the change is far from the
threshold on every shard, as here), or their collectives mismatch. Used by tests/test_compose.py
and benchmarks/compose.py.
"""
from __future__ import annotations

import contextlib

import torch

from attnpatch.tools import parallel_check as pc

STEPS = ((0.75, 0), (0.749, 0), (0.748, 1))  # (timestep, latent seed) per call


def _inputs(family: str, grid=None) -> dict:
    """The parallel check's inputs, or Flux's on a bigger ``grid`` (H, W) with 16 text tokens."""
    if family != "flux" or grid is None:
        return pc._inputs(family)
    from attnpatch.models.tiny import _r

    (H, W), T = grid, 16
    ids = torch.zeros(H * W, 3)
    ids[:, 1], ids[:, 2] = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    return dict(hidden_states=_r(1, 1, H * W, 4), encoder_hidden_states=_r(2, 1, T, 32), pooled_projections=_r(3, 1, 32),
                timestep=torch.full((1,), 0.75), img_ids=ids, txt_ids=torch.zeros(T, 3), return_dict=False)


def _steps(family: str, grid=None) -> list[dict]:
    from attnpatch.models.tiny import _r

    out = []
    for t, seed in STEPS:
        kw = _inputs(family, grid)
        if seed:
            kw["hidden_states"] = _r(100 + seed, *kw["hidden_states"].shape)
        scale = 1 if family == "flux" else 1000  # Flux's timestep counts to 1, Wan's and LTX's to 1000
        kw["timestep"] = torch.full_like(kw["timestep"], t * scale)
        out.append(kw)
    return out


def _denoise(model, family: str, grid=None, ran: list | None = None) -> list[torch.Tensor]:
    """One output per step, in one cache context (as a pipeline's loop; a cache starts empty).
    ``ran`` gets, per step, whether the model's last block ran (False: the cache reused its residual)."""
    outs = []
    if getattr(model, "_diffusers_hook", None) is not None:
        model._diffusers_hook.reset_stateful_hooks()
    tail = [m for m in model.children() if isinstance(m, torch.nn.ModuleList)][-1][-1]
    calls = [0]  # a child of the last block: the cache replaces the block's forward, not its hooks
    hook = next(tail.children()).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with torch.no_grad(), model.cache_context("cond"):
            for kw in _steps(family, grid):
                before = calls[0]
                outs.append(model(**kw)[0])
                if ran is not None:
                    ran.append(calls[0] > before)
    finally:
        hook.remove()
    return outs


def _model(family: str, layers: dict | None):
    from attnpatch.models import tiny

    torch.manual_seed(0)
    return tiny.model(family, **(layers or {}))


def _cached(model, threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return model


def _job(job: dict, world: int) -> dict:
    import attnpatch as ap

    fam, method, thr, grid = job["family"], job["method"], job.get("threshold", 0.2), job.get("grid")
    run = lambda m, ran=None: _denoise(m, fam, grid, ran)  # noqa: E731
    ran_single, ran_par = [], []
    one = _model(fam, job.get("layers"))
    stock = run(one)
    with ap.patch(one, method) if method is not None else contextlib.nullcontext():
        full = run(one)
        single = run(_cached(one, thr), ran_single)
    one.disable_cache()
    par, handle = _parallel(job, world, cached=True)
    parallel = run(par, ran_par)
    stats = handle.stats() if handle is not None else {}
    times = _times(job, world, par, run)
    mx = lambda a, b: float((a - b).abs().max())  # noqa: E731
    return dict(family=fam, method=repr(method), threshold=thr, world=world, grid=grid, layers=job.get("layers"),
                order=job.get("order", "cache_first"), par_vs_single=[mx(p, s) for p, s in zip(parallel, single)],
                skipped_single=[not r for r in ran_single], skipped_par=[not r for r in ran_par],
                patched_vs_stock=[mx(f, s) for f, s in zip(full, stock)], routed=stats.get("routed", 0),
                handed_back=stats.get("handed_back", {}), **times)


def _parallel(job: dict, world: int, cached: bool):
    """The patched model under Ulysses-``world``; ``cached``: FirstBlockCache enabled before
    ``enable_parallelism`` (job order "cache_first", the default) or after it ("cache_after": diffusers
    0.42 then wraps Wan's first block outside the split hook, and the cache compares a sharded output
    with the unsharded input)."""
    import attnpatch as ap
    from attnpatch.patchers.parallel import enable
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    par = _model(job["family"], job.get("layers"))
    handle = ap.patch(par, job["method"]) if job["method"] is not None else None  # None: stock attention
    after = job.get("order", "cache_first") == "cache_after"
    if cached and not after:
        _cached(par, job.get("threshold", 0.2))
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    enable(par, ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    if cached and after:
        _cached(par, job.get("threshold", 0.2))
    return par, handle


def _times(job: dict, world: int, cached, run) -> dict:
    """Seconds of the parallel patched denoising loop without and with the cache, taken in turn
    ``repeats`` times (every rank runs the same sequence: the collectives stay matched)."""
    if not job.get("repeats"):
        return {}
    import time

    plain, _ = _parallel(job, world, cached=False)
    models = {"uncached_s": plain, "cached_s": cached}
    out = {k: [] for k in models}
    run(plain)  # warm-up
    for r in range(job["repeats"]):
        for key in sorted(models, reverse=bool(r % 2)):  # alternate which runs first
            t = time.perf_counter()
            run(models[key])
            out[key].append(time.perf_counter() - t)
    return out


def _run_job(job: dict, world: int, state) -> dict:
    return _job(job, world)


def _label(job: dict) -> dict:
    return dict(family=job["family"], method=repr(job["method"]), order=job.get("order", "cache_first"))


def check(jobs: list[dict], world: int = 2) -> list[dict]:
    """Run ``jobs`` on ``world`` gloo processes; rows of rank 0. A job: family, method, threshold;
    optionally grid (Flux's (H, W)), layers (tiny config overrides) and repeats (time the loop)."""
    from attnpatch.tools import gloo

    return gloo.run(_run_job, jobs, world, label=_label)
