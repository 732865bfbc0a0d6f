"""The one-line patch on a diffusers model and a transformers model, offline.

    python examples/quickstart.py

Uses tiny random-weight models built from configs; pass real ones the same way, e.g.
``FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")`` or
``AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")``.
"""
import torch

import attnpatch as ap
from attnpatch.models import tiny

# transformers: a causal LM, sink + window attention in prefill and KV-cache decode
model = tiny.llm("llama")
ids = torch.randint(3, 97, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    stock = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with ap.patch(model, ap.SinkWindow(sink=4, window=8)):  # undone when the block ends
        sparse = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("stock  :", stock[0, 32:].tolist())
    print("sparse :", sparse[0, 32:].tolist())
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), stock)

# diffusers: a Flux pipeline; every attention call now reaches the method with its Site
pipe = tiny.flux_pipeline()


class Show(ap.Method):
    def plan(self, q, k, site):
        if site.step == 0:
            print(f"  {site.name}: {site.kind}, grid {site.grid}, {site.text_len} text tokens first={site.text_first}, t={site.timestep:.2f}")
        return None  # dense


handle = ap.patch(pipe, Show())
print("Flux attention sites at step 0:")
tiny.flux_call(pipe, steps=2)
ap.unpatch(pipe)
print("restored:", handle.active is False)
