#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip and git are all it needs).
#   bash dev.sh demo   set up .venv, train a small GPT-2 with NerVE on the embedded corpus, report
#   bash dev.sh test   set up .venv, lint with ruff, run the whole test suite
# Extra arguments go to the demo script or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NERVE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    # Install only when setup.cfg changed since the last install (keeps reruns fast).
    local stamp="$VENV/.nerve_installed"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
        "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
        touch "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        setup
        exec "$PY" scripts/demo.py "$@"
        ;;
    test)
        setup
        "$PY" -m ruff check .            # lint (rules and line length in pyproject.toml)
        "$PY" -m ruff format --check .   # formatting
        exec "$PY" -m pytest -n 2 "$@"
        ;;
    *)
        echo "usage: bash dev.sh {demo|test} [args...]" >&2
        exit 2
        ;;
esac
