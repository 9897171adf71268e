"""NerveConfig: what NerveCallback measures and where it writes; one checked field per option.

``scripts/run_clm.py`` derives its ``--nerve_*`` flags from these fields (:mod:`nerve_hf.options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nerve_hf.options import (
    Validated,
    boolean,
    int_list,
    one_of,
    option,
    optional,
    positive_int,
    positive_number,
    text,
    token_cap,
)
from nerve_hf.tracking.measurements.positions import position_bucket_list

__all__ = ["NerveConfig"]


@dataclass
class NerveConfig(Validated):
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
    layers: Optional[list[int]] = option(
        None, "Block indices to watch (negative counts from the end); None: every FFN.", optional(int_list)
    )
    max_tokens: Optional[int] = option(
        None,
        "Per measurement and FFN, count at most this many tokens (pre and post share them); None: all.",
        optional(token_cap),
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
        "Refuse to start if one measurement's float64 covariance state, 2 x (D^2 + D) x 8 bytes per measured "
        "FFN, would exceed this many MiB.",
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
        "Where the float64 covariance state lives ('cpu': host memory); None: the activations' device.",
        optional(text),
    )
    spectra_dtype: str = option(
        "float64",
        "Eigendecomposition precision: 'float64', or 'float32' (faster on CPUs; its measured error: "
        "benchmarks/results/perf/spectra_precision_cpu.json).",
        one_of(("float64", "float32")),
        choices=["float64", "float32"],
    )
    spectra: str = option(
        "exact",
        "'exact': full eigendecompositions; 'estimate': FFNs at least 4096 wide get SE, EEE and JS from stochastic "
        "Lanczos quadrature and their top 64 eigenvalues (about 3x faster at 8192; measured error in "
        "benchmarks/results/perf/spectra_estimate_cpu.md); PR stays exact.",
        one_of(("exact", "estimate")),
        choices=["exact", "estimate"],
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
        one_of(("all", "pr")),
        choices=["all", "pr"],
    )

    flow: bool = option(
        True,
        "Also the spectra of each FFN's d-wide input and output (input -> pre -> post -> output: SE/PR/EEE per "
        "stage, JS between consecutive stages): 2 more d x d states per FFN, about 3% more time per measurement "
        "(docs/coherence.md).",
        boolean,
    )
    position_buckets: Optional[list[int]] = option(
        None,
        "Token-position bucket edges such as [0, 16, 64]: metrics per bucket [e_i, e_i+1) (the last open), logged as "
        "nerve/<site>/<metric>.pos<bucket>; one more pre/post state pair per bucket and FFN. None: off.",
        optional(position_bucket_list),
    )
    cross_layer: Optional[str] = option(
        None,
        "'adjacent' (or 'all' pairs): JS between the spectra of consecutive layers and linear CKA of their FFN "
        "inputs, logged as nerve/<site>/cka_next, js_pre_next, js_post_next; d x d per pair. None: off.",
        optional(one_of(("adjacent", "all"))),
        choices=["adjacent", "all"],
    )

    def __post_init__(self) -> None:
        if self.layers_per_step is not None and not self.log_per_site:
            raise ValueError("layers_per_step logs per-site keys only; it needs log_per_site=True")
        if self.site_sharded and self.cross_layer is not None:
            raise ValueError(
                "cross_layer cannot be measured with site_sharded=True: the two layers of a pair may belong to "
                "different processes; leave one of them off"
            )
