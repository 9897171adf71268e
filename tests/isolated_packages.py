"""Packages the suite installs apart from the environment, for the tests that need them only.

bitsandbytes and torchao print on stderr when imported (a failed kernel download, torch deprecation
warnings), and transformers imports them in every process once they are installed, which the one-line
error tests forbid. ``bash dev.sh test`` therefore installs them into ``<venv>/isolated-packages``
(``pip install --target``), outside ``sys.path``. Their tests skip in the suite's own processes, and
:func:`run_in_child` runs them in one child pytest process whose ``PYTHONPATH`` adds that folder (and
whose Hub access is off).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ISOLATED = Path(sys.prefix) / "isolated-packages"


def run_in_child(request: pytest.FixtureRequest, packages: tuple[str, ...], selection: list[str], tests: int) -> None:
    """Run the pytest ``selection`` (node ids or a file and ``-k``) in a child process that imports
    ``packages`` from :data:`ISOLATED`; exactly ``tests`` must pass there, none skipped or failed.

    Skips when the packages import in this process (their tests ran here) or are not in :data:`ISOLATED`.
    """
    if all(importlib.util.find_spec(package) is not None for package in packages):
        pytest.skip(f"{', '.join(packages)} import in this process: their tests ran here")
    missing = [package for package in packages if not (ISOLATED / package).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bash dev.sh test installs them into {ISOLATED})")
    root = request.config.rootpath
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(root), str(ISOLATED)])}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *selection],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else child.stderr[-2000:]
    assert child.returncode == 0, f"the tests with {', '.join(packages)} failed:\n{child.stdout[-6000:]}"
    assert re.search(rf"\b{tests} passed\b", summary) and "skipped" not in summary, summary
