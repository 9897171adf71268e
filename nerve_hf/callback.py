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

from .metrics import METRIC_NAMES
from .records import RECORDS_FILENAME, append_records, drop_records_after
from .spectral_report import SpectralReport
from .tracker import FFNTracker

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

    def __post_init__(self) -> None:
        if int(self.every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {self.every_n_steps}")
        if self.max_tokens is not None and int(self.max_tokens) < 2:
            raise ValueError(f"max_tokens must be at least 2 (a covariance needs two tokens), got {self.max_tokens}")


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
        # Both trackers stay attached from set-up on (torch.compile only sees hooks that exist before
        # its first trace) and decide per forward whether to record: train-mode forwards of a measured
        # step, and eval-mode forwards.
        self._train: Optional[FFNTracker] = None
        self._eval: Optional[FFNTracker] = None
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
            return True
        self.detach()
        try:
            options = dict(adapter=self.adapter, layers=self.config.layers, max_tokens=self.config.max_tokens)
            self._train = FFNTracker(model, when=self._records_train_forward, **options)
            self._eval = FFNTracker(model, when=lambda module: not module.training, **options)
        except (ValueError, TypeError) as error:  # unknown architecture, mismatched widths, ...
            self._failed = True
            warnings.warn(f"NerveCallback is disabled: {error}", RuntimeWarning)
            return False
        self._model = model
        if self.config.measure_train:
            self._train.attach()
        if self.config.measure_eval:
            self._eval.attach()
        return True

    def _records_train_forward(self, module: nn.Module) -> bool:
        return module.training and self._measured_step is not None

    def detach(self) -> None:
        """Remove every hook this callback placed on the model."""
        for tracker in (self._train, self._eval):
            if tracker is not None:
                tracker.detach()

    # ------------------------------------------------------------ measurement
    def _measure(self, tracker: FFNTracker) -> SpectralReport:
        """The tracker's report, or a NaN report with a warning if the computation fails."""
        try:
            return tracker.compute()
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
        return logs

    def _write(self, args, state, report: SpectralReport, split: str) -> None:
        if not (self.config.write_jsonl and state.is_world_process_zero and args.output_dir):
            return
        records = [{"step": state.global_step, "split": split, **row} for row in report.rows]
        append_records(Path(args.output_dir) / RECORDS_FILENAME, records)

    # ------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._set_up(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
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
        elif self._pending is not None and self._pending[0] == state.global_step and "loss" in logs:
            extra = self._pending[1]
            self._pending = None
        else:
            return
        logs.update(extra)
        # The Trainer appended a copy of `logs` to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_predict(self, args, state, control, **kwargs):
        if self._eval is not None:
            self._eval.reset()  # prediction forwards are not an evaluation

    def on_train_end(self, args, state, control, **kwargs):
        if self._train is not None:
            self._train.detach()  # the eval tracker stays: a later trainer.evaluate() is measured too
        self._measured_step = None

    def __repr__(self) -> str:
        return f"NerveCallback({asdict(self.config)})"
