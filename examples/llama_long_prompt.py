"""A long prompt through a Llama-style model with sparse prefill: stock vs SinkWindow and
TopKBlocks on the same prompt; prints prefill time, speedup and whether the answers agree.

    python examples/llama_long_prompt.py                          # SmolLM2-135M-Instruct, offline
    python examples/llama_long_prompt.py Qwen/Qwen2.5-0.5B-Instruct --tokens 8000   # a hub id or folder
"""
import argparse
import time

import torch

import attnpatch as ap


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="hub id or folder of a causal LM (default: SmolLM2-135M, offline)")
    p.add_argument("--tokens", type=int, default=3000, help="approximate prompt length")
    a = p.parse_args()
    if a.model is None:
        from attnpatch.models import smollm2

        model, tok = smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(a.model).eval(), AutoTokenizer.from_pretrained(a.model)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    n = len(tok(filler).input_ids)
    body = filler * (a.tokens // n // 2) + "The secret code is 4721. " + filler * (a.tokens // n // 2)
    msgs = [{"role": "user", "content": body + "\nWhat is the secret code?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    print(f"prompt: {ids.shape[1]} tokens")

    def run(method):
        ctx = ap.patch(model, method) if method is not None else None
        try:
            if ctx:
                ctx.__enter__()
            with torch.inference_mode():
                t = time.perf_counter()
                model(ids, use_cache=False)  # prefill alone, timed
                prefill = time.perf_counter() - t
                out = model.generate(ids, max_new_tokens=12, do_sample=False)
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        return prefill, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    base, answer = run(None)
    print(f"stock: prefill {base:.2f} s -> {answer!r}")
    for m in (ap.SinkWindow(sink=4, window=1024), ap.TopKBlocks(keep=0.25, block=256)):
        t, ans = run(m)
        print(f"{m}: prefill {t:.2f} s (speedup {base / t:.2f}x) -> {ans!r} ({'same' if ans == answer else 'differs'})")


if __name__ == "__main__":
    main()
