"""One loader for every place text comes from: an embedded corpus, a ``save_to_disk`` folder, a Hub
dataset (or a local folder of data files that ``datasets.load_dataset`` reads), local text files.

* :func:`load_dataset_splits` opens a dataset by name and returns all its splits (``nerve probe``).
* :func:`load_raw_datasets` turns a name or files into ``train`` and ``validation`` splits
  (``run_clm.py``, the benchmarks).
* :func:`find_text_column` is the one rule that names the column holding the text, in this order:

  1. the column the caller names (it must be a column of the data whenever the columns are known);
  2. the dataset's own column in :data:`HUB_TEXT_DATASETS` (``content`` for codeparrot);
  3. the first of :data:`TEXT_COLUMNS` (``text``, ``content``, ``code``, ``document``, ``sentence``) the data has;
  4. the first column holding strings;

  otherwise an :class:`~nerve_hf.errors.InputError` that lists the columns.

Hub datasets load only when asked for by name: nothing here touches the network on a default path (DESIGN §6).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nerve_hf.data.corpus import DEFAULT_CORPUS, EMBEDDED_CORPORA, load_embedded_corpus
from nerve_hf.errors import InputError, requires

logger = logging.getLogger(__name__)

DEFAULT_STREAMING_VALIDATION_DOCS = 1000  # documents held out from a stream that has no validation split
TEXT_COLUMNS = ("text", "content", "code", "document", "sentence")  # column names that mean "the text"


@dataclass(frozen=True)
class HubTextDataset:
    """What a Hub text dataset needs that its name does not say."""

    text_column: str  # column holding the document text
    config: str | None = None  # default ``name=`` (subset) when the user gives none
    validation_split: str | None = None  # a held-out split on the Hub; None = carve one from train


# The paper's pretraining corpora (codeparrot; C4 and FineWeb for the web-text runs).
HUB_TEXT_DATASETS: dict[str, HubTextDataset] = {
    "codeparrot/codeparrot-clean": HubTextDataset(text_column="content"),
    "allenai/c4": HubTextDataset(text_column="text", config="en", validation_split="validation"),
    "HuggingFaceFW/fineweb": HubTextDataset(text_column="text", config="sample-10BT"),
}


def _is_string(feature) -> bool:
    with requires("probe"):
        import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _column_kinds(data, read_row: bool) -> dict[str, bool] | None:
    """``{column: holds strings}`` of a row (a dict), a ``datasets.Features`` or a split (its features, else
    its first row, read only if ``read_row``); None when unknown."""
    with requires("probe"):
        import datasets

    if isinstance(data, datasets.Features):
        return {name: _is_string(feature) for name, feature in data.items()}
    if isinstance(data, Mapping):
        return {name: isinstance(value, str) for name, value in data.items()}
    if data.features is not None:
        return _column_kinds(data.features, read_row)
    if not read_row:
        return None
    first = next(iter(data), None)  # a stream without declared features
    return None if first is None else _column_kinds(first, read_row)


def find_text_column(data, dataset_name: str | None = None, column: str | None = None) -> str:
    """The column of ``data`` (a row, ``datasets.Features`` or a split) that holds the text: ``column`` when
    given, else the table's column for ``dataset_name``, else the first of :data:`TEXT_COLUMNS` present, else
    the first string column (see the module docstring). InputError when there is none or ``column`` is absent.

    >>> find_text_column({"id": 3, "body": "def f(): pass"}), find_text_column({"code": "x", "text": "y"})
    ('body', 'text')
    >>> find_text_column({"id": 3}, "codeparrot/codeparrot-clean")
    'content'
    """
    known = _column_kinds(data, read_row=False)
    if column is not None:
        if known is not None and column not in known:
            raise InputError(f"dataset has no column {column!r}; its columns: {', '.join(known)}")
        return column
    spec = HUB_TEXT_DATASETS.get(dataset_name) if dataset_name else None
    if spec is not None:
        return spec.text_column
    kinds = known if known is not None else (_column_kinds(data, read_row=True) or {})
    for name in TEXT_COLUMNS:
        if name in kinds:
            return name
    strings = [name for name, holds_text in kinds.items() if holds_text]
    if not strings:
        raise InputError(
            f"dataset has no text column; its columns: {', '.join(kinds) or '(none)'}; name the "
            f"column that holds the text (nerve probe --text-column, run_clm.py --text_column_name)"
        )
    return strings[0]


def _is_saved_dataset(name: str) -> bool:
    """Whether ``name`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    path = Path(name)
    return path.is_dir() and any(
        (path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def load_dataset_splits(
    name: str,
    config: str | None = None,
    *,
    streaming: bool = False,
    token=None,
    cache_dir: str | None = None,
    embedded_options: dict | None = None,
):
    """Every split of dataset ``name`` as a ``DatasetDict`` (``IterableDatasetDict`` when ``streaming``).

    ``name`` is, in this order: an embedded corpus (:data:`EMBEDDED_CORPORA`; ``embedded_options`` go to its
    loader); a ``save_to_disk`` folder (a single saved ``Dataset`` is the split ``train``); anything else is
    ``datasets.load_dataset(name, config)``: a Hub id or a local folder of data files, with the default
    subset of :data:`HUB_TEXT_DATASETS` when ``config`` is None. Errors of ``datasets`` propagate as raised.
    """
    with requires("probe"):
        import datasets

    if name in EMBEDDED_CORPORA:
        logger.info("using the embedded corpus %r (offline)", name)
        raw = load_embedded_corpus(name, **(embedded_options or {}))
    elif _is_saved_dataset(name):
        raw = datasets.load_from_disk(name)
        if isinstance(raw, datasets.Dataset):
            raw = datasets.DatasetDict({"train": raw})
    else:
        spec = HUB_TEXT_DATASETS.get(name)
        config = config or (spec.config if spec else None)
        return datasets.load_dataset(name, config, streaming=streaming, token=token, cache_dir=cache_dir)
    if streaming:  # the same rows as a stream: the streaming code path runs offline too
        raw = datasets.IterableDatasetDict({split: _as_stream(part) for split, part in raw.items()})
    return raw


_FILE_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}


def _no_rows():
    return iter(())


def _as_stream(split):
    """A map-style split as an ``IterableDataset`` (an empty one cannot be sharded, so it gets a generator)."""
    with requires("probe"):
        import datasets

    if len(split) == 0:
        return datasets.IterableDataset.from_generator(_no_rows, features=split.features)
    return split.to_iterable_dataset()


def _file_builder(path: str) -> str:
    extension = Path(path).suffix.lstrip(".").lower()
    try:
        return _FILE_BUILDERS[extension]
    except KeyError:
        raise ValueError(f"{path}: unsupported extension {extension!r}; use one of {sorted(_FILE_BUILDERS)}") from None


def _load_files(train_file, validation_file, validation_split_percentage, keep_linebreaks, cache_dir):
    with requires("probe"):
        import datasets

    files = {name: path for name, path in (("train", train_file), ("validation", validation_file)) if path}
    builders = {_file_builder(path) for path in files.values()}
    if len(builders) != 1:
        raise ValueError(f"train and validation files must have the same format, got {sorted(files.values())}")
    builder = builders.pop()
    kwargs = dict(data_files=files, cache_dir=cache_dir)
    if builder == "text":
        kwargs["keep_linebreaks"] = keep_linebreaks  # keep "\n" so code and prose keep their line structure
    raw = datasets.load_dataset(builder, **kwargs)
    if "validation" not in raw:
        raw = _carve_validation(raw["train"], validation_split_percentage)
    return raw


def _carve_validation(train, percentage: float):
    """Split a map-style train set into train/validation by row position (the run_clm convention)."""
    with requires("probe"):
        import datasets

    n_val = int(len(train) * percentage / 100)
    if percentage > 0 and n_val == 0 and len(train) > 1:
        n_val = 1  # tiny files: still hold out one row rather than none
    return datasets.DatasetDict(
        {"train": train.select(range(n_val, len(train))), "validation": train.select(range(n_val))}
    )


def _train_validation(raw, name: str, streaming: bool, percentage: float, streaming_validation_docs: int):
    """``train`` and ``validation`` of ``raw``: its own validation split (the table's name for it, else
    ``validation``), else the first documents of a stream, else a share of the map-style train split."""
    with requires("probe"):
        import datasets

    spec = HUB_TEXT_DATASETS.get(name)
    validation = spec.validation_split if spec and spec.validation_split else "validation"
    if validation in raw:
        return type(raw)({"train": raw["train"], "validation": raw[validation]})
    if streaming:  # unknown length: hold out the first documents of the stream
        stream = raw["train"]
        return datasets.IterableDatasetDict(
            {"train": stream.skip(streaming_validation_docs), "validation": stream.take(streaming_validation_docs)}
        )
    return _carve_validation(raw["train"], percentage)


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str | None = None,
    streaming: bool = False,
    validation_split_percentage: float = 5.0,
    streaming_validation_docs: int = DEFAULT_STREAMING_VALIDATION_DOCS,
    keep_linebreaks: bool = True,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    embedded_options: dict | None = None,
):
    """Load raw text with ``train`` and ``validation`` splits; returns ``(dataset_dict, text_column)``.

    Resolution: nothing at all -> the embedded corpus :data:`~nerve_hf.data.corpus.DEFAULT_CORPUS`;
    ``train_file``/``validation_file`` (txt, json, jsonl, csv) -> local files; a ``dataset_name`` -> whatever
    :func:`load_dataset_splits` opens for it. The text column follows :func:`find_text_column`.
    """
    if dataset_name is not None and (train_file or validation_file):
        raise ValueError("give either a dataset name or train/validation files, not both")
    if dataset_name is None and not (train_file or validation_file):
        dataset_name = DEFAULT_CORPUS

    if dataset_name is None:
        if not train_file:
            raise ValueError("a validation_file needs a train_file")
        raw = _load_files(train_file, validation_file, validation_split_percentage, keep_linebreaks, cache_dir)
    else:
        raw = load_dataset_splits(
            dataset_name,
            dataset_config_name,
            streaming=streaming,
            token=token,
            cache_dir=cache_dir,
            embedded_options=embedded_options,
        )
        if "train" not in raw:
            raise InputError(f"dataset {dataset_name!r} has no train split; its splits: {', '.join(raw)}")
    column = find_text_column(raw["train"], dataset_name, text_column)
    if dataset_name is not None:
        raw = _train_validation(raw, dataset_name, streaming, validation_split_percentage, streaming_validation_docs)
    return raw, column
