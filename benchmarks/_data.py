"""Data of the benchmark runs: LM blocks (embedded corpus, packed tokens or Hub) and image splits, cached per
process. Every ``info`` carries ``corpus_fingerprint``: what exactly the run was trained and evaluated on."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from _settings import RunSettings

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=4)
def _lm_data(
    dataset, dataset_config, streaming, tokenizer_name, vocab_size, corpus_max_bytes, block_size, eval_samples
):
    from nerve_hf.data import EMBEDDED_CORPORA, get_tokenizer, load_raw_datasets, tokenize_and_group

    embedded = dataset in EMBEDDED_CORPORA
    options = {"max_bytes": corpus_max_bytes} if embedded else None
    if tokenizer_name is None:
        if not embedded:
            raise ValueError(f"a Hub dataset ({dataset}) needs a named tokenizer (settings.tokenizer)")
        tokenizer = get_tokenizer(vocab_size=vocab_size, corpus=dataset, **options)
        tokenizer_desc = f"local byte-level BPE, {len(tokenizer)} tokens, trained on {dataset}"
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        tokenizer_desc = tokenizer_name
    raw, text_column = load_raw_datasets(dataset, dataset_config, streaming=streaming, embedded_options=options)
    if embedded:
        from nerve_hf.data import corpus_fingerprint

        fingerprint = corpus_fingerprint(dataset, raw, **options)
    else:  # a Hub dataset: its name, subset and (when the Hub says) revision are all we know without reading it
        key = f"{dataset}/{dataset_config}" if dataset_config else dataset
        fingerprint = {
            "corpus": dataset,
            "id": "hub-" + hashlib.sha256(key.encode()).hexdigest()[:12],
            "config": dataset_config,
        }
    grouped = tokenize_and_group(raw, tokenizer, block_size, text_column=text_column)
    train, validation = grouped["train"], grouped["validation"]
    if eval_samples:
        validation = (
            validation.take(eval_samples) if streaming else validation.select(range(min(eval_samples, len(validation))))
        )
    if streaming:  # Trainer needs a map-style eval set to count it; the eval slice is small
        import datasets

        validation = datasets.Dataset.from_list(list(validation))
    info = {
        "dataset": dataset if not dataset_config else f"{dataset}/{dataset_config}",
        "corpus_max_bytes": corpus_max_bytes if embedded else None,
        "tokenizer": tokenizer_desc,
        "block_size": block_size,
        "train_blocks": None if streaming else len(train),
        "eval_blocks": len(validation),
        "corpus_fingerprint": fingerprint,
    }
    return train, validation, len(tokenizer), info


@lru_cache(maxsize=4)
def _packed_data(folder, block_size, eval_samples):
    """Blocks cut from the token files of ``benchmarks/pack_corpus.py`` (no tokenizer, no ``datasets`` needed)."""
    import pack_corpus

    packed = pack_corpus.load_packed(folder)
    train = pack_corpus.TokenBlocks(packed.train, block_size)
    validation = pack_corpus.TokenBlocks(packed.validation, block_size, limit=eval_samples or None)
    meta = packed.meta
    info = {
        "dataset": f"{meta['fingerprint']['corpus']} (packed: {Path(folder).name})",
        "corpus_max_bytes": meta["fingerprint"]["options"].get("max_bytes"),
        "tokenizer": meta["tokenizer"],
        "block_size": block_size,
        "train_blocks": len(train),
        "eval_blocks": len(validation),
        "corpus_fingerprint": {**meta["fingerprint"], "packed": {k: meta[k] for k in ("tokens", "dtype", "sha256")}},
    }
    return train, validation, meta["vocab_size"], info


def packed_folder(settings: RunSettings) -> Path:
    folder = Path(settings.packed_data)
    return folder if folder.is_absolute() else REPO / folder


def lm_data(settings: RunSettings):
    """``(train, eval, vocab_size, info)``: LM blocks of ``settings.block_size`` tokens (``input_ids``, ``labels``)."""
    if settings.packed_data:
        return _packed_data(str(packed_folder(settings)), settings.block_size, settings.eval_samples)
    return _lm_data(
        settings.dataset,
        settings.dataset_config,
        settings.streaming,
        settings.tokenizer,
        settings.vocab_size,
        settings.corpus_max_bytes,
        settings.block_size,
        settings.eval_samples,
    )


@lru_cache(maxsize=2)
def _image_data(dataset, image_size, seed, data_dir, eval_samples):
    from torch.utils.data import Subset

    import nerve_zoo as zoo

    splits = zoo.load_image_dataset(dataset, image_size=image_size, seed=seed, data_dir=data_dir)
    val = splits.val if not eval_samples else Subset(splits.val, range(min(eval_samples, len(splits.val))))
    info = {
        "dataset": splits.source,
        "image_size": image_size,
        "train_images": len(splits.train),
        "eval_images": len(val),
        "num_classes": splits.num_classes,
        "corpus_fingerprint": image_fingerprint(splits, dataset),
    }
    return splits.train, val, splits.num_classes, info


def image_fingerprint(splits, dataset: str) -> dict:
    """Counts and a sha256 of the raw uint8 images and labels of both splits (the split is seeded)."""
    digest = hashlib.sha256()
    for part in (splits.train, splits.val):
        digest.update(part.images.contiguous().numpy().tobytes())
        digest.update(part.labels.contiguous().numpy().tobytes())
    return {
        "corpus": dataset,
        "id": digest.hexdigest()[:16],
        "source": splits.source,
        "train_images": len(splits.train),
        "eval_images": len(splits.val),
        "content_sha256": digest.hexdigest(),
    }


def image_data(settings: RunSettings):
    """``(train, eval, num_classes, info)`` of ``nerve_zoo.load_image_dataset``."""
    return _image_data(settings.dataset, settings.image_size, settings.seed, settings.data_dir, settings.eval_samples)
