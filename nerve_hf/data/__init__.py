"""Offline data for NerVE runs: an embedded code corpus, a locally trained tokenizer, LM block packing,
and one loader for embedded corpora, Hub datasets and local text files.

Importing this package is cheap; ``datasets``/``transformers``/``tokenizers`` load when a function runs.
"""

from .corpus import (
    EMBEDDED_CORPORA,
    EmbeddedCorpus,
    StdlibCorpusConfig,
    load_embedded_corpus,
    load_stdlib_corpus,
)
from .grouping import group_texts, tokenize_and_group
from .sources import HUB_TEXT_DATASETS, HubTextDataset, load_raw_datasets
from .tokenizer import cache_root, get_tokenizer, train_bpe_tokenizer

__all__ = [
    "EMBEDDED_CORPORA",
    "EmbeddedCorpus",
    "HUB_TEXT_DATASETS",
    "HubTextDataset",
    "StdlibCorpusConfig",
    "cache_root",
    "get_tokenizer",
    "group_texts",
    "load_embedded_corpus",
    "load_raw_datasets",
    "load_stdlib_corpus",
    "tokenize_and_group",
    "train_bpe_tokenizer",
]
