"""The offloading section of benchmarks/compose.py: attnpatch with diffusers' offloading on the
trained FLUX fixture's pipeline and with accelerate's ``device_map`` on a transformers Llama, on CPU.

Every row is one setting: what ran (or diffusers' / accelerate's message where it did not), the
max difference to the plainly loaded patched model, and its time as a ratio to the plain patched
run in the same interleaved loop. Onloading to the CPU moves no data: the ratio is the hooks' cost.
"""
from __future__ import annotations

import copy
import tempfile

import torch

import attnpatch as ap
from attnpatch.tools.timing import interleave

PROMPT = "a large red circle at the top left"
STEPS = 4


def _flux_runs(method) -> tuple[dict, list[dict]]:
    """Runs (name -> (pipe, prepare)) of the FLUX fixture, and rows for what cannot run on CPU."""
    from attnpatch.models import fixtures

    cpu = torch.device("cpu")
    runs, failed = {}, []

    def add(name, prepare, patch=True):
        pipe = fixtures.flux_shapes()
        try:
            prepare(pipe)
        except Exception as e:  # noqa: BLE001 - recorded: what diffusers says on this machine
            failed.append(dict(setting=name, result=f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
            return
        if patch:
            ap.patch(pipe, copy.deepcopy(method))
        runs[name] = pipe

    add("stock", lambda p: None, patch=False)
    add("patched", lambda p: None)
    add("patched + group offload (block_level, 1 block a group)", lambda p: p.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1))
    add("patched + group offload (leaf_level)", lambda p: p.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="leaf_level"))
    add("patched + enable_model_cpu_offload(device='cpu')", lambda p: p.enable_model_cpu_offload(device="cpu"))
    add("enable_model_cpu_offload() (no device)", lambda p: p.enable_model_cpu_offload())
    add("group offload with use_stream=True", lambda p: p.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="leaf_level", use_stream=True))
    seq = fixtures.flux_shapes()  # fails at the call, stock as well: accelerate offloads to "meta" on CPU
    seq.enable_sequential_cpu_offload(device="cpu")
    try:
        seq(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt")
        failed.append(dict(setting="stock + enable_sequential_cpu_offload(device='cpu')", result="ran"))
    except Exception as e:  # noqa: BLE001
        failed.append(dict(setting="stock + enable_sequential_cpu_offload(device='cpu')",
                           result=f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))
    return runs, failed


def flux_rows(repeats: int) -> list[dict]:
    runs, failed = _flux_runs(ap.Neighborhood(window=5, dense_steps=0))
    outs = {}

    def run(name):
        def go():
            import time

            t = time.perf_counter()
            with torch.no_grad():
                outs[name] = runs[name](PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                                        output_type="pt").images
            return time.perf_counter() - t
        return go

    times = interleave({n: run(n) for n in runs}, repeats)
    rows = []
    for name, ts in times.items():
        r = [t / p for t, p in zip(ts, times["patched"])]
        rows.append(dict(model=f"FLUX fixture pipeline, 64x64, {STEPS} steps, Neighborhood(window=5)", setting=name,
                         result="ran", diff_patched=f"{float((outs[name] - outs['patched']).abs().max()):.1e}",
                         ratio=sorted(r)[len(r) // 2], lo=min(r), hi=max(r)))
    return rows + [dict(model="FLUX fixture pipeline", **f) for f in failed]


def llama():
    """A random Llama (4 layers, 8 / 4 heads of 32) and a 1024-token prompt."""
    from attnpatch.models import tiny

    base = tiny.llm("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)
    return base, torch.randint(1, 97, (1, 1024), generator=torch.Generator().manual_seed(0))


def llm_rows(repeats: int) -> list[dict]:
    """A random Llama (4 layers, 8/4 heads of 32) saved, loaded plainly and with accelerate device_maps
    (all on CPU; layer 3 offloaded to disk), each patched with SinkWindow; a 1024-token prefill."""
    import time

    import transformers

    base, ids = llama()
    method = ap.SinkWindow(sink=4, window=256, block=64)
    d = tempfile.mkdtemp()
    base.save_pretrained(d)
    disk = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}, "model.layers.3": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    models = {"stock": base, "patched": copy.deepcopy(base)}
    for name, dm in (("patched, device_map='cpu'", "cpu"), ("patched, device_map with layer 3 on disk", disk)):
        models[name] = transformers.AutoModelForCausalLM.from_pretrained(d, device_map=dm, offload_folder=d).eval()
    for name, m in models.items():
        if name != "stock":
            ap.patch(m, copy.deepcopy(method))
    outs = {}

    def run(name):
        def go():
            t = time.perf_counter()
            with torch.no_grad():
                outs[name] = models[name](ids).logits
            return time.perf_counter() - t
        return go

    times = interleave({n: run(n) for n in models}, repeats)
    rows = []
    for name, ts in times.items():
        r = sorted(t / p for t, p in zip(ts, times["patched"]))
        rows.append(dict(model="Llama 4 layers (random), 1024-token prefill, SinkWindow(sink=4, window=256)", setting=name,
                         result="ran", diff_patched=f"{float((outs[name] - outs['patched']).abs().max()):.1e}",
                         ratio=r[len(r) // 2], lo=r[0], hi=r[-1]))
    return rows


def section(repeats: int) -> list[dict]:
    return flux_rows(max(3, repeats // 3)) + llm_rows(repeats)


COLUMNS = [("model", "model"), ("setting", "setting"), ("result", "result"), ("diff_patched", "max |out - patched|"),
           ("ratio", "time x patched (median)"), ("lo", "min"), ("hi", "max")]
