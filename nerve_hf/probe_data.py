"""Inputs for ``nerve probe``: text documents -> padded token batches; images -> pixel batches.

Text sources (each yields documents, lazily, in a fixed order):

* ``--text-file F``: the file is one document.
* ``--dataset NAME``: an embedded corpus (``nerve_hf.data.EMBEDDED_CORPORA``, read by :func:`embedded_text`), a
  local dataset (``save_to_disk`` folder or data files ``datasets.load_dataset`` can read), or a Hub
  dataset streamed with ``datasets.load_dataset(NAME, streaming=True)``.
* nothing: the embedded ``stdlib-code`` corpus, real Python source files of the running interpreter.

Images for timm models come from ``--image-dir`` or the embedded ``digits`` set (scikit-learn's 8x8
handwritten digits, resized to the model's input size and normalised with its mean/std).
"""

from __future__ import annotations

import itertools

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError

__all__ = [
    "DEFAULT_TEXT",
    "EMBEDDED_IMAGES",
    "TextBatches",
    "ImageBatches",
    "embedded_text",
    "is_embedded_corpus",
    "text_file_documents",
    "dataset_documents",
    "check_text_file",
    "tokenize_documents",
    "digits_images",
    "image_dir_images",
    "image_batches",
]

DEFAULT_TEXT = "stdlib-code"  # the corpus probed when neither --text-file nor --dataset is given

# ---------------------------------------------------------------------------------------------- text
def embedded_text(name: str) -> Iterator[str]:
    """Documents of the embedded corpus ``name`` (see :data:`nerve_hf.data.EMBEDDED_CORPORA`).

    The held-out validation split comes first, then the training split, so a probe limited by
    ``--max-tokens`` reads text a demo model never trained on.
    """
    from .data import EMBEDDED_CORPORA, load_embedded_corpus

    if name not in EMBEDDED_CORPORA:
        raise InputError(f"unknown embedded corpus {name!r}; embedded corpora: {', '.join(sorted(EMBEDDED_CORPORA))}")
    corpus = load_embedded_corpus(name)
    yield from corpus["validation"]["text"]
    yield from corpus["train"]["text"]


def is_embedded_corpus(name: str) -> bool:
    from .data import EMBEDDED_CORPORA

    return name in EMBEDDED_CORPORA


def check_text_file(path: str | os.PathLike) -> str:
    """The file's text; InputError when it is missing, unreadable, not UTF-8 or holds only whitespace."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"text file {str(path)!r} is not UTF-8 text") from None
    except OSError as error:
        raise InputError(f"cannot read text file {str(path)!r}: {error.strerror or error}") from None
    if not text.strip():
        raise InputError(f"text file {str(path)!r} is empty; give a file with some text in it")
    return text


def text_file_documents(path: str | os.PathLike) -> Iterator[str]:
    yield check_text_file(path)


def _text_column(first_row: dict, column: str | None) -> str:
    if column is not None:
        if column not in first_row:
            raise InputError(f"dataset has no column {column!r}; its columns: {', '.join(first_row)}")
        return column
    for candidate in ("text", "content", "code", "document", "sentence"):
        if candidate in first_row:
            return candidate
    strings = [name for name, value in first_row.items() if isinstance(value, str)]
    if not strings:
        raise InputError(f"dataset has no text column; its columns: {', '.join(first_row)}; pass --text-column")
    return strings[0]


def dataset_documents(
    name: str, config: str | None = None, split: str = "train", column: str | None = None
) -> tuple[str | None, Iterator[str]]:
    """(text column read, documents) of an embedded corpus (column None), a local dataset or a Hub
    dataset (streamed), in dataset order. The dataset is opened and its first row read here, so a bad
    name, split or column fails at this call (an InputError) and the column is known before tokenising."""
    if is_embedded_corpus(name):
        return None, embedded_text(name)
    import datasets  # imported on use: slow, and not needed for the embedded corpus

    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()
                               or (local / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
            rows: Iterable[dict] = loaded
        else:
            rows = datasets.load_dataset(name, config, split=split, streaming=True)
        iterator = iter(rows)
        first = next(iterator, None)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user gets one line
        where = "local dataset" if local.exists() else "dataset (not a local path, so tried the Hugging Face Hub)"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load {where} {name!r}: {reason}") from None
    if first is None:
        raise InputError(f"dataset {name!r} split {split!r} has no rows")
    key = _text_column(first, column)
    return key, itertools.chain([first[key]], (row[key] for row in iterator))


@dataclass
class TextBatches:
    """Padded token batches and how they were made."""

    batches: list[dict] = field(default_factory=list)  # input_ids, attention_mask: LongTensor [B, T]
    sequences: int = 0  # number of sequences over all batches
    tokens: int = 0  # real (unpadded) tokens over all batches
    documents: int = 0  # documents read (the last one possibly in part)


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special token ids the tokenizer wraps every sequence in (``[CLS]``/``[SEP]``, BOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


def tokenize_documents(
    documents: Iterable[str], tokenizer, seq_len: int, batch_size: int, max_tokens: int | None
) -> TextBatches:
    """Cut each document into sequences of at most ``seq_len`` tokens (special tokens included) and pad
    them into batches; stop once ``max_tokens`` real tokens are collected (the last sequence is cut).

    A sequence never spans two documents. Padding is on the right; ``attention_mask`` is 1 on real tokens
    and 0 on pads, so the tracker never counts a pad.
    """
    import torch

    prefix, suffix = _special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)  # content tokens per sequence
    if body < 1:
        raise InputError(f"--seq-len {seq_len} leaves no room next to the tokenizer's {len(prefix) + len(suffix)} special tokens")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    sequences: list[list[int]] = []
    total, n_documents = 0, 0
    for text in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        if not isinstance(text, str) or not text.strip():
            continue
        n_documents += 1
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            sequence = prefix + ids[start : start + body] + suffix
            if max_tokens is not None:
                room = max_tokens - total
                if room <= len(prefix) + len(suffix):
                    break
                sequence = sequence[:room] if len(sequence) > room else sequence
            sequences.append(sequence)
            total += len(sequence)
    if not sequences:
        raise InputError("the text gave no tokens to measure")

    out = TextBatches(sequences=len(sequences), tokens=total, documents=n_documents)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        for i, sequence in enumerate(chunk):
            input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[i, : len(sequence)] = 1
        out.batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return out


# -------------------------------------------------------------------------------------------- images
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageBatches:
    """Normalised pixel batches and how they were made."""

    batches: list = field(default_factory=list)  # FloatTensor [B, C, H, W]
    images: int = 0


def _normalise(x, mean, std):
    import torch

    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)  # [1, C, 1, 1]
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def digits_images(n: int, input_size: tuple[int, int, int], mean, std):
    """The first ``n`` scikit-learn digits as a float tensor ``[n, C, H, W]`` for a model of ``input_size``
    ``(C, H, W)``: grey values scaled to [0, 1], resized bilinearly, repeated over channels, normalised."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    channels, height, width = input_size
    images = load_digits().images[:n]  # [n, 8, 8], values 0..16
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)  # [n, 1, H, W]
    x = x.expand(-1, channels, -1, -1).contiguous()  # [n, C, H, W]
    return _normalise(x, mean, std)


def image_dir_images(directory: str | os.PathLike, n: int, data_config: dict):
    """Up to ``n`` images of ``directory`` (sorted by name, searched recursively) through timm's eval
    transform for ``data_config``, as ``[n, C, H, W]``."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"image directory {str(directory)!r} does not exist")
    transform = create_transform(**data_config, is_training=False)
    channels = data_config["input_size"][0]
    tensors = []
    for path in sorted(p for p in directory.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES):
        if len(tensors) >= n:
            break
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if channels == 3 else "L")
                tensors.append(transform(image))  # [C, H, W]
        except (OSError, UnidentifiedImageError):
            continue  # not an image after all
    if not tensors:
        raise InputError(f"image directory {str(directory)!r} holds no readable images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return torch.stack(tensors)


# Embedded image set name -> loader(n, input_size, mean, std)
EMBEDDED_IMAGES = {"digits": digits_images}


def image_batches(images, batch_size: int) -> ImageBatches:
    """Split ``[n, C, H, W]`` into batches of ``batch_size``."""
    return ImageBatches(batches=list(images.split(batch_size)), images=int(images.shape[0]))
