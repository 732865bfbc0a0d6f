"""Shared helpers of the benchmark scripts: timing, machine description, result tables."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attnpatch.tools.timing import timeit, timeit_interleaved  # noqa: F401  (re-exported for the scripts)


RESULTS = Path(__file__).resolve().parent / "results"  # committed: full runs only
SCRATCH = Path(tempfile.gettempdir()) / "attnpatch-bench"  # where quick / partial runs go by default


def out_stem(name: str, out: str | None, partial: str | None = None) -> Path:
    """Where a run writes ``<stem>.md`` / ``.json``: ``--out`` when given; else the committed
    ``benchmarks/results/<name>`` for a full run, and a scratch folder for a quick or partial one
    (``partial`` says why), so a smoke test never overwrites the committed tables unless asked."""
    if out is not None:
        return Path(out)
    if partial is None:
        return RESULTS / name
    stem = SCRATCH / name
    print(f"{partial} run: writing {stem}.{{md,json}}, not the committed {RESULTS / name}.{{md,json}} "
          "(--out names another place)", file=sys.stderr)
    return stem


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``(key, header)`` columns; floats to 2-3 digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(out: Path, title: str, intro: str, md_body: str, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    m = data["machine"]
    head = f"# {title}\n\nMeasured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), " \
           f"torch {m['torch']}{', GPU ' + m['gpu'] if 'gpu' in m else ''}.\n\n{intro}\n\n"
    out.with_suffix(".md").write_text(head + md_body + "\n")


def pick_device(parser, device: str) -> str:
    """``--device``: "auto" is cuda when a GPU is visible; an explicit cuda without one is a usage error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    return device


def bench_dtype(device: str) -> torch.dtype:
    """float32 on the CPU (its fast path), bfloat16 on a GPU (what models run there)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def to_device(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    """A model's keyword inputs on ``device``, floating tensors cast to ``dtype`` (as the pipelines pass them)."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}
