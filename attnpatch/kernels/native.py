"""Native CPU kernels: C sources shipped with the package (``*.c`` next to this file), compiled on first use with the
machine's C compiler for its own CPU (``-march=native``) and loaded with ctypes. No torch headers and no build step at
install: a compile takes about a second; the library is cached per source, compiler flags and CPU in
``$ATTNPATCH_CACHE`` (default ``~/.cache/attnpatch``) under ``native/``. Where there is no compiler, the CPU lacks what a
source needs (``#error``), or ``ATTNPATCH_NATIVE=0``, ``library`` says why and the kernels that need it decline the call
(``why_not``), so ``kernels.select`` falls back to the torch kernels and logs the reason."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_LOADED: dict[str, tuple] = {}  # source name -> (ctypes library or None, why not)


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNPATCH_CACHE") or Path.home() / ".cache" / "attnpatch") / "native"


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU model and flags line (a library built on one CPU may use
    instructions another lacks, e.g. a shared home directory on a mixed cluster)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines) or platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def library(name: str) -> tuple:
    """``(ctypes.CDLL, None)`` for the source ``<name>.c``, compiled once per process (and cached on disk), or
    ``(None, why)``."""
    with _LOCK:
        if name not in _LOADED:
            _LOADED[name] = _build(name)
        return _LOADED[name]


def _build(name: str) -> tuple:
    if os.environ.get("ATTNPATCH_NATIVE", "1") == "0":
        return None, "native kernels are off (ATTNPATCH_NATIVE=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native kernels are written for x86-64 (AVX2), not {platform.machine()}"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler found (install gcc or set CC) to build the native kernels"
    src = _HERE / f"{name}.c"
    tag = hashlib.sha256("\n".join([src.read_text(), cc, " ".join(FLAGS), _cpu()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{tag}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: a private temporary folder for this process
            out = Path(tempfile.mkdtemp(prefix="attnpatch-native-")) / out.name
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        try:
            res = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"compiling {src.name} with {cc} failed: {e}"
        if res.returncode != 0:
            err = (res.stderr.strip().splitlines() or ["no message"])
            why = next((ln for ln in err if "#error" in ln), err[-1])
            return None, f"compiling {src.name} with {cc} failed: {why.strip()}"
        os.replace(tmp, out)  # atomic: another process compiling the same source loads a whole file
    try:
        return ctypes.CDLL(str(out)), None
    except OSError as e:
        return None, f"loading {out} failed: {e}"
