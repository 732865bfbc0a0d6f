"""``attnpatch demo``: every supported family patched on tiny embedded models (no download),
checked against stock attention, plus a measured block-sparse speedup."""
from __future__ import annotations

import time

EXIT_OK, EXIT_FAIL = 0, 1


def _diffusers_rows(ap, tiny, torch):
    rows, ok = [], True
    for name, case in tiny.CASES.items():
        model, inputs = case.build().eval(), case.inputs()
        sites = []

        class Record(ap.Method):
            def plan(self, q, k, site):
                sites.append(site)

        with torch.no_grad():
            stock = model(**inputs)[0]
            with ap.patch(model, Record()):
                model(**inputs)
            with ap.patch(model, ap.Dense()):
                out = model(**inputs)[0]
            restored = torch.equal(model(**inputs)[0], stock)
        diff = (out - stock).abs().max().item()
        ok &= diff < 1e-4 and restored
        kinds = "/".join(sorted({s.kind for s in sites}))
        text = max(s.text_len for s in sites)
        rows.append((name, f"{len(sites)} calls ({kinds})", str(sites[0].grid), str(text), f"{diff:.1e}", str(restored)))
    return rows, ok


def _llm_rows(ap, tiny, torch):
    model = tiny.llm("llama", num_hidden_layers=4)
    ids = torch.randint(3, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    rows, ok = [], True
    with torch.no_grad():
        t0 = time.perf_counter()
        stock = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        t_stock = time.perf_counter() - t0
        for method in (ap.SinkWindow(sink=4, window=4096), ap.SinkWindow(sink=4, window=8)):
            with ap.patch(model, method):
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
                t = time.perf_counter() - t0
            agree = (out[:, 48:] == stock[:, 48:]).float().mean().item()
            if method.window > 64:
                ok &= agree == 1.0
            rows.append((f"llama / {method}", f"{agree:.0%} tokens equal to stock", f"{t_stock / t:.2f}x"))
    return rows, ok


def _sparse_rows(ap, torch):
    """Block-sparse attention vs dense SDPA on a 64x64 latent grid, timed here, one process."""
    import torch.nn.functional as F

    from ..tools.timing import timeit

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4096, 128, generator=g) for _ in range(3))  # (B, H, S, D)
    site, rows, ok = ap.Site(grid=(64, 64)), [], True

    t_dense = timeit(lambda: F.scaled_dot_product_attention(q, k, v), reduce=min)
    for method in (ap.SlidingTile(tile=(16, 32), window=(1, 3)), ap.Neighborhood(window=21)):
        plan = method.plan(q, k, site)
        out = ap.attend(q, k, v, method, site)
        ref = ap.attend(q, k, v, method, site, backend="sdpa")
        err = (out - ref).abs().max().item()
        ok &= err < 1e-4
        t = timeit(lambda: ap.attend(q, k, v, method, site), reduce=min)
        rows.append((str(method).replace(", dilation=1, causal=False, tile=None", ""), f"{plan.blocks.density():.3f}",
                     f"{t_dense / t:.2f}x", f"{1 / plan.blocks.density():.2f}x", f"{err:.1e}"))
    return rows, ok


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def demo(seed: int = 0) -> int:
    import warnings

    import torch

    import attnpatch as ap
    from ..models import tiny

    warnings.filterwarnings("ignore", message="In CPU autocast")  # Mochi's RoPE asks for fp32 autocast

    torch.manual_seed(seed)
    print("attnpatch demo: tiny random-weight models built from configs (no download), CPU\n")
    rows, ok1 = _diffusers_rows(ap, tiny, torch)
    print(_table(["diffusers model", "attention calls seen", "grid", "text tokens", "max abs diff Dense vs stock", "unpatch bit-identical"], rows))
    print()
    rows, ok2 = _llm_rows(ap, tiny, torch)
    print(_table(["transformers generate", "agreement", "speed vs stock (tiny model: overhead only)"], rows))
    print("\nA window covering the prompt must reproduce stock generate; a narrow one changes it.\n")
    rows, ok3 = _sparse_rows(ap, torch)
    print(_table(["sparse attention, 64x64 grid, 4 heads x 128", "block density", "speedup vs dense SDPA",
                  "ideal", "max abs diff vs masked SDPA"], rows))
    print("\nFull kernel tables: benchmarks/results/kernels.md (python benchmarks/kernel_speed.py).")
    ok = ok1 and ok2 and ok3
    print("OK" if ok else "MISMATCH: see the tables above")
    return EXIT_OK if ok else EXIT_FAIL
