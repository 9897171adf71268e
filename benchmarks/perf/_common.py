"""Shared plumbing of the perf benchmarks: device choice, environment record, result files.

Benchmarks live outside the library's import graph; run them from the repository root, e.g.
``python benchmarks/perf/accumulator_throughput.py --device auto``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "perf"
if str(REPO) not in sys.path:  # `python benchmarks/perf/x.py` from anywhere finds nerve_hf
    sys.path.insert(0, str(REPO))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' runs on the CPU and, when one is present, on CUDA; or 'cpu', 'cuda', 'cuda:1'",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (about a minute on 2 CPU cores)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result files")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own choice); 1 gives stable numbers on a shared machine",
    )


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def devices(choice: str) -> list[torch.device]:
    """The devices a benchmark runs on: 'auto' means the CPU plus CUDA when available."""
    if choice == "auto":
        found = [torch.device("cpu")]
        if torch.cuda.is_available():
            found.append(torch.device("cuda", torch.cuda.current_device()))
        return found
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {choice}: CUDA is not available here")
    return [device]


def device_label(device: torch.device) -> str:
    """'cpu' or 'cuda-<gpu name>' as a file-name-safe slug (e.g. 'cuda-nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_label": device_label(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(out: Path, name: str, device: torch.device, payload: dict, quick: bool) -> Path:
    """Write ``<out>/<name>_<device label>[_quick].json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{device_label(device)}{'_quick' if quick else ''}.json"
    record = {"benchmark": name, "quick": quick, "environment": environment(device), **payload}
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB); Linux reports ru_maxrss in KiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")
