"""Site names: the one parser of ``"<family>.<layer>"`` (``ffn.3``, ``token_mlp.0``).

Every report row, log key and record names its FFN this way; plots, run analysis and the report read
the family and layer back from the name with these functions only.

>>> family("token_mlp.3"), layer_of("token_mlp.3"), family("mean"), layer_of("mean")
('token_mlp', 3, 'mean', -1)
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["family", "layer_of", "next_sites"]


def _split(site: str) -> tuple[str, int | None]:
    head, _, tail = site.rpartition(".")
    return (head, int(tail)) if head and tail.isdigit() else (site, None)


def family(site: str) -> str:
    """``ffn.3`` -> ``ffn``; ``token_mlp.0`` -> ``token_mlp``; a name without a layer is its own family."""
    return _split(site)[0]


def layer_of(site: str) -> int:
    """``ffn.3`` -> 3; -1 for a name without a layer (``mean``)."""
    layer = _split(site)[1]
    return -1 if layer is None else layer


def next_sites(rows: Iterable[dict]) -> dict[str, str]:
    """site -> the next site of its family by the rows' ``layer``.

    >>> next_sites([{"site": "ffn.0", "layer": 0}, {"site": "ffn.2", "layer": 2}, {"site": "ffn.1", "layer": 1}])
    {'ffn.0': 'ffn.1', 'ffn.1': 'ffn.2'}
    """
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(family(row["site"]), []).append(row)
    following = {}
    for members in families.values():
        members = sorted(members, key=lambda row: row["layer"])
        following.update({a["site"]: b["site"] for a, b in zip(members, members[1:])})
    return following
