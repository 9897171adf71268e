"""Offline data for NerVE runs: embedded code corpora (the stdlib; the stdlib + site-packages) and their
fingerprints, an embedded image set, a locally trained tokenizer, LM block packing, and one loader for
embedded corpora, saved datasets, Hub datasets and local text files (with one rule for the text column:
:func:`find_text_column`).

Importing this package is cheap; ``datasets``/``transformers``/``tokenizers``/``sklearn`` load when a function runs.
"""

from nerve_hf.data.corpus import (
    DEFAULT_CORPUS,
    DEFAULT_ENV_PACKAGES,
    EMBEDDED_CORPORA,
    EmbeddedCorpus,
    PythonEnvCorpusConfig,
    StdlibCorpusConfig,
    corpus_fingerprint,
    embedded_corpus,
    load_embedded_corpus,
    load_python_env_corpus,
    load_stdlib_corpus,
)
from nerve_hf.data.digits import DIGITS_SOURCE, load_digits
from nerve_hf.data.grouping import group_texts, tokenize_and_group
from nerve_hf.data.sources import (
    HUB_TEXT_DATASETS,
    TEXT_COLUMNS,
    HubTextDataset,
    find_text_column,
    load_dataset_splits,
    load_raw_datasets,
)
from nerve_hf.data.tokenizer import cache_root, get_tokenizer, train_bpe_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_ENV_PACKAGES",
    "DIGITS_SOURCE",
    "EMBEDDED_CORPORA",
    "EmbeddedCorpus",
    "HUB_TEXT_DATASETS",
    "HubTextDataset",
    "PythonEnvCorpusConfig",
    "StdlibCorpusConfig",
    "TEXT_COLUMNS",
    "cache_root",
    "corpus_fingerprint",
    "embedded_corpus",
    "find_text_column",
    "get_tokenizer",
    "group_texts",
    "load_dataset_splits",
    "load_digits",
    "load_embedded_corpus",
    "load_python_env_corpus",
    "load_raw_datasets",
    "load_stdlib_corpus",
    "tokenize_and_group",
    "train_bpe_tokenizer",
]
