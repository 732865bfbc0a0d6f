"""Run the upstream diffusers / transformers model tests three times: stock, every model patched with
``attnpatch.Dense()`` (identity) and with a covering sparse method (every key kept, so outputs must
equal stock), and report the patched-only failures.

    python benchmarks/upstream/run.py                     # everything (see README.md here)
    python benchmarks/upstream/run.py --suites flux,llama --modes stock,dense

Test sources live in a cache folder outside the repo (``--cache``, default
~/.cache/attnpatch-upstream); nothing from them is copied into this repository.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import report  # noqa: E402
import tf_tree  # noqa: E402

DIFFUSERS = ("flux", "sd3", "wan", "hunyuan_video", "cogvideox", "ltx", "mochi")
TRANSFORMERS = tuple(tf_tree.FAMILIES)
MODES = ("stock", "dense", "sparse")
ORDER = ("flux", "sd3", "wan", "llama", "gemma2", "hunyuan_video", "cogvideox", "ltx", "mochi", "gemma3", "qwen3",
         "mistral", "qwen2", "gemma")  # most used first, so a partial run covers them
EXTRA = ("parameterized", "peft")  # test-only imports not installed with the library: into the cache only


def sh(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def sdist(cache: Path, name: str) -> Path:
    """The installed version's source distribution, unpacked in the cache."""
    ver = version(name)
    root = cache / f"{name}-{ver}"
    if not root.exists():
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{name}=={ver}",
            "-d", str(cache)], stdout=subprocess.DEVNULL)
        with tarfile.open(cache / f"{name}-{ver}.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return root


def extras(cache: Path) -> Path:
    site = cache / "site"
    missing = [p for p in EXTRA if not (site / p).exists()]
    if missing:
        sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *missing])
    return site


def diffusers_tests(cache: Path, given: str | None) -> tuple[Path, str]:
    """Folder holding diffusers' tests/ and a note on where it came from."""
    root = sdist(cache, "diffusers")
    if (root / "tests" / "models" / "transformers").is_dir():
        return root, f"diffusers {version('diffusers')} sdist"
    have = sorted(p.name for p in (root / "tests").iterdir()) if (root / "tests").is_dir() else []
    note = f"the diffusers {version('diffusers')} sdist ships tests/ = {have} only (no model tests)"
    path = Path(given or os.environ.get("ATTNPATCH_UPSTREAM_DIFFUSERS", cache / "diffusers-gh")).expanduser()
    if not (path / "tests" / "models" / "transformers").is_dir():
        sys.exit(f"{note}: give a diffusers source checkout with --diffusers PATH (a folder holding tests/), "
                 f"e.g. git clone --depth 1 https://github.com/huggingface/diffusers {path}")
    return path, f"{note}; model tests from the checkout at {path}"


def run_suite(kind: str, suite: str, mode: str, root: Path, site: Path, logs: Path, timeout: int) -> Path:
    log = logs / f"{kind}-{suite}-{mode}.jsonl"
    log.unlink(missing_ok=True)
    test = (f"tests/models/transformers/test_models_transformer_{suite}.py" if kind == "diffusers"
            else f"tests/models/{suite}/test_modeling_{suite}.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTNPATCH_UPSTREAM_MODE=mode, ATTNPATCH_UPSTREAM_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), str(site)]), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "attnpatch_upstream_plugin",
           f"--timeout={timeout}", "-W", "ignore", test]
    t0 = time.time()
    with open(logs / f"{kind}-{suite}-{mode}.out", "w") as out:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"{kind}/{suite}/{mode}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    (logs / f"{kind}-{suite}-{mode}.meta").write_text(
        f"{time.strftime('%H:%M UTC', time.gmtime(t0))}, attnpatch {head.stdout.strip()}, {time.time() - t0:.0f} s\n")
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suites", default=",".join(ORDER))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cache", default="~/.cache/attnpatch-upstream")
    p.add_argument("--diffusers", default=None, help="diffusers source checkout (folder with tests/)")
    p.add_argument("--timeout", type=int, default=120, help="per-test timeout (pytest-timeout), seconds")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "upstream"),
                   help="writes OUT.md and OUT.json")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cached logs")
    a = p.parse_args(argv)
    cache = Path(a.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    suites, modes = a.suites.split(","), a.modes.split(",")
    tf_root = cache / "tf-tests"
    tf_tree.build(sdist(cache, "transformers") / "tests", tf_root)
    tf_note = (f"transformers {version('transformers')} sdist: tests/test_modeling_common.py (ModelTesterMixin) "
               "and test_configuration_common.py as shipped; the sdist has no tests/models/, generation or export "
               "tests, so each family gets a generated tiny-config test class (benchmarks/upstream/tf_tree.py) and "
               "GenerationTesterMixin / ExportTesterMixin are empty stubs")
    df_root, df_note = (None, "") if not any(s in DIFFUSERS for s in suites) else diffusers_tests(cache, a.diffusers)
    site = extras(cache)
    if not a.report_only:
        for suite in suites:
            kind = "diffusers" if suite in DIFFUSERS else "transformers"
            for mode in modes:
                run_suite(kind, suite, mode, df_root if kind == "diffusers" else tf_root, site, logs, a.timeout)
    report.write(Path(a.out), logs, suites, modes, {"diffusers": df_note, "transformers": tf_note}, DIFFUSERS)


if __name__ == "__main__":
    main()
