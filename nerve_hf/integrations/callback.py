"""NerveCallback: FFN eigenspectrum metrics logged by a ``transformers.Trainer`` while it trains.

At every optimizer step ``k`` that is a multiple of ``every_n_steps`` the callback measures all
micro-batches of that step (the forward passes whose loss the Trainer logs at step ``k``, before
update ``k``) and logs ``nerve/<site>/<metric>`` and ``nerve/mean/<metric>`` with step ``k``. During
every evaluation it measures the evaluation set and logs the same keys with the evaluation prefix
(``eval_nerve/mean/pr_post``), in the same log record as ``eval_loss``; ``Trainer.predict`` adds
``test_nerve/...`` to its metrics.

One :class:`~nerve_hf.FFNTracker` hooks every watched FFN once and feeds two windows
(:mod:`nerve_hf.tracking.windows`): ``train`` records the train-mode forwards of a measured step, ``eval`` the
eval-mode forwards outside training steps; with ``layers_per_step`` each window rotates over groups
of blocks.

Which forwards count as evaluation: the ``eval`` window is *staged*. Until the Trainer's first
``on_prediction_step`` of an evaluation (called after its first batch) confirms the window, each
eval-mode forward outside a training step replaces what the window held; from then on to the end of
the evaluation, every eval-mode forward adds to it. So a user's own inference between evaluations
never reaches the next evaluation's spectra, and the staging costs no memory. Under several processes, the samples
that the distributed sampler repeats to pad the last evaluation batch are left out, as accelerate's
``gather_for_metrics`` leaves them out of the loss: 2 processes measure the same tokens as 1.

Getting the keys to every ``report_to`` integration: the Trainer calls ``on_log`` of its callbacks in
list order, and the integrations come before user callbacks, so a callback that adds to ``logs`` in
``on_log`` is normally too late. NerveCallback moves itself ahead of the integrations in the Trainer's
callback list the first time it is called, so the metrics it adds reach TensorBoard, W&B, MLflow, ...
in the very record that carries the loss.

A monitor never stops a run: options are checked where they are given (``NerveConfig``), a layer that
the model does not have or a memory budget that is too small is refused when the Trainer is built, and
from then on every failure warns once, says what is lost, and the run goes on.

The module holds one class whose methods are the Trainer's events, each guarded so that it cannot
raise into training; its options live in :mod:`nerve_hf.integrations.config`, the measurement in the tracker.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.training_args import ParallelMode

from model_adapters import LayerRangeError
from nerve_hf import spectra
from nerve_hf.integrations.config import NerveConfig
from nerve_hf.parallel import comm as distributed
from nerve_hf.report import SpectralReport
from nerve_hf.sinks.archive import ARCHIVE_DIRNAME, drop_measurements_after, write_measurement
from nerve_hf.sinks.records import RECORDS_FILENAME, append_records, drop_records_after
from nerve_hf.tracking.tracker import FFNTracker, MemoryBudgetError
from nerve_hf.tracking.windows import Window

__all__ = ["NerveConfig", "NerveCallback"]


def _eval_prefix(logs: dict) -> Optional[str]:
    """``"eval_"`` (or ``"eval_<name>_"``, ``"test_"``) when ``logs`` is an evaluation record, else None."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("runtime")]
    return None


def _beyond_rows(report: SpectralReport, row: dict) -> dict:
    """What the options beyond the paper add to a site's JSONL record: ``positions`` (its bucket rows) and,
    towards the next layer, ``cka_next``, ``js_pre_next`` and ``js_post_next``; nothing when they are off."""
    extra = {}
    if report.positions:
        extra["positions"] = [
            {k: v for k, v in bucket.items() if k not in ("site", "layer", "dim")}
            for bucket in report.positions
            if bucket["site"] == row["site"]
        ]
    prefix = f"nerve/{row['site']}/"
    for key, value in report.to_log_dict().items() if report.cross_layer else ():
        if key.startswith(prefix) and key.endswith("_next"):
            extra[key[len(prefix) :]] = value
    return extra


def _never_raises(lost: str):
    """Event handler decorator: an exception warns once per handler, saying ``lost``, and is swallowed."""

    def decorate(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - a monitor must never stop training
                self._warn_once(
                    f"failed:{method.__name__}",
                    f"NerveCallback.{method.__name__} failed ({type(error).__name__}: {error}); {lost}. "
                    f"Training goes on (further failures here are not reported).",
                )
                return None

        return guarded

    return decorate


def _accelerate_padding() -> Optional[int]:
    """When the running evaluation batch is accelerate's last and padded: how many samples of the global
    last batch are real (``GradientState.remainder``); else None."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return None
    state = GradientState()
    if not state.initialized or not state.in_dataloader or not state.end_of_dataloader:
        return None
    remainder = state.remainder
    return remainder if remainder > 0 else None


class NerveCallback(TrainerCallback):
    """Log NerVE metrics of every FFN during ``Trainer.train``, ``Trainer.evaluate`` and ``Trainer.predict``.

    Args:
        config: a :class:`NerveConfig`; or pass its fields as keyword arguments.
        adapter: where the FFNs are (a ``model_adapters.Adapter``); ``None`` looks the model up.

    Use: ``Trainer(..., callbacks=[NerveCallback(every_n_steps=100)])`` or
    ``trainer.add_callback(NerveCallback(...))``; nothing else is needed for the metrics to reach
    ``state.log_history``, every ``report_to`` integration and ``<output_dir>/nerve_metrics.jsonl``.
    The callback never stops training: a failed measurement warns and logs NaN.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50))
    >>> data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (8, 16))]
    >>> out = tempfile.TemporaryDirectory()
    >>> args = TrainingArguments(out.name, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
    ...                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[NerveCallback(every_n_steps=1)])
    >>> trainer.remove_callback(PrinterCallback)  # keeps this example's output to what it checks
    >>> _ = trainer.train()
    >>> [(log["step"], 1 <= log["nerve/mean/pr_pre"] <= 128) for log in trainer.state.log_history if "loss" in log]
    [(1, True), (2, True)]
    >>> records = [json.loads(line) for line in (Path(out.name) / "nerve_metrics.jsonl").open()]
    >>> [(r["step"], r["site"], r["tokens"]) for r in records]
    [(1, 'ffn.0', 64), (1, 'ffn.1', 64), (2, 'ffn.0', 64), (2, 'ffn.1', 64)]
    >>> out.cleanup()
    """

    def __init__(self, config: Optional[NerveConfig] = None, *, adapter=None, **options) -> None:
        if config is not None and options:
            raise TypeError("pass either a NerveConfig or keyword options, not both")
        if config is not None and not isinstance(config, NerveConfig):
            raise TypeError(f"config must be a NerveConfig, got {type(config).__name__}")
        known = {f.name for f in fields(NerveConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown NerveCallback options {unknown}; known: {sorted(known)}")
        self.config = config if config is not None else NerveConfig(**options)
        self.adapter = adapter
        self._model: Optional[nn.Module] = None
        # The tracker stays attached from set-up on (torch.compile only sees hooks that exist before
        # its first trace); its windows' gates decide per forward which one records.
        self._tracker: Optional[FFNTracker] = None
        self._eval_count = 0  # evaluations measured so far (selects the next eval group)
        self._measured_step: Optional[int] = None  # the step whose micro-batches are being measured
        self._in_train_step = False  # between on_step_begin and on_step_end: no forward is an evaluation
        self._eval_incomplete: Optional[str] = None  # why the running evaluation cannot be measured whole
        self._pending: Optional[tuple[int, dict]] = None  # (step, logs) of the last train measurement
        self._placed = False
        self._failed = False  # set-up failed (unknown architecture, ...): the callback stays idle
        self._warned: set[str] = set()
        self._handler: Optional[CallbackHandler] = None  # the Trainer's callback list, once found

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------ set-up
    def add_to(self, trainer) -> "NerveCallback":
        """Add this callback to ``trainer``, ahead of its ``report_to`` integrations, and hook the model now.

        The explicit way to attach NerveCallback to a Trainer that exists already (``trainer.add_callback``
        works too): the first evaluation or prediction after it is measured from its first batch, and a
        layer the model lacks or a budget too small raises here.

        >>> from transformers import TrainerCallback
        >>> isinstance(NerveCallback(every_n_steps=5), TrainerCallback)
        True
        """
        handler = trainer.callback_handler
        if not any(cb is self for cb in handler.callbacks):
            handler.callbacks.append(self)
        self._place_in(handler)
        self._refuse_data_parallel(trainer.args)
        self._set_up(trainer.model, refuse_bad_input=True)
        return self

    def _place_in(self, handler: CallbackHandler) -> None:
        """Move this callback right after DefaultFlowCallback in ``handler``'s list."""
        self._placed = True
        self._handler = handler  # also where the TensorBoard integration's writer is found
        callbacks = handler.callbacks
        callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        # Inserting before our old position keeps the handler's running loop on course: every
        # callback after us keeps its index.
        callbacks.insert(flow[-1] + 1 if flow else 0, self)

    def _place_ahead_of_integrations(self) -> None:
        """First event of a callback given as ``Trainer(callbacks=[...])`` or ``add_callback``: find the
        Trainer's callback list (the CallbackHandler calling this event, up the call stack) and move ahead
        of the integrations there. :meth:`add_to` does the same without the search."""
        if self._placed:
            return
        self._placed = True
        handler = self._find_handler()
        if handler is None:
            self._warn_once(
                "placement",
                "NerveCallback could not find the Trainer's callback list; report_to integrations that run "
                "before it will not see the nerve/ keys (state.log_history and the JSONL file still will). "
                "Attach it with NerveCallback(...).add_to(trainer).",
            )
            return
        self._place_in(handler)

    def _find_handler(self) -> Optional[CallbackHandler]:
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler) and any(cb is self for cb in candidate.callbacks):
                return candidate
            frame = frame.f_back
        return None

    def _set_up(self, model: Optional[nn.Module], refuse_bad_input: bool = False) -> bool:
        """Build the trackers once a model is known; False while the callback cannot measure.

        ``refuse_bad_input`` (while the Trainer is being built): a layer the model does not have or a
        memory budget too small raises; later the same problems warn and leave the callback idle.
        """
        self._place_ahead_of_integrations()
        if self._failed or model is None:
            return False
        if self._model is model:
            self._attach()  # a second train() or evaluate() after the hooks came off
            return True
        self.detach()
        try:
            windows = [
                Window("train", when=self._train_gate, layers_per_step=self.config.layers_per_step),
                Window(
                    "eval",
                    when=self._eval_gate,
                    keep_samples=self._real_samples,
                    staged=True,
                    layers_per_step=self.config.layers_per_step,
                ),
            ]
            self._tracker = FFNTracker(
                model,
                adapter=self.adapter,
                layers=self.config.layers,
                max_tokens=self.config.max_tokens,
                memory_budget_mb=self.config.memory_budget_mb,
                windows=windows,
                site_sharded=self.config.site_sharded,
                state_device=self.config.state_device,
                flow=self.config.flow,
                position_buckets=self.config.position_buckets,
                cross_layer=self.config.cross_layer,
            )
            self._eval_count = 0
        except (MemoryBudgetError, LayerRangeError) as error:
            if refuse_bad_input:
                raise  # asked for explicitly: refusing to start is the point
            self._disable(f"NerveCallback is disabled: {error}")
            return False
        except (ValueError, TypeError) as error:  # unknown architecture, mismatched widths, ...
            self._disable(f"NerveCallback is disabled: {error}")
            return False
        self._model = model
        self._attach()
        return True

    def _disable(self, message: str) -> None:
        self._failed = True
        self._tracker = None
        self._warn_once("disabled", message)

    def _refuse_data_parallel(self, args) -> None:
        """Several GPUs in one process: the Trainer wraps the model in nn.DataParallel, whose threaded
        replicas the trackers cannot follow. Stay idle, with a warning, rather than log wrong numbers."""
        if self._failed or getattr(args, "parallel_mode", None) != ParallelMode.NOT_DISTRIBUTED:
            return
        self.detach()
        self._disable(
            f"NerveCallback is disabled: the Trainer runs nn.DataParallel over {getattr(args, 'n_gpu', 'several')} "
            f"GPUs in one process, which it cannot measure. Launch with torchrun or accelerate launch "
            f"(DistributedDataParallel; the statistics of all ranks are reduced exactly), or use one GPU."
        )

    def _attach(self) -> None:
        """Put the tracker's hooks on the model when the configuration measures anything."""
        if (
            self._tracker is not None
            and not self._tracker.active
            and (self.config.measure_train or self.config.measure_eval)
        ):
            self._tracker.attach()

    def _train_gate(self, module: nn.Module) -> bool:
        """The ``train`` window records a forward: train mode during a measured step."""
        return self.config.measure_train and module.training and self._measured_step is not None

    def _eval_gate(self, module: nn.Module) -> bool:
        """The ``eval`` window records a forward: eval mode, outside a training step."""
        return self.config.measure_eval and not module.training and not self._in_train_step

    @staticmethod
    def _real_samples(batch_size: int) -> Optional[int]:
        """Leading samples of this process's evaluation batch that are not padding repeats (None: all).

        accelerate pads the last batch of every process to the same size with samples from the start,
        and ``gather_for_metrics`` keeps the first ``remainder`` samples of the rank-ordered concatenation.
        """
        if not distributed.is_distributed():
            return None
        remainder = _accelerate_padding()
        if remainder is None:
            return None
        return min(max(remainder - distributed.rank() * batch_size, 0), batch_size)

    def detach(self) -> None:
        """Remove every hook this callback placed on the model."""
        if self._tracker is not None:
            self._tracker.detach()

    # ------------------------------------------------------------ measurement
    def _measure(self, window: str, incomplete: Optional[str] = None) -> SpectralReport:
        """The window's report, or a NaN report with a warning if the window is incomplete or the
        computation fails. Collective: every rank calls it at the same point."""
        tracker = self._tracker
        try:
            report = tracker.compute(
                metrics=self.config.metrics,
                window=window,
                spectra_dtype=self.config.spectra_dtype,
                extra_metrics=self.config.extra_metrics,
                spectra=self.config.spectra,
            )
            if incomplete is None:
                return report
            self._warn_once(f"incomplete:{incomplete}", f"NerveCallback: {incomplete}; logging NaN for it")
        except Exception as error:  # noqa: BLE001 - a monitor must never stop training
            self._warn_once(
                f"measure:{type(error).__name__}",
                f"NerveCallback: measurement failed ({type(error).__name__}: {error}); logging NaN",
            )
        finally:
            tracker.reset(window)
        watched = tracker.window(window)
        sites = [site for i, site in enumerate(tracker.sites) if watched.watches(i)]
        return SpectralReport(rows=spectra.nan_rows(sites), eigenvalues={})

    def _log_dict(self, report: SpectralReport, prefix: str = "") -> dict:
        logs = report.to_log_dict(prefix=f"{prefix}nerve")
        if not self.config.log_per_site:
            logs = {k: v for k, v in logs.items() if k.startswith(f"{prefix}nerve/mean/")}
        if self.config.layers_per_step is not None:  # a mean over this step's group only: not logged
            logs = {k: v for k, v in logs.items() if not k.startswith(f"{prefix}nerve/mean/")}
        if self.config.metrics == "pr":  # only what the trace identity gives (and CKA, which needs no spectrum)
            logs = {k: v for k, v in logs.items() if k.rpartition("/")[2].startswith(("pr_", "cka_"))}
        return logs

    def _records_path(self, args) -> Optional[Path]:
        if not (self.config.write_jsonl and args.output_dir):
            return None
        return Path(args.output_dir) / RECORDS_FILENAME

    def _write(self, args, state, report: SpectralReport, split: str) -> None:
        """Append the report's rows, archive its spectra and draw them in TensorBoard (rank 0); a failed
        write warns once and the run goes on."""
        if not state.is_world_process_zero:
            return
        self._archive(args, state, report, split)
        self._histograms(args, state, report, split)
        path = self._records_path(args)
        if path is None:
            return
        records = [
            {"step": state.global_step, "split": split, "sites": len(report.rows), **row, **_beyond_rows(report, row)}
            for row in report.rows
        ]
        try:
            append_records(path, records)
        except OSError as error:
            self._warn_once(
                "write",
                f"NerveCallback: records are not being written to {path} ({type(error).__name__}: {error}); "
                f"the metrics still reach the Trainer's logs and report_to integrations. Later measurements "
                f"are tried again without a new warning.",
            )

    def _archive(self, args, state, report: SpectralReport, split: str) -> None:
        if not (self.config.save_spectra and args.output_dir and report.eigenvalues):
            return
        try:
            write_measurement(
                args.output_dir,
                split,
                state.global_step,
                report.eigenvalues,
                report.flow_eigenvalues,
                report.position_eigenvalues,
            )
        except OSError as error:
            self._warn_once(
                "archive",
                f"NerveCallback: spectra are not being written to {Path(args.output_dir) / ARCHIVE_DIRNAME} "
                f"({type(error).__name__}: {error}); the metrics still are. Later measurements are tried again.",
            )

    def _histograms(self, args, state, report: SpectralReport, split: str) -> None:
        """Each spectrum as a histogram of log10(λ / Σλ) at its step: through the writer of the Trainer's
        TensorBoard integration (so in the run's own event file), and through W&B's run when ``wandb`` is in
        ``report_to`` and has a run. Tags: ``<split>/nerve/<site>/log10_spectrum_<pre|post>``."""
        shares = {}
        for site, sides in report.eigenvalues.items():
            for side, values in zip(("pre", "post"), sides):
                values = values[values > 0]
                if values.numel() and bool(torch.isfinite(values).all()):
                    shares[f"{split}/nerve/{site}/log10_spectrum_{side}"] = torch.log10(values / values.sum()).numpy()
        if not shares:
            return
        callbacks = getattr(self._handler, "callbacks", ())
        board = next((cb for cb in callbacks if type(cb).__name__ == "TensorBoardCallback"), None)
        if board is not None:
            if getattr(board, "tb_writer", None) is None and hasattr(board, "_init_summary_writer"):
                board._init_summary_writer(args)
            writer = getattr(board, "tb_writer", None)
            for tag, values in shares.items() if writer is not None else ():
                writer.add_histogram(tag, values, state.global_step)
        if "wandb" in (args.report_to or []):
            wandb = sys.modules.get("wandb")  # the W&B integration imported it; never imported here
            if wandb is not None and getattr(wandb, "run", None) is not None:
                histograms = {tag: wandb.Histogram(values) for tag, values in shares.items()}
                wandb.log({**histograms, "train/global_step": state.global_step}, commit=False)

    # ------------------------------------------------------------ Trainer events
    @_never_raises("the callback stays idle")
    def _init_end(self, args, model) -> None:
        self._refuse_data_parallel(args)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._init_end(args, model)
        self._set_up(model, refuse_bad_input=True)  # bad layers or budget: refused while the Trainer is built

    @_never_raises("NerVE is not measured in this run")
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._refuse_data_parallel(args)
        self._set_up(model)
        if not (state.is_world_process_zero and args.output_dir):
            return
        # A resumed run re-measures nothing before its checkpoint: drop what came after it.
        path = self._records_path(args)
        try:
            if path is not None:
                drop_records_after(path, state.global_step)
            if self.config.save_spectra:
                drop_measurements_after(args.output_dir, state.global_step)
        except OSError as error:
            self._warn_once(
                "drop",
                f"NerveCallback: could not drop the records after step {state.global_step} in {args.output_dir} "
                f"({type(error).__name__}: {error}); a step may be kept twice (nerve report keeps the last)",
            )

    @_never_raises("this step is not measured")
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._pending = None
        self._in_train_step = True
        step = state.global_step + 1  # the optimizer step these micro-batches belong to
        if not self.config.measure_train or step % self.config.every_n_steps:
            return
        if not self._set_up(model):
            return
        self._tracker.rotate(step // self.config.every_n_steps - 1, "train")
        self._tracker.reset("train")
        self._measured_step = step

    @_never_raises("this step's NerVE values are not logged")
    def on_step_end(self, args, state, control, **kwargs):
        self._in_train_step = False
        if self._measured_step is None:
            return
        step, self._measured_step = self._measured_step, None
        report = self._measure("train")
        self._write(args, state, report, "train")
        self._pending = (step, self._log_dict(report))
        control.should_log = True  # the loss of these very micro-batches is logged at this step

    @_never_raises("this evaluation's NerVE values are NaN")
    def on_prediction_step(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if not self.config.measure_eval:
            return
        if self._tracker is None:  # added after the Trainer was built and first called here
            if not self._set_up(model):
                return
            self._catch_up(model, eval_dataloader)
        self._tracker.commit("eval")  # an evaluation is running: its batches add up until it is measured

    def _catch_up(self, model: nn.Module, dataloader) -> None:
        """Set up during an evaluation: the first batch ran before the hooks existed, so run it again.

        The Trainer's evaluation batches come in a fixed order, so the first batch of a fresh pass over
        the process's own shard is the one just evaluated. If that fails, this evaluation is logged as NaN.
        """
        try:
            from accelerate.utils import send_to_device

            batches = getattr(dataloader, "base_dataloader", dataloader)  # accelerate: this process's shard
            batch = next(iter(batches))
            parameter = next(model.parameters())
            batch = send_to_device(batch, parameter.device)
            with torch.no_grad():
                model(**batch) if isinstance(batch, dict) else model(batch)
        except Exception as error:  # noqa: BLE001
            self._eval_incomplete = (
                f"the callback was set up during an evaluation and could not re-run its first batch "
                f"({type(error).__name__}: {error}), so that evaluation's spectra would miss it"
            )

    @_never_raises("this record's NerVE values are not logged")
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        prefix = _eval_prefix(logs)
        if prefix is not None:
            extra = self._measure_evaluation(args, state, prefix)
            if extra is None:
                return
        elif self._pending is not None and self._pending[0] == state.global_step and "loss" in logs:
            extra = self._pending[1]
            self._pending = None
        else:
            return
        logs.update(extra)
        # The Trainer appended a copy of `logs` to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    @_never_raises("the NerVE values of this prediction are not added to its metrics")
    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if metrics is None:
            return
        prefix = _eval_prefix(metrics) or "test_"
        extra = self._measure_evaluation(args, state, prefix)
        if extra is not None:
            metrics.update(extra)

    def _measure_evaluation(self, args, state, prefix: str) -> Optional[dict]:
        """The eval-set measurement that just ended: written, returned as log keys, next group chosen."""
        if self._tracker is None or not self.config.measure_eval:
            return None
        incomplete, self._eval_incomplete = self._eval_incomplete, None
        report = self._measure("eval", incomplete)
        self._write(args, state, report, prefix.rstrip("_"))
        self._eval_count += 1  # round-robin: the next evaluation measures the next group
        self._tracker.rotate(self._eval_count, "eval")
        return self._log_dict(report, prefix)

    @_never_raises("the hooks may stay on the model")
    def on_train_end(self, args, state, control, **kwargs):
        if not self.config.measure_eval:  # else the hooks stay: a later trainer.evaluate() is measured too
            self.detach()
        self._measured_step = None
        self._in_train_step = False

    def __repr__(self) -> str:
        return f"NerveCallback({asdict(self.config)})"
