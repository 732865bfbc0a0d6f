#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command, within 8 minutes:
#   the CUDA tests (pytest -m cuda, tests/test_triton.py, the kernel matrix on cuda) and the kernel,
#   pipeline, LLM, per-call and speed-curve benchmarks with --device cuda (bf16, sizes up to 64K),
#   each under its own timeout. Results and logs go to benchmarks/results/gpu/ with the GPU named;
#   summary.md / summary.json list every step (ok / failed / timed out / skipped) and its time.
#
#   benchmarks/gpu.sh               # on the GPU machine, from anywhere in the repo
#   benchmarks/gpu.sh --cpu-smoke   # no GPU: the same steps with --device cpu --quick (tests only
#                                   # collected), writing under $TMPDIR/attnpatch-bench/gpu-smoke
# Without a GPU (and without --cpu-smoke) it stops at once: "no CUDA device: ..." and exit 2.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
TOTAL=470  # seconds for all steps (8 minutes, less the summary): a step that would not fit is skipped
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1

if [ $SMOKE = 0 ]; then
    command -v nvidia-smi >/dev/null 2>&1 || { echo "no CUDA device: nvidia-smi not found; run benchmarks/gpu.sh on a machine with an NVIDIA GPU (benchmarks/gpu.sh --cpu-smoke checks the steps on the CPU)" >&2; exit 2; }
    GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    [ -n "$GPU" ] || { echo "no CUDA device: nvidia-smi lists no GPU" >&2; exit 2; }
    $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
        echo "no CUDA device: torch.cuda.is_available() is False (torch $($PY -c 'import torch; print(torch.__version__)' 2>/dev/null) built without CUDA?) although nvidia-smi shows $GPU" >&2; exit 2; }
    DEV=(--device cuda); Q=(); PQ=(); CQ=(); OUT=benchmarks/results/gpu; SCALE=1
else  # CPU smoke: quick sizes, one family each, 4x the timeouts (a CPU is slower than a GPU)
    GPU="none (--cpu-smoke)"; DEV=(--device cpu); Q=(--quick); OUT=${TMPDIR:-/tmp}/attnpatch-bench/gpu-smoke; SCALE=4
    PQ=(--families fixture); CQ=(--families wan)
    TOTAL=$((TOTAL * SCALE))
fi
mkdir -p "$OUT/logs"
STEPS="$OUT/logs/steps.tsv"
: > "$STEPS"
echo "GPU: $GPU; results under $OUT"

step() {  # step NAME TIMEOUT_S COMMAND...: run it under timeout, log it, record rc and seconds
    local name=$1 limit=$(($2 * SCALE)); shift 2
    local left=$((TOTAL - SECONDS))
    if [ "$left" -lt 20 ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" "$*" >> "$STEPS"; echo "== $name: skipped (8-minute budget spent)"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" "$*" >> "$STEPS"
    tail -n 3 "$OUT/logs/$name.log"
    echo "== $name: rc $rc in $((SECONDS - t0)) s"
}

PT=(-q -p no:cacheprovider)
[ $SMOKE = 1 ] && PT+=(--collect-only)
step pytest-cuda 120 $PY -m pytest "${PT[@]}" -m cuda tests          # conftest marks test_triton.py and every case parametrised on the cuda device
step kernels 90 $PY benchmarks/kernel_speed.py "${DEV[@]}" "${Q[@]}" --grids 128x128,13x30x52 --natten none --reps 10 --out "$OUT/kernels_cuda"
step pipelines 70 $PY benchmarks/pipelines.py "${DEV[@]}" "${Q[@]}" --part speed --reps 3 --out "$OUT/pipelines_cuda"
step llm 50 $PY benchmarks/llm.py "${DEV[@]}" "${Q[@]}" --part speed --out "$OUT/llm_cuda"
step percall 75 $PY benchmarks/percall.py "${DEV[@]}" "${Q[@]}" "${PQ[@]}" --budget-s 55 --out "$OUT/percall_cuda"
step curves 65 $PY benchmarks/curves.py "${DEV[@]}" "${Q[@]}" "${CQ[@]}" --budget-s 30 --out "$OUT/curves_cuda"

$PY - "$OUT" "$GPU" "$SMOKE" <<'EOF'
import json, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import machine
out, gpu, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
rows = []
for line in (out / "logs" / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit, cmd = line.split("\t")
    status = {"skipped": "skipped", "0": "ok", "124": "timed out", "137": "timed out"}.get(rc, "failed")
    if name == "pytest-cuda" and rc == "5":
        status = "no test marked cuda"
    rows.append(dict(step=name, status=status, rc=rc, seconds=int(secs), timeout=int(limit), log=f"logs/{name}.log", command=cmd))
m = {**machine(), "nvidia_smi": gpu}
(out / "summary.json").write_text(json.dumps(dict(machine=m, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  smoke=smoke, steps=rows), indent=1))
lines = [f"# GPU run: {m.get('gpu', gpu)}", "", f"nvidia-smi: {gpu}; torch {m['torch']}; {m['cpu']} ({m['cores']} cores); "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}" + (" (CPU smoke test, not GPU numbers)" if smoke else ""), "",
         "| step | status | seconds | timeout | log | command |", "|---|---|---|---|---|---|"]
lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['timeout']} | [{r['log']}]({r['log']}) | `{r['command']}` |" for r in rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
