"""Cross-layer coherence (``cross_layer="adjacent"`` or ``"all"``).

JS between the spectra of two layers (pre with pre, post with post, equal widths,
:func:`nerve_hf.metrics.js_divergence`), and linear CKA between their FFN inputs, which live in the
same d-wide residual basis, from a streaming
:class:`~nerve_hf.stats.cross_covariance.CrossCovarianceAccumulator`.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["CROSS_LAYER_KEYS", "CROSS_LAYER_CHOICES", "layer_pairs"]

# Keys of each row of SpectralReport.cross_layer, in column order.
CROSS_LAYER_KEYS = ("site_a", "site_b", "layer_a", "layer_b", "tokens", "js_pre", "js_post", "cka")
CROSS_LAYER_CHOICES = ("adjacent", "all")


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
