"""diffusers' FirstBlockCache together with Ulysses context parallelism and attnpatch, on gloo
processes (CPU): ``check(jobs, world=2)`` runs each job ``(family, method, threshold)`` on every rank
and returns rank 0's comparison, per denoising step, of

- ``single``: the patched + cached output in one process;
- ``parallel``: the same with ``ContextParallelConfig(ulysses_degree=world)`` (patch, then the
  cache, then ``enable_parallelism``);
- ``full``: the patched output without the cache (one process): where a step equals it the cache
  computed every block, else it reused the tail blocks' residual (``skipped``).

The steps (``STEPS``) are three calls as a denoising loop makes them: the same latent at two close
timesteps (the first block's residual barely moves: the cache reuses the tail), then a new latent
(it moves: every block runs). diffusers' FirstBlockCache decides on each rank from that rank's
shard, with no collective: the ranks must agree (they do when the change is far from the
threshold on every shard, as here), or their collectives mismatch. Used by tests/test_compose.py
and benchmarks/compose.py.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch

from attnpatch.tools import parallel_check as pc

STEPS = ((0.75, 0), (0.749, 0), (0.748, 1))  # (timestep, latent seed) per call


def _steps(family: str) -> list[dict]:
    from attnpatch.models.tiny import _r

    out = []
    for t, seed in STEPS:
        kw = pc._inputs(family)
        if seed:
            kw["hidden_states"] = _r(100 + seed, *kw["hidden_states"].shape)
        scale = 1000 if family == "wan" else 1  # Wan's timestep counts to 1000, Flux's to 1
        kw["timestep"] = torch.full_like(kw["timestep"], t * scale)
        out.append(kw)
    return out


def _denoise(model, family: str) -> list[torch.Tensor]:
    """One output per step, in one cache context (as a pipeline's loop)."""
    outs = []
    with torch.no_grad(), model.cache_context("cond"):
        for kw in _steps(family):
            outs.append(model(**kw)[0])
    return outs


def _cached(model, threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return model


def _job(job: dict, world: int) -> dict:
    import attnpatch as ap
    from attnpatch.patchers.parallel import enable
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    fam, method, thr = job["family"], job["method"], job.get("threshold", 0.2)
    one = pc._model(fam, None)
    stock = _denoise(one, fam)
    with ap.patch(one, method):
        full = _denoise(one, fam)
        single = _denoise(_cached(one, thr), fam)
    one.disable_cache()
    par = pc._model(fam, None)
    handle = ap.patch(par, method)
    _cached(par, thr)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    enable(par, ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    parallel = _denoise(par, fam)
    stats = handle.stats()
    handle.remove()
    mx = lambda a, b: float((a - b).abs().max())  # noqa: E731
    return dict(family=fam, method=repr(method), threshold=thr, world=world,
                par_vs_single=[mx(p, s) for p, s in zip(parallel, single)],
                skipped_single=[mx(s, f) > 1e-6 for s, f in zip(single, full)],
                skipped_par=[mx(p, f) > 1e-6 for p, f in zip(parallel, full)],
                patched_vs_stock=[mx(f, s) for f, s in zip(full, stock)], routed=stats.get("routed", 0),
                handed_back=stats.get("handed_back", {}))


def _worker(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # world processes on a shared CPU
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        for job in jobs:
            try:
                rows.append(_job(job, world))
            except Exception as e:  # noqa: BLE001 - the row says what failed; every rank fails alike
                rows.append(dict(family=job["family"], method=repr(job["method"]), error=f"{type(e).__name__}: {e}",
                                 where=traceback.format_exc()[-1500:]))
    finally:
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
        dist.destroy_process_group()


def check(jobs: list[dict], world: int = 2) -> list[dict]:
    """Run ``jobs`` (dicts: family, method, threshold) on ``world`` gloo processes; rows of rank 0."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_worker, args=(world, pc._free_port(), jobs, out), nprocs=world)
        with open(out) as f:
            return json.load(f)
