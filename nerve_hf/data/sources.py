"""One loader for the three places text comes from: an embedded corpus, a Hub dataset, local files.

Every source comes back as a ``DatasetDict`` (``IterableDatasetDict`` when streaming) with ``train``
and ``validation`` splits, plus the name of its text column. Hub datasets load only when asked for by
name: nothing here touches the network on a default path (DESIGN §6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .corpus import EMBEDDED_CORPORA, load_embedded_corpus

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDED_CORPUS = "stdlib-code"  # what runs when no dataset and no files are given
DEFAULT_STREAMING_VALIDATION_DOCS = 1000  # documents held out from a stream that has no validation split


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

_FILE_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}


def _no_rows():
    return iter(())


def _as_stream(split):
    """A map-style split as an ``IterableDataset`` (an empty one cannot be sharded, so it gets a generator)."""
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
    import datasets

    n_val = int(len(train) * percentage / 100)
    if percentage > 0 and n_val == 0 and len(train) > 1:
        n_val = 1  # tiny files: still hold out one row rather than none
    return datasets.DatasetDict(
        {"train": train.select(range(n_val, len(train))), "validation": train.select(range(n_val))}
    )


def _load_hub(name, config, streaming, validation_split_percentage, streaming_validation_docs, token, cache_dir):
    import datasets

    spec = HUB_TEXT_DATASETS.get(name)
    config = config or (spec.config if spec else None)
    raw = datasets.load_dataset(name, config, streaming=streaming, token=token, cache_dir=cache_dir)
    validation = spec.validation_split if spec and spec.validation_split else "validation"
    if validation in raw:
        return type(raw)({"train": raw["train"], "validation": raw[validation]})
    if streaming:  # unknown length: hold out the first documents of the stream
        stream = raw["train"]
        return datasets.IterableDatasetDict(
            {"train": stream.skip(streaming_validation_docs), "validation": stream.take(streaming_validation_docs)}
        )
    return _carve_validation(raw["train"], validation_split_percentage)


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

    Resolution: an embedded corpus name (``"stdlib-code"``) or nothing at all -> the embedded corpus
    (``embedded_options`` go to its loader); ``train_file``/``validation_file`` (txt, json, jsonl, csv) ->
    local files; any other ``dataset_name`` -> ``datasets.load_dataset`` from the Hub, with the text column
    and default subset of :data:`HUB_TEXT_DATASETS` when the name is known there.
    """
    if dataset_name is not None and (train_file or validation_file):
        raise ValueError("give either a dataset name or train/validation files, not both")

    if dataset_name is None and not (train_file or validation_file):
        dataset_name = DEFAULT_EMBEDDED_CORPUS
    if dataset_name in EMBEDDED_CORPORA:
        logger.info("using the embedded corpus %r (offline)", dataset_name)
        raw = load_embedded_corpus(dataset_name, **(embedded_options or {}))
        if streaming:  # same data as a stream: exercises the streaming code path offline
            import datasets

            raw = datasets.IterableDatasetDict({name: _as_stream(split) for name, split in raw.items()})
        return raw, text_column or "text"

    if dataset_name is None:
        if not train_file:
            raise ValueError("a validation_file needs a train_file")
        raw = _load_files(train_file, validation_file, validation_split_percentage, keep_linebreaks, cache_dir)
        return raw, text_column or "text"

    spec = HUB_TEXT_DATASETS.get(dataset_name)
    raw = _load_hub(
        dataset_name,
        dataset_config_name,
        streaming,
        validation_split_percentage,
        streaming_validation_docs,
        token,
        cache_dir,
    )
    return raw, text_column or (spec.text_column if spec else "text")
