"""StreamingHeads (retrieval heads full, the rest sink + window: DuoAttention's split without training)
against uniform SinkWindow at the same KV budget and dense, on SmolLM2-135M-Instruct.

1. Profile: ``attnpatch.tools.retrieval_heads`` scores every (layer, head) on seeded word-copy prompts
   (seed 1000, a different format from the test task) and keeps the top ``--top`` of the KV groups full
   (``benchmarks/results/duo_heads.safetensors``; reused unless ``--rescore``).
2. Accuracy: RULER ``niah_single`` (attnpatch.tools.ruler, seed 0: a 7-digit number at depths 0.05-0.95),
   teacher-forced: one forward of prompt + " " + answer per setting; a sample counts when every digit
   token of the answer is the argmax at its row (rows past the prompt attend under the method's mask exactly as decode
   over the per-head cache would). Settings in turn on each sample; Wilson 95 % intervals.
3. KV budget: tokens StreamingHeads' evicting cache holds (``StreamingHeads.kv_tokens``: computed; the cache
   is per KV head in the layers with retrieval heads, measured in 4.); uniform SinkWindow gets the window that
   makes its evicting cache that size.
4. Decode speed and KV memory held: a SmolLM2-shaped Llama with random weights decodes after a cache of S
   random keys (as benchmarks/decode.py), settings interleaved per step; each step's cache first takes one
   untimed token (an evicting policy trims it then), the next token is timed; tokens/s, the median ratio to
   dense and the bytes the cache holds after it (measured).

    python benchmarks/duo.py                     # -> benchmarks/results/duo.{md,json}
    python benchmarks/duo.py --samples 4 --lengths 2048 --out /tmp/duo   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.methods.duo import load_heads  # noqa: E402
from attnpatch.tools import retrieval_heads, ruler  # noqa: E402
from common import RESULTS, machine, out_stem, table, write  # noqa: E402

PROFILE = RESULTS / "duo_heads.safetensors"
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, vocab_size=49152, max_position_embeddings=16384)


def settings(heads, sink: int, window: int, L: int, shape) -> dict:
    """name -> (method, KV tokens per layer-head at context L): dense, StreamingHeads, SinkWindow at its budget."""
    layers, hq, hkv = shape
    duo = ap.StreamingHeads(heads, sink=sink, window=window, evict=True)  # evicts where every head streams
    budget = duo.kv_tokens(layers, hq, hkv, L) / (layers * hkv)  # mean cached tokens per (layer, KV head)
    uni = ap.SinkWindow(sink=sink, window=max(1, round(budget) - sink + 1), evict=True)
    return {"dense": (None, L), f"StreamingHeads(sink={sink}, window={window})": (duo, budget),
            "SinkWindow, same KV budget": (uni, min(L, uni.sink + uni.window - 1))}


@torch.inference_mode()
def accuracy(model, tok, heads, a, data, save) -> None:
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads)
    for L in a.lengths:
        cells = data["accuracy"].setdefault(str(L), {})
        for s in ruler.generate("niah_single", L, a.samples, count, seed=0):
            ids = tok(s.prompt, return_tensors="pt")["input_ids"]
            ans = tok(" " + s.answers[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
            full, n = torch.cat([ids, ans], 1), ans.shape[1]
            for name, (method, kv) in settings(heads, a.sink, a.window, ids.shape[1], shape).items():
                c = cells.setdefault(name, {"hits": {}, "kv_tokens": {}, "window": {}})
                if str(s.index) in c["hits"]:
                    continue  # resumed run: measured already
                with ap.patch(model, method) if method is not None else _null():
                    pred = model(full, logits_to_keep=n + 1).logits[0, :-1].argmax(-1)  # the answer rows only
                want = pred == ans[0]
                # the digits only: a lone leading space token is where dense itself may prefer ":" (a format
                # choice, not retrieval)
                skip = int(tok.decode(ans[0, :1]).strip() == "")
                i = str(s.index)  # per sample index: the uniform window follows each prompt's length
                c["hits"][i], c["kv_tokens"][i] = int(bool(want[skip:].all())), kv
                c["window"][i] = getattr(method, "window", None)
            print(L, s.index, {k: v["hits"][str(s.index)] for k, v in cells.items()}, flush=True)
            save()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def speed(heads, a) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import _cache

    from attnpatch.patchers.transformers import _cache_bytes

    torch.manual_seed(0)
    stock = LlamaForCausalLM(LlamaConfig(**SMOL)).eval()
    L, Hq, Hkv, D = SMOL["num_hidden_layers"], SMOL["num_attention_heads"], SMOL["num_key_value_heads"], SMOL["head_dim"]
    rows, ids = [], torch.tensor([[42]])
    for S in a.speed_lengths:
        sets = settings(heads, a.sink, a.window, S, (L, Hq, Hkv))
        models = {n: stock if m is None else copy.deepcopy(stock) for n, (m, _) in sets.items()}
        handles = [ap.patch(models[n], m) for n, (m, _) in sets.items() if m is not None]
        base = [(torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)) for _ in range(L)]
        times, held = {n: [] for n in sets}, {}
        for step in range(2 + a.steps):  # interleaved: every setting decodes one token in turn
            for n in sets:
                cache = _cache(base)  # the same S keys every step: each setting times one token at context S
                models[n](ids, cache=cache, use_cache=True)  # untimed: an evicting policy trims the cache after it
                t0 = time.perf_counter()
                models[n](ids, cache=cache, use_cache=True)
                if step >= 2:
                    times[n].append(time.perf_counter() - t0)
                held[n] = _cache_bytes(cache) / 2**20
        for n, (m, kv) in sets.items():
            ratio = statistics.median(d / t for d, t in zip(times["dense"], times[n]))
            rows.append(dict(context=S, setting=n, tok_s=1 / statistics.median(times[n]), x_dense=ratio, held_mib=held[n],
                             kv_mib=kv * L * Hkv * 2 * D * 4 / 2**20))  # per-head budget: fp32 K + V, all layers
            print(rows[-1], flush=True)
        for h in handles:
            h.remove()
    return rows


def render(data) -> str:
    rows = []
    for L, cells in data["accuracy"].items():
        for name, c in cells.items():
            k, n = sum(c["hits"].values()), len(c["hits"])
            lo, hi = ruler.wilson(k, n)
            w = sorted({x for x in c["window"].values() if x is not None})
            rows.append(dict(length=L, setting=name + (f" (window {w[0]}-{w[-1]})" if w and "same KV" in name else ""),
                             n=n, acc=k / max(n, 1), ci=f"{lo:.2f}-{hi:.2f}",
                             kv=statistics.mean(c["kv_tokens"].values()) if n else None))
    acc = table(rows, [("length", "prompt tokens"), ("setting", "setting"), ("n", "n"), ("acc", "accuracy"),
                       ("ci", "Wilson 95 %"), ("kv", "KV tokens / (layer, KV head)")])
    spd = table(data.get("speed", []), [("context", "context"), ("setting", "setting"), ("tok_s", "decode tok/s"),
                                        ("x_dense", "x dense"), ("held_mib", "KV MiB held (measured)"),
                                        ("kv_mib", "KV MiB computed (kv_tokens)")])
    heads = data["heads"]
    return (f"Retrieval heads kept full: {len(heads)} query heads ({len({(l, h // 3) for l, h in heads})} KV groups of 90) "
            f"in layers {sorted({l for l, _ in heads})}.\n\n## Needle accuracy (niah_single, teacher-forced)\n\n{acc}\n\n"
            f"## Decode speed and KV memory (random-weight SmolLM2 shape)\n\nBoth methods evict (`evict=True`); KV MiB held "
            "is the cache's size after the timed token, measured. SinkWindow holds its budget in every layer; StreamingHeads "
            "holds a per-head cache in the layers with a retrieval head (the KV heads serving one whole, the others trimmed "
            "to sink + window - 1, run as two attention calls) and trims every KV head of the other layers; the last "
            f"column is the size computed from kv_tokens.\n\n{spd}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--top", type=float, default=0.1)
    p.add_argument("--speed-lengths", default="4096,8192")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rescore", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.speed_lengths = [int(x) for x in a.speed_lengths.split(",")]
    stem = out_stem("duo", a.out, None if a.samples >= 30 else "quick")
    from attnpatch.models import smollm2

    model, tok = smollm2()
    if a.rescore or not PROFILE.exists():
        scores = retrieval_heads.score_heads(model, tok, n=6, length=2048, seed=1000)
        retrieval_heads.save_heads(PROFILE, retrieval_heads.top_heads(scores, a.top, model.config.num_key_value_heads),
                                   scores, prompts=6, length=2048, seed=1000, top=a.top, model="SmolLM2-135M")
    heads = load_heads(PROFILE)
    js = stem.with_suffix(".json")
    data = json.loads(js.read_text()) if js.exists() else {"accuracy": {}}
    data.update(machine=machine(), heads=heads, args={k: v for k, v in vars(a).items()})

    def save():
        write(stem, "StreamingHeads vs SinkWindow at the same KV budget (SmolLM2-135M)", __doc__.split("\n\n")[0],
              render(data), data)

    if not a.skip_speed:
        data["speed"] = speed(heads, a)
        save()
    accuracy(model, tok, heads, a, data, save)
    save()


if __name__ == "__main__":
    main()
