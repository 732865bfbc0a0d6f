"""Does a method give the same output under transformers' tensor parallelism as in one process?

``check(jobs, world=2)`` starts ``world`` gloo processes on this machine (CPU). Rank 0 saves a tiny
random decoder of the job's family (``attnpatch.models.tiny.llm``: 4 query / 2 KV heads unless the
job overrides it); every rank loads it with ``DistributedConfig(tp_size=world)`` (the family's
``base_model_tp_plan``: q/k/v_proj colwise, so rank r attends with query heads
[r * H / N, (r + 1) * H / N) and their KV heads) and also builds the unsharded model. For every job
``(family, method)`` rank 0 measures, on a prompt prefill followed by ``decode`` one-token steps
through the KV cache (the logits of every step, concatenated):

- ``single``: the patched output in one process; ``stock``: unpatched, in one process;
- ``parallel``: the patched output under tensor parallelism; ``stock_parallel``: unpatched, in parallel;
- ``restored``: the parallel output after ``unpatch`` (must equal ``stock_parallel``).

Returns one dict per job with the max absolute differences (``par_vs_single``, ``par_vs_stock``,
``single_vs_stock``, ``stock_par_vs_stock``, ``restored_vs_stock``), the routed call count, and
``heads``: per rank, the model heads each patched layer's calls said they hold (``Site.heads``).
tests/test_tp.py runs it.
"""
from __future__ import annotations

import os

import torch

from ..patchers.transformers import cache_name, cache_of


def _prompt(job: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 97, (job.get("batch", 1), job.get("tokens", 64)), generator=g)


def _run(model, job: dict) -> torch.Tensor:
    """Logits of the prefill of all but the last ``decode`` prompt tokens, then of each decode step
    (``pad``: row 0 left-padded by that many tokens, through the attention mask)."""
    ids, n = _prompt(job), job.get("decode", 2)
    mask = torch.ones_like(ids)
    mask[0, :job.get("pad", 0)] = 0
    with torch.no_grad():
        out = model(ids[:, :ids.shape[1] - n], attention_mask=mask[:, :ids.shape[1] - n], use_cache=True)
        logits, cache, name = [out.logits], cache_of(out), cache_name(model)  # ``cache`` from 5.24, else past_key_values
        for i in range(ids.shape[1] - n, ids.shape[1]):
            out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], use_cache=True, **{name: cache})
            logits.append(out.logits)
            cache = cache_of(out)
    return torch.cat(logits, 1)


class _Models:
    """The unsharded and tensor-parallel tiny models of each (family, overrides), built once per worker."""

    def __init__(self, folder: str, world: int):
        self.folder, self.world, self._got = folder, world, {}

    def get(self, job: dict):
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, DistributedConfig

        from ..models import tiny

        over = job.get("config", {})
        key = (job.get("family", "llama"), tuple(sorted(over.items())))
        if key not in self._got:
            one = tiny.llm(key[0], **over)  # same seed on every rank: the same weights
            path = os.path.join(self.folder, f"m{len(self._got)}")
            if dist.get_rank() == 0:
                one.save_pretrained(path)
            dist.barrier()
            tp = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=self.world),
                                                      dtype=torch.float32).eval()
            self._got[key] = (one, tp)
        return self._got[key]


def _seen_heads(model) -> dict:
    """{layer name: Site.heads of its calls} as the transformers patcher cached them."""
    return {name: sorted({got[0] for got in m._attnpatch.heads.values() if got[0] is not None})
            for name, m in model.named_modules() if getattr(m, "_attnpatch", None) is not None}


def _job(job: dict, models: _Models) -> dict:
    import torch.distributed as dist

    from .. import api

    method = job["method"]
    one, tp = models.get(job)
    stock = _run(one, job)
    with api.patch(one, method):
        single = _run(one, job)
    stock_par = _run(tp, job)
    with api.patch(tp, method) as handle:
        par = _run(tp, job)
        routed = handle.stats().get("routed", 0)
        heads = [None] * dist.get_world_size()
        dist.all_gather_object(heads, _seen_heads(tp))
    restored = _run(tp, job)
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
    return dict(family=job.get("family", "llama"), method=repr(method), world=dist.get_world_size(),
                par_vs_single=diff(par, single), par_vs_stock=diff(par, stock), single_vs_stock=diff(single, stock),
                stock_par_vs_stock=diff(stock_par, stock), restored_vs_stock=diff(restored, stock_par),
                routed=routed, heads=heads)


def _models(rank: int, world: int, folder: str) -> _Models:
    return _Models(folder, world)


def _label(job: dict) -> dict:
    return dict(family=job.get("family", "llama"), method=repr(job["method"]))


def check(jobs: list[dict], world: int = 2) -> list[dict]:
    """Run ``jobs`` (dicts: method; optional family, config overrides, tokens, decode, batch, pad) on ``world``
    gloo processes; one result dict per job (``error`` set where the job raised)."""
    from . import gloo

    return gloo.run(_job_on, jobs, world, setup=_models, label=_label)


def _job_on(job: dict, world: int, models: _Models) -> dict:
    return _job(job, models)
