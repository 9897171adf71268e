#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip and git are all it needs).
#   bash dev.sh demo   set up .venv, train a small GPT-2 with NerVE on the embedded corpus, report
#   bash dev.sh test   set up .venv, lint with ruff, run the whole test suite
#   bash dev.sh docs   set up .venv, build the API reference into site/ (mkdocs --strict: any warning fails)
# Extra arguments go to the demo script, to pytest or to mkdocs build.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NERVE_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    # One environment for every command: every extra (all, test, docs) goes in together. Install only
    # when setup.cfg changed since the last install (keeps reruns fast); the stamp names the extras, so
    # a .venv installed before an extra was added is brought up to date.
    local extras="all,test,docs"
    local stamp="$VENV/.nerve_installed"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
        "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$PY" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
        # Quantization backends that log on stderr when imported: installed outside sys.path, for the tests
        # that run them in a child process (tests/isolated_packages.py)
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
            --target "$VENV/isolated-packages" bitsandbytes torchao
        echo "$extras" > "$stamp"
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
    docs)
        setup
        exec "$PY" -m mkdocs build --strict --site-dir site "$@"   # generated pages are built, never committed
        ;;
    *)
        echo "usage: bash dev.sh {demo|test|docs} [args...]" >&2
        exit 2
        ;;
esac
