"""The outputs of NerveCallback for one run: which sinks its configuration asks for, built once per run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from nerve_hf.integrations import trainer_internals as internals
from nerve_hf.integrations.config import NerveConfig
from nerve_hf.report import SpectralReport
from nerve_hf.sinks.archive import SpectraArchiveSink
from nerve_hf.sinks.base import Sink
from nerve_hf.sinks.histograms import HistogramSink
from nerve_hf.sinks.records import RECORDS_FILENAME, RecordsSink

__all__ = ["CallbackSinks"]


class CallbackSinks:
    """The sinks of the Trainer's ``args`` (one per output the configuration asks for), built once per
    ``args`` and output folder so that each sink warns once per run.

    Args:
        config: the callback's options (``save_spectra``, ``write_jsonl``).
        handler: returns the Trainer's callback list, where the TensorBoard integration's writer is found.
    """

    def __init__(self, config: NerveConfig, handler: Callable[[], object]) -> None:
        self.config = config
        self._handler = handler
        self._built: Optional[tuple[tuple, list[Sink]]] = None  # ((id(args), output_dir), their sinks)

    def forget(self) -> None:
        """A new Trainer: build the sinks afresh at the next write."""
        self._built = None

    def for_args(self, args) -> list[Sink]:
        key = (id(args), args.output_dir)
        if self._built is None or self._built[0] != key:
            self._built = (key, self._build(args))
        return self._built[1]

    def _build(self, args) -> list[Sink]:
        """One sink per output the configuration asks for (an output is one more line here)."""
        run_dir = args.output_dir
        sinks: list[Sink] = []
        if self.config.save_spectra and run_dir:
            sinks.append(SpectraArchiveSink(run_dir))
        sinks.append(
            HistogramSink(
                tensorboard=lambda: internals.tensorboard_writer(self._handler(), args),
                wandb=lambda: internals.wandb_module(args),
            )
        )
        if self.config.write_jsonl and run_dir:
            sinks.append(RecordsSink(Path(run_dir) / RECORDS_FILENAME))
        return sinks

    def write(self, args, state, report: SpectralReport, split: str) -> None:
        """Hand the report to every sink (rank 0); a failed write warns once there and the run goes on."""
        if not state.is_world_process_zero:
            return
        for sink in self.for_args(args):
            sink.write(report, split, state.global_step)

    def drop_after(self, args, step: int) -> None:
        """A resumed run re-measures nothing before its checkpoint at ``step``: drop what came after it."""
        for sink in self.for_args(args):
            sink.drop_after(step)
