"""The speed tools of issue 18 (benchmarks/_speed.py, percall.py, curves.py, gpu.sh): what they time
and how they report it. No wall-clock assertions: shapes, names, interpolation and exit codes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnpatch as ap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _speed as sp  # noqa: E402

GUIDANCE = {"PAG", "SharedAttention", "StyleInjection"}  # add work by design: not in the per-call benchmark


def test_every_sparse_and_calibrated_public_method_is_benchmarked():
    layouts = [sp.case("smollm2", 1024), sp.case("flux", (32, 32)), sp.case("wan", (4, 16, 16))]
    seen = {type(m).__name__ for c in layouts for m in sp.methods_for(c)}
    public = {n for n in ap.methods._FILES if isinstance(getattr(ap, n), type) and getattr(ap, n).plan is not ap.Method.plan}
    missing = public - GUIDANCE - seen
    assert not missing, f"add {sorted(missing)} to benchmarks/_speed.py methods_for (or to GUIDANCE if it adds work by design)"
    assert not seen & GUIDANCE


def test_each_method_plans_at_its_layout_without_error():
    """The parameters chosen per size are valid for the Site the benchmark builds (a wrong one would only
    show as a crash in a 20-minute run)."""
    for fam, size in (("smollm2", 64), ("fixture", (8, 8)), ("wan", (1, 8, 8)), ("wan", (4, 8, 8))):
        c = sp.case(fam, size)
        q, k, v = sp.tensors(c, heads=c.H // c.Hkv)
        for m in sp.methods_for(c):
            out = ap.core.run(q, k, v, m, c.site())
            assert out.shape == q.shape and torch.isfinite(out).all(), (fam, size, m)


def test_measure_names_the_kernel_and_ratio_per_repeat(monkeypatch):
    from attnpatch import kernels

    picked = []
    real = kernels.select

    def spy(*a, **kw):  # what the cost model picks on this machine: the row must name exactly that
        picked.append(real(*a, **kw).name)
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "select", spy)
    c = sp.case("fixture", (8, 8))
    r = sp.measure(c, ap.SlidingTile(tile=4, window=1), reps=2, row_s=0.0)
    assert picked and set(r["kernel"].split("+")) == set(picked)
    assert r["reps"] == 2 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert r["slow"] == (r["ratio"] > sp.SLOW) and r["tokens"] == 80 and r["heads"] == 4
    assert sp.measure(c, ap.Temperature(tau=0.9), reps=2, row_s=0.0)["kernel"] == "sdpa"


def test_crossover_interpolates_in_log_tokens():
    assert sp.crossover([(1000, 0.5), (4000, 1.5)]) == pytest.approx(2000.0)  # halfway in log2: 1000 * 2
    assert sp.crossover([(256, 1.2), (1024, 2.0)]) == 256.0  # pays from the smallest size
    assert sp.crossover([(256, 0.5), (1024, 0.9)]) is None  # never in range
    assert sp.crossover([(4000, 1.5), (1000, 0.5)]) == pytest.approx(2000.0)  # order of the points does not matter


def test_fit_heads_keeps_whole_kv_groups_and_skips_what_cannot_fit():
    c = sp.case("llama8b", 16384)  # 32 query heads over 8 KV heads: groups of 4
    one_group = sp.dense_flops(c, 4)
    assert sp.fit_heads(c, one_group * 2.5, 1.0) == 8
    assert sp.fit_heads(c, one_group / 2, 1.0) == 0
    assert sp.fit_heads(c, 1.0, None) is None
    q, k, _ = sp.tensors(sp.case("smollm2", 64), heads=6)
    assert (q.shape[1], k.shape[1]) == (6, 2)


def test_label_shows_only_non_default_fields():
    assert sp.label(ap.SlidingTile(tile=4, window=3)) == "SlidingTile(tile=4)"
    assert sp.label(ap.Temperature(tau=0.9)) == "Temperature(tau=0.9)"


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="checks a machine without a GPU")
def test_gpu_script_fails_fast_without_a_gpu():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TMPDIR": "/nonexistent"})
    assert r.returncode == 2 and r.stderr.startswith("no CUDA device:") and "--cpu-smoke" in r.stderr
    assert r.stdout == ""  # stopped before any step


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")]).returncode == 0


def _committed(threads=1):
    import curves
    from common import machine

    rows = [dict(family="smollm2", tokens=n, name="SinkWindow", speedup=1.2) for n in (256, 8192)]
    skipped = ["smollm2 16384 (16384 tokens): stock call > 0.3 s even with one KV group",
               "smollm2 65536 (65536 tokens): stock call > 0.3 s even with one KV group",
               "flux 512+128x128 (16896 tokens): stock call > 0.3 s even with one KV group"]
    return curves, dict(machine=machine(), args=dict(quick=False, reps=5, threads=threads, device="cpu", max_call_s=0.3),
                        rows=rows, e2e=[{"model": "flux"}], skipped=skipped, crossover=[])


def _extend_args(**kw):
    import argparse

    base = dict(device="cpu", threads=1, families="smollm2", from_tokens=9000, to_tokens=40000, extend="c.json", note="")
    return argparse.Namespace(**{**base, **kw})


def test_curves_extend_keeps_the_committed_rows_and_takes_measured_sizes_off_the_skipped_list():
    curves, old = _committed()
    a = _extend_args()
    new = curves._extended(a, old, dict(reps=3, threads=1, device="cpu", max_call_s=2.0))
    assert [r["tokens"] for r in new["rows"]] == [256, 8192] and new["e2e"] == [{"model": "flux"}]
    # 16K and 32K are measured now (smollm2 only); 64K (beyond --to-tokens) and flux (another family) stay listed
    assert [s.split(" (")[0] for s in new["skipped"]] == ["smollm2 65536", "flux 512+128x128"]
    assert new["args"]["max_call_s"] == 0.3 and new["extensions"][0]["max_call_s"] == 2.0


@pytest.mark.parametrize("change, says", [(dict(from_tokens=4000), "already has smollm2 at 8192"),
                                          (dict(threads=2), "--threads 1")])
def test_curves_extend_refuses_what_would_mix_or_rewrite_rows(change, says):
    curves, old = _committed()
    with pytest.raises(SystemExit, match=says):
        curves._extended(_extend_args(**change), old, dict(reps=3, threads=1, device="cpu", max_call_s=2.0))
