"""What the CLI runs: models by name (``builtin:NAME``, a hub id or a local folder, one code
path), methods from text (``SlidingTile(tile=4, window=(1, 3))`` plus ``key=value`` settings),
and one generation of a diffusion pipeline or an LLM, timed."""
from __future__ import annotations

import ast
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._extras import require


class UsageError(ValueError):
    """Bad input from the command line: exit code 2 with this message."""


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses: "A(x=(1, 2)),B" -> ["A(x=(1, 2))", "B"]."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def method_names() -> list[str]:
    from .. import methods

    return ["Dense", *methods._FILES]


def parameters(cls) -> list[str]:
    """A method's parameter names: its own first, then the schedule's."""
    valid = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    return sorted(valid, key=lambda n: n in ("dense_steps", "dense_layers", "profile"))


def parse_call(spec: str, what: str, example: str) -> tuple[str, dict]:
    """``Name`` or ``Name(k=v, ...)`` -> (name, keyword values as Python literals); ``what`` ("method",
    "cache") and ``example`` (e.g. "window=7") name the thing in errors."""
    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name, kwargs = name.strip(), {}
    if rest:
        if not rest.rstrip().endswith(")"):
            raise UsageError(f"{what} {spec!r}: missing ')'")
        try:
            call = ast.parse(f"f({rest}", mode="eval").body
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise UsageError(f"{what} {spec!r}: cannot parse its parameters ({e})") from None
        if call.args:
            raise UsageError(f"{what} {spec!r}: give parameters by name, e.g. {name}({example})")
    return name, kwargs


def parse_method(spec: str, settings: list[str] = ()):
    """A method instance from ``Name`` or ``Name(k=v, ...)`` plus ``k=v`` settings."""
    from .. import methods

    name = spec.strip().partition("(")[0].strip()
    if name not in method_names() or name == "Sparse":  # the name first: an unknown one is the likelier typo
        raise UsageError(f"unknown method {name!r}; valid: {', '.join(n for n in method_names() if n != 'Sparse')}")
    cls = getattr(methods, name)
    _, kwargs = parse_call(spec, "method", "window=7")
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq:
            raise UsageError(f"--set {s!r}: expected key=value")
        kwargs[key.strip()] = _literal(value.strip())
    valid = parameters(cls)
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise UsageError(f"{name} has no parameter {', '.join(map(repr, bad))}; valid: {', '.join(valid) or '(none)'}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


@dataclass
class Loaded:
    kind: str  # "diffusion" or "llm"
    obj: object  # the pipeline or the model
    tokenizer: object = None
    name: str = ""
    prompts: list = field(default_factory=list)  # defaults when the user gives none
    call: dict = field(default_factory=dict)  # default call arguments


BUILTIN_PROMPTS = {
    "flux-shapes": ["a large red circle at the top left", "a large blue square in the center", "a small yellow triangle on the right",
                    "a large green circle at the bottom"],
    "wan-shapes": ["a large red square moving right", "a large blue circle moving down"],
    "smollm2": ["What is the capital of France?", "Write one sentence about the sea."],
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_device(device: str) -> torch.device:
    """The device, or a UsageError before anything loads (a missing GPU used to fail after the model load)."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return d
    backend = torch.backends.mps if d.type == "mps" else getattr(torch, d.type, None)
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise UsageError(f"--device {device}: no {d.type.upper()} device is visible to torch "
                         f"(torch.{d.type}.is_available() is False); use --device cpu")
    if d.index is not None and hasattr(backend, "device_count") and d.index >= backend.device_count():
        raise UsageError(f"--device {device}: torch sees {backend.device_count()} {d.type} device(s); "
                         f"use {d.type}:0 to {d.type}:{backend.device_count() - 1}")
    return d


@dataclass
class Source:
    """Where ``--model`` points, worked out without loading it."""
    spec: str
    name: str  # for default output folders
    kind: str  # "builtin", "folder" or "hub"
    is_pipe: bool | None = None  # None: ask the hub when loading
    local_only: bool = False  # a hub id found in the local cache while the hub is unreachable


def resolve(spec: str) -> Source:
    """Check ``--model`` before any load: builtin names, local folders (a model config and, for
    an LLM, a tokenizer), hub ids (offline: only from the local cache, decided in a second)."""
    if spec.startswith("builtin:"):
        from .. import models

        name = spec.split(":", 1)[1]
        if name not in models.BUILTIN:
            raise UsageError(f"unknown builtin model {name!r}; available: {', '.join('builtin:' + n for n in models.BUILTIN)}")
        return Source(spec, name, "builtin", name != "smollm2")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(spec, path)
    if path.exists():
        raise UsageError(f"--model {spec!r} is a file; give a folder, a hub id or builtin:NAME")
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        raise UsageError(f"--model {spec!r}: no such folder (give an existing save_pretrained folder, a hub id "
                         "owner/name or builtin:NAME)")
    return _hub(spec)


def _folder(spec: str, path: Path) -> Source:
    if (path / "model_index.json").is_file():
        return Source(spec, path.resolve().name, "folder", True)
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {spec!r}: the folder has neither model_index.json (a diffusers pipeline) nor "
                         "config.json (a transformers model); give a folder written by save_pretrained")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"--model {spec!r}: the folder has a model but no tokenizer (no tokenizer.json or "
                         "tokenizer_config.json); save the one it was trained with beside it: "
                         f"AutoTokenizer.from_pretrained(<base model>).save_pretrained({str(path)!r})")
    return Source(spec, path.resolve().name, "folder", False)


def _hub(spec: str) -> Source:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise UsageError(f"--model {spec!r}: no such folder, and not a hub id (owner/name)") from None
    name = spec.replace("/", "--")
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    if why is None:
        return Source(spec, name, "hub")
    cached = {f: isinstance(try_to_load_from_cache(spec, f), str) for f in ("model_index.json", "config.json")}
    if not any(cached.values()):
        raise UsageError(f"--model {spec!r}: no such local folder, and the Hugging Face hub cannot be used ({why}) and "
                         "the model is not in the local cache: give a local folder or builtin:NAME, or download it first "
                         "where the hub is reachable (HF_HUB_OFFLINE=1 skips the hub check)")
    return Source(spec, name, "hub", cached["model_index.json"], local_only=True)


def _hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the hub opens within ``timeout`` s, else why not. One
    probe instead of the hub client's ~60 s of retries; DNS runs in a thread so it cannot hang."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result = [f"no answer from {host} within {timeout:.0f} s"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = f"{host} is unreachable: {e}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0]


def load(spec: str, device: str = "cpu", dtype: str = "float32") -> Loaded:
    """``builtin:NAME``, a local folder (diffusers pipeline or transformers model) or a hub id."""
    tdtype = DTYPES.get(dtype)
    if tdtype is None:
        raise UsageError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    check_device(device)
    require("diffusers", "transformers", what="loading a model in the attnpatch CLI")
    src = resolve(spec)
    if src.kind == "builtin":
        from .. import models

        if src.name == "smollm2":
            model, tok = models.smollm2(dtype=tdtype, device=device)
            return Loaded("llm", model, tok, src.name, BUILTIN_PROMPTS[src.name])
        pipe = models.load(src.name, dtype=tdtype, device=device)
        return Loaded("diffusion", pipe, None, src.name, BUILTIN_PROMPTS[src.name])
    kw = dict(dtype=tdtype, local_files_only=src.local_only)
    try:
        if src.is_pipe or (src.is_pipe is None and _hub_is_pipeline(spec)):
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec, **kw).to(device)
            return Loaded("diffusion", pipe, None, src.name, ["a photo of a cat"])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, local_files_only=src.local_only)  # first: it fails in a second, the model in minutes
        model = AutoModelForCausalLM.from_pretrained(spec, **kw).to(device).eval()
        return Loaded("llm", model, tok, src.name, ["Hello"])
    except OSError as e:
        raise UsageError(f"cannot load {spec!r}: {str(e).splitlines()[0]}") from None


def _hub_is_pipeline(spec: str) -> bool:
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(spec, "model_index.json")
        return True
    except Exception:  # noqa: BLE001 (any failure: not a diffusers repo)
        return False


def run(loaded: Loaded, prompts: list[str], seed: int, steps: int | None = None, max_new_tokens: int = 48, **call):
    """(output, seconds): images (N, 3, H, W) / frames (N, T, 3, H, W) in [0, 1], or generated token ids."""
    t = time.perf_counter()
    if loaded.kind == "diffusion":
        kw = {**loaded.call, **{k: v for k, v in call.items() if v is not None}}
        if steps:
            kw["num_inference_steps"] = steps
        out = loaded.obj(prompts, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw)
        result = out.images if hasattr(out, "images") else torch.as_tensor(out.frames)
        return result.float().cpu(), time.perf_counter() - t
    tok, model = loaded.tokenizer, loaded.obj
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if getattr(tok, "chat_template", None) else p for p in prompts]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
    torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].cpu(), time.perf_counter() - t


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of generated positions where two greedy runs chose the same token."""
    n = min(a.shape[1], b.shape[1])
    return (a[:, :n] == b[:, :n]).float().mean().item() if n else 1.0
