"""Layer-by-layer tables of a report: the cross-layer coherence matrix."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from nerve_hf.errors import requires

__all__ = ["layer_matrix"]


def layer_matrix(rows: Sequence[dict], cross_rows: Sequence[dict], key: str, family: Optional[str] = None):
    """A symmetric depth x depth ``pandas.DataFrame`` (index and columns: layers) of ``key`` (``cka``,
    ``js_pre`` or ``js_post``) from :attr:`SpectralReport.cross_layer` rows; the diagonal is 1 for CKA,
    0 for JS; pairs not measured are NaN. ``family``: the site family (default: the first)."""
    with requires("analysis"):
        import pandas as pd

    from nerve_hf.sites import family as family_of

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
