"""Every place where NerveCallback reaches past the public ``TrainerCallback`` API, and why.

A ``TrainerCallback`` gets ``args``, ``state``, ``control`` and a few objects (model, dataloaders) per event;
it is never given the Trainer, its callback list, the other callbacks or accelerate's state. Four things the
callback needs are not offered publicly; each is reached here and nowhere else, and
``tests/integrations/test_trainer_internals.py`` fails when a transformers or accelerate release changes what
these functions rely on:

- **The Trainer's callback list** (:func:`find_callback_handler`, :func:`place_after_default_flow`). The
  Trainer calls ``on_log`` of its callbacks in list order, and the ``report_to`` integrations are added
  before user callbacks; a callback that adds keys to ``logs`` must run before them for its keys to reach
  TensorBoard, W&B, MLflow... in the record that carries the loss. A callback given as
  ``Trainer(callbacks=[...])`` never sees the handler, so the first event finds it up the call stack
  (``CallbackHandler.call_event`` is a frame whose ``self`` is the handler) and the callback moves itself
  right after ``DefaultFlowCallback``.
- **The TensorBoard writer** (:func:`tensorboard_writer`): histograms belong in the run's own event file,
  whose ``SummaryWriter`` is ``TensorBoardCallback.tb_writer``; it is made lazily by
  ``_init_summary_writer(args)`` (and closed and dropped at the end of every ``train()``).
- **The W&B run** (:func:`wandb_module`): ``wandb.run`` is W&B's public handle of the active run, but the
  module is only looked up in ``sys.modules`` (imported by the Trainer's W&B integration), never imported
  here: W&B is not a dependency.
- **accelerate's padding of the last batch** (:func:`padded_last_batch`, :func:`process_shard`): under
  several processes, accelerate pads every process's last evaluation batch to the same size with repeated
  samples, and ``gather_for_metrics`` drops them from the loss by ``GradientState.remainder``; the callback
  leaves the same samples out of the spectra. ``DataLoaderShard.base_dataloader`` is the process's own
  shard, whose first batch is re-run when the callback was set up during an evaluation.

- **Which evaluation is running** (:func:`running_evaluation`): an evaluation that raised leaves no event
  behind, so the next one must be told apart from it by something that exists once per evaluation. Each
  call of ``Trainer.evaluation_loop`` makes its own ``all_losses`` container (a local of that frame); the
  callback keeps a weak reference to it, so the first batch of the next evaluation shows a new one.
- **Whether transformers' ``generate`` is running** (:func:`in_generation`): ``Seq2SeqTrainer`` with
  ``predict_with_generate`` calls ``generate`` before the teacher-forced forward of every evaluation batch;
  generate's forwards read generated tokens, not the batch's, and neither they nor the calls' arguments
  say so. A frame of ``transformers/generation/`` on the call stack does. This module imports nothing
  of ``nerve_hf``, so the token sources and hook points of ``nerve_hf.tracking`` use it too.

The Trainer also appends a copy of ``logs`` to ``state.log_history`` just before ``on_log``;
:func:`add_to_last_log` puts the callback's keys there too.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Optional

from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

__all__ = [
    "find_callback_handler",
    "place_after_default_flow",
    "tensorboard_writer",
    "wandb_module",
    "padded_last_batch",
    "process_shard",
    "add_to_last_log",
    "running_evaluation",
    "in_generation",
]


def find_callback_handler(callback, frame: Optional[FrameType] = None) -> Optional[CallbackHandler]:
    """The ``CallbackHandler`` up the call stack (from ``frame``, default the caller's) whose list holds
    ``callback``; None when the event was not called by one."""
    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and any(cb is callback for cb in candidate.callbacks):
            return candidate
        frame = frame.f_back
    return None


def place_after_default_flow(handler: CallbackHandler, callback) -> None:
    """Move ``callback`` (which must be in ``handler.callbacks``) right after the last ``DefaultFlowCallback``
    there, so ahead of the ``report_to`` integrations; first in the list when there is none.

    Safe inside the handler's running loop: the callback only moves towards the front, so every callback
    after its old position keeps its index and the loop calls each of them once.
    """
    callbacks = handler.callbacks
    callbacks.remove(callback)
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flow[-1] + 1 if flow else 0, callback)


def tensorboard_writer(handler: Optional[CallbackHandler], args):
    """The ``SummaryWriter`` of the Trainer's ``TensorBoardCallback`` in ``handler`` (made now if the
    integration has none yet); None without that integration or a writer."""
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        return None
    board = next((cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, TensorBoardCallback)), None)
    if board is None:
        return None
    if getattr(board, "tb_writer", None) is None and hasattr(board, "_init_summary_writer"):
        board._init_summary_writer(args)
    return getattr(board, "tb_writer", None)


def wandb_module(args):
    """The ``wandb`` module when ``"wandb"`` is in ``args.report_to`` and the module (imported by the
    Trainer's W&B integration) has an active run; else None. Never imports ``wandb``."""
    if "wandb" not in (args.report_to or []):
        return None
    wandb = sys.modules.get("wandb")
    return wandb if wandb is not None and getattr(wandb, "run", None) is not None else None


def padded_last_batch() -> Optional[int]:
    """While accelerate's dataloader yields its last batch and that batch is padded: how many samples of the
    global last batch are real (``GradientState.remainder``); else None (accelerate absent, outside a
    dataloader, not the last batch, or no padding)."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return None
    state = GradientState()
    if not state.initialized or not state.in_dataloader or not state.end_of_dataloader:
        return None
    remainder = state.remainder
    return remainder if remainder > 0 else None


def process_shard(dataloader):
    """This process's own shard of an accelerate-prepared dataloader (``base_dataloader``); any other
    iterable as it is."""
    return getattr(dataloader, "base_dataloader", dataloader)


def add_to_last_log(state, extra: dict) -> None:
    """Add ``extra`` to the record the Trainer appended to ``state.log_history`` for this step's ``on_log``."""
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(extra)


def running_evaluation(frame: Optional[FrameType] = None):
    """An object that exists once per running ``Trainer.evaluation_loop`` call (its ``all_losses``
    container), found up the call stack from ``frame`` (default the caller's); None outside one."""
    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "evaluation_loop":
            return frame.f_locals.get("all_losses")
        frame = frame.f_back
    return None


_GENERATION_DIR: list[str] = []  # transformers' generation package, found on first use


def in_generation(frame: Optional[FrameType] = None) -> bool:
    """True while a ``generate`` of transformers runs: a frame of a module in ``transformers/generation/``
    (the decoding loops of ``GenerationMixin``, where every model's ``generate`` ends) is up the call stack
    from ``frame`` (default the caller's). Its forwards read generated tokens (each beam, one cached token
    per step, the pads of finished sequences), not a batch's data tokens."""
    if not _GENERATION_DIR:
        import transformers

        _GENERATION_DIR.append(os.path.join(os.path.dirname(os.path.abspath(transformers.__file__)), "generation", ""))
    frame = frame if frame is not None else sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_GENERATION_DIR[0]):
            return True
        frame = frame.f_back
    return False
