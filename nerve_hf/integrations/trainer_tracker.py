"""NerveCallback's FFNTracker: built once the Trainer's model is known, gated by where training is.

The tracker feeds two windows (:mod:`nerve_hf.tracking.windows`): ``train`` records the train-mode forwards
of a measured step (``measured_step`` set), ``eval`` the eval-mode forwards outside training steps
(``in_train_step`` unset, not inside ``generate``), staged until an evaluation confirms it and without
accelerate's padding repeats under several processes. NerveCallback decides when a step is measured and
when a window is computed; this class turns those decisions into hooks, gates and reports, and a failure
into a warning and NaN.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn
from transformers.training_args import ParallelMode

from model_adapters import LayerRangeError
from nerve_hf import spectra
from nerve_hf.integrations import trainer_internals as internals
from nerve_hf.integrations.config import NerveConfig
from nerve_hf.integrations.trainer_internals import in_generation
from nerve_hf.parallel import comm as distributed
from nerve_hf.probe.memory_plan import MemoryPlanError, plan_memory
from nerve_hf.report import SpectralReport
from nerve_hf.tracking.devices import is_dispatched
from nerve_hf.tracking.measurements.experts import ExpertRangeError
from nerve_hf.tracking.tracker import FFNTracker, MemoryBudgetError
from nerve_hf.tracking.windows import Window

__all__ = ["TrainerTracker"]


class TrainerTracker:
    """An FFNTracker with a ``train`` and an ``eval`` window, made from a :class:`NerveConfig`.

    Args:
        config: what to measure.
        adapter: where the FFNs are (``None`` looks the model up).
        warn_once: ``(key, message)``: the callback's warning, once per key.

    Attributes set by the callback: ``measured_step`` (the optimizer step whose micro-batches the
    ``train`` window records, or None) and ``in_train_step`` (no forward is an evaluation).
    """

    def __init__(self, config: NerveConfig, adapter, warn_once: Callable[[str, str], None]) -> None:
        self.config = config
        self.adapter = adapter
        self._warn_once = warn_once
        # The tracker stays attached from set-up on (torch.compile only sees hooks that exist before
        # its first trace); its windows' gates decide per forward which one records.
        self.tracker: Optional[FFNTracker] = None
        self.model: Optional[nn.Module] = None
        self.failed = False  # set-up failed (unknown architecture, ...): nothing is measured
        self.measured_step: Optional[int] = None
        self.in_train_step = False
        self.eval_count = 0  # evaluations measured so far (selects the next eval group)

    def set_up(self, model: Optional[nn.Module], refuse_bad_input: bool = False) -> bool:
        """Build the tracker once a model is known; False while nothing can be measured.

        ``refuse_bad_input`` (while the Trainer is being built): a layer or routed expert the model does not
        have or a memory budget too small raises; later the same problems warn and leave the callback idle.
        A model dispatched by a device map (or quantized) is never moved: each FFN's statistics live on the
        device its layer runs on (or ``state_device``), and the per-device memory plan of ``nerve probe``
        (:func:`~nerve_hf.probe.memory_plan.plan_memory`: state and eigendecomposition against each device's
        free memory) is checked here like the budget.
        """
        if self.failed or model is None:
            return False
        if self.model is model:
            self.attach()  # a second train() or evaluate() after the hooks came off
            return True
        self.detach()
        try:
            self.tracker = self._build(model)
            self.eval_count = 0
            if is_dispatched(model):  # spread over devices by a device map: each must hold its sites' state
                plan_memory(model, self.tracker, self.config.spectra).check("NerveCallback", cli=False)
        except (MemoryBudgetError, MemoryPlanError, LayerRangeError, ExpertRangeError) as error:
            if refuse_bad_input:
                raise  # asked for explicitly: refusing to start is the point
            self.disable(f"NerveCallback is disabled: {error}")
            return False
        except (ValueError, TypeError) as error:  # unknown architecture, mismatched widths, ...
            self.disable(f"NerveCallback is disabled: {error}")
            return False
        self.model = model
        self.attach()
        return True

    def _build(self, model: nn.Module) -> FFNTracker:
        config = self.config
        windows = [
            Window("train", when=self._train_gate, layers_per_step=config.layers_per_step),
            Window(
                "eval",
                when=self._eval_gate,
                keep_samples=self._real_samples,
                staged=True,
                layers_per_step=config.layers_per_step,
            ),
        ]
        return FFNTracker(
            model,
            adapter=self.adapter,
            layers=config.layers,
            max_tokens=config.max_tokens,
            memory_budget_mb=config.memory_budget_mb,
            windows=windows,
            site_sharded=config.site_sharded,
            state_device=config.state_device,
            flow=config.flow,
            position_buckets=config.position_buckets,
            cross_layer=config.cross_layer,
            experts=config.experts,
            experts_per_step=config.experts_per_step,
        )

    def disable(self, message: str) -> None:
        self.failed = True
        self.tracker = None
        self._warn_once("disabled", message)

    def refuse_data_parallel(self, args) -> None:
        """Several GPUs in one process: the Trainer wraps the model in nn.DataParallel, whose threaded
        replicas the trackers cannot follow. Stay idle, with a warning, rather than log wrong numbers."""
        if self.failed or getattr(args, "parallel_mode", None) != ParallelMode.NOT_DISTRIBUTED:
            return
        self.detach()
        self.disable(
            f"NerveCallback is disabled: the Trainer runs nn.DataParallel over {getattr(args, 'n_gpu', 'several')} "
            f"GPUs in one process, which it cannot measure. Launch with torchrun or accelerate launch "
            f"(DistributedDataParallel; the statistics of all ranks are reduced exactly), or use one GPU."
        )

    def attach(self) -> None:
        """Put the tracker's hooks on the model when the configuration measures anything."""
        if (
            self.tracker is not None
            and not self.tracker.active
            and (self.config.measure_train or self.config.measure_eval)
        ):
            self.tracker.attach()

    def detach(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()

    def end_stray_forward(self) -> bool:
        """Between the Trainer's events no forward runs; one that seems to is a forward a KeyboardInterrupt
        ended (torch skips the hooks that would have closed it). Forget it (hooks off and on again), so the
        next forward is a top-level one again; True if there was one."""
        tracker = self.tracker
        if tracker is None or not tracker.active or not tracker.points.in_forward:
            return False
        tracker.detach()
        tracker.attach()
        return True

    def forget_windows(self) -> None:
        """A new Trainer: nothing recorded for the previous one carries over."""
        self.measured_step, self.in_train_step = None, False
        if self.tracker is not None:
            self.tracker.reset("train")
            self.tracker.reset("eval")

    def _train_gate(self, module: nn.Module) -> bool:
        """The ``train`` window records a forward: train mode during a measured step."""
        return self.config.measure_train and module.training and self.measured_step is not None

    def _eval_gate(self, module: nn.Module) -> bool:
        """The ``eval`` window records a forward: eval mode, outside a training step, and not one of
        ``generate``'s (``predict_with_generate``: the teacher-forced forward with labels is measured)."""
        return self.config.measure_eval and not module.training and not self.in_train_step and not in_generation()

    @staticmethod
    def _real_samples(batch_size: int) -> Optional[int]:
        """Leading samples of this process's evaluation batch that are not padding repeats (None: all).

        accelerate pads the last batch of every process to the same size with samples from the start,
        and ``gather_for_metrics`` keeps the first ``remainder`` samples of the rank-ordered concatenation.
        """
        if not distributed.is_distributed():
            return None
        remainder = internals.padded_last_batch()
        if remainder is None:
            return None
        return min(max(remainder - distributed.rank() * batch_size, 0), batch_size)

    def begin_train_step(self, step: int) -> None:
        """Record the micro-batches of optimizer step ``step`` (a multiple of ``every_n_steps``) afresh, in
        the group of blocks whose turn it is."""
        self.tracker.rotate(step // self.config.every_n_steps - 1, "train")
        self.tracker.reset("train")
        self.measured_step = step

    def next_eval_group(self) -> None:
        """Round-robin: the next evaluation measures the next group of blocks."""
        self.eval_count += 1
        self.tracker.rotate(self.eval_count, "eval")

    def measure(self, window: str, incomplete: Optional[str] = None) -> SpectralReport:
        """The window's report, or a NaN report with a warning if the window is incomplete (``incomplete``
        says why) or the computation fails; the window is empty afterwards. Collective: every rank calls it
        at the same point."""
        tracker = self.tracker
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
