"""NerveCallback: FFN eigenspectrum metrics logged by a ``transformers.Trainer`` while it trains.

At every optimizer step ``k`` that is a multiple of ``every_n_steps`` the callback measures all
micro-batches of that step (the forward passes whose loss the Trainer logs at step ``k``, before
update ``k``) and logs ``nerve/<site>/<metric>`` and ``nerve/mean/<metric>`` with step ``k``. During
every evaluation it measures the evaluation set and logs the same keys with the evaluation prefix
(``eval_nerve/mean/pr_post``), in the same log record as ``eval_loss``.

Getting the keys to every ``report_to`` integration: the Trainer calls ``on_log`` of its callbacks in
list order, and the integrations come before user callbacks, so a callback that adds to ``logs`` in
``on_log`` is normally too late. NerveCallback moves itself ahead of the integrations in the Trainer's
callback list the first time it is called, so the metrics it adds reach TensorBoard, W&B, MLflow, ...
in the very record that carries the loss.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.training_args import ParallelMode

from .metrics import METRIC_NAMES
from .records import RECORDS_FILENAME, append_records, drop_records_after
from .spectral_report import SpectralReport
from .tracker import FFNTracker, MemoryBudgetError

__all__ = ["NerveConfig", "NerveCallback"]


@dataclass
class NerveConfig:
    """What NerveCallback measures and where it writes."""

    every_n_steps: int = 100  # measure the training micro-batches of each optimizer step k with k % every_n_steps == 0
    measure_train: bool = True  # measure training batches at those steps (False: evaluation spectra only)
    measure_eval: bool = True  # measure the evaluation set during every evaluation, logged with the eval prefix
    layers: Optional[list[int]] = None  # block indices to watch (negative counts from the end); None: every FFN
    max_tokens: Optional[int] = None  # per measurement and FFN, count at most this many tokens (pre and post share them)
    log_per_site: bool = True  # log nerve/<site>/<metric> for every FFN as well as nerve/mean/<metric>
    write_jsonl: bool = True  # rank 0 appends every measurement to <output_dir>/nerve_metrics.jsonl
    layers_per_step: Optional[int] = None  # round-robin: each measurement covers the next this-many watched blocks
    # (train: group (k / every_n_steps - 1) mod #groups at step k; eval: the next group each evaluation);
    # only per-site keys are logged then, as a mean over different layers at each step would not be one series
    memory_budget_mb: Optional[float] = None  # refuse to start if one measurement's float64 covariance state,
    # 2 x (D^2 + D) x 8 bytes per measured FFN, would exceed this many MiB (MemoryBudgetError, a ValueError)
    metrics: str = "all"  # "pr": only pr_pre/pr_post, by the trace identity, no eigendecomposition

    def __post_init__(self) -> None:
        if int(self.every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {self.every_n_steps}")
        if self.max_tokens is not None and int(self.max_tokens) < 2:
            raise ValueError(f"max_tokens must be at least 2 (a covariance needs two tokens), got {self.max_tokens}")
        if self.layers_per_step is not None and int(self.layers_per_step) < 1:
            raise ValueError(f"layers_per_step must be a positive integer or None, got {self.layers_per_step}")
        if self.layers_per_step is not None and not self.log_per_site:
            raise ValueError("layers_per_step logs per-site keys only; it needs log_per_site=True")
        if self.metrics not in ("all", "pr"):
            raise ValueError(f"metrics must be 'all' or 'pr', got {self.metrics!r}")


def _eval_prefix(logs: dict) -> Optional[str]:
    """``"eval_"`` (or ``"eval_<name>_"``) when ``logs`` is an evaluation record, else None."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("runtime")]
    return None


class NerveCallback(TrainerCallback):
    """Log NerVE metrics of every FFN during ``Trainer.train`` and ``Trainer.evaluate``.

    Args:
        config: a :class:`NerveConfig`; or pass its fields as keyword arguments.
        adapter: where the FFNs are (a ``model_adapters.Adapter``); ``None`` looks the model up.

    Use: ``Trainer(..., callbacks=[NerveCallback(every_n_steps=100)])`` or
    ``trainer.add_callback(NerveCallback(...))``; nothing else is needed for the metrics to reach
    ``state.log_history``, every ``report_to`` integration and ``<output_dir>/nerve_metrics.jsonl``.
    The callback never stops training: a failed measurement warns and logs NaN.
    """

    def __init__(self, config: Optional[NerveConfig] = None, *, adapter=None, **options) -> None:
        if config is not None and options:
            raise TypeError("pass either a NerveConfig or keyword options, not both")
        known = {f.name for f in fields(NerveConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown NerveCallback options {unknown}; known: {sorted(known)}")
        self.config = config if config is not None else NerveConfig(**options)
        self.adapter = adapter
        self._model: Optional[nn.Module] = None
        # Every tracker stays attached from set-up on (torch.compile only sees hooks that exist before
        # its first trace) and decides per forward whether to record: the active train group records
        # the train-mode forwards of a measured step, the active eval group the eval-mode forwards.
        self._train: Optional[FFNTracker] = None  # the active train group
        self._eval: Optional[FFNTracker] = None  # the active eval group
        self._train_groups: list[FFNTracker] = []  # one tracker per round-robin group (one group by default)
        self._eval_groups: list[FFNTracker] = []
        self._eval_count = 0  # evaluations measured so far (selects the next eval group)
        self._measured_step: Optional[int] = None  # the step whose micro-batches are being measured
        self._pending: Optional[tuple[int, dict]] = None  # (step, logs) of the last train measurement
        self._placed = False
        self._failed = False  # set-up failed (unknown architecture, ...): the callback stays idle

    # ------------------------------------------------------------ set-up
    def _place_ahead_of_integrations(self) -> None:
        """Move this callback right after DefaultFlowCallback in the Trainer's callback list."""
        if self._placed:
            return
        self._placed = True
        handler = self._find_handler()
        if handler is None:
            warnings.warn(
                "NerveCallback could not find the Trainer's callback list; report_to integrations that run "
                "before it will not see the nerve/ keys (state.log_history and the JSONL file still will)",
                RuntimeWarning,
            )
            return
        callbacks = handler.callbacks
        callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        # Inserting before our old position keeps the handler's running loop on course: every
        # callback after us keeps its index.
        callbacks.insert(flow[-1] + 1 if flow else 0, self)

    def _find_handler(self) -> Optional[CallbackHandler]:
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler) and any(cb is self for cb in candidate.callbacks):
                return candidate
            frame = frame.f_back
        return None

    def _set_up(self, model: Optional[nn.Module]) -> bool:
        """Build the trackers once a model is known; False while the callback cannot measure."""
        self._place_ahead_of_integrations()
        if self._failed or model is None:
            return False
        if self._model is model:
            self._attach()  # a second train() after on_train_end detached the train trackers
            return True
        self.detach()
        try:
            options = dict(
                adapter=self.adapter, max_tokens=self.config.max_tokens, memory_budget_mb=self.config.memory_budget_mb
            )
            groups = self._layer_groups(model)
            self._train_groups = [FFNTracker(model, layers=layers, **options) for layers in groups]
            self._eval_groups = [FFNTracker(model, layers=layers, **options) for layers in groups]
            for tracker in self._train_groups:
                tracker.when = self._train_gate(tracker)
            for tracker in self._eval_groups:
                tracker.when = self._eval_gate(tracker)
            self._train, self._eval = self._train_groups[0], self._eval_groups[0]
            self._eval_count = 0
        except MemoryBudgetError:
            raise  # asked for explicitly: refusing to start is the point
        except (ValueError, TypeError) as error:  # unknown architecture, mismatched widths, ...
            self._failed = True
            warnings.warn(f"NerveCallback is disabled: {error}", RuntimeWarning)
            return False
        self._model = model
        self._attach()
        return True

    def _refuse_data_parallel(self, args) -> None:
        """Several GPUs in one process: the Trainer wraps the model in nn.DataParallel, whose threaded
        replicas the trackers cannot follow. Stay idle, with a warning, rather than log wrong numbers."""
        if self._failed or getattr(args, "parallel_mode", None) != ParallelMode.NOT_DISTRIBUTED:
            return
        self._failed = True
        self.detach()
        warnings.warn(
            f"NerveCallback is disabled: the Trainer runs nn.DataParallel over {getattr(args, 'n_gpu', 'several')} "
            f"GPUs in one process, which it cannot measure. Launch with torchrun or accelerate launch "
            f"(DistributedDataParallel; the statistics of all ranks are reduced exactly), or use one GPU.",
            RuntimeWarning,
        )

    def _attach(self) -> None:
        """Attach every tracker the configuration measures with (those already attached stay)."""
        wanted = (self._train_groups if self.config.measure_train else []) + (
            self._eval_groups if self.config.measure_eval else []
        )
        for tracker in wanted:
            if not tracker.active:
                tracker.attach()

    def _train_gate(self, tracker: FFNTracker):
        """Record a forward into ``tracker``: train mode, a measured step, and its group's turn."""
        return lambda module: module.training and self._measured_step is not None and self._train is tracker

    def _eval_gate(self, tracker: FFNTracker):
        """Record a forward into ``tracker``: eval mode and its group's turn."""
        return lambda module: not module.training and self._eval is tracker

    def _layer_groups(self, model: nn.Module) -> list[Optional[list[int]]]:
        """The ``layers`` argument of each round-robin group's trackers: ``[config.layers]`` by default."""
        if self.config.layers_per_step is None:
            return [self.config.layers]
        # Nothing is allocated before the first activation, so resolving the sites this way is cheap.
        watched = FFNTracker(model, adapter=self.adapter, layers=self.config.layers).sites
        blocks = sorted({site.layer for site in watched})
        size = int(self.config.layers_per_step)
        return [blocks[i : i + size] for i in range(0, len(blocks), size)]

    def detach(self) -> None:
        """Remove every hook this callback placed on the model."""
        for tracker in (*self._train_groups, *self._eval_groups):
            tracker.detach()

    # ------------------------------------------------------------ measurement
    def _measure(self, tracker: FFNTracker) -> SpectralReport:
        """The tracker's report, or a NaN report with a warning if the computation fails."""
        try:
            return tracker.compute(metrics=self.config.metrics)
        except Exception as error:  # noqa: BLE001 - a monitor must never stop training
            warnings.warn(f"NerveCallback: measurement failed ({type(error).__name__}: {error}); logging NaN",
                          RuntimeWarning)
            nan = {name: math.nan for name in METRIC_NAMES}
            rows = [{"site": s.site, "layer": s.layer, "dim": 0, "tokens": 0, **nan} for s in tracker.sites]
            return SpectralReport(rows=rows, eigenvalues={})
        finally:
            tracker.reset()

    def _log_dict(self, report: SpectralReport, prefix: str = "") -> dict:
        logs = report.to_log_dict(prefix=f"{prefix}nerve")
        if not self.config.log_per_site:
            logs = {k: v for k, v in logs.items() if k.startswith(f"{prefix}nerve/mean/")}
        if self.config.layers_per_step is not None:  # a mean over this step's group only: not logged
            logs = {k: v for k, v in logs.items() if not k.startswith(f"{prefix}nerve/mean/")}
        if self.config.metrics == "pr":
            logs = {k: v for k, v in logs.items() if k.endswith(("/pr_pre", "/pr_post"))}
        return logs

    def _write(self, args, state, report: SpectralReport, split: str) -> None:
        if not (self.config.write_jsonl and state.is_world_process_zero and args.output_dir):
            return
        records = [{"step": state.global_step, "split": split, **row} for row in report.rows]
        append_records(Path(args.output_dir) / RECORDS_FILENAME, records)

    # ------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._refuse_data_parallel(args)
        self._set_up(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._refuse_data_parallel(args)
        self._set_up(model)
        if self.config.write_jsonl and state.is_world_process_zero and args.output_dir:
            # A resumed run re-measures nothing before its checkpoint; drop what came after it.
            drop_records_after(Path(args.output_dir) / RECORDS_FILENAME, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._pending = None
        step = state.global_step + 1  # the optimizer step these micro-batches belong to
        if not self.config.measure_train or step % self.config.every_n_steps:
            return
        if not self._set_up(model):
            return
        self._train = self._train_groups[(step // self.config.every_n_steps - 1) % len(self._train_groups)]
        self._train.reset()
        self._measured_step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self._measured_step is None:
            return
        step, self._measured_step = self._measured_step, None
        report = self._measure(self._train)
        self._write(args, state, report, "train")
        self._pending = (step, self._log_dict(report))
        control.should_log = True  # the loss of these very micro-batches is logged at this step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        prefix = _eval_prefix(logs)
        if prefix is not None:
            if self._eval is None or not self.config.measure_eval:
                return
            report = self._measure(self._eval)
            self._write(args, state, report, prefix.rstrip("_"))
            extra = self._log_dict(report, prefix)
            self._next_eval_group()
        elif self._pending is not None and self._pending[0] == state.global_step and "loss" in logs:
            extra = self._pending[1]
            self._pending = None
        else:
            return
        logs.update(extra)
        # The Trainer appended a copy of `logs` to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _next_eval_group(self) -> None:
        """Round-robin: the next evaluation measures the next group."""
        self._eval_count += 1
        self._eval = self._eval_groups[self._eval_count % len(self._eval_groups)]

    def on_predict(self, args, state, control, **kwargs):
        if self._eval is not None:
            self._eval.reset()  # prediction forwards are not an evaluation

    def on_train_end(self, args, state, control, **kwargs):
        for tracker in self._train_groups:
            tracker.detach()  # the eval trackers stay: a later trainer.evaluate() is measured too
        self._measured_step = None

    def __repr__(self) -> str:
        return f"NerveCallback({asdict(self.config)})"
