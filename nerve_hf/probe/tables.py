"""The probe's text tables for the terminal: per-layer metrics, variance flow, position buckets, layer pairs.

>>> print(aligned(["site", "pr_pre"], [["ffn.0", format_value(12.3456)], ["mean", format_value(float("nan"))]]))
site   pr_pre
-----  -------
ffn.0  12.3456
mean       nan
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.tracking.measurements.base import nan_mean

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = ["format_table", "aligned", "format_value", "every_mean", "means_per_checkpoint"]


def format_value(value: Optional[float]) -> str:
    """A metric as a table cell: 4 decimals below 1000, 1 above, ``nan`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def aligned(columns: list[str], body: list[list[str]]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(column), *(len(line[i]) for line in body)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def every_mean(report: SpectralReport) -> dict[str, dict[str, float]]:
    """The layer mean of every family of sites, never two averaged together: the dense families as
    :meth:`~nerve_hf.report.SpectralReport.means` names them (``mean``, or ``mean/encoder.ffn``,
    ``mean/decoder.ffn``, ``mean/vision.ffn``...), then the shared experts' ``mean/shared_expert``
    (``mean/shared_expert/<family>`` where they form several families) and the routed experts'
    ``mean/expert``, over every expert of every layer (each expert index is a family of its own:
    ``experts[0]``)."""
    found = dict(report.means()) if report.families("dense") else {}
    shared = report.families("shared_expert")
    for name in shared:
        found["mean/shared_expert" if len(shared) == 1 else f"mean/shared_expert/{name}"] = report.mean(
            "shared_expert", name
        )
    experts = [row for row in report.rows if row.get("kind") == "expert"]
    if experts:
        found["mean/expert"] = {m: nan_mean(row.get(m, math.nan) for row in experts) for m in METRIC_NAMES}
    return found or report.means()


def means_per_checkpoint(rows: list[tuple[str, int, SpectralReport, Optional[float]]], with_loss: bool) -> str:
    """The table a checkpoint series prints: per checkpoint ``(name, step, report, loss)``, one line per
    family mean (:func:`every_mean`), with the loss when ``with_loss``."""
    columns = ["checkpoint", "step", "mean"] + list(METRIC_NAMES) + (["loss"] if with_loss else [])
    body = []
    for name, step, report, loss in rows:
        for mean_name, mean in every_mean(report).items():
            cells = [format_value(mean[metric]) for metric in METRIC_NAMES]
            body.append([name, str(step), mean_name, *cells, *([format_value(loss)] if with_loss else [])])
    return aligned(columns, body)


def format_table(report: SpectralReport) -> str:
    """The per-layer metrics as an aligned text table, with the layer means as its last rows (one per family
    of dense FFNs); then the tables of the features the report holds (variance flow, position buckets,
    cross-layer pairs)."""
    columns = ["site", "tokens"] + list(METRIC_NAMES)
    body = [[row["site"], str(row["tokens"])] + [format_value(row[n]) for n in METRIC_NAMES] for row in report.rows]
    for name, mean in report.means().items():  # one per family of dense FFNs: mean, or mean/<family>
        body.append([name, ""] + [format_value(mean[metric]) for metric in METRIC_NAMES])
    tables = [aligned(columns, body)]
    if report.rows and "se_input" in report.rows[0]:
        flow_columns = ["site"] + [f"{m}_{s}" for m in ("se", "pr", "eee") for s in ("input", "pre", "post", "output")]
        flow_columns += ["js_input_pre", "js", "js_post_output"]
        flow_body = [[row["site"]] + [format_value(row[name]) for name in flow_columns[1:]] for row in report.rows]
        tables.append(
            "variance flow (input -> pre -> post -> output; js = pre -> post):\n" + aligned(flow_columns, flow_body)
        )
    if report.positions:
        position_columns = ["site", "bucket", "tokens"] + list(METRIC_NAMES)
        position_body = [
            [row["site"], row["bucket"], str(row["tokens"])] + [format_value(row[name]) for name in METRIC_NAMES]
            for row in report.positions
        ]
        tables.append("per position bucket [start-end):\n" + aligned(position_columns, position_body))
    if report.cross_layer:
        cross_columns = ["site_a", "site_b", "tokens", "cka", "js_pre", "js_post"]
        cross_body = [
            [row["site_a"], row["site_b"], str(row["tokens"])] + [format_value(row[k]) for k in cross_columns[3:]]
            for row in report.cross_layer
        ]
        tables.append(
            "cross-layer coherence (CKA of FFN inputs, JS of spectra):\n" + aligned(cross_columns, cross_body)
        )
    return "\n\n".join(tables)
