"""Site names: the one parser of ``"<family>.<layer>"`` (``ffn.3``, ``token_mlp.0``).

Every report row, log key and record names its FFN this way; plots, run analysis and the report read
the family and layer back from the name with these functions only.

>>> family("token_mlp.3"), layer_of("token_mlp.3"), family("mean"), layer_of("mean")
('token_mlp', 3, 'mean', -1)

Layer means are over one family of like sites only, named by :func:`mean_name`: ``mean`` for a model with
one family of dense FFNs (``nerve/mean/pr_pre``), ``mean/<family>`` for each family of a model with several
(an encoder-decoder's ``nerve/mean/encoder.ffn/pr_pre`` and ``nerve/mean/decoder.ffn/pr_pre``, a VLM's
``mean/vision.ffn`` and ``mean/text.ffn``, an MLP-Mixer's ``mean/token_mlp`` and ``mean/channel_mlp``).

>>> mean_name("ffn", ["ffn"]), mean_name("decoder.ffn", ["encoder.ffn", "decoder.ffn"])
('mean', 'mean/decoder.ffn')
>>> is_mean("mean"), is_mean("mean/token_mlp"), is_mean("ffn.0")
(True, True, False)
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["family", "families", "is_mean", "layer_of", "mean_name", "next_sites"]


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


def families(sites: Iterable[str]) -> list[str]:
    """The families of ``sites``, in order of first appearance (``["encoder.ffn", "decoder.ffn"]``)."""
    return list(dict.fromkeys(family(site) for site in sites))


def mean_name(family: str, all_families: Sequence[str]) -> str:
    """The name of the layer mean over ``family``: ``mean`` when it is the only family in ``all_families``
    (the model's families of dense FFNs), else ``mean/<family>``."""
    return "mean" if list(all_families) in ([], [family]) else f"mean/{family}"


def is_mean(site: str) -> bool:
    """Is ``site`` the name of a layer mean (``mean``, ``mean/<family>``) rather than of an FFN?"""
    return site == "mean" or site.startswith("mean/")


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
