"""``nerve probe``: NerVE metrics of every FFN of a pretrained checkpoint on a fixed set of inputs.

* :mod:`~nerve_hf.probe.api`: :class:`ProbeConfig`, :func:`probe_model` (any model, your batches),
  :func:`run_probe` (what the command does) and :func:`write_probe` (the output files).
* :mod:`~nerve_hf.probe.models`: which library loads MODEL (transformers or timm) and loading it.
* :mod:`~nerve_hf.probe.inputs`: text and image batches (text file, dataset, embedded corpus or digits).

Importing this package does not import torch; the modules load heavy libraries when a function runs.
"""

from nerve_hf.probe.api import (
    ProbeConfig,
    ProbeResult,
    choose_layers,
    format_table,
    probe_model,
    run_probe,
    write_probe,
)

__all__ = ["ProbeConfig", "ProbeResult", "probe_model", "run_probe", "write_probe", "format_table", "choose_layers"]
