#!/usr/bin/env bash
# Every GPU check of the performance work in one call, sized for one H100/H200 and at most 8 minutes:
#   1. the CUDA tests (tests/test_cuda.py): a tracked forward under torch.cuda.set_sync_debug_mode("error"),
#      the bf16 split product against float64, side-stream spectra, the tracker and callback on the GPU; and
#      a model split over the GPU and the CPU by device_map="auto", probed (tests/probe/test_big_models.py);
#   2. accumulator throughput (split product vs IEEE fp32 vs one bf16 GEMM), eigendecomposition
#      (batched vs side streams), probe throughput (GPT-2-small shape, tracked vs plain forward, bf16),
#      training overhead (GPT-2 small's shape in bf16, 64k tokens per step: --shape gpt2-small --batch 512),
#      routed-expert overhead (Mixtral- and Qwen3-MoE-shaped layers, all experts and a round-robin share);
#   3. the CUDA scaling plot redrawn and SUMMARY.md regenerated.
# Results go to benchmarks/results/perf/ (*_cuda-<gpu>.json, scaling_cuda-<gpu>.png, SUMMARY.md) and the
# log to benchmarks/results/perf/run_gpu.log; commit what it wrote.
#
#   bash benchmarks/perf/run_gpu.sh            run (PYTHON=... picks the interpreter; default .venv's, else python)
#   bash benchmarks/perf/run_gpu.sh --dry-run  print the plan, with each step's time limit, and run nothing
#
# Each step has its own time limit, and a step that fails or runs out of time is reported and skipped,
# so one slow benchmark never costs the others their results. The limits add up to 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
OUT=benchmarks/results/perf
LOG=$OUT/run_gpu.log

# seconds | command (run from the repository root)
STEPS=(
    "90|$PYTHON -m pytest tests/test_cuda.py tests/probe/test_big_models.py::test_cuda_auto_device_map_over_gpu_and_cpu -q -p no:xdist"
    "50|$PYTHON benchmarks/perf/accumulator_throughput.py --device cuda"
    "70|$PYTHON benchmarks/perf/eigendecomposition.py --device cuda --quick"
    "60|$PYTHON benchmarks/perf/probe_throughput.py --device cuda"
    "110|$PYTHON benchmarks/perf/training_overhead.py --device cuda --quick --skip-sweep --shape gpt2-small --batch 512"
    "40|$PYTHON benchmarks/perf/moe_overhead.py --device cuda --quick"
    "40|$PYTHON benchmarks/perf/scaling_plot.py --device cuda --quick"
    "20|$PYTHON benchmarks/perf/summarize.py"
)

total=0
for step in "${STEPS[@]}"; do total=$((total + ${step%%|*})); done
if [ "$DRY_RUN" = 1 ]; then
    for step in "${STEPS[@]}"; do printf '%4ss  %s\n' "${step%%|*}" "${step#*|}"; done
    echo "total limit: ${total}s"
    exit 0
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA device is visible to $PYTHON; nothing was run" >&2
    exit 2
fi
mkdir -p "$OUT"
: > "$LOG"
failed=()
for step in "${STEPS[@]}"; do
    limit=${step%%|*}
    command=${step#*|}
    echo "== [$limit s] $command" | tee -a "$LOG"
    start=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" $command 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    echo "-- exit $status after $(($(date +%s) - start)) s" | tee -a "$LOG"
    [ "$status" -ne 0 ] && failed+=("$command (exit $status)")
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'run_gpu.sh: %d step(s) did not finish:\n' "${#failed[@]}" | tee -a "$LOG"
    printf '  %s\n' "${failed[@]}" | tee -a "$LOG"
    exit 1
fi
echo "run_gpu.sh: all steps finished; commit $OUT" | tee -a "$LOG"
