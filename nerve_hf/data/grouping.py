"""Tokenize texts and pack them into fixed-length blocks for causal language modelling.

The convention of transformers' ``run_clm`` example: concatenate the token ids of a batch of documents,
cut them into ``block_size`` chunks, drop the remainder, and use the inputs as labels (the model shifts
them). Every block is full, so no padding and no attention mask is ever needed.
"""

from __future__ import annotations

from itertools import chain

from nerve_hf.errors import requires

DEFAULT_MAP_BATCH_SIZE = 1000  # documents concatenated per map batch; the remainder of each batch is dropped


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate every list column of a batch and cut it into ``block_size`` chunks; add ``labels``.

    >>> out = group_texts({"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]]}, block_size=3)
    >>> out["input_ids"], out["labels"]
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]])
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    concatenated = {key: list(chain.from_iterable(values)) for key, values in examples.items()}
    n_tokens = len(concatenated["input_ids"])
    usable = (n_tokens // block_size) * block_size  # drop the tail that does not fill a block
    result = {
        key: [values[start : start + block_size] for start in range(0, usable, block_size)]
        for key, values in concatenated.items()
    }
    result["labels"] = [list(block) for block in result["input_ids"]]
    return result


def _tokenize_and_group_batch(examples, tokenizer, text_column, block_size, append_eos):
    # verbose=False: documents longer than model_max_length are expected here, they are cut into blocks
    encoded = tokenizer(examples[text_column], add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = encoded["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        ids = [seq + [tokenizer.eos_token_id] for seq in ids]  # documents separated by end-of-text
    return group_texts({"input_ids": ids}, block_size)


def _column_names(dataset, text_column: str) -> list[str]:
    """All columns of a (possibly streaming) dataset; a Hub stream may only reveal them by peeking."""
    names = dataset.column_names
    if names is None:  # IterableDataset without declared features
        names = list(next(iter(dataset)).keys())
    if text_column not in names:
        raise ValueError(f"text column {text_column!r} not in dataset columns {names}; pass the right column name")
    return names


def tokenize_and_group(
    dataset,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    append_eos: bool = True,
    num_proc: int | None = None,
    batch_size: int = DEFAULT_MAP_BATCH_SIZE,
):
    """Map a ``Dataset``/``DatasetDict`` (or their streaming ``Iterable*`` forms) to LM blocks.

    Returns the same container type with columns ``input_ids`` and ``labels`` only, each row a list of
    exactly ``block_size`` token ids. ``append_eos`` puts the tokenizer's eos after every document (the
    GPT-2 pretraining convention; the tokenizer itself does not add it).
    """
    with requires("probe"):
        import datasets

    def one(ds, name=None):
        kwargs = dict(
            batched=True,
            batch_size=batch_size,
            remove_columns=_column_names(ds, text_column),
            fn_kwargs=dict(tokenizer=tokenizer, text_column=text_column, block_size=block_size, append_eos=append_eos),
        )
        if isinstance(ds, datasets.Dataset):  # progress bar and worker processes exist for map-style only
            kwargs.update(
                num_proc=num_proc, desc=f"Tokenizing and grouping {name or 'texts'} into blocks of {block_size}"
            )
        return ds.map(_tokenize_and_group_batch, **kwargs)

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({name: one(split, name) for name, split in dataset.items()})
    return one(dataset)
