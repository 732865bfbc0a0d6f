"""Run jobs on N gloo processes on this machine (CPU): the harness the parallel checks share
(``parallel_check``: diffusers context parallelism, ``tp_check``: transformers tensor parallelism,
benchmarks/compose_cp.py: caches under context parallelism).

``run(job_fn, jobs, world)`` spawns ``world`` processes, each joins one gloo group (one torch
thread each: they share the CPU), runs ``job_fn(job, world, state)`` for every job in order
(``state``: what ``setup(rank, world, folder)`` returned, e.g. models loaded once; ``folder``: a
temporary folder all ranks share), and returns rank 0's
result rows; a job that raises gives a row with ``error`` and ``where`` (every rank fails alike,
so the collectives stay in step).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job_fn, jobs: list, setup, label, out: str) -> None:
    import torch
    import torch.distributed as dist

    # LOCAL_RANK: transformers reads it when it binds a device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # world processes on a shared CPU
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        state = setup(rank, world, os.path.dirname(out)) if setup is not None else None
        for job in jobs:
            try:
                rows.append(job_fn(job, world, state))
            except Exception as e:  # noqa: BLE001 - the row says what failed; every rank fails alike
                rows.append(dict(label(job), world=world, error=f"{type(e).__name__}: {e}",
                                 where=traceback.format_exc()[-1500:]))
    finally:
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
        dist.destroy_process_group()


def run(job_fn, jobs: list, world: int = 2, *, setup=None, label=lambda job: {}) -> list[dict]:
    """Rank 0's rows of ``job_fn`` over ``jobs`` on ``world`` gloo processes (``job_fn``, ``setup`` and
    ``label`` must be module-level functions: spawned processes import them)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_worker, args=(world, free_port(), job_fn, jobs, setup, label, out), nprocs=world)
        with open(out) as f:
            return json.load(f)
