"""Long-context quality on SmolLM2-135M-Instruct: a RULER-style suite (attnpatch.tools.ruler) for
every LLM method, side by side with kvpress's presses at the same KV budgets, in one process.

    python benchmarks/llm_quality.py                      # -> benchmarks/results/llm_quality.{md,json}
    python benchmarks/llm_quality.py --minutes 60         # stop starting new samples after 60 min
    python benchmarks/llm_quality.py --render             # re-render the .md from the .json

Every prompt goes through one greedy ``generate`` (prompt = context + question + answer prefix),
the method patched in (attnpatch) or the press's hooks on (kvpress: it compresses the KV cache of
the prefill; prefill attention itself stays dense). kvpress presses get SinkWindow(window=512)'s
KV budget: compression_ratio = 1 - min(1, (4 + 512) / prompt tokens). Work runs in priority order
(dense on every task first, then every setting on the tasks where dense beats chance, 1K before
2K ...), settings taken in turn on each sample, and the json is saved after every sample, so a
stopped run keeps what it measured (the table says n). kvpress is benchmark-only and not an extra
(kvpress 0.5.5 pins transformers<5.3): ``pip install --no-deps kvpress==0.5.5 cachetools``; without it
its rows are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.patchers.transformers import _cache_bytes, cache_name, cache_of  # noqa: E402
from attnpatch.tools import ruler  # noqa: E402
from common import RESULTS, machine, out_stem, table, write  # noqa: E402

SINKCAL = RESULTS / "smollm2_act.safetensors"
DUO = RESULTS / "duo_heads.safetensors"
PRESS_WINDOW = 512  # kvpress budgets match SinkWindow(sink=4, window=512)


def attnpatch_settings() -> dict:
    return {
        "dense": None,
        "SinkWindow(4, 256, evict)": ap.SinkWindow(sink=4, window=256, evict=True),
        "SinkWindow(4, 512, evict)": ap.SinkWindow(sink=4, window=512, evict=True),
        "TopKBlocks(keep=0.25, block=128)": ap.TopKBlocks(keep=0.25, block=128),
        "TopKBlocks(keep=0.5, block=128)": ap.TopKBlocks(keep=0.5, block=128),
        "VerticalSlash(256, 256, window=128)": ap.VerticalSlash(verticals=256, slashes=256, window=128),
        "Power(local=256)": ap.Power(local=256),
        "SinkCalibration(smollm2_act)": ap.SinkCalibration(heads=str(SINKCAL)),
        # query-aware decode (prefill dense), retrieval / streaming heads (benchmarks/duo.py's profile) and
        # HyperAttention sparse from 256 tokens (its default min_len=4096 is exact dense at these lengths)
        "Quest(budget=256, pooled=0)": ap.Quest(budget=256, pooled=0.0),
        "Quest(budget=512, pooled=0)": ap.Quest(budget=512, pooled=0.0),
        "StreamingHeads(duo, 4, 256, evict)": ap.StreamingHeads(str(DUO), sink=4, window=256, evict=True),
        "HyperAttention(64, 64, min_len=256)": ap.HyperAttention(block=64, samples=64, min_len=256),
        # a second setting for the methods above that had one: sparser (VerticalSlash, Power, HyperAttention), the
        # retrieval heads at SinkWindow(4, 512)'s window, and ACT on every head instead of the calibrated ones
        "VerticalSlash(128, 128, window=64)": ap.VerticalSlash(verticals=128, slashes=128, window=64),
        "Power(local=64)": ap.Power(local=64),
        "StreamingHeads(duo, 4, 512, evict)": ap.StreamingHeads(str(DUO), sink=4, window=512, evict=True),
        "HyperAttention(128, 128, min_len=512)": ap.HyperAttention(block=128, samples=128, min_len=512),
        "SinkCalibration(all heads)": ap.SinkCalibration(),
        # VerticalSlash at MInference's GPU-kernel granularity (64-row blocks) and at 256 (the CPU's fastest before 12-03)
        "VerticalSlash(128, 128, window=64, block=64)": ap.VerticalSlash(verticals=128, slashes=128, window=64, block=64),
        "VerticalSlash(128, 128, window=64, block=256)": ap.VerticalSlash(verticals=128, slashes=128, window=64, block=256),
        # Quest at the budget of decode.md's speed rows (1024 keys: 3.3x dense decode at 16K), where accuracy is the question
        "Quest(budget=1024, pooled=0)": ap.Quest(budget=1024, pooled=0.0),
        # half its pages by mean key score: the bound alone is loose on SmolLM2's keys (quest.py's docstring)
        "Quest(budget=1024, pooled=0.5)": ap.Quest(budget=1024, pooled=0.5),
        "Quest(budget=512, pooled=0.5)": ap.Quest(budget=512, pooled=0.5),
        # the calibrated logit scalings: sharper attention everywhere, and log-n scaling from a shorter "training"
        # length (an identity for queries that see <= train_len keys, 256 and 512 act on every prompt here)
        "Temperature(tau=0.9)": ap.Temperature(tau=0.9),
        "Temperature(tau=0.8)": ap.Temperature(tau=0.8),
        "EntropyScale(train_len=256)": ap.EntropyScale(train_len=256),
        "EntropyScale(train_len=512)": ap.EntropyScale(train_len=512),
    }


def _kvpress():
    """kvpress 0.5.5, importable without its unused heavy imports (datasets / fire: DuoAttention's
    download and a CLI), or None when it is not installed."""
    for name in ("datasets", "fire"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].load_dataset = None
    try:
        import kvpress
    except ImportError:
        return None
    return kvpress


def _adapt(press):
    """kvpress 0.5.5 reads ``past_key_values`` / ``cache_position`` from the attention's kwargs;
    transformers >= 5.24 passes ``cache`` and no positions: supply them (prefill <=> the cache
    holds exactly this call's tokens)."""
    orig = press.forward_hook

    def hook(module, args, kwargs, output):
        kw = dict(kwargs)
        kw.setdefault("hidden_states", args[0] if args else None)
        cache = kw.get("past_key_values", kw.get("cache"))
        kw["past_key_values"] = cache
        if "cache_position" not in kw:
            q, S = kw["hidden_states"].shape[1], cache.get_seq_length(module.layer_idx)
            kw["cache_position"] = torch.arange(S - q, S)
        return orig(module, args, kw, output)

    press.forward_hook = hook
    return press


def press_settings(kvpress) -> dict:
    """name -> factory(prompt tokens) of a press at SinkWindow(4, PRESS_WINDOW)'s budget."""
    if kvpress is None:
        return {}
    ratio = lambda S: max(0.0, 1 - (4 + PRESS_WINDOW) / S)  # noqa: E731
    return {
        f"kvpress StreamingLLM (={PRESS_WINDOW + 4} keys)": lambda S: kvpress.StreamingLLMPress(compression_ratio=ratio(S), n_sink=4),
        f"kvpress SnapKV (={PRESS_WINDOW + 4} keys)": lambda S: kvpress.SnapKVPress(compression_ratio=ratio(S)),
        f"kvpress Knorm (={PRESS_WINDOW + 4} keys)": lambda S: kvpress.KnormPress(compression_ratio=ratio(S)),
        f"kvpress ExpectedAttention (={PRESS_WINDOW + 4} keys)": lambda S: kvpress.ExpectedAttentionPress(compression_ratio=ratio(S)),
    }


def runner(model, tok):
    """``run(setting, ids, new) -> (texts, kv MiB per row, seconds, new tokens)``: one greedy generate
    of a batch of equal-length prompts (no padding: every method sees plain rows)."""
    aps, presses = attnpatch_settings(), press_settings(_kvpress())

    def ctx(name, S):
        if name in presses:
            return _adapt(presses[name](S))(model)
        return ap.patch(model, aps[name]) if aps[name] is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def run(name, ids, new):
        with ctx(name, ids.shape[1]):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)  # no padding: all ones
            dt = time.perf_counter() - t0
        texts = tok.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
        return texts, _cache_bytes(cache_of(out)) / 2**20 / ids.shape[0], dt, out.sequences.shape[1] - ids.shape[1]

    run.ctx = ctx
    return run, list(aps) + list(presses)


def _key(task, L, name):
    return f"{task}|{L}|{name}"


def qualifies(data, task, L) -> bool:
    """Dense clearly above chance on ``task`` at the shortest length measured up to ``L``: its
    95 % interval's lower end above the chance score."""
    cells = [c for c in data["cells"].values() if c["task"] == task and c["setting"] == "dense" and c["length"] <= L]
    c = min(cells, key=lambda c: c["length"], default=None)
    return bool(c and c["scores"]) and ruler.interval(c["scores"])[0] > statistics.mean(c["chance"])


def work(data, a, names):
    """(task, length, settings, samples) in order: dense probes of every task, the speed table, then
    every setting on the main tasks (by default those where the dense probe beats chance)."""
    lengths = [int(x) for x in a.lengths.split(",")]
    parts = a.parts.split(",")
    if "probe" in parts:
        for L in lengths:
            for task in ruler.TASKS:
                yield task, L, ["dense"], a.probe
    if "speed" in parts:
        yield "speed", None, names, None
    if "main" in parts:
        for L in lengths:
            for task in a.tasks.split(",") if a.tasks else ruler.TASKS:
                if a.tasks or qualifies(data, task, L):
                    yield task, L, names, a.samples


def exact(tok, prompt: str, L: int) -> list[int]:
    """The prompt's ids made exactly ``L`` long by noise sentences in front (the generator fills to
    at most L), so samples batch without padding."""
    ids = tok(prompt).input_ids
    fill = tok(" ".join([ruler.NOISE] * (L // 8 + 1)) + "\n").input_ids
    return fill[len(fill) - (L - len(ids)):] + ids if len(ids) < L else ids


def run_cell(data, save, run, tok, task, L, names, n, stop, batch):
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    samples = ruler.generate(task, L, n, count, seed=0)
    for b in range(0, n, batch):
        if time.time() > stop:
            return False
        chunk = samples[b:b + batch]
        ids = torch.tensor([exact(tok, s.prompt, L) for s in chunk])
        for name in names:
            c = data["cells"].setdefault(_key(task, L, name), dict(task=task, length=L, setting=name, scores=[], chance=[],
                                                                   kv_mib=[], outputs=[]))
            if len(c["scores"]) >= b + len(chunk):  # measured by an earlier (stopped) run
                continue
            texts, kv, dt, _ = run(name, ids, max(s.max_new_tokens for s in chunk))
            c["scores"] += [ruler.score(t, s.answers) for t, s in zip(texts, chunk)]
            c["chance"] += [s.chance for s in chunk]
            c["kv_mib"] += [kv] * len(chunk)
            c["outputs"] += [dict(answers=s.answers, output=t) for t, s in zip(texts, chunk)][:max(0, 3 - len(c["outputs"]))]
            save()
        print(task, L, b + len(chunk), {nm: round(statistics.mean(data["cells"][_key(task, L, nm)]["scores"]), 2) for nm in names},
              time.strftime("%H:%M:%S"), flush=True)
    return True


def rekv(data, save, run, tok, want, names, p) -> None:
    """The KV MiB of every cell of the settings ``want``, measured again on the cell's first sample (the cache's
    size depends on the prompt length and new tokens only, the same for every sample of a cell)."""
    unknown = [x for x in want if x not in names]
    if unknown:
        p.error(f"--rekv: unknown {unknown}; the settings are {names}")
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    for c in data["cells"].values():
        if c["setting"] in want and c["scores"]:
            s = ruler.generate(c["task"], c["length"], 1, count, seed=0)[0]
            _, kv, _, _ = run(c["setting"], torch.tensor([exact(tok, s.prompt, c["length"])]), s.max_new_tokens)
            print("rekv", c["task"], c["length"], c["setting"], round(statistics.mean(c["kv_mib"]), 2), "->", round(kv, 2), flush=True)
            c["kv_mib"] = [kv] * len(c["scores"])
            save()


@torch.inference_mode()
def _timed(model, ctx, ids, new):
    """Prefill seconds, decode tokens/s over ``new`` greedy steps (own loop: prefill noise stays out
    of the decode rate) and the KV cache MiB after them."""
    with ctx:
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        for _ in range(new):
            out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_name(model): cache_of(out)})
        t2 = time.perf_counter()
    return t1 - t0, new / (t2 - t1), _cache_bytes(cache_of(out)) / 2**20


def speed(model, run, tok, names, L, new, reps):
    """Every setting's ``_timed`` on one niah_single prompt, in turn within every repetition (order
    rotating), medians."""
    s = ruler.generate("niah_single", L, 1, lambda t: len(tok(t).input_ids), seed=1)[0]
    ids = torch.tensor([exact(tok, s.prompt, L)])
    got = {nm: [] for nm in names}
    for r in range(reps):
        for nm in names[r % len(names):] + names[:r % len(names)]:
            got[nm].append(_timed(model, run.ctx(nm, L), ids, new))
            print("speed", nm, got[nm][-1], flush=True)
    return [dict(setting=nm, tokens=L, new_tokens=new, reps=reps, prefill_s=statistics.median(g[0] for g in v),
                 decode_tps=statistics.median(g[1] for g in v), kv_mib=statistics.median(g[2] for g in v)) for nm, v in got.items()]


def summary(data) -> list[dict]:
    rows = []
    for c in data["cells"].values():
        lo, hi = ruler.interval(c["scores"])
        rows.append(dict(task=c["task"], length=c["length"], setting=c["setting"], n=len(c["scores"]),
                         score=statistics.mean(c["scores"]), lo=lo, hi=hi, chance=statistics.mean(c["chance"]),
                         kv_mib=statistics.mean(c["kv_mib"])))
    order = {t: i for i, t in enumerate(ruler.TASKS)}
    return sorted(rows, key=lambda r: (r["length"], order[r["task"]], r["setting"] != "dense"))


def render(data, level: str = "##") -> str:
    """The page body; ``level``: the markdown heading of its sections (llm.md nests them one deeper)."""
    rows = summary(data)
    for r in rows:
        r["ci"] = f"{r['lo']:.2f} - {r['hi']:.2f}"
    cols = [("task", "task"), ("length", "tokens"), ("setting", "setting"), ("n", "n"), ("score", "score"), ("ci", "95 % CI"),
            ("chance", "chance"), ("kv_mib", "KV at the end (MiB)")]
    parts = [f"{level} RULER-style accuracy (SmolLM2-135M-Instruct, greedy)\n\n" + table(rows, cols)]
    if data.get("speed"):
        m = data.get("speed_machine")
        where = f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads).\n\n" if m else ""
        parts.append(f"{level} Prefill, decode and KV memory at {data['speed'][0]['tokens']} tokens (one process, settings in turn)\n\n"
                     + where + table(data["speed"], [("setting", "setting"), ("tokens", "prompt tokens"), ("prefill_s", "prefill (s)"),
                                             ("decode_tps", "decode tokens / s"), ("kv_mib", "KV cache (MiB)"),
                                             ("reps", "repetitions")]))
    if data.get("notes"):
        parts.append("Run notes: " + data["notes"])
    return "\n\n".join(parts)


INTRO = ("Scores are RULER's string_match_all (fraction of the reference strings in the greedy output; exact match for "
         "one answer); 95 % intervals: Wilson for 0/1 scores, seeded bootstrap for partial credit. Chance: an "
         "answer-shaped guess (see attnpatch/tools/ruler.py). Prompts from `attnpatch.tools.ruler.generate(task, length, n, "
         "seed=0)`; settings run in turn on every sample in this process.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--probe", type=int, default=10, help="dense samples per task that decide where the methods run")
    p.add_argument("--speed-length", type=int, default=2048)
    p.add_argument("--new", type=int, default=16, help="new tokens of the speed table's decode")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core box is oversubscribed)")
    p.add_argument("--batch", type=int, default=10, help="equal-length samples per generate call")
    p.add_argument("--parts", default="probe,speed,main", help="any of probe (dense on every task), speed, main")
    p.add_argument("--tasks", default="", help="main tasks (default: where the dense probe beats chance)")
    p.add_argument("--merge", nargs="*", default=[], help="json files of other runs whose cells and speed rows to add")
    p.add_argument("--settings", default="", help="';'-separated setting names to run (default: all)")
    p.add_argument("--redo-speed", action="store_true", help="measure the speed table again (default: kept once measured)")
    p.add_argument("--rekv", default="", help="';'-separated settings whose cells' KV MiB to measure again (one sample "
                   "per cell): for a change that moves the cache's size but not the logits")
    p.add_argument("--render", action="store_true")
    p.add_argument("--notes", default=None, help="run notes kept in the json and shown under the tables")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = out_stem("llm_quality", a.out)
    path = out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "cells": {}, "speed": [], "notes": ""}
    save = lambda: path.write_text(json.dumps(data, indent=1))  # noqa: E731
    for other in map(lambda f: json.loads(Path(f).read_text()), a.merge):
        data["cells"].update({k: c for k, c in other["cells"].items() if len(c["scores"]) > len(data["cells"].get(k, {}).get("scores", []))})
        data["speed"] = data["speed"] or other["speed"]
    data["notes"] = data.get("notes", "") if a.notes is None else a.notes
    if a.redo_speed and not a.render:
        data["speed"] = []
    if not a.render:
        from attnpatch.models import smollm2

        model, tok = smollm2()
        run, names = runner(model, tok)
        if a.settings:
            want = [x.strip() for x in a.settings.split(";") if x.strip()]
            unknown = [x for x in want if x not in names]
            if unknown:
                p.error(f"--settings: unknown {unknown}; the settings are {names}")
            names = [n for n in names if n in want]
        stop = time.time() + 60 * a.minutes
        if a.rekv:
            rekv(data, save, run, tok, [x.strip() for x in a.rekv.split(";") if x.strip()], names, p)
        for task, L, which, n in work(data, a, names):
            if time.time() > stop:
                break
            if task == "speed":
                if not data["speed"]:
                    data["speed"] = speed(model, run, tok, names, a.speed_length, a.new, 2)
                    data["speed_machine"] = machine()  # the accuracy cells do not depend on the machine; times do
                    save()
                continue
            run_cell(data, save, run, tok, task, L, which, n, stop, min(a.batch, n))
    write(out, "Long-context quality: RULER-style suite and kvpress, SmolLM2-135M", INTRO, render(data), data)


if __name__ == "__main__":
    main()
