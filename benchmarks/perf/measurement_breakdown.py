"""Where one measurement's time goes: NerveCallback's defaults against the paper's float32 floor.

A Trainer run of the demo's GPT-2 (``training_overhead.py``'s model: 4 layers, n_embd 128, context 128)
with ``--d-ff`` wide FFNs and ``--batch`` sequences per step (default 16: 2,048 tokens), measured every
other step with ``NerveCallback``'s defaults (float64 spectra, the variance flow, the JSONL records and
the spectra archive). The library's functions are wrapped with timers for the run (nothing in the
library changes); per measured step, the median over the measured steps of:

* ``hook_copies_selection``: the hooks' own work (detach, token selection, the token cap), i.e. all hook
  time minus what the measurements' updates took;
* ``batch_scatter``: each batch's centred scatter in the working precision (``shifted_moments``);
* ``chan_merge``: the float64 merge of that scatter into the running moments (``_merge_moments``);
* ``update_checks``: the rest of ``CovarianceAccumulator.update`` (argument checks, reshapes);
* the same three for the flow's d-wide input and output stages (``flow_*``), which share the kernels;
* ``covariance_build``: ``M2 / (n − 1)`` per accumulator at compute time;
* ``eigvalsh``: the float64 eigendecompositions, pre/post (``eigvalsh``) and flow (``flow_eigvalsh``);
* ``metrics``: ``spectrum_metrics`` and the flow's padded JS;
* ``compute_other``: the rest of ``tracker.compute`` (rows, NaN checks, conversions);
* ``sinks_*``: the spectra archive, the JSONL records, the histogram sink; ``log_dict``: the logged keys;
* ``measured_step_extra``: the median measured step minus the median unmeasured one (what the
  measurement costs in all).

After training, one forward of the same model on a batch of the same size keeps its pre/post
activations, and on those the paper's float32 floor is timed (concatenate and cast, one fp32
covariance, one fp32 ``eigvalsh`` per matrix), beside the float64 eigenvalue routines that could replace
``torch.linalg.eigvalsh`` for the same matrices: one batched call on ``[2L, D, D]``, and
``scipy.linalg.eigh(eigvals_only=True)`` with the ``ev``, ``evd``, ``evr`` and ``evx`` drivers (their
largest deviation from ``torch.linalg.eigvalsh`` relative to λ_max is recorded); and issue #29's change on
the path, the covariances' finiteness test before (``isfinite(Σ).all()``) and after (``all_finite``).

Run: ``python benchmarks/perf/measurement_breakdown.py --device cpu --threads 1 [--d-ff 512 1024]``;
writes ``measurement_breakdown_<device>[_quick].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import add_common_args, apply_threads, devices, write_result

SEQ, N_LAYER, N_EMBD, N_HEAD, VOCAB = 128, 4, 128, 4, 4096  # training_overhead.py's demo model


class Timers:
    """Inclusive seconds per key for the current measured step; ``where`` names the enclosing measurement."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.where: list[str] = []

    def wrap(self, owner, name: str, key) -> None:
        """Replace ``owner.name`` by a timed version; ``key`` is a string or a function of (args, where)."""
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            label = key if isinstance(key, str) else key(args, timers.where)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.now[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def scope(self, owner, name: str, where: str) -> None:
        """Time ``owner.name`` under ``where`` and mark calls made inside it as ``where``'s."""
        original = getattr(owner, name)
        timers = self

        def scoped(*args, **kwargs):
            timers.where.append(where)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.now[where] += time.perf_counter() - start
                timers.where.pop()

        setattr(owner, name, scoped)

    def close_step(self) -> None:
        self.steps.append(dict(self.now))
        self.now = defaultdict(float)


def _stage_of(args, where):
    stage = args[2]
    return f"update_{'flow' if stage in ('input', 'output') else 'prepost'}"


def _in_flow(name: str):
    return lambda args, where: f"flow_{name}" if "update_flow" in where or "flow_compute" in where else name


def instrument(timers: Timers) -> None:
    """Wrap the library's functions on the measured step's path (class attributes and module names)."""
    from nerve_hf.integrations import callback as callback_module
    from nerve_hf.sinks.archive import SpectraArchiveSink
    from nerve_hf.sinks.histograms import HistogramSink
    from nerve_hf.sinks.records import RecordsSink
    from nerve_hf.spectra import exact
    from nerve_hf.stats import covariance
    from nerve_hf.stats.moments import StreamingMoments
    from nerve_hf.tracking.measurements import flow
    from nerve_hf.tracking.measurements.base import MeasurementCollection
    from nerve_hf.tracking.measurements.flow import Flow
    from nerve_hf.tracking.measurements.prepost import PrePost
    from nerve_hf.tracking.points import FFNHookPoints
    from nerve_hf.tracking.tracker import FFNTracker

    timers.wrap(FFNHookPoints, "record", "hooks")

    original_update = MeasurementCollection.update

    def update(self, site, stage, rows, keep, positions):
        where = "update_flow" if stage in ("input", "output") else "update_prepost"
        timers.where.append(where)
        start = time.perf_counter()
        try:
            return original_update(self, site, stage, rows, keep, positions)
        finally:
            timers.now[where] += time.perf_counter() - start
            timers.where.pop()

    MeasurementCollection.update = update
    timers.wrap(covariance, "shifted_moments", _in_flow("batch_scatter"))
    timers.wrap(StreamingMoments, "_merge_moments", _in_flow("chan_merge"))
    timers.scope(FFNTracker, "compute", "compute")
    timers.scope(PrePost, "compute", "prepost_compute")
    timers.scope(Flow, "compute", "flow_compute")
    timers.wrap(covariance.CovarianceAccumulator, "covariance", _in_flow("covariance_build"))
    timers.wrap(torch.linalg, "eigvalsh", _in_flow("eigvalsh"))
    timers.wrap(exact, "spectrum_metrics", _in_flow("metrics"))
    timers.wrap(flow, "padded_js", "flow_metrics")
    timers.wrap(SpectraArchiveSink, "write", "sinks_archive")
    timers.wrap(RecordsSink, "write", "sinks_records")
    timers.wrap(HistogramSink, "write", "sinks_histograms")
    timers.wrap(callback_module, "log_dict", "log_dict")


def exclusive(t: dict[str, float]) -> dict[str, float]:
    """The breakdown's rows (exclusive seconds) from one step's inclusive timers."""
    g = lambda key: t.get(key, 0.0)  # noqa: E731
    rows = {
        "hook_copies_selection": g("hooks") - g("update_prepost") - g("update_flow"),
        "batch_scatter": g("batch_scatter"),
        "chan_merge": g("chan_merge"),
        "update_checks": g("update_prepost") - g("batch_scatter") - g("chan_merge"),
        "flow_batch_scatter": g("flow_batch_scatter"),
        "flow_chan_merge": g("flow_chan_merge"),
        "flow_update_checks": g("update_flow") - g("flow_batch_scatter") - g("flow_chan_merge"),
        "covariance_build": g("covariance_build"),
        "eigvalsh": g("eigvalsh"),
        "metrics": g("metrics"),
        "prepost_compute_other": g("prepost_compute") - g("covariance_build") - g("eigvalsh") - g("metrics"),
        "flow_covariance_build": g("flow_covariance_build"),
        "flow_eigvalsh": g("flow_eigvalsh"),
        "flow_metrics": g("flow_metrics"),
        "flow_compute_other": g("flow_compute") - g("flow_covariance_build") - g("flow_eigvalsh") - g("flow_metrics"),
        "compute_other": g("compute") - g("prepost_compute") - g("flow_compute"),
        "sinks_archive": g("sinks_archive"),
        "sinks_records": g("sinks_records"),
        "sinks_histograms": g("sinks_histograms"),
        "log_dict": g("log_dict"),
    }
    rows["sum"] = sum(rows.values())
    return rows


def build_model(d_ff: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=SEQ, n_inner=d_ff, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def trainer_breakdown(d_ff: int, batch: int, steps: int, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from nerve_hf import NerveCallback

    timers = Timers()
    instrument(timers)
    model = build_model(d_ff)
    ids = torch.randint(1, VOCAB, (batch * steps, SEQ), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.measured, self.unmeasured, self.start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            if state.global_step % 2 == 0:
                self.measured.append(seconds)
                timers.close_step()
            else:
                self.unmeasured.append(seconds)
                timers.now.clear()

    times = StepTimes()
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        logging_steps=2, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callback = NerveCallback(every_n_steps=2, measure_eval=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, times])
    trainer.train()
    first_measured_skipped = timers.steps[1:] or timers.steps  # the first one also allocates the state
    rows = [exclusive(t) for t in first_measured_skipped]
    breakdown = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    extra = statistics.median(times.measured[1:] or times.measured) - statistics.median(times.unmeasured[1:])
    breakdown["measured_step_extra"] = extra
    return {
        "breakdown_seconds": breakdown,
        "measured_steps": len(rows),
        "unmeasured_step_seconds": statistics.median(times.unmeasured[1:]),
        "model": model,
        "ids": ids[:batch],
    }


def interleaved(routines: dict, rounds: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each routine over ``rounds`` rounds that call every routine once in turn (background
    load hits all alike), and each routine's last result."""
    times: dict[str, list[float]] = {name: [] for name in routines}
    results: dict[str, object] = {}
    for _ in range(rounds):
        for name, routine in routines.items():
            start = time.perf_counter()
            results[name] = routine()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def floor_and_routines(model, ids: torch.Tensor, repeats: int) -> dict:
    """The paper's fp32 floor on one step's activations, and float64 eigenvalue routines on their covariances,
    timed in ``repeats`` interleaved rounds."""
    import numpy as np
    import scipy.linalg

    from nerve_hf.spectra import exact

    kept: list[torch.Tensor] = []
    handles = []
    for block in model.transformer.h:
        handles.append(block.mlp.c_fc.register_forward_hook(lambda m, a, out: kept.append(out.detach().clone())))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(lambda m, a: kept.append(a[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    flat = [x.reshape(-1, x.shape[-1]) for x in kept]  # 2L x [N, D]

    def paper_cov(x):
        x = torch.cat([x]).to(torch.float32)
        x = x - x.mean(0)
        return x.T @ x / (x.shape[0] - 1)

    covs32 = [paper_cov(x) for x in flat]
    covs64 = []
    for x in flat:
        x = x.double() - x.double().mean(0)
        covs64.append(x.T @ x / (x.shape[0] - 1))
    reference = [torch.linalg.eigvalsh(c) for c in covs64]
    stack = torch.stack(covs64)  # [2L, D, D]
    routines = {
        "paper_covariances_fp32": lambda: [paper_cov(x) for x in flat],
        "paper_eigvalsh_fp32": lambda: [torch.linalg.eigvalsh(c) for c in covs32],
        "torch_eigvalsh_loop": lambda: [torch.linalg.eigvalsh(c) for c in covs64],
        "torch_eigvalsh_batched": lambda: list(torch.linalg.eigvalsh(stack)),
    }
    for driver in ("ev", "evd", "evr", "evx"):
        routines[f"scipy_eigh_{driver}"] = lambda driver=driver: [
            torch.from_numpy(
                scipy.linalg.eigh(
                    np.array(c.numpy(), order="F"),
                    eigvals_only=True,
                    driver=driver,
                    overwrite_a=True,
                    check_finite=False,
                )
            )
            for c in covs64
        ]
    seconds, deviation = {}, {}
    try:  # scipy's OpenBLAS keeps its own thread pool: hold it to torch's thread count, as torch's LAPACK is
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(torch.get_num_threads())
    except ImportError:  # without threadpoolctl, OpenBLAS may oversubscribe the cores: the file says so
        limit = None
    # issue #29's change on this path, before and after: the finiteness test of each covariance
    routines["finite_test_before_isfinite_all"] = lambda: [bool(torch.isfinite(c).all()) for c in covs64]
    routines["finite_test_after_all_finite"] = lambda: [bool(exact.all_finite(c)) for c in covs64]
    seconds, results = interleaved(routines, repeats)
    finite_tests = {name: seconds.pop(name) for name in list(seconds) if name.startswith("finite_test")}
    results = {name: value for name, value in results.items() if not name.startswith("finite_test")}
    for name, values in results.items():
        if not name.startswith("paper"):
            deviation[name] = max(float((v - r).abs().max() / r.abs().max()) for v, r in zip(values, reference))
    if limit is not None:
        limit.restore_original_limits()
    return {
        "scipy_threads_limited": limit is not None,
        "matrices": len(flat),
        "paper_floor_seconds": {
            "covariances_fp32": seconds.pop("paper_covariances_fp32"),
            "eigvalsh_fp32": seconds.pop("paper_eigvalsh_fp32"),
        },
        "float64_eigenvalues_seconds": seconds,
        "finiteness_test_seconds": finite_tests,
        "float64_eigenvalues_max_deviation_rel_lambda_max": deviation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--d-ff", type=int, nargs="+", default=[512, 1024], help="FFN widths")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (2,048 tokens at 16)")
    args = parser.parse_args()
    apply_threads(args.threads)
    for device in devices(args.device):
        if device.type != "cpu":
            print(f"{device}: skipped (this breakdown runs on the CPU)", file=sys.stderr)
            continue
        results = []
        for d_ff in args.d_ff:
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
                run = trainer_breakdown(d_ff, args.batch, 8 if args.quick else 14, Path(tmp))
            floor = floor_and_routines(run.pop("model"), run.pop("ids"), 2 if args.quick else 5)
            floor["paper_floor_seconds"]["total"] = sum(floor["paper_floor_seconds"].values())
            b = run["breakdown_seconds"]
            print(f"D={d_ff}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in b.items()), flush=True)
            print(f"D={d_ff}: {floor}", flush=True)
            results.append({"d_ff": d_ff, "tokens_per_step": args.batch * SEQ, **run, **floor})
        payload = {"model": dict(n_layer=N_LAYER, n_embd=N_EMBD, seq_len=SEQ, batch=args.batch), "results": results}
        write_result(args.out, "measurement_breakdown", device, payload, args.quick)


if __name__ == "__main__":
    main()
