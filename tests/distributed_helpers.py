"""Run a worker script under real ``torchrun`` processes (gloo on CPU) and collect its output; and what
the workers share: their own float64 capture of a tiny GPT-2's FFN rows, and the way a worker ends."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc tests/workers/<script> args...``; raises on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKERS / script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # gloo now and then aborts a process during interpreter finalisation on a loaded machine, after the
        # worker's work is done and its process group destroyed (tests/test_examples.py meets the same): one
        # rerun, whose own assertions decide
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def capture_gpt2_ffn_rows(model, real: list) -> dict[str, list]:
    """Hooks on every block's ``c_fc`` output (pre) and ``c_proj`` input (post) of a GPT-2 ``model`` that keep,
    in float64, the rows that the last mask in ``real`` (``[B, T]`` bool, appended by the caller per call)
    marks real; ``{"<block>.pre"|"<block>.post": [rows [n, D], ...]}``."""
    seen = {f"{i}.{stage}": [] for i in range(len(model.transformer.h)) for stage in ("pre", "post")}
    for i, block in enumerate(model.transformer.h):
        block.mlp.c_fc.register_forward_hook(lambda m, a, y, k=f"{i}.pre": seen[k].append(y[real[-1]].double()))
        block.mlp.c_proj.register_forward_pre_hook(lambda m, a, k=f"{i}.post": seen[k].append(a[0][real[-1]].double()))
    return seen


def end_worker() -> None:
    """End a worker process once its results are written. Sharded engines (FSDP2's last reduce-scatter work
    objects, DeepSpeed's) keep collectives alive on their objects; left to interpreter finalisation, gloo's
    threads release them after Python is gone and the process aborts now and then ("terminate called without
    an active exception"). So the caller drops its references first, then this collects them while the
    process group still exists, tears the group down, and ends the process without finalisation."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
