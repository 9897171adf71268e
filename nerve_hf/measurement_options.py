"""What is measured: the options that NerveConfig (training) and ProbeConfig (``nerve probe``) share.

Each option is defined here once, with its default, its help text and its check (:func:`nerve_hf.options.option`).
:class:`~nerve_hf.integrations.config.NerveConfig` and :class:`~nerve_hf.probe.config.ProbeConfig` inherit the
fields; functions that take these options as keywords (:func:`nerve_hf.probe.probe_model`) default them to
:data:`MEASUREMENT_DEFAULTS`. The fields are keyword-only, so a config that adds a required field (the probe's
MODEL) can inherit them.

>>> MeasurementOptions()
MeasurementOptions(layers=None, max_tokens=None, flow=True, position_buckets=None, cross_layer=None, spectra='exact', \
experts=None, experts_per_step=None)
>>> default("flow"), MEASUREMENT_DEFAULTS["spectra"]
(True, 'exact')
>>> MeasurementOptions(spectra="fast")
Traceback (most recent call last):
...
nerve_hf.options.OptionValueError: spectra must be one of 'exact', 'estimate', got 'fast'
>>> MeasurementOptions(experts=[0], experts_per_step=2)
Traceback (most recent call last):
...
nerve_hf.errors.InputError: give experts (a subset) or experts_per_step (a round-robin share), not both
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

from nerve_hf.errors import InputError
from nerve_hf.options import (
    OptionValueError,
    Validated,
    boolean,
    int_list,
    one_of,
    option,
    optional,
    positive_int,
    token_cap,
)
from nerve_hf.spectra.estimate import DEFAULT_TOP_K, ESTIMATE_MIN_DIM
from nerve_hf.spectra.exact import SPECTRA_METHODS
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_CHOICES
from nerve_hf.tracking.measurements.positions import position_bucket_list

__all__ = ["MEASUREMENT", "MeasurementOptions", "MEASUREMENT_DEFAULTS", "default"]

# The argument group of these options in ``nerve probe --help`` (a field's ``group`` metadata). ``metavar``
# metadata is how ``nerve probe`` spells a value (comma lists); run_clm's flags leave both out.
MEASUREMENT = "measurement"


def expert_indices(name: str, value: Any) -> list[int]:
    """A non-empty list of routed-expert indices (ints >= 0), sorted, each once."""
    indices = int_list(name, value)
    if any(index < 0 for index in indices):
        raise OptionValueError(name, "a non-empty list of expert indices >= 0 such as [0, 5]", value)
    return sorted(set(indices))


@dataclass(kw_only=True)
class MeasurementOptions(Validated):
    """Which FFNs are measured, on how many tokens, and which features beyond the paper's pre/post pair.
    Every field is checked when it is set."""

    layers: Optional[list[int]] = option(
        None,
        "Block indices to measure (negative counts from the end); None: every FFN.",
        optional(int_list),
        group=MEASUREMENT,
        metavar="I,J,...",
    )
    max_tokens: Optional[int] = option(
        None,
        "Per measurement and FFN, count at most this many tokens (pre and post share them); None: all.",
        optional(token_cap),
        group=MEASUREMENT,
    )
    flow: bool = option(
        True,
        "Also the spectra of each FFN's d-wide input and output (input -> pre -> post -> output: SE/PR/EEE per "
        "stage, JS between consecutive stages): 2 more d x d states per FFN, about 3% more time per measurement "
        "(docs/coherence.md; the probe writes flow.png and flow_eigenvalues.npz).",
        boolean,
        group=MEASUREMENT,
    )
    position_buckets: Optional[list[int]] = option(
        None,
        "Token-position bucket edges such as 0, 16, 64: metrics per bucket [e_i, e_i+1) of positions (the last "
        "open); one more pre/post state pair per bucket and FFN. Logged as nerve/<site>/<metric>.pos<bucket>; "
        "the probe writes positions.csv and positions.png. None: off.",
        optional(position_bucket_list),
        group=MEASUREMENT,
        metavar="E0,E1,...",
    )
    cross_layer: Optional[str] = option(
        None,
        "'adjacent' (or 'all' pairs): JS between the spectra of two layers and linear CKA of their FFN inputs; "
        "d x d per pair. Logged as nerve/<site>/cka_next, js_pre_next, js_post_next; the probe writes "
        "cross_layer.csv, cka_matrix.csv and cross_layer.png. None: off.",
        optional(one_of(CROSS_LAYER_CHOICES)),
        choices=list(CROSS_LAYER_CHOICES),
        group=MEASUREMENT,
        metavar="|".join(CROSS_LAYER_CHOICES),
    )
    spectra: str = option(
        "exact",
        f"'exact': full eigendecompositions; 'estimate': FFNs at least {ESTIMATE_MIN_DIM} wide get SE, "
        f"EEE and JS from stochastic Lanczos quadrature and their top {DEFAULT_TOP_K} eigenvalues (about 3x faster "
        "at 8192; measured error in benchmarks/results/perf/spectra_estimate_cpu.md and docs/metrics.md); PR "
        "stays exact.",
        one_of(SPECTRA_METHODS),
        choices=list(SPECTRA_METHODS),
        group=MEASUREMENT,
        metavar="|".join(SPECTRA_METHODS),
    )
    experts: Optional[list[int]] = option(
        None,
        "MoE models: measure only these routed experts (indices, in every MoE layer); each measured expert keeps "
        "2 x (F^2 + F) x 8 bytes of state. None: every expert.",
        optional(expert_indices),
        group=MEASUREMENT,
        metavar="I,J,...",
    )
    experts_per_step: Optional[int] = option(
        None,
        "MoE models: measure a share of this many routed experts per measurement, the next share each time "
        "(the expert round-robin), to bound the state; the routing statistics still cover every expert. "
        "None: every expert each time.",
        optional(positive_int),
        group=MEASUREMENT,
    )

    def __post_init__(self) -> None:
        if self.experts is not None and self.experts_per_step is not None:
            raise InputError("give experts (a subset) or experts_per_step (a round-robin share), not both")


def _defaults() -> Mapping[str, Any]:
    out = {}
    for f in fields(MeasurementOptions):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return MappingProxyType(out)


# Option name -> its one default (read-only); what probe_model's and FFNTracker's keywords default to.
MEASUREMENT_DEFAULTS: Mapping[str, Any] = _defaults()


def default(name: str) -> Any:
    """The default of measurement option ``name`` (KeyError for a name that is not one)."""
    return MEASUREMENT_DEFAULTS[name]
