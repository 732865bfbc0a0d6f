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


def parse_method(spec: str, settings: list[str] = ()):
    """A method instance from ``Name`` or ``Name(k=v, ...)`` plus ``k=v`` settings."""
    from .. import methods

    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name = name.strip()
    if name not in method_names() or name == "Sparse":
        raise UsageError(f"unknown method {name!r}; valid: {', '.join(n for n in method_names() if n != 'Sparse')}")
    cls = getattr(methods, name)
    kwargs = {}
    if rest:
        if not rest.rstrip().endswith(")"):
            raise UsageError(f"method {spec!r}: missing ')'")
        try:
            call = ast.parse(f"f({rest}", mode="eval").body
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            if call.args:
                raise UsageError(f"method {spec!r}: give parameters by name, e.g. {name}(window=7)")
        except (SyntaxError, ValueError) as e:
            raise UsageError(f"method {spec!r}: cannot parse its parameters ({e})") from None
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq:
            raise UsageError(f"--set {s!r}: expected key=value")
        kwargs[key.strip()] = _literal(value.strip())
    valid = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    valid.sort(key=lambda n: n in ("dense_steps", "dense_layers", "profile"))  # the method's own first, then the schedule
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


def load(spec: str, device: str = "cpu", dtype: str = "float32") -> Loaded:
    """``builtin:NAME``, a local folder (diffusers pipeline or transformers model) or a hub id."""
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if tdtype is None:
        raise UsageError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    if spec.startswith("builtin:"):
        from .. import models

        name = spec.split(":", 1)[1]
        if name not in models.BUILTIN:
            raise UsageError(f"unknown builtin model {name!r}; available: {', '.join('builtin:' + n for n in models.BUILTIN)}")
        if name == "smollm2":
            model, tok = models.smollm2(dtype=tdtype, device=device)
            return Loaded("llm", model, tok, name, BUILTIN_PROMPTS[name])
        pipe = models.load(name, dtype=tdtype, device=device)
        return Loaded("diffusion", pipe, None, name, BUILTIN_PROMPTS[name])
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--model {spec!r} is a file; give a folder, a hub id or builtin:NAME")
    is_pipe = (path / "model_index.json").is_file() if path.is_dir() else None
    name = path.name if path.is_dir() else spec.replace("/", "--")
    try:
        if is_pipe or (is_pipe is None and _hub_is_pipeline(spec)):
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=tdtype).to(device)
            return Loaded("diffusion", pipe, None, name, ["a photo of a cat"])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=tdtype).to(device).eval()
        return Loaded("llm", model, AutoTokenizer.from_pretrained(spec), name, ["Hello"])
    except OSError as e:
        raise UsageError(f"cannot load {spec!r}: {str(e).splitlines()[0]} (no model hub is reachable offline: use a "
                         "local folder or builtin:NAME)") from None


def _hub_is_pipeline(spec: str) -> bool:
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(spec, "model_index.json")
        return True
    except Exception:  # noqa: BLE001 (any failure: not a diffusers repo, or offline)
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
