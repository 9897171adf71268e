"""Writing a probe into a folder: ``report.json``, ``report.csv``, the eigenvalue archives and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nerve_hf.probe.layers import choose_layers
from nerve_hf.probe.result import ProbeResult

__all__ = ["write_probe"]


def write_probe(
    result: ProbeResult, out_dir, spectra_layers: Optional[list[int]] = None, with_plots: bool = True
) -> list[Path]:
    """Write ``report.json``, ``report.csv``, ``eigenvalues.npz`` and (``with_plots``) the PNG plots into ``out_dir``;
    with the tracker's options beyond the paper also ``flow_eigenvalues.npz`` and ``flow.png`` (flow),
    ``positions.csv``, ``position_eigenvalues.npz`` and ``positions.png`` (position buckets),
    ``cross_layer.csv``, ``cka_matrix.csv`` and ``cross_layer.png`` (cross-layer coherence); MoE models also
    ``routing.csv`` (the routing statistics per layer; the expert rows are in ``report.csv``/``report.json``,
    their spectra in ``eigenvalues.npz`` as ``experts[<e>].<layer>/pre``) and ``experts.png`` (expert x layer
    heatmaps; the per-layer plots then show each MoE layer's token-weighted mean over its experts).

    Every file is written atomically; files already in ``out_dir`` that this does not produce are kept.
    Returns the paths written.
    """
    import numpy as np

    from nerve_hf.analysis import expert_plots
    from nerve_hf.analysis import probe_plots as plots
    from nerve_hf.sinks.archive import spectra_npz
    from nerve_hf.sinks.files import write_bytes, write_csv, write_figure, write_json

    out_dir = Path(out_dir)
    rows = result.report.rows
    sites = choose_layers(rows, spectra_layers)  # before writing anything: may raise InputError
    title = f"{result.model.get('name', '')}"
    report = result.report
    written = [
        write_json(out_dir / "report.json", result.to_json()),
        write_csv(out_dir / "report.csv", report.to_pandas()),  # ROW_KEYS, then flow/extra columns if any
    ]
    if report.eigenvalues:
        eigenvalues = spectra_npz(report.eigenvalues, dtype=np.float64)  # the archive's keys
        written.append(write_bytes(out_dir / "eigenvalues.npz", eigenvalues))
    if report.flow_eigenvalues:
        flow = spectra_npz({}, np.float64, flow=report.flow_eigenvalues)  # "<site>/input", "<site>/output"
        written.append(write_bytes(out_dir / "flow_eigenvalues.npz", flow))
    if report.positions:
        written.append(write_csv(out_dir / "positions.csv", report.positions_to_pandas()))
    if report.position_eigenvalues:  # "<site>/pos/<bucket>/pre", ".../post"
        buckets = spectra_npz({}, np.float64, positions=report.position_eigenvalues)
        written.append(write_bytes(out_dir / "position_eigenvalues.npz", buckets))
    if report.cross_layer:
        from nerve_hf.analysis.layers import layer_matrix

        written.append(write_csv(out_dir / "cross_layer.csv", report.cross_layer_to_pandas()))
        from nerve_hf.sites import family

        families = list(dict.fromkeys(family(row["site"]) for row in rows))
        for name in families:  # cka_matrix.csv; several site families (MLP-Mixer): cka_matrix_<family>.csv
            matrix = layer_matrix(rows, report.cross_layer, "cka", family=name).reset_index()
            file = "cka_matrix.csv" if len(families) == 1 else f"cka_matrix_{name}.csv"
            written.append(write_csv(out_dir / file, matrix))
    if report.routing:  # MoE models: one row per layer of routed experts (assignments per expert as a list)
        written.append(write_csv(out_dir / "routing.csv", report.routing_to_pandas()))
    if not with_plots:
        return written
    if report.rows and "se_input" in report.rows[0]:
        written.append(write_figure(out_dir / "flow.png", plots.plot_flow(rows, f"variance flow: {title}")))
    if report.positions:
        figure = plots.plot_position_buckets(report.positions, f"metrics per position bucket: {title}")
        written.append(write_figure(out_dir / "positions.png", figure))
    if report.cross_layer:
        figure = plots.plot_cross_layer(rows, report.cross_layer, f"cross-layer coherence: {title}")
        written.append(write_figure(out_dir / "cross_layer.png", figure))
    if expert_plots.expert_rows(rows):  # MoE: the heatmaps, and one line per layer (mean over its experts)
        figure = expert_plots.plot_expert_heatmaps(rows, f"routed experts: {title}")
        written.append(write_figure(out_dir / "experts.png", figure))
        rows = [row for row in rows if row.get("kind") != "expert"] + expert_plots.summary_rows(rows)
    written.append(write_figure(out_dir / "metrics_per_layer.png", plots.plot_layer_metrics(rows, title)))
    written.append(write_figure(out_dir / "js_per_layer.png", plots.plot_js(rows, f"JS(pre, post) per layer: {title}")))
    if sites and result.report.eigenvalues:
        figure = plots.plot_spectra(result.report.eigenvalues, sites, f"eigenvalue spectra: {title}")
        written.append(write_figure(out_dir / "spectra.png", figure))
    return written
