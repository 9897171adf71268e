"""Which measured layers get their eigenvalue spectra plotted (``--spectra-layers``)."""

from __future__ import annotations

from typing import Optional

from nerve_hf.errors import InputError

__all__ = ["choose_layers"]


def choose_layers(rows: list[dict], wanted: Optional[list[int]] = None) -> list[str]:
    """Sites whose spectra are plotted: those of layers ``wanted`` (negative from the end), else the
    first, middle and last measured layer.

    >>> rows = [{"site": f"ffn.{i}", "layer": i} for i in range(5)]
    >>> choose_layers(rows), choose_layers(rows, [-1])
    (['ffn.0', 'ffn.2', 'ffn.4'], ['ffn.4'])
    """
    layers = sorted({row["layer"] for row in rows})
    if not layers:
        return []
    if wanted is None:
        picked = {layers[0], layers[len(layers) // 2], layers[-1]}
    else:
        count = max(layers) + 1
        picked = {w + count if w < 0 else w for w in wanted}
        missing = sorted(picked - set(layers))
        if missing:
            raise InputError(f"--spectra-layers {missing} were not measured; measured layers: {layers}")
    return [row["site"] for row in rows if row["layer"] in picked]
