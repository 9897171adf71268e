"""Beyond one FFN's pre/post pair: variance flow through the block, position buckets and cross-layer coherence.

Pure functions on eigenvalues and accumulators; :class:`nerve_hf.FFNTracker` fills the report with them.

* **Flow** (``flow=True``): the spectra of the FFN's d-wide **input** (the up/gate projection's input,
  the normalised residual stream) and **output** (the down projection's output, before any dropout or
  residual add) beside pre and post, so a row reads input -> pre -> post -> output. Consecutive stages
  are compared by JS; input -> pre and post -> output have different lengths (d and D), so JS is taken
  over the two normalised spectra, sorted descending, the shorter one zero-padded to the longer length
  (:func:`padded_js`; a zero tail adds no mass, so this is the JS of the two distributions over ranks).
* **Position buckets** (``position_buckets=[0, 16, 64, ...]``): rows of metrics per bucket of token
  positions [e_i, e_{i+1}) (the last bucket is open), from one (pre, post) accumulator pair per bucket.
* **Cross-layer coherence** (``cross_layer="adjacent"`` or ``"all"``): JS between the spectra of two
  layers (pre with pre, post with post, equal widths, :func:`nerve_hf.metrics.js_divergence`), and
  linear CKA between their FFN inputs, which live in the same d-wide residual basis, from a streaming
  :class:`~nerve_hf.cross_covariance.CrossCovarianceAccumulator`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .metrics import METRIC_NAMES, js_divergence

__all__ = [
    "FLOW_KEYS",
    "FLOW_STAGES",
    "POSITION_KEYS",
    "CROSS_LAYER_KEYS",
    "CROSS_LAYER_CHOICES",
    "padded_js",
    "flow_values",
    "bucket_labels",
    "check_buckets",
    "position_bucket_list",
    "layer_pairs",
    "layer_matrix",
]

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
# Keys of each row of SpectralReport.positions, in column order.
POSITION_KEYS = ("site", "layer", "bucket", "position_start", "position_end", "dim", "tokens") + METRIC_NAMES
# Keys of each row of SpectralReport.cross_layer, in column order.
CROSS_LAYER_KEYS = ("site_a", "site_b", "layer_a", "layer_b", "tokens", "js_pre", "js_post", "cka")
CROSS_LAYER_CHOICES = ("adjacent", "all")


def padded_js(eig_a: Optional[Tensor], eig_b: Optional[Tensor]) -> float:
    """JS between two spectra of possibly different lengths: each normalised and sorted descending, the
    shorter zero-padded to the longer length. NaN if either is missing or has no distribution.

    >>> padded_js(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0, 0.0]))
    0.0
    """
    if eig_a is None or eig_b is None:
        return math.nan
    a, b = torch.as_tensor(eig_a, dtype=torch.float64), torch.as_tensor(eig_b, dtype=torch.float64)
    length = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, length - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, length - b.shape[-1]))
    return float(js_divergence(a, b))


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


def check_buckets(edges) -> Optional[tuple[int, ...]]:
    """``position_buckets`` as a tuple of strictly increasing non-negative integers (None stays None)."""
    if edges is None:
        return None
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise TypeError(f"position_buckets must be a list of integers such as [0, 16, 64], got {edges!r}")
    edges = list(edges)
    if not edges or not all(isinstance(e, int) and not isinstance(e, bool) for e in edges):
        raise TypeError(f"position_buckets must be a non-empty list of integers such as [0, 16, 64], got {edges!r}")
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"position_buckets must be strictly increasing non-negative positions such as [0, 16, 64], got {edges!r}"
        )
    return tuple(edges)


def position_bucket_list(name: str, value) -> list[int]:
    """Option check of ``position_buckets`` (``NerveConfig``, ``ProbeConfig``): :func:`check_buckets` as a
    list, its errors naming the option."""
    from .options import OptionTypeError, OptionValueError

    requirement = "a list of strictly increasing non-negative integers such as [0, 16, 64]"
    try:
        return list(check_buckets(value))
    except TypeError:
        raise OptionTypeError(name, requirement, value) from None
    except ValueError:
        raise OptionValueError(name, requirement, value) from None


def bucket_labels(edges: Sequence[int]) -> list[tuple[str, int, Optional[int]]]:
    """(label, start, end) of each bucket [start, end); the last is open (end None, label ``"<start>-inf"``).

    >>> bucket_labels([0, 16, 64])
    [('0-16', 0, 16), ('16-64', 16, 64), ('64-inf', 64, None)]
    """
    ends = list(edges[1:]) + [None]
    return [(f"{start}-{'inf' if end is None else end}", start, end) for start, end in zip(edges, ends)]


def layer_pairs(sites, mode: Optional[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i before j, of tracked sites of the same family: consecutive tracked layers
    (``"adjacent"``) or every pair (``"all"``); ``None``: none."""
    if mode is None:
        return []
    if mode not in CROSS_LAYER_CHOICES:
        raise ValueError(f"cross_layer must be one of {CROSS_LAYER_CHOICES} or None, got {mode!r}")
    families: dict[str, list[int]] = {}
    for index, site in enumerate(sites):
        families.setdefault(site.family, []).append(index)
    pairs = []
    for members in families.values():
        members = sorted(members, key=lambda i: sites[i].layer)
        if mode == "adjacent":
            pairs.extend(zip(members, members[1:]))
        else:
            pairs.extend((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
    return pairs


def layer_matrix(rows: Sequence[dict], cross_rows: Sequence[dict], key: str, family: Optional[str] = None):
    """A symmetric depth x depth ``pandas.DataFrame`` (index and columns: layers) of ``key`` (``cka``,
    ``js_pre`` or ``js_post``) from :attr:`SpectralReport.cross_layer` rows; the diagonal is 1 for CKA,
    0 for JS; pairs not measured are NaN. ``family``: the site family (default: the first)."""
    import pandas as pd

    from .plots import family as family_of

    families = list(dict.fromkeys(family_of(row["site"]) for row in rows))
    family = family if family is not None else (families[0] if families else None)
    layers = sorted({row["layer"] for row in rows if family_of(row["site"]) == family})
    frame = pd.DataFrame(math.nan, index=layers, columns=layers, dtype=float)
    for layer in layers:
        frame.loc[layer, layer] = 1.0 if key == "cka" else 0.0
    for row in cross_rows:
        if family_of(row["site_a"]) != family:
            continue
        frame.loc[row["layer_a"], row["layer_b"]] = row[key]
        frame.loc[row["layer_b"], row["layer_a"]] = row[key]
    frame.index.name = "layer"
    return frame
