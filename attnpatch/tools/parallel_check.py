"""Does a method give the same output under diffusers' Ulysses context parallelism as in one process?

``check(jobs, world=2)`` starts ``world`` gloo processes on this machine (CPU), and for every job
``(family, method, order)`` builds the family's tiny denoiser (same seed on every rank, inputs whose
sequence splits evenly), and measures on rank 0:

- ``single``: the patched output in one process (no parallelism);
- ``parallel``: the patched output with ``ContextParallelConfig(ulysses_degree=world)``, the patch
  applied ``"before"`` or ``"after"`` ``enable_parallelism``;
- ``stock`` / ``stock_parallel``: unpatched, in one process and in parallel;
- ``restored``: the parallel output after ``unpatch`` (must equal ``stock_parallel``).

Returns one dict per job with the max absolute differences (``par_vs_single``, ``par_vs_stock``,
``restored_vs_stock``) and the handle's routing counts. The tests (tests/test_parallel.py) and the
benchmark (benchmarks/parallel.py) both run it.
"""
from __future__ import annotations

import functools
import torch

# family -> (tiny config overrides, inputs(B) whose sequence splits over 2 and 4 ranks)
FAMILIES = ("flux", "wan", "ltx")


def _inputs(family: str, B: int = 1, text_mask: bool = False, side: int = 4) -> dict:
    from ..models.tiny import _g

    if family == "flux":  # joint attention: 8 text + 4x4 image tokens (side 8: 8x8), both sharded
        H, W, T = side, side, 8
        ids = torch.zeros(H * W, 3)
        ids[:, 1], ids[:, 2] = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
        return dict(hidden_states=_g(B, H * W, 4), encoder_hidden_states=_g(B, T, 32), pooled_projections=_g(B, 32),
                    timestep=torch.full((B,), 0.75), img_ids=ids, txt_ids=torch.zeros(T, 3), return_dict=False)
    if family == "wan":  # self-attention over a 2x4x4 grid (sharded), cross-attention to 11 unsharded text tokens
        return dict(hidden_states=_g(B, 4, 2, 8, 8), encoder_hidden_states=_g(B, 11, 16), timestep=torch.full((B,), 250),
                    return_dict=False)
    if family == "ltx":  # self-attention over 2x4x4 (sharded), cross-attention to 8 sharded text tokens (2 padded)
        mask = torch.ones(B, 8)
        mask[:, -2:] = 0
        return dict(hidden_states=_g(B, 32, 8), encoder_hidden_states=_g(B, 8, 16), timestep=torch.full((B,), 600),
                    encoder_attention_mask=mask if text_mask else None, num_frames=2, height=4, width=4, return_dict=False)
    raise ValueError(f"no parallel check inputs for {family!r}; known: {FAMILIES}")


def _model(family: str, heads: int | None, head_dim: int | None = None):
    from ..models import tiny

    torch.manual_seed(0)
    over = {"num_attention_heads": heads} if heads else {}
    if head_dim:  # FLUX's rotary axes must add up to the head dim
        over.update(attention_head_dim=head_dim, **({"axes_dims_rope": (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)}
                                                    if family == "flux" else {}))
    return tiny.model(family, **over)


def _run(model, family: str, B: int, text_mask: bool = False, side: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family, B, text_mask, side))[0]


def _job(job: dict, world: int) -> dict:
    """One job on every rank; the numbers are rank 0's."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from .. import api
    from ..patchers.parallel import enable

    fam, method, order, B, heads = job["family"], job["method"], job.get("order", "after"), job.get("batch", 1), job.get("heads")
    run = functools.partial(_run, family=fam, B=B, text_mask=job.get("text_mask", False), side=job.get("side", 4))
    if job.get("ring"):
        return _ring(job, world)
    if fam == "wan22":
        return _wan22(job, world)
    if job.get("time"):
        return _time(job, world)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=world, mesh=mesh)
    one = _model(fam, heads)
    stock = run(one)
    with api.patch(one, method):
        single = run(one)
    par = _model(fam, heads)
    if order == "before":
        handle = api.patch(par, method)
        enable(par, config)
        out = run(par)
        stats = handle.stats()
        dealt = _dealt(par)
        handle.remove()
        stock_par = restored = _stock(run, par)
    else:
        enable(par, config)
        stock_par = _stock(run, par)
        with api.patch(par, method) as handle:
            out = run(par)
            stats = handle.stats()
            dealt = _dealt(par)
        restored = _stock(run, par)
    diff = lambda a, b: float((a - b).abs().max()) if torch.is_tensor(a) and torch.is_tensor(b) else a if isinstance(a, str) else b  # noqa: E731
    return dict(family=fam, method=repr(method), order=order, world=world, par_vs_single=diff(out, single),
                par_vs_stock=diff(out, stock), single_vs_stock=diff(single, stock),
                stock_par_vs_stock=diff(stock_par, stock), restored_vs_stock=diff(restored, stock_par),
                routed=stats.get("routed", 0), handed_back=stats.get("handed_back", {}), dealt=dealt)


def _time(job: dict, world: int) -> dict:
    """Whole-forward times (ms, rank 0; barriers make each the slowest rank's) of stock and patched
    attention, in one process and under Ulysses, interleaved over ``job["time"]`` repeats."""
    import statistics
    import time

    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from .. import api
    from ..patchers.parallel import enable

    fam, heads, reps = job["family"], job.get("heads"), int(job["time"])
    run = functools.partial(_run, family=fam, B=1, side=job.get("side", 4))
    build = functools.partial(_model, fam, heads, job.get("head_dim"))
    one, par = build(), build()
    enable(par, ContextParallelConfig(ulysses_degree=world, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))))
    fns = {"stock_one": lambda: run(one), "stock_par": lambda: run(par)}
    handles = []
    try:
        one_p, par_p = build(), build()
        enable(par_p, ContextParallelConfig(ulysses_degree=world, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))))
        handles = [api.patch(one_p, job["method"]), api.patch(par_p, job["method"])]
        fns.update(patched_one=lambda: run(one_p), patched_par=lambda: run(par_p))
        times = {k: [] for k in fns}
        for i in range(reps + 1):  # the first round warms plans and caches: not counted
            for name, fn in (list(fns.items()) if i % 2 else list(fns.items())[::-1]):
                dist.barrier()
                t = time.perf_counter()
                fn()
                dist.barrier()
                if i:
                    times[name].append(1e3 * (time.perf_counter() - t))
    finally:
        for h in handles:
            h.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = [s / p for s, p in zip(times["stock_par"], times["patched_par"])]
    return dict(family=fam, method=repr(job["method"]), order="time", world=world, reps=reps,
                **{f"{k}_ms": v for k, v in med.items()}, speedup_par=statistics.median(ratio),
                speedup_min=min(ratio), speedup_max=max(ratio))


def _dealt(model) -> list:
    """The head orders attnpatch's load balance chose on this patched model's attention calls."""
    out = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            for order in getattr(getattr(hook, "__self__", None), "__dict__", {}).get("_head_orders", {}).values():
                if order is not None:
                    out.append(order.tolist())
    return out


def _wan22(job: dict, world: int) -> dict:
    """Wan 2.2's pipeline with both experts (transformer and transformer_2), each under Ulysses:
    the whole patched generation (CFG, 4 steps crossing the experts' boundary) vs one process."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from .. import api
    from ..models import tiny
    from ..patchers.parallel import enable

    kw = dict(tiny._wan_kw(), height=64, width=128)  # grid (3, 4, 8): 96 tokens per frame stack, even over 2 and 4
    pipe = tiny.wan22_pipeline()
    stock = tiny.run(pipe, kw, steps=4, output_type="latent")
    with api.patch(pipe, job["method"]):
        single = tiny.run(pipe, kw, steps=4, output_type="latent")
    pipe = tiny.wan22_pipeline()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    for m in (pipe.transformer, pipe.transformer_2):
        enable(m, ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    stock_par = tiny.run(pipe, kw, steps=4, output_type="latent")
    with api.patch(pipe, job["method"]) as handle:
        out = tiny.run(pipe, kw, steps=4, output_type="latent")
        names = handle.stats()
    restored = tiny.run(pipe, kw, steps=4, output_type="latent")
    d = lambda a, b: float((a - b).abs().max())  # noqa: E731
    return dict(family="wan22", method=repr(job["method"]), order="after", world=world, par_vs_single=d(out, single),
                par_vs_stock=d(out, stock), single_vs_stock=d(single, stock), stock_par_vs_stock=d(stock_par, stock),
                restored_vs_stock=d(restored, stock_par), routed=names.get("routed", 0),
                handed_back=names.get("handed_back", {}))


def _ring(job: dict, world: int) -> dict:
    """Ring attention: what ``patch`` after ``enable_parallelism`` and a call after ``patch`` say."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from .. import api
    from ..patchers.parallel import enable

    fam, method = job["family"], job["method"]
    run = functools.partial(_run, family=fam, B=1)
    said = {}
    for order in ("after", "before"):
        model = _model(fam, None)
        config = ContextParallelConfig(ring_degree=world, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("ring", "ulysses")))
        try:
            if order == "after":
                enable(model, config)
                api.patch(model, method)
            else:
                with api.patch(model, method):
                    enable(model, config)
                    run(model)
            said[order] = "ran"
        except RuntimeError as e:
            said[order] = str(e)
    return dict(family=fam, method=repr(method), order="ring", world=world, refused_after=said["after"],
                refused_before=said["before"])


def _stock(run, model):
    """The unpatched parallel output, or why diffusers' own parallel attention failed (diffusers 0.42
    keeps every head of LTX's text mask in its Ulysses op, which then fails to broadcast)."""
    try:
        return run(model)
    except RuntimeError as e:
        return f"stock parallel attention failed: {e}"


def _run_job(job: dict, world: int, state) -> dict:
    return _job(job, world)


def _label(job: dict) -> dict:
    return dict(family=job["family"], method=repr(job["method"]), order=job.get("order", "after"))


def check(jobs: list[dict], world: int = 2) -> list[dict]:
    """Run ``jobs`` (dicts: family, method, order "before" / "after", batch, heads) on ``world`` gloo
    processes; one result dict per job (``error`` set where the job raised)."""
    from . import gloo

    return gloo.run(_run_job, jobs, world, label=_label)
