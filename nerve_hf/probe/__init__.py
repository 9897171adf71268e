"""``nerve probe``: NerVE metrics of every FFN of a pretrained checkpoint on a fixed set of inputs.

* :mod:`~nerve_hf.probe.config`: :class:`ProbeConfig`, whose fields are the command's flags.
* :mod:`~nerve_hf.probe.models`: which library loads MODEL (transformers or timm) and loading it.
* :mod:`~nerve_hf.probe.inputs`: text and image batches (text file, dataset, embedded corpus or digits).
* :mod:`~nerve_hf.probe.measure`: :func:`probe_model` (any model, your batches; its train/eval mode is
  restored afterwards) and :func:`run_probe` (what the command does: load, build the batches, measure).
* :mod:`~nerve_hf.probe.result`: :class:`ProbeResult` and its ``report.json`` content.
* :mod:`~nerve_hf.probe.tables`, :mod:`~nerve_hf.probe.layers`, :mod:`~nerve_hf.probe.write`: the terminal
  tables, the layers whose spectra are plotted, and :func:`write_probe` (``report.json``, ``report.csv``,
  ``eigenvalues.npz`` and the PNG plots in a folder).
* :mod:`~nerve_hf.probe.series`: several checkpoints of one model on the same tokens.

Transformers and timm load only when a model is loaded.
"""

from nerve_hf.probe.config import ProbeConfig
from nerve_hf.probe.layers import choose_layers
from nerve_hf.probe.measure import probe_model, run_probe
from nerve_hf.probe.result import ProbeResult
from nerve_hf.probe.tables import format_table
from nerve_hf.probe.write import write_probe

__all__ = ["ProbeConfig", "ProbeResult", "probe_model", "run_probe", "write_probe", "format_table", "choose_layers"]
