"""Turn the plugin's JSON-lines logs into benchmarks/results/upstream.{md,json}."""
from __future__ import annotations

import json
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

RANK = {"error": 5, "failed": 4, "xpassed": 3, "passed": 2, "xfailed": 1, "skipped": 0}

# (class, pattern on "test name: error"), first match wins. "known:" = a defect listed in issue 16.
RULES = [
    ("eager attention weights by design", r"attention_outputs|retain_grad_hidden_states_attentions|output_attentions"
                                          r"|attentions\b"),
    ("checks the attn_implementation name", r"sdpa_can_dispatch|can_set_attention_dynamically|attn_implementation|eager_matches"),
    ("known: autograd through tiles buffers", r"index_select\(\): functions with out="),
    ("known: autograd, backward through the graph twice", r"backward through the graph a second time"),
    ("known: autograd through flex on CPU", r"FlexAttention does not support backward"),
    ("known: processor rebuild (load_ip_adapter / processor.__class__())", r"_Wrapped\.__init__|load_ip_adapter"),
    ("known: deepcopy of a patched model", r"deepcopy|not patched"),
]


def classify(test: str, error: str) -> str:
    text = f"{test.split('::')[-1]}: {error}"
    for name, pat in RULES:
        if re.search(pat, text):
            return name
    return "NEW: to classify"


def _fold(old: dict, new: dict) -> dict:
    """One record per test: the worst outcome; calls, errors against the reference merged."""
    worst = new if RANK[new["outcome"]] > RANK[old["outcome"]] else old
    out = dict(worst)
    out["attnpatch_calls"] = max(old["attnpatch_calls"], new["attnpatch_calls"])
    out["max_err"] = max(old.get("max_err", 0.0), new.get("max_err", 0.0))
    for key in ("mismatch", "ref_errors"):
        out[key] = (old.get(key) or []) + [x for x in new.get(key) or [] if x not in (old.get(key) or [])]
    return out


def outcomes(log: Path) -> dict:
    """nodeid -> one record (subtests and phases folded into their test)."""
    tests: dict = {}
    if not log.exists():
        return tests
    for line in log.read_text().splitlines():
        r = json.loads(line)
        tests[r["test"]] = r if r["test"] not in tests else _fold(tests[r["test"]], r)
    return tests


def _count(tests: dict) -> dict:
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for r in tests.values():
        key = {"error": "failed", "xpassed": "passed", "xfailed": "skipped"}.get(r["outcome"], r["outcome"])
        c[key] += 1
    c["routed"] = sum(1 for r in tests.values() if r["attnpatch_calls"] > 0)
    return c


def _suite(logs: Path, kind: str, suite: str, modes: list[str]) -> dict:
    runs = {m: outcomes(logs / f"{kind}-{suite}-{m}.jsonl") for m in modes}
    meta = {m: (logs / f"{kind}-{suite}-{m}.meta").read_text().strip() for m in modes
            if (logs / f"{kind}-{suite}-{m}.meta").exists()}
    out = {"kind": kind, "suite": suite, "counts": {m: _count(t) for m, t in runs.items() if t}, "runs": meta,
           "patched_only": [], "patch_errors": sorted({e for t in runs.values() for r in t.values()
                                                      for e in r.get("patch_errors", [])})}
    out["mismatch"] = [{"mode": m, "test": t, "max_err": r["max_err"], "detail": r["mismatch"][:2]}
                       for m, tests in runs.items() for t, r in sorted(tests.items()) if r.get("mismatch")]
    out["ref_errors"] = sorted({e for tests in runs.values() for r in tests.values() for e in r.get("ref_errors") or []})
    out["max_err"] = {m: max([r.get("max_err", 0.0) for r in tests.values()] or [0.0]) for m, tests in runs.items()}
    stock = runs.get("stock", {})
    for m in modes:
        if m == "stock":
            continue
        for test, r in sorted(runs[m].items()):
            before = stock.get(test, {}).get("outcome", "not run")
            if r["outcome"] in ("failed", "error") and before not in ("failed", "error"):
                out["patched_only"].append({"mode": m, "test": test, "error": r["error"], "stock": before,
                                            "class": classify(test, r["error"])})
    return out


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def write(out: Path, logs: Path, suites: list[str], modes: list[str], notes: dict, diffusers: tuple) -> None:
    rows = [_suite(logs, "diffusers" if s in diffusers else "transformers", s, modes) for s in suites]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "attnpatch_commit": _git_head(),
            "machine": f"2-core CPU ({platform.machine()}), no GPU", "torch": version("torch"),
            "diffusers": version("diffusers"), "transformers": version("transformers"), "sources": notes,
            "modes": {"stock": "no patching", "dense": "attnpatch.Dense()",
                      "sparse": "covering sparse: transformers SinkWindow(sink=4, window=10**6, block=16); "
                                "diffusers Neighborhood(window=10**6, dense_steps=0)"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "suites": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(meta, rows, modes))
    print(f"wrote {out.with_suffix('.md')} and .json")


def _markdown(meta: dict, rows: list, modes: list[str]) -> str:
    lines = [f"# Upstream model tests with every model patched ({meta['date']})", "",
             f"Machine: {meta['machine']}. attnpatch {meta['attnpatch_commit']}, torch {meta['torch']}, "
             f"diffusers {meta['diffusers']}, transformers {meta['transformers']}. "
             "Command: `python benchmarks/upstream/run.py` (see benchmarks/upstream/README.md).", ""]
    lines += [f"- {k}: {v}" for k, v in meta["modes"].items()] + [""]
    lines += [f"- sources, {k}: {v}" for k, v in meta["sources"].items() if v] + [""]
    head = "| suite | " + " | ".join(f"{m} pass / fail / skip" for m in modes) + " | patched-only failures |"
    lines += [head, "|" + "---|" * (len(modes) + 2)]
    for r in rows:
        cells = []
        for m in modes:
            c = r["counts"].get(m)
            routed = f" ({c['routed']} routed)" if c and m != "stock" else ""
            cells.append(f"{c['passed']} / {c['failed']} / {c['skipped']}{routed}" if c else "not run")
        lines.append(f"| {r['kind']}/{r['suite']} | " + " | ".join(cells) + f" | {len(r['patched_only'])} |")
    lines += ["", "(routed: tests in which at least one attention call went through attnpatch)", "",
              "Runs (start, attnpatch commit, `-dirty` = other helpers' uncommitted edits present, wall time):", ""]
    lines += [f"- {r['kind']}/{r['suite']}: " + "; ".join(f"{m} {v}" for m, v in r["runs"].items()) for r in rows]
    lines += ["",
              "## Patched-only failures (fail patched, not stock: passed or skipped there)", ""]
    groups: dict = {}  # (class, test name, error) -> where: one line per kind of failure
    for r in rows:
        for f in r["patched_only"]:
            was = "" if f["stock"] == "passed" else f" (stock {f['stock']})"
            key = (f["class"], f["test"].split("::")[-1], f["error"][:200])
            groups.setdefault(key, []).append(f"{r['suite']} {f['mode']}{was}")
    for (cls, test, err), where in sorted(groups.items()):
        lines.append(f"- **{cls}**: `{test}` — `{err}` — in {len(where)}: {', '.join(where)}")
    for r in rows:
        for e in r["patch_errors"]:
            lines.append(f"- {r['kind']}/{r['suite']}: patch() itself failed: `{e[:200]}`")
    lines += ["", "## Attention outputs against the float64 definition", "",
              "Every call routed through attnpatch in the dense / sparse runs is compared with dense attention "
              "computed from the definition in float64 (same q, k, v, mask, scale, softcap, causal offset); "
              "error = max |out - ref| / (1 + max |ref|), limit 1e-4 (float32) / 3e-2 (half). Both modes must "
              "give dense attention exactly.", "", "| suite | " + " | ".join(f"{m} max error" for m in modes
                                                                              if m != "stock") + " |",
              "|---|" + "---|" * (len(modes) - 1)]
    for r in rows:
        lines.append(f"| {r['kind']}/{r['suite']} | " + " | ".join(
            f"{r['max_err'][m]:.1e}" if r["counts"].get(m) else "not run" for m in modes if m != "stock") + " |")
    lines.append("")
    for r in rows:
        for x in r["mismatch"]:
            lines.append(f"- {r['kind']}/{r['suite']} [{x['mode']}] `{x['test'].split('::', 1)[1]}`: {x['detail']}")
        for e in r["ref_errors"]:
            lines.append(f"- {r['kind']}/{r['suite']}: reference could not read a call: `{e}`")
    notes = Path(__file__).with_name("notes.md")  # hand-written findings that a rerun keeps
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"
