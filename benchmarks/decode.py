"""Decode at long context: Quest (query-aware pages) and SinkWindow (sink + window keys) vs dense.

Speed: a SmolLM2-135M-shaped Llama (30 layers, GQA 9/3, head dim 64; random weights: speed does not
depend on them) decodes one token at a time after a KV cache of S random keys (8K, 16K, 32K: building it
by prefill would take the CPU minutes per length and the same numbers). Each setting has its own copy of
the model (patched once) and its own cache over the same tensors; the settings decode one token each in
turn (two untimed rounds first: a patched model's cache layers then copy the cache into their buffers,
Quest's also bound every page, once per generation, as after a prefill), ``--steps`` timed rounds, tokens/s the median
step and "x stock" the median (min - max) of the per-round ratios (a busy machine slows every setting of a round). "KV
read" is what attention reads per token over all layers (keys + values, Quest's bounds included);
"cache write" what the cache update copies per token (DynamicLayer's cat copies the whole cache).

Accuracy: the real SmolLM2-135M-Instruct on passkey retrieval (a 5-digit key at a random depth in
filler text (the classic repeated filler), ``--samples`` prompts of ``--needle-tokens``), greedy 8 tokens, Wilson 95 % intervals.
Quest's prefill is dense by definition, so each prompt is prefilled once and every setting decodes from
its own copy of that cache.

    python benchmarks/decode.py                       # full run: benchmarks/results/decode.{md,json}
    python benchmarks/decode.py --lengths 8192 --samples 4 --steps 2   # a quick look (scratch output)
    python benchmarks/decode.py --keep-accuracy       # the speed table again, the committed passkey rows kept
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time

import torch

import attnpatch as ap
from common import RESULTS, machine, out_stem, table, write

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, max_position_embeddings=65536, rope_theta=100000.0)
SPEED = {  # setting -> method (None: stock transformers, sdpa + DynamicCache)
    "stock": None,
    # stock attention through attnpatch: the patcher's default KV policy (KeepAll) appends in place, what the cache alone saves
    "Dense() (in-place cache)": ap.Dense(),
    # by bound only (pooled=0: the paper's rule; the default is pooled=0.5)
    "Quest(budget=1024, pooled=0)": ap.Quest(budget=1024, page=16, pooled=0.0),
    "Quest(budget=2048, pooled=0)": ap.Quest(budget=2048, page=16, pooled=0.0),
    # half the pages by mean key score (the bound alone misses needles on SmolLM2: llm_quality.md)
    "Quest(budget=1024, pooled=0.5)": ap.Quest(budget=1024, page=16, pooled=0.5),
    "SinkWindow(4, 1024)": ap.SinkWindow(sink=4, window=1024),
}
ACCURACY = {"dense": None, "Quest(budget=256, pooled=0)": ap.Quest(budget=256, page=16, pooled=0.0),
            "Quest(budget=512, pooled=0)": ap.Quest(budget=512, page=16, pooled=0.0),
            "Quest(budget=1024, pooled=0)": ap.Quest(budget=1024, page=16, pooled=0.0),
            "Quest(budget=2048, pooled=0)": ap.Quest(budget=2048, page=16, pooled=0.0),
            "Quest(budget=512, pooled=0.5)": ap.Quest(budget=512, page=16, pooled=0.5),
            "Quest(budget=1024, pooled=0.5)": ap.Quest(budget=1024, page=16, pooled=0.5)}  # the speed table's budgets


def _cache(base):
    """A DynamicCache whose layers hold ``base``'s (keys, values) tensors (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for k, v in base:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def _kv_bytes(method, S: int, layers: int, per_key: int) -> tuple[float, float]:
    """(attention KV read, cache write) bytes per decoded token over all layers, from the method's rule."""
    if isinstance(method, ap.Quest) and S <= method.budget:  # every page fits: dense attention, in-place appends
        return layers * S * per_key, layers * per_key
    if isinstance(method, ap.Quest):
        sparse = layers - len([i for i in method.dense_layers if i < layers])
        # a page's max and min weigh what one key and its value do; its float32 mean key (pooled) half that
        tables = 1.5 if method.pooled else 1.0
        read = (layers - sparse) * S + sparse * (min(S, method.budget) + tables * S / method.page)
        return read * per_key, layers * per_key  # appends in place
    if isinstance(method, ap.SinkWindow):  # evict=False: every key kept (KeepAll), appended in place
        return layers * min(S, method.sink + method.window) * per_key, layers * per_key
    if method is not None:  # patched: KeepAll appends in place
        return layers * S * per_key, layers * per_key
    return layers * S * per_key, layers * 2 * S * per_key  # stock: DynamicLayer's cat reads and writes the whole cache


@torch.no_grad()
def speed(lengths, steps: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    stock = LlamaForCausalLM(LlamaConfig(**SMOL)).eval()
    models = {name: stock if m is None else copy.deepcopy(stock) for name, m in SPEED.items()}
    handles = [ap.patch(models[name], m) for name, m in SPEED.items() if m is not None]
    L, Hkv, D = SMOL["num_hidden_layers"], SMOL["num_key_value_heads"], SMOL["head_dim"]
    rows, ids = [], torch.tensor([[42]])
    for S in lengths:
        base = [(torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)) for _ in range(L)]
        caches = {name: _cache(base) for name in SPEED}
        times = {name: [] for name in SPEED}
        for step in range(2 + steps):  # interleaved per step: every setting decodes one token in turn
            for name in SPEED:
                t0 = time.perf_counter()
                models[name](ids, cache=caches[name], use_cache=True)
                if step >= 2:  # untimed: Quest copies the cache and bounds every page; first calls warm the allocator
                    times[name].append(time.perf_counter() - t0)
        for name, method in SPEED.items():
            ratios = [s / t for s, t in zip(times["stock"], times[name])]
            read, write_ = _kv_bytes(method, S, L, 2 * Hkv * D * 4)
            rows.append(dict(context=S, setting=name, tok_s=1 / statistics.median(times[name]),
                             speedup=statistics.median(ratios), min=min(ratios), max=max(ratios), kv_read_mb=read / 2**20, cache_write_mb=write_ / 2**20))
            print(rows[-1], flush=True)
        del base, caches
    for h in handles:
        h.remove()
    return rows


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tok, tokens: int, depth: float, key: int) -> str:
    """The classic passkey prompt (Mohtashami & Jaggi 2023; as benchmarks/llm.py): repeated filler with
    the needle at ``depth``, about ``tokens`` long. (Filler sentences in a random order instead made dense
    SmolLM2-135M fail at 3K tokens, 0 / 24: no test of what sparsity loses.)"""
    head = "There is an important number hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    n_fill = max(0, tokens - len(tok(head + needle + tail).input_ids))
    words = tok(FILLER * (n_fill // len(tok(FILLER).input_ids) + 1)).input_ids[:n_fill]
    cut = int(len(words) * depth)
    return head + tok.decode(words[:cut]) + needle + tok.decode(words[cut:]) + tail


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


@torch.no_grad()
def accuracy(samples: int, tokens: int, new: int = 8) -> list[dict]:
    from transformers import DynamicCache

    from attnpatch.models import smollm2

    model, tok = smollm2()
    rng, hits = random.Random(20), {name: 0 for name in ACCURACY}
    for i in range(samples):
        key = rng.randrange(10000, 100000)
        ids = tok(passkey_prompt(tok, tokens, rng.random(), key), return_tensors="pt").input_ids
        cache = DynamicCache(config=model.config)
        first = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # dense prefill, shared
        for name, method in ACCURACY.items():
            out = _greedy(model, copy.deepcopy(cache), first, method, new)
            hits[name] += str(key) in tok.decode(out[0])
        print(i, {n: h for n, h in hits.items()}, flush=True)
    return [dict(tokens=tokens, setting=name, correct=h, samples=samples, accuracy=h / samples,
                 ci_low=wilson(h, samples)[0], ci_high=wilson(h, samples)[1]) for name, h in hits.items()]


def _greedy(model, cache, first, method, new: int):
    handle = ap.patch(model, method) if method is not None else None
    try:
        out, nxt = [first], first
        for _ in range(new - 1):
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            out.append(nxt)
        return torch.cat(out, 1)
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per setting (interleaved)")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--needle-tokens", type=int, default=3000)
    p.add_argument("--keep-speed", action="store_true", help="reuse the speed rows of the committed decode.json")
    p.add_argument("--keep-accuracy", action="store_true", help="reuse the passkey rows of the committed decode.json")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    full = (a.keep_speed or a.lengths == [8192, 16384, 32768] and a.steps >= 16) and (a.keep_accuracy or a.samples >= 30)
    out = out_stem("decode", a.out, None if full else "quick")
    old = json.loads((RESULTS / "decode.json").read_text()) if a.keep_speed or a.keep_accuracy else {}
    if a.keep_accuracy:  # the table's heading names the committed run's prompts
        a.samples, a.needle_tokens = old["args"]["samples"], old["args"]["needle_tokens"]
    # reused speed rows keep the machine that measured them (the passkey rows do not depend on it)
    data = dict(machine=old["machine"] if a.keep_speed else machine(), args=vars(a),
                speed=old["speed"] if a.keep_speed else speed(a.lengths, a.steps) if a.lengths else [],
                accuracy=old["accuracy"] if a.keep_accuracy else accuracy(a.samples, a.needle_tokens) if a.samples else [])
    body = "## Decode speed (SmolLM2-135M shapes, random weights, batch 1, float32)\n\n" + table(data["speed"], [
        ("context", "context"), ("setting", "setting"), ("tok_s", "tokens/s"), ("speedup", "x stock"), ("min", "min"), ("max", "max"),
        ("kv_read_mb", "KV read / token (MB)"), ("cache_write_mb", "cache write / token (MB)")])
    body += f"\n\n## Passkey retrieval (SmolLM2-135M-Instruct, {a.needle_tokens} tokens, {a.samples} samples)\n\n" + table(
        data["accuracy"], [("setting", "setting"), ("correct", "correct"), ("accuracy", "accuracy"),
                           ("ci_low", "95 % CI low"), ("ci_high", "95 % CI high")])
    write(out, "Fast decode: Quest and SinkWindow vs dense", __doc__.split("\n\n")[1], body, data)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
