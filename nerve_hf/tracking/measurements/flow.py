"""Variance flow through the FFN block (``flow=True``): input -> pre -> post -> output.

Beside pre and post, the spectra of the FFN's d-wide **input** (the up/gate projection's input, the
normalised residual stream) and **output** (the down projection's output, before any dropout or
residual add), so a row reads input -> pre -> post -> output. Consecutive stages are compared by JS;
input -> pre and post -> output have different lengths (d and D), so JS is taken over the two
normalised spectra, sorted descending, the shorter one zero-padded to the longer length
(:func:`nerve_hf.metrics.padded_js`; a zero tail adds no mass, so this is the JS of the two
distributions over ranks).
"""

from __future__ import annotations

from nerve_hf.metrics import padded_js

__all__ = ["FLOW_STAGES", "FLOW_KEYS", "flow_values"]

FLOW_STAGES = ("input", "pre", "post", "output")
# Row keys a report gains with flow=True, in column order (after the seven paper metrics).
FLOW_KEYS = (
    "dim_input",
    "se_input",
    "pr_input",
    "eee_input",
    "se_output",
    "pr_output",
    "eee_output",
    "js_input_pre",
    "js_post_output",
)


def flow_values(dim_input: int, io_values: dict[str, float], io_spectra, spectra) -> dict[str, float]:
    """The :data:`FLOW_KEYS` of one site: ``io_values`` are the metrics of the (input, output) pair as
    :func:`nerve_hf.spectra.metric_values` names them (``se_pre`` is the input's, ``se_post`` the
    output's); ``io_spectra`` (input, output) and ``spectra`` (pre, post) eigenvalues, or None."""
    io_spectra = io_spectra or (None, None)
    spectra = spectra or (None, None)
    return {
        "dim_input": int(dim_input),
        **{
            f"{metric}_{stage}": io_values[f"{metric}_{side}"]
            for stage, side in (("input", "pre"), ("output", "post"))
            for metric in ("se", "pr", "eee")
        },
        "js_input_pre": padded_js(io_spectra[0], spectra[0]),
        "js_post_output": padded_js(spectra[1], io_spectra[1]),
    }
