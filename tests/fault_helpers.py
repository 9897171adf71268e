"""Real faults for the fault-injection tests: folders that root cannot write, processes without root's
override capabilities, torn files.

Tests run as root here, and root writes through a read-only mode bit (CAP_DAC_OVERRIDE). A process started
through :func:`without_override` has that capability (and CAP_DAC_READ_SEARCH) removed from its bounding
and inheritable sets, so for it a ``chmod 555`` folder really is read-only.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
_DROPPED = "-dac_override,-dac_read_search"


def without_override(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run without root's permission-override capabilities (a no-op wrapper for non-root users)."""
    if os.geteuid() != 0:
        return list(cmd)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is needed to drop root's capabilities")
    return [setpriv, f"--inh-caps={_DROPPED}", f"--bounding-set={_DROPPED}", *cmd]


def run_python(
    code: str, *args: str, drop_override: bool = True, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` with the repo importable; without override capabilities by default."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), environment.get("PYTHONPATH", "")])
    environment.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-c", code, *args]
    if drop_override:
        cmd = without_override(cmd)
    return subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=timeout)


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (a folder) made read-only for the block; its mode is restored afterwards."""
    mode = path.stat().st_mode
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        yield path
    finally:
        path.chmod(mode)


def tear_last_line(path: Path, keep: int = 17) -> str:
    """Cut the file's last line after ``keep`` characters, as a crash during its write would; return the
    torn fragment."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    fragment = lines[-1][:keep]
    path.write_text("".join(lines[:-1]) + fragment, encoding="utf-8")
    return fragment
