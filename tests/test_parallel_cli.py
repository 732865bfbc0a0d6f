"""``attnpatch generate --parallel ulysses=N`` (attnpatch/cli/parallel_cli.py): a real torchrun of 2
gloo processes writes, on rank 0 only, the image the single-process ``generate`` writes with the same
seed and method; bad commands exit 2 with a message before the model loads or a process group starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
HAVE_FLUX = (ROOT / "attnpatch/models/weights/flux-shapes/model_index.json").is_file()
needs_flux = pytest.mark.skipif(not HAVE_FLUX, reason="the trained FLUX fixture (attnpatch/models/weights/flux-shapes) is not here")
# flux-shapes: 4 heads (split over 2), 16 text + 16x16 image tokens at 64 px (both split over 2)
ARGS = ["generate", "--model", "builtin:flux-shapes", "--prompt", "a large red circle at the top left", "--steps", "2",
        "--height", "64", "--width", "64", "--quiet"]
METHOD = "Neighborhood(window=3)"


def torchrun(*args, n: int = 2):
    """``torchrun --standalone --nproc-per-node n -m attnpatch ARGS`` (a free port of its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "attnpatch", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def main(*args) -> tuple[int, str, str]:
    """``attnpatch.cli.main(ARGS)`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from attnpatch import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


# wan-shapes: 4 heads, 9 frames of 32x32 -> 5x8x8 tokens (self-attention split), text not split (cross-attention)
WAN = ["generate", "--model", "builtin:wan-shapes", "--prompt", "a large red square moving right", "--steps", "2",
       "--video-format", "png", "--quiet"]


@pytest.mark.parametrize("args", [pytest.param(ARGS, marks=needs_flux, id="flux"),
                                  pytest.param(WAN, marks=[pytest.mark.slow, pytest.mark.skipif(
                                      not (ROOT / "attnpatch/models/weights/wan-shapes").is_dir(), reason="no wan-shapes")],
                                               id="wan")])
def test_torchrun_rank0_writes_the_single_process_output(tmp_path, args):
    r = torchrun(*args, "--method", METHOD, "--parallel", "ulysses=2", "--out", str(tmp_path / "par"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == sorted(["report.json", "report.md", OUT[args[2]]])
    assert r.stdout.count("calls through Neighborhood") == 1, r.stdout  # rank 0 speaks, rank 1 is silent
    report = json.loads((tmp_path / "par" / "report.json").read_text())
    assert report["parallel"] == "ulysses=2" and report["backend"] == "gloo" and report["world_size"] == 2
    assert report["stats"]["routed"] > 0 and not report["stats"]["handed_back"], report["stats"]  # never quietly stock
    for method, name in ((METHOD, "single"), ("Dense", "dense")):
        code, _, err = main(*args, "--method", method, "--out", str(tmp_path / name))
        assert code == 0, err
    par, single, dense = (frames(tmp_path / d / OUT[args[2]]) for d in ("par", "single", "dense"))
    assert abs(par - single).max() <= 1  # within 1/255 of one process (pixel-equal here)
    assert abs(single - dense).max() > 8  # the method changes the output: the equality above means something


OUT = {"builtin:flux-shapes": "patched_0.png", "builtin:wan-shapes": "patched_0"}  # an image; a folder of frames


def frames(path: Path):
    """An image, or a video's frames stacked, as integers."""
    import numpy as np

    return pixels(path) if path.is_file() else np.stack([pixels(f) for f in sorted(path.glob("frame_*.png"))])


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model or starting the process group fails the test: every usage error comes before."""
    from attnpatch.cli import parallel_cli, runner

    def never(*a, **k):
        raise AssertionError("the model loaded / the process group started before the usage error")

    monkeypatch.setattr(runner, "load", never)
    monkeypatch.setattr(parallel_cli, "_start", never)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _ranks(mp, world: int):
    mp.setenv("RANK", "0"), mp.setenv("WORLD_SIZE", str(world)), mp.setenv("LOCAL_RANK", "0")


def _usage(tmp_path, *args, model="builtin:flux-shapes") -> str:
    argv = [*ARGS, "--method", METHOD, "--out", str(tmp_path / "o"), *args]
    argv[argv.index("builtin:flux-shapes")] = model
    code, _, err = main(*argv)
    assert code == 2 and "Traceback" not in err, err
    return err


def test_not_under_torchrun_or_wrong_world_size(no_load, tmp_path):
    err = _usage(tmp_path, "--parallel", "ulysses=2")
    assert "not started by torchrun" in err and "torchrun --nproc-per-node 2 -m attnpatch generate" in err
    _ranks(no_load, 3)
    err = _usage(tmp_path, "--parallel", "ulysses=2")
    assert "needs 2 processes but torchrun started 3" in err and "--nproc-per-node 2" in err


@pytest.mark.parametrize("spec, said", [
    ("ring=2", "refuses ring (and unified) attention"), ("ulysses=2,ring=2", "use Ulysses: --parallel ulysses=4"),
    ("ulysses", "expected ulysses=N"), ("tensor=2", "unknown kind tensor"), ("ulysses=1", "ulysses=1 is one process")])
def test_bad_parallel_spec(no_load, tmp_path, spec, said):
    _ranks(no_load, 2)
    assert said in _usage(tmp_path, "--parallel", spec)


@needs_flux
def test_heads_that_do_not_split(no_load, tmp_path):
    _ranks(no_load, 3)  # flux-shapes has 4 heads
    err = _usage(tmp_path, "--parallel", "ulysses=3")
    assert "has 4 attention heads, which do not split over 3 ranks; use a degree dividing 4: 2, 4" in err


def test_family_without_cp_plan_names_those_with_one(no_load, tmp_path):
    """An SD3 pipeline folder (configs only: the check reads them, nothing loads)."""
    folder = tmp_path / "sd3"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                         "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    _ranks(no_load, 2)
    err = _usage(tmp_path, "--parallel", "ulysses=2", model=str(folder))
    assert "SD3Transformer2DModel, which has no context-parallel plan (_cp_plan)" in err
    assert "families that have one: Flux, Wan, LTX-Video" in err and "without --parallel" in err


def test_language_model_and_refine_refused(no_load, tmp_path):
    _ranks(no_load, 2)
    code, _, err = main("generate", "--model", "builtin:smollm2", "--method", "SinkWindow", "--parallel", "ulysses=2",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "is a language model" in err
    assert "--refine-from is not supported" in _usage(tmp_path, "--parallel", "ulysses=2", "--refine-from", "32")


@needs_flux
@pytest.mark.slow
def test_torchrun_compare(tmp_path):
    """--compare under torchrun: stock (diffusers' own Ulysses attention) and the method, rank 0 saves both."""
    r = torchrun(*ARGS, "--method", METHOD, "--parallel", "ulysses=2", "--compare", "--repeats", "1",
                 "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["patched_0.png", "stock_0.png"]
    assert r.stdout.count("speedup") == 1 and "PSNR" in r.stdout
    assert abs(pixels(tmp_path / "c" / "patched_0.png") - pixels(tmp_path / "c" / "stock_0.png")).max() > 8


def test_a_sequence_that_does_not_split_is_a_usage_error():
    """diffusers' own check (a bare assertion on the first denoiser call) becomes a message naming the sizes."""
    import torch
    from diffusers.hooks.context_parallel import EquipartitionSharder

    from attnpatch.cli import parallel_cli
    from attnpatch.cli.runner import UsageError

    class Mesh:
        size = staticmethod(lambda: 2)

    with pytest.raises(UsageError, match=r"not a multiple of 2\): choose --height / --width / --frames"):
        with parallel_cli.shards(2):
            EquipartitionSharder.shard(torch.zeros(1, 81, 4), 1, Mesh())
    with pytest.raises(AssertionError, match="other"), parallel_cli.shards(2):  # any other assertion: as it was
        raise AssertionError("other")
