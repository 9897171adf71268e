#!/usr/bin/env bash
# All nine experiments (the eight of the paper and moe) with the gpu-short preset on one H100/H200 in at most ~10 minutes, then their tables.
#
#   bash benchmarks/run_gpu_short.sh              # train; results in benchmarks/results/gpu-short/
#   bash benchmarks/run_gpu_short.sh --dry-run    # the plan only, no GPU and no data needed (or DRY_RUN=1)
#
# Before: `python benchmarks/pack_corpus.py` on the machine whose corpus the runs use (it writes the
# git-ignored benchmarks/data/gpu-short, ~23 MB); on the device tool name that folder in `carry`.
# One process per experiment, all at once (small models leave a GPU mostly idle between kernel launches);
# each is stopped after TIME_LIMIT seconds, and keeps every run that finished (the result file is written
# after each run; `--resume` again completes it). Then tables.py writes RESULTS/gpu-short/README.md.
#
# Environment: PYTHON (default python3), RESULTS (default benchmarks/results), TIME_LIMIT (default 540),
# THREADS (torch threads per process, default 2), LOGS (default $TMPDIR/nerve-gpu-short-logs), NERVE_GIT_COMMIT
# (the commit to record where the tree is a copy without .git).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
TIME_LIMIT=${TIME_LIMIT:-540}
THREADS=${THREADS:-2}
LOGS=${LOGS:-${TMPDIR:-/tmp}/nerve-gpu-short-logs}
DRY_RUN=${DRY_RUN:-0}
EXTRA=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) EXTRA+=("$arg") ;;  # passed to every run.py call (e.g. --set max_steps=500)
    esac
done
EXPERIMENTS=(optimizers llama_positional gpt2_width gpt2_normfree gpt2_weightnorm gpt2_norm_position gpt2_activations mixer moe)

if [ "$DRY_RUN" = 1 ]; then
    "$PYTHON" benchmarks/run.py "${EXPERIMENTS[@]}" --preset gpu-short --out "$RESULTS" --dry-run ${EXTRA[@]+"${EXTRA[@]}"}
    for name in "${EXPERIMENTS[@]}"; do
        echo "would run: timeout $TIME_LIMIT $PYTHON benchmarks/run.py $name --preset gpu-short --out $RESULTS --resume --threads $THREADS --quiet ${EXTRA[*]-} > $LOGS/$name.log"
    done
    echo "would run: $PYTHON benchmarks/tables.py --results $RESULTS --preset gpu-short --output $RESULTS/gpu-short/README.md"
    exit 0
fi

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-short needs a CUDA GPU')"
"$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); import pack_corpus; pack_corpus.load_packed('benchmarks/data/gpu-short')"
mkdir -p "$LOGS"
start=$(date +%s)
pids=()
for name in "${EXPERIMENTS[@]}"; do
    timeout "$TIME_LIMIT" "$PYTHON" benchmarks/run.py "$name" --preset gpu-short --out "$RESULTS" --resume \
        --threads "$THREADS" --quiet ${EXTRA[@]+"${EXTRA[@]}"} > "$LOGS/$name.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "${EXPERIMENTS[$i]}: stopped or failed (see $LOGS/${EXPERIMENTS[$i]}.log)" >&2
        failed=1
    fi
done
echo "trained in $(( $(date +%s) - start )) s"
"$PYTHON" benchmarks/tables.py --results "$RESULTS" --preset gpu-short --output "$RESULTS/gpu-short/README.md"
exit $failed
