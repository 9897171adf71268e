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

The module holds the scheduling: one class whose methods are the Trainer's events, each guarded so that it
cannot raise into training; it decides when to measure and which window, then hands the report to its sinks
and the log keys to the Trainer. Its options live in :mod:`nerve_hf.integrations.config`; the tracker, its
windows' gates and the NaN fallback in :mod:`nerve_hf.integrations.trainer_tracker`; the outputs in
:mod:`nerve_hf.sinks` (one small class each); the logged keys in :mod:`nerve_hf.integrations.log_keys`; every
reach into the Trainer's or accelerate's internals in :mod:`nerve_hf.integrations.trainer_internals`.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import asdict, fields
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from nerve_hf.integrations import trainer_internals as internals
from nerve_hf.integrations.callback_sinks import CallbackSinks
from nerve_hf.integrations.config import NerveConfig
from nerve_hf.integrations.log_keys import eval_prefix, log_dict
from nerve_hf.integrations.trainer_tracker import TrainerTracker
from nerve_hf.options import OptionFixedError
from nerve_hf.tracking.devices import input_device

__all__ = ["NerveConfig", "NerveCallback"]


FIXED = (
    "NerveCallback's options are fixed once it is given to a Trainer (its hooks and outputs are built from "
    "them); build a new NerveCallback(...) with the options wanted"
)


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
        self._config = config if config is not None else NerveConfig(**options)
        self.adapter = adapter
        self._tracking = TrainerTracker(self.config, adapter, self._warn_once)  # the tracker and its gates
        self._eval_incomplete: Optional[str] = None  # why the running evaluation cannot be measured whole
        self._pending: Optional[tuple[int, dict]] = None  # (step, logs) of the last train measurement
        self._warned: set[str] = set()
        self._handler = None  # the Trainer's callback list, once found
        self._sinks = CallbackSinks(self.config, lambda: self._handler)
        self._evaluation = None  # weak reference to the running evaluation's marker (trainer_internals)

    @property
    def config(self) -> NerveConfig:
        """The options; fixed once the callback meets a Trainer (assigning one then raises OptionFixedError)."""
        return self._config

    @config.setter
    def config(self, config: NerveConfig) -> None:
        if self._handler is not None:
            raise OptionFixedError(f"config cannot change: {FIXED}")
        raise AttributeError("pass the options to NerveCallback(...); config is read-only")

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
        self._tracking.refuse_data_parallel(trainer.args)
        self._set_up(trainer.model, refuse_bad_input=True)
        return self

    def _place_in(self, handler) -> None:
        """Move this callback ahead of the integrations in ``handler``'s list; a new Trainer's list (one
        callback object given to a second Trainer) also starts this callback's state tied to a Trainer
        afresh: its sinks (the TensorBoard writer, the records file), a pending log and unfinished windows."""
        if self._handler is not None and handler is not self._handler:
            self._sinks.forget()
            self._pending = None
            self._eval_incomplete = None
            self._tracking.forget_windows()
        self._handler = handler  # also where the TensorBoard integration's writer is found
        self._config.fix(FIXED)  # the hooks, sinks and gates are built from it: one rule for every option
        internals.place_after_default_flow(handler, self)

    def _place_ahead_of_integrations(self) -> None:
        """Every event of a callback given as ``Trainer(callbacks=[...])`` or ``add_callback``: find the
        Trainer's callback list (through trainer_internals, up the call stack); the first time
        in a list, move ahead of the integrations there. :meth:`add_to` does the same without the search."""
        handler = internals.find_callback_handler(self)
        if handler is not None and handler is self._handler:
            return
        if handler is None:
            if self._handler is not None:
                return  # an event called by hand: stay where we are
            self._warn_once(
                "placement",
                "NerveCallback could not find the Trainer's callback list; report_to integrations that run "
                "before it will not see the nerve/ keys (state.log_history and the JSONL file still will). "
                "Attach it with NerveCallback(...).add_to(trainer).",
            )
            return
        self._place_in(handler)

    def _set_up(self, model: Optional[nn.Module], refuse_bad_input: bool = False) -> bool:
        """Find our place in the Trainer's callback list, then build the tracker once a model is known;
        False while the callback cannot measure (see :meth:`TrainerTracker.set_up`)."""
        self._place_ahead_of_integrations()
        return self._tracking.set_up(model, refuse_bad_input)

    def detach(self) -> None:
        """Remove every hook this callback placed on the model."""
        self._tracking.detach()

    # ------------------------------------------------------------ Trainer events
    @_never_raises("the callback stays idle")
    def _init_end(self, args, model) -> None:
        self._tracking.refuse_data_parallel(args)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._init_end(args, model)
        self._set_up(model, refuse_bad_input=True)  # bad layers or budget: refused while the Trainer is built

    @_never_raises("NerVE is not measured in this run")
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._tracking.refuse_data_parallel(args)
        self._set_up(model)
        self._discard_unfinished()
        if not (state.is_world_process_zero and args.output_dir):
            return
        # A resumed run re-measures nothing before its checkpoint: drop what came after it.
        self._sinks.drop_after(args, state.global_step)

    @_never_raises("this step is not measured")
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._pending = None
        self._set_up(model)  # a new Trainer's list is found here too
        self._discard_unfinished()
        self._tracking.in_train_step = True  # between on_step_begin and on_step_end: no forward is an evaluation
        step = state.global_step + 1  # the optimizer step these micro-batches belong to
        if not self.config.measure_train or step % self.config.every_n_steps:
            return
        if self._set_up(model):
            self._tracking.begin_train_step(step)

    @_never_raises("this step's NerVE values are not logged")
    def on_step_end(self, args, state, control, **kwargs):
        tracking = self._tracking
        tracking.in_train_step = False
        if tracking.measured_step is None:
            return
        step, tracking.measured_step = tracking.measured_step, None
        report = tracking.measure("train")
        self._sinks.write(args, state, report, "train")
        self._pending = (step, log_dict(report, self.config))
        control.should_log = True  # the loss of these very micro-batches is logged at this step

    @_never_raises("this evaluation's NerVE values are NaN")
    def on_prediction_step(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if not self.config.measure_eval:
            return
        tracking = self._tracking
        if tracking.tracker is None:  # added after the Trainer was built and first called here
            if not self._set_up(model):
                return
            self._catch_up(model, eval_dataloader)
            evaluation = internals.running_evaluation()
            self._evaluation = weakref.ref(evaluation) if evaluation is not None else None
        else:
            self._set_up(model)
            if self._first_batch_missed():
                tracking.tracker.reset("eval")
                self._catch_up(model, eval_dataloader)
        tracking.tracker.commit("eval")  # an evaluation is running: its batches add up until it is measured

    def _first_batch_missed(self) -> bool:
        """At an evaluation's prediction step: whether the eval window may not hold exactly this evaluation's
        first batch, because a training step never ended (its gate kept the batch out) or an earlier
        evaluation never ended (its batches are still in the window). Either is discarded with a warning."""
        evaluation = internals.running_evaluation()
        known = self._evaluation() if self._evaluation is not None else None
        new_evaluation = evaluation is not None and evaluation is not known
        if evaluation is not None:
            self._evaluation = weakref.ref(evaluation)
        return self._discard_unfinished(keep_eval=not new_evaluation)

    def _discard_unfinished(self, keep_eval: bool = False) -> bool:
        """Windows that did not complete, whatever ended them (an exception or an interrupt mid-step or
        mid-evaluation, caught by the user): a measured training step that never reached ``on_step_end``,
        an evaluation whose batches were confirmed but never measured. Each is discarded with a warning;
        True if any was."""
        tracking = self._tracking
        discarded = tracking.end_stray_forward()
        if tracking.measured_step is not None or tracking.in_train_step:
            step = tracking.measured_step
            if step is not None:
                self._warn_once(
                    f"unfinished:train:{step}",
                    f"NerveCallback: training step {step} did not complete (interrupted or raised); its "
                    f"measurement is discarded",
                )
                tracking.tracker.reset("train")
            tracking.measured_step, tracking.in_train_step = None, False
            discarded = True
        if not keep_eval and tracking.tracker is not None and tracking.tracker.window("eval").confirmed:
            self._warn_once(
                f"unfinished:eval:{tracking.eval_count}",
                "NerveCallback: an evaluation did not complete (interrupted or raised); its batches are "
                "discarded and the next evaluation is measured from its first batch",
            )
            tracking.tracker.reset("eval")
            discarded = True
        return discarded

    def _catch_up(self, model: nn.Module, dataloader) -> None:
        """Set up during an evaluation: the first batch ran before the hooks existed, so run it again.

        The Trainer's evaluation batches come in a fixed order, so the first batch of a fresh pass over
        the process's own shard is the one just evaluated. If that fails, this evaluation is logged as NaN.
        """
        try:
            from accelerate.utils import send_to_device

            batch = next(iter(internals.process_shard(dataloader)))
            # where the model's first module runs: a dispatched model's first parameter may be on disk (meta)
            batch = send_to_device(batch, input_device(model))
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
        prefix = eval_prefix(logs)
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
        internals.add_to_last_log(state, extra)  # the Trainer appended a copy of `logs` before on_log

    @_never_raises("the NerVE values of this prediction are not added to its metrics")
    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if metrics is None:
            return
        prefix = eval_prefix(metrics) or "test_"
        extra = self._measure_evaluation(args, state, prefix)
        if extra is not None:
            metrics.update(extra)

    def _measure_evaluation(self, args, state, prefix: str) -> Optional[dict]:
        """The eval-set measurement that just ended: written, returned as log keys, next group chosen."""
        if self._tracking.tracker is None or not self.config.measure_eval:
            return None
        incomplete, self._eval_incomplete = self._eval_incomplete, None
        report = self._tracking.measure("eval", incomplete)
        self._sinks.write(args, state, report, prefix.rstrip("_"))
        self._tracking.next_eval_group()
        return log_dict(report, self.config, prefix)

    @_never_raises("the hooks may stay on the model")
    def on_train_end(self, args, state, control, **kwargs):
        if not self.config.measure_eval:  # else the hooks stay: a later trainer.evaluate() is measured too
            self.detach()
        self._tracking.measured_step = None
        self._tracking.in_train_step = False

    def __repr__(self) -> str:
        return f"NerveCallback({asdict(self.config)})"
