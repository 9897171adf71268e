#!/usr/bin/env bash
# Run every perf benchmark on the CPU and, when present, on CUDA; then write SUMMARY.md.
#   bash benchmarks/perf/run_all.sh            full settings (~25 min on 2 CPU cores; GPU parts are quick)
#   bash benchmarks/perf/run_all.sh --quick    small settings
# Extra arguments go to every script (e.g. --device cuda, --threads 1, --out DIR).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
for script in accumulator_throughput eigendecomposition scaling_plot probe_throughput training_overhead; do
    echo "== $script $*"
    "$PY" "$script.py" "$@"
done
"$PY" summarize.py "$@"
