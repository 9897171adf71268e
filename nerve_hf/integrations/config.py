"""NerveConfig: what NerveCallback measures and where it writes; one checked field per option.

The options of what is measured (layers, max_tokens, flow, position_buckets, cross_layer, spectra, experts,
experts_per_step) come from
:class:`~nerve_hf.measurement_options.MeasurementOptions`, shared with ``nerve probe``; the fields here are the
callback's own. ``scripts/run_clm.py`` derives its ``--nerve_*`` flags from all of them (:mod:`nerve_hf.options`).

>>> NerveConfig().flow, NerveConfig(every_n_steps=10, layers=[0, -1]).layers
(True, [0, -1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nerve_hf.measurement_options import MeasurementOptions
from nerve_hf.options import (
    OptionConflictError,
    boolean,
    device,
    one_of,
    option,
    optional,
    positive_int,
    positive_number,
)
from nerve_hf.spectra.exact import SPECTRA_DTYPES

__all__ = ["NerveConfig"]

METRICS = ("all", "pr")  # values of the metrics option


@dataclass
class NerveConfig(MeasurementOptions):
    """What NerveCallback measures and where it writes. Every field is checked when it is set."""

    every_n_steps: int = option(
        100, "Measure the training micro-batches of each optimizer step k with k % every_n_steps == 0.", positive_int
    )
    measure_train: bool = option(
        True, "Measure training batches at those steps (False: evaluation spectra only).", boolean
    )
    measure_eval: bool = option(
        True, "Measure the evaluation set during every evaluation, logged with the eval prefix.", boolean
    )
    log_per_site: bool = option(
        True, "Log nerve/<site>/<metric> for every FFN as well as nerve/mean/<metric>.", boolean
    )
    save_spectra: bool = option(
        True,
        "Rank 0 keeps every measurement's eigenvalues in <output_dir>/nerve_spectra/ (float32 .npz per "
        "measurement; nerve_hf.sinks.archive.load_spectra reads them); off for huge models.",
        boolean,
    )
    write_jsonl: bool = option(True, "Rank 0 appends every measurement to <output_dir>/nerve_metrics.jsonl.", boolean)
    layers_per_step: Optional[int] = option(
        None,
        "Round-robin: each measurement covers the next this-many watched blocks (train: group "
        "(k / every_n_steps - 1) mod #groups at step k; eval: the next group each evaluation); only per-site "
        "keys are logged then.",
        optional(positive_int),
    )
    memory_budget_mb: Optional[float] = option(
        None,
        "Refuse to start if one measurement's float64 state would exceed this many MiB: per measured FFN "
        "[(1 + B) x 2 x (D^2 + D) + s x (d^2 + d)] x 8 bytes (D its hidden width, d its model width, B the "
        "position buckets, s = 2 stages with flow, 1 with cross_layer alone, else 0), plus (d^2 + 2d) x 8 per "
        "cross-layer pair.",
        optional(positive_number),
    )
    site_sharded: bool = option(
        False,
        "Under several processes, each measures about 1/W of the FFNs on its own tokens (a per-site token "
        "subsample; every record says how many tokens) and keeps state only for them.",
        boolean,
    )
    state_device: Optional[str] = option(
        None,
        "Where the float64 covariance state lives ('cpu': host memory, 'cuda:1', ...; it must exist here); None: "
        "the activations' device.",
        optional(device),
    )
    spectra_dtype: str = option(
        "float64",
        "Eigendecomposition precision: 'float64', or 'float32' (faster on CPUs; its measured error: "
        "benchmarks/results/perf/spectra_precision_cpu.json).",
        one_of(SPECTRA_DTYPES),
        choices=list(SPECTRA_DTYPES),
    )
    extra_metrics: bool = option(
        False,
        "Also effective rank, stable rank, the alpha-ReQ exponent and a finite-sample-corrected PR in every "
        "record of nerve_metrics.jsonl (nerve_hf.extra_metrics); the logged keys stay the seven paper metrics.",
        boolean,
    )
    metrics: str = option(
        "all",
        "'all': the seven metrics; 'pr': only pr_pre/pr_post, by the trace identity, no eigendecomposition.",
        one_of(METRICS),
        choices=list(METRICS),
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # the measurement options' own cross-field checks
        if self.layers_per_step is not None and not self.log_per_site:
            raise OptionConflictError(
                "layers_per_step logs per-site keys only; it needs log_per_site=True",
                ("layers_per_step", "log_per_site"),
            )
        if self.site_sharded and self.cross_layer is not None:
            raise OptionConflictError(
                "cross_layer cannot be measured with site_sharded=True: the two layers of a pair may belong to "
                "different processes; leave one of them off",
                ("cross_layer", "site_sharded"),
            )
