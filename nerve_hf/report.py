"""The result of one measurement window: one row of NerVE metrics per FFN site."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import families, family, mean_name
from nerve_hf.tracking.measurements.base import nan_mean
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_KEYS, cross_layer_log_dict
from nerve_hf.tracking.measurements.experts import ROUTING_KEYS, experts_log_dict
from nerve_hf.tracking.measurements.flow import flow_names
from nerve_hf.tracking.measurements.positions import POSITION_KEYS, position_log_dict

# Keys of every row, in column order; rows of routed experts add ``expert``.
ROW_KEYS = ("site", "layer", "dim", "tokens") + METRIC_NAMES + ("kind",)

__all__ = ["METRIC_NAMES", "ROUTING_KEYS", "ROW_KEYS", "SpectralReport"]


@dataclass
class SpectralReport:
    """Per-site NerVE metrics.

    Attributes:
        rows: one dict per site with :data:`ROW_KEYS`: ``site`` (str, ``"ffn.3"``), ``layer``,
            ``dim``, ``tokens`` (int), the seven metrics (float, NaN when undefined) and ``kind``; with the
            tracker's ``flow`` also :data:`~nerve_hf.tracking.measurements.flow.FLOW_KEYS`
            (``extra_metrics``: its summaries).
        eigenvalues: site -> (pre, post) eigenvalues, descending float64 CPU tensors ``[dim]``.
        flow_eigenvalues: ``flow``: site -> (input, output) eigenvalues ``[d]``.
        positions: ``position_buckets``: per site and bucket,
            :data:`~nerve_hf.tracking.measurements.positions.POSITION_KEYS`.
        position_eigenvalues: ``position_buckets``: (site, bucket label) -> (pre, post) eigenvalues ``[dim]``
            (all NaN for a bucket no token reached).
        cross_layer: ``cross_layer``: per pair of layers,
            :data:`~nerve_hf.tracking.measurements.cross_layer.CROSS_LAYER_KEYS`.
        routing: MoE models: per layer of routed experts, its routing statistics
            (:data:`~nerve_hf.tracking.measurements.experts.ROUTING_KEYS`).

    Rows say what they measured with ``kind``: ``"dense"``, ``"shared_expert"`` or ``"expert"`` (one row
    per routed expert, with ``expert``, its index in the layer); a row without ``kind`` is dense.

    >>> ones, nans = {m: 1.0 for m in METRIC_NAMES}, {m: float("nan") for m in METRIC_NAMES}
    >>> r = SpectralReport(rows=[dict(site="ffn.0", layer=0, dim=3, tokens=9, **ones),
    ...                          dict(site="ffn.1", layer=1, dim=3, tokens=9, **nans)])
    >>> r.mean()["pr_pre"], r.to_log_dict()["nerve/ffn.0/js"], r.to_log_dict()["nerve/mean/js"]
    (1.0, 1.0, 1.0)
    """

    rows: list[dict] = field(default_factory=list)
    eigenvalues: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # Filled only by the measurements the tracker's options add (nerve_hf.tracking.measurements); empty otherwise.
    flow_eigenvalues: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # site -> (input, output)
    positions: list[dict] = field(default_factory=list)  # one row per site and position bucket: POSITION_KEYS
    position_eigenvalues: dict[tuple[str, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    cross_layer: list[dict] = field(default_factory=list)  # one row per pair of layers: CROSS_LAYER_KEYS
    routing: list[dict] = field(default_factory=list)  # one row per MoE layer: ROUTING_KEYS

    def __len__(self) -> int:
        return len(self.rows)

    def _flow_names(self) -> list[str]:
        """The flow metrics the rows carry (none without ``flow``)."""
        return flow_names(self.rows)

    def _of_kind(self, kind: str) -> list[dict]:
        return [row for row in self.rows if row.get("kind", "dense") == kind]

    def families(self, kind: str = "dense") -> list[str]:
        """The site families of the rows of ``kind``, in row order (``["encoder.ffn", "decoder.ffn"]``)."""
        return families(row["site"] for row in self._of_kind(kind))

    def mean(self, kind: str | None = None, family_name: str | None = None) -> dict[str, float]:
        """Average of each metric over the sites of one kind and one family that have it defined (NaN if none
        has); with ``flow``, of the flow metrics too. ``kind`` None: the dense FFNs, or where a model has none,
        its shared experts, else its routed experts. ``family_name`` None: the kind's first family (a model
        with several, an encoder-decoder's ``encoder.ffn`` and ``decoder.ffn``: :meth:`means` has them all).
        Never two kinds or two families averaged together."""
        if kind is None:
            kind = next((k for k in ("dense", "shared_expert", "expert") if self._of_kind(k)), "dense")
        rows = self._of_kind(kind)
        if family_name is None and rows:
            family_name = family(rows[0]["site"])
        rows = [row for row in rows if family(row["site"]) == family_name]
        return {
            name: nan_mean(row.get(name, float("nan")) for row in rows) for name in (*METRIC_NAMES, *self._flow_names())
        }

    def means(self) -> dict[str, dict[str, float]]:
        """The layer mean of each family of dense FFNs by its name (:func:`~nerve_hf.sites.mean_name`):
        ``{"mean": {...}}`` for a model with one family, ``{"mean/encoder.ffn": {...}, "mean/decoder.ffn":
        {...}}`` for one with several; where the model has no dense FFN, the mean of :meth:`mean`'s kind."""
        kind = next((k for k in ("dense", "shared_expert", "expert") if self._of_kind(k)), "dense")
        names = self.families(kind)
        return {mean_name(name, names): self.mean(kind, name) for name in names} or {"mean": self.mean(kind)}

    def mean_summary(self) -> dict:
        """:meth:`means` for ``report.json``: the metrics of the one mean (``{"pr_pre": ...}``) for a model with
        one family, else ``{"mean/<family>": {"pr_pre": ...}, ...}``."""
        means = self.means()
        return means["mean"] if list(means) == ["mean"] else means

    def to_log_dict(self, prefix: str = "nerve") -> dict[str, float]:
        """Flat ``{f"{prefix}/{site}/{metric}": value}`` for every row, plus the layer means over each family
        of dense FFNs (never two families together): ``f"{prefix}/mean/{metric}"`` for a model with one family,
        ``f"{prefix}/mean/{family}/{metric}"`` for every family of a model with several (an encoder-decoder's
        ``nerve/mean/encoder.ffn/pr_pre`` and ``nerve/mean/decoder.ffn/pr_pre``, a VLM's ``vision.ffn`` and
        ``text.ffn``, an MLP-Mixer's ``token_mlp`` and ``channel_mlp``; :func:`~nerve_hf.sites.mean_name`).

        Options beyond the paper add: ``flow``, the flow metrics under the same keys
        (``nerve/ffn.0/se_input``); ``position_buckets``, ``f"{prefix}/{site}/{metric}.pos{bucket}"`` and
        the layer mean ``f"{prefix}/mean/{metric}.pos{bucket}"`` (``nerve/mean/pr_pre.pos0-16``);
        MoE models: ``f"{prefix}/mean/{metric}"`` over dense FFNs only, ``f"{prefix}/mean/shared_expert/{metric}"``
        over shared experts, and per layer of routed experts the summaries over its experts and its
        routing statistics (:func:`~nerve_hf.tracking.measurements.experts.experts_log_dict`; no per-expert key);
        ``cross_layer``, for each layer and the next tracked one, ``f"{prefix}/{site}/cka_next"``,
        ``js_pre_next`` and ``js_post_next``, and their layer means ``f"{prefix}/mean/cka_next"``, ...
        """
        names = (*METRIC_NAMES, *self._flow_names())
        sites = [row for row in self.rows if row.get("kind") != "expert"]  # experts: per-layer summaries
        out = {f"{prefix}/{row['site']}/{name}": row[name] for row in sites for name in names if name in row}
        dense = self.families("dense")
        for name in dense:
            mean = mean_name(name, dense)
            out.update({f"{prefix}/{mean}/{metric}": value for metric, value in self.mean("dense", name).items()})
        if self._of_kind("shared_expert"):
            out.update({f"{prefix}/mean/shared_expert/{k}": v for k, v in self.mean("shared_expert").items()})
        out.update(experts_log_dict(self.rows, self.routing, prefix))
        means = {name: mean_name(name, dense) for name in dense}  # other kinds' families: mean/<family>
        means |= {name: f"mean/{name}" for name in families(row["site"] for row in sites) if name not in means}
        out.update(position_log_dict(self.positions, prefix, means))  # each measurement's own keys
        out.update(cross_layer_log_dict(self.rows, self.cross_layer, prefix, means))
        return out

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` with columns :data:`ROW_KEYS` (then any extra summaries the
        rows carry, ``compute(extra_metrics=True)``).

        >>> ones = {m: 1.0 for m in METRIC_NAMES}
        >>> row = dict(site="ffn.0", layer=0, dim=3, tokens=9, **ones, kind="dense")
        >>> frame = SpectralReport(rows=[row]).to_pandas()
        >>> frame.shape, list(frame.columns[:5])
        ((1, 12), ['site', 'layer', 'dim', 'tokens', 'se_pre'])
        """
        with requires("analysis"):
            import pandas as pd  # imported on use: pandas is only needed here

        extra = [key for key in dict.fromkeys(k for row in self.rows for k in row) if key not in ROW_KEYS]
        return pd.DataFrame(self.rows, columns=list(ROW_KEYS) + extra)

    def positions_to_pandas(self):
        """:attr:`positions` as a ``pandas.DataFrame`` with columns
        :data:`~nerve_hf.tracking.measurements.positions.POSITION_KEYS`."""
        with requires("analysis"):
            import pandas as pd

        return pd.DataFrame(self.positions, columns=list(POSITION_KEYS))

    def routing_to_pandas(self):
        """:attr:`routing` as a ``pandas.DataFrame`` with columns
        :data:`~nerve_hf.tracking.measurements.experts.ROUTING_KEYS` and ``assignments_per_expert`` (a list)."""
        import pandas as pd

        return pd.DataFrame(self.routing, columns=[*ROUTING_KEYS, "assignments_per_expert"])

    def cross_layer_to_pandas(self):
        """:attr:`cross_layer` as a ``pandas.DataFrame`` with columns
        :data:`~nerve_hf.tracking.measurements.cross_layer.CROSS_LAYER_KEYS`."""
        with requires("analysis"):
            import pandas as pd

        return pd.DataFrame(self.cross_layer, columns=list(CROSS_LAYER_KEYS))
