"""Head selection for PAG (HeadHunter, 2025): greedily grow a set of (layer, head) pairs whose
perturbation maximises a user objective on generated images, and save it as a profile that
``PAG(heads=path)`` loads.

    from attnpatch.tools.headhunter import hunt
    result = hunt(pipe, prompts, score=my_score, rounds=3, out="heads.safetensors")
"""
from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

from .. import api
from ..methods.base import Method
from ..methods.pag import PAG, save_heads


class _Heads(Method):
    """Dense; records the head count of every self / joint attention layer."""

    def __init__(self):
        self.layers: dict[int, int] = {}

    def plan(self, q, k, site):
        if site.kind != "cross" and q.shape[2] == k.shape[2]:
            self.layers[site.layer] = q.shape[1]
        return None


def candidates(pipe, generate: Callable) -> list[tuple[int, int]]:
    """Every (layer, head) of the pipeline's self / joint attention, found by one generation."""
    probe = _Heads()
    with api.patch(pipe, probe):
        generate(pipe)
    return [(l, h) for l, n in sorted(probe.layers.items()) for h in range(n)]


def hunt(pipe, generate: Callable, score: Callable, *, rounds: int = 3, scale: float = 3.0, soft: float = 1.0,
         pool: list | None = None, out=None, progress: bool = True) -> dict:
    """Greedy forward selection. ``generate(pipe) -> images`` runs the pipeline on the user's
    prompts with a fixed seed; ``score(images) -> float`` is the objective (higher is better).
    Each round adds the (layer, head) whose perturbation scores best; stops early when no pair
    improves the score. Returns {"heads": {layer: [heads]}, "score": best, "history": [...]}."""
    pool = list(pool) if pool is not None else candidates(pipe, generate)
    if not pool:
        raise ValueError("no self / joint attention heads found to select from")
    chosen: list[tuple[int, int]] = []
    best = score(generate(pipe))  # no guidance
    history = [dict(round=0, heads=[], score=best)]
    bar = tqdm(total=rounds * len(pool), desc="head hunt", disable=not progress)
    for r in range(1, rounds + 1):
        trial_best, pick = None, None
        for pair in pool:
            if pair in chosen:
                bar.update(1)
                continue
            heads = _as_dict(chosen + [pair])
            with api.patch(pipe, PAG(scale=scale, soft=soft, layers=sorted(heads), heads=heads)):
                s = score(generate(pipe))
            if trial_best is None or s > trial_best:
                trial_best, pick = s, pair
            bar.update(1)
        if pick is None or trial_best <= best:
            break
        chosen.append(pick)
        best = trial_best
        history.append(dict(round=r, heads=list(chosen), score=best))
    bar.close()
    result = dict(heads=_as_dict(chosen), score=best, history=history)
    if out is not None:
        save_heads(out, result["heads"], scale=scale, soft=soft, score=best)
    return result


def _as_dict(pairs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, h in pairs:
        out.setdefault(int(l), []).append(int(h))
    return out

