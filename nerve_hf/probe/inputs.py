"""Inputs for ``nerve probe``: text documents -> padded token batches; images -> pixel batches.

Text comes from the first of these that is given:

* ``--text-file F``: the file is one document, read once, when :func:`check_inputs` checks the options.
* ``--dataset NAME``: whatever :func:`nerve_hf.data.load_dataset_splits` opens (an embedded corpus, a
  ``save_to_disk`` folder, a local folder of data files, a Hub dataset, streamed), one split of it, its
  text column chosen by :func:`nerve_hf.data.find_text_column`.
* nothing: the embedded corpus :data:`nerve_hf.data.DEFAULT_CORPUS`, real Python source files of the
  running interpreter.

An embedded corpus is read held-out split first, then its training split, so a probe limited by
``--max-tokens`` reads text a demo model never trained on. Images for timm models come from
``--image-dir`` or the embedded digits (:func:`nerve_hf.data.load_digits`), resized to the model's input
size and normalised with its mean/std.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from nerve_hf.data import DEFAULT_CORPUS, EMBEDDED_CORPORA, find_text_column, load_dataset_splits
from nerve_hf.errors import InputError, first_line, requires
from nerve_hf.probe.config import ProbeConfig
from nerve_hf.probe.models import LoadedModel

__all__ = [
    "TextBatches",
    "ImageBatches",
    "check_inputs",
    "make_batches",
    "read_text_file",
    "dataset_documents",
    "tokenize_documents",
    "digits_images",
    "image_dir_images",
    "image_batches",
]


# ---------------------------------------------------------------------------------- the options
def check_inputs(config: ProbeConfig, modality: str) -> Optional[str]:
    """Check the data options against the model's ``modality`` (``text`` or ``image``) before anything heavy
    loads; returns the text of ``--text-file`` (read here, once), else None. InputError when they do not fit."""
    if modality == "image":
        if config.text_file is not None or config.dataset is not None:
            raise InputError(
                f"{config.model!r} is an image model (timm); it cannot take text "
                f"(--text-file/--dataset); give --image-dir DIR or nothing for the embedded digits"
            )
    elif config.image_dir is not None:
        raise InputError(f"{config.model!r} is a text model; --image-dir is for timm image models")
    if config.image_dir is not None and not Path(config.image_dir).is_dir():
        raise InputError(f"image directory {config.image_dir!r} does not exist")
    return read_text_file(config.text_file) if config.text_file is not None else None


def make_batches(config: ProbeConfig, loaded: LoadedModel, seq_len: int, text: Optional[str] = None):
    """``(batches, provenance)`` for ``loaded``: images, or ``text`` (what :func:`check_inputs` read) /
    the dataset / the default corpus cut into sequences of ``seq_len`` tokens."""
    if loaded.source.modality == "image":
        if config.image_dir is not None:
            images = image_dir_images(config.image_dir, config.num_images, loaded.data_config)
            source = {"kind": "images", "source": "image-dir", "path": str(Path(config.image_dir).resolve())}
        else:
            cfg = loaded.data_config
            images = digits_images(config.num_images, tuple(cfg["input_size"]), cfg["mean"], cfg["std"])
            source = {
                "kind": "images",
                "source": "embedded:digits",
                "description": "scikit-learn handwritten digits (8x8 grey), resized bilinearly to the model's "
                "input size, repeated over channels, normalised with the model's mean/std",
            }
        made = image_batches(images, config.batch_size)
        source.update(images=made.images, input_size=list(images.shape[1:]), batch_size=config.batch_size)
        return made.batches, source

    if config.text_file is not None:
        documents: Iterable[str] = [text if text is not None else read_text_file(config.text_file)]
        source = {"kind": "text", "source": "text-file", "path": str(Path(config.text_file).resolve())}
    else:
        name = config.dataset or DEFAULT_CORPUS
        read: list[str] = []  # the splits the tokens came from, in order, filled as they are read
        column, documents = dataset_documents(
            name, config.dataset_config, config.dataset_split, config.text_column, read=read
        )
        embedded = name in EMBEDDED_CORPORA
        source = {"kind": "text", "source": f"embedded:{name}" if embedded else "dataset", "name": name}
        if not embedded:
            source.update(config=config.dataset_config, column=column)
    made = tokenize_documents(documents, loaded.tokenizer, seq_len, config.batch_size, config.max_tokens)
    if config.text_file is None:
        source["split"] = "+".join(read)  # "validation", or "validation+train" when it ran out
    source.update(
        documents=made.documents,
        sequences=made.sequences,
        tokens=made.tokens,
        seq_len=seq_len,
        batch_size=config.batch_size,
        padding="right; attention_mask excludes pads",
    )
    return made.batches, source


# ---------------------------------------------------------------------------------------------- text
def read_text_file(path: str | os.PathLike) -> str:
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


def dataset_documents(
    name: str,
    config: str | None = None,
    split: str = "train",
    column: str | None = None,
    read: list[str] | None = None,
) -> tuple[str, Iterator[str]]:
    """``(text column, documents)`` of one split of dataset ``name`` (an embedded corpus: its validation
    split, then its training split), in dataset order, streamed where the data allows. The dataset is
    opened and its first row read here, so a bad name, split or column fails at this call (an InputError)
    and the column is known before tokenising. ``read``, when given, receives the name of each split as its
    first row is read (what ``report.json`` records as the split read)."""
    embedded = name in EMBEDDED_CORPORA
    read = [] if read is None else read
    try:
        splits = load_dataset_splits(name, config, streaming=not embedded)
        if embedded:
            names = ["validation", "train"]
        elif split not in splits:
            raise InputError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
        else:
            names = [split]

        def part(which):
            read.append(which)
            yield from splits[which]

        rows = itertools.chain.from_iterable(part(which) for which in names)
        first = next(rows, None)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user gets one line
        where = "local dataset" if Path(name).exists() else "dataset (not a local path, so tried the Hugging Face Hub)"
        raise InputError(f"cannot load {where} {name!r}: {first_line(error)}") from None
    if first is None:
        raise InputError(f"dataset {name!r} split {split!r} has no rows")
    key = find_text_column(first, name, column)
    return key, itertools.chain([first[key]], (row[key] for row in rows))


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
        raise InputError(
            f"--seq-len {seq_len} leaves no room next to the tokenizer's {len(prefix) + len(suffix)} special tokens"
        )
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
    """The first ``n`` embedded digits (:func:`nerve_hf.data.load_digits`) as a float tensor ``[n, C, H, W]``
    for a model of ``input_size`` ``(C, H, W)``: grey values in [0, 1], resized bilinearly, repeated over
    channels, normalised with ``mean``/``std``."""
    import torch
    import torch.nn.functional as F

    from nerve_hf.data import load_digits

    channels, height, width = input_size
    images, _ = load_digits()  # [1797, 8, 8] in [0, 1]
    x = torch.tensor(images[:n], dtype=torch.float32).unsqueeze(1)  # [n, 1, 8, 8]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)  # [n, 1, H, W]
    x = x.expand(-1, channels, -1, -1).contiguous()  # [n, C, H, W]
    return _normalise(x, mean, std)


def image_dir_images(directory: str | os.PathLike, n: int, data_config: dict):
    """Up to ``n`` images of the folder ``directory`` (sorted by name, searched recursively) through timm's
    eval transform for ``data_config``, as ``[n, C, H, W]``; files that are not images are passed over."""
    import torch

    with requires("probe"):
        from PIL import Image, UnidentifiedImageError
        from timm.data import create_transform

    directory = Path(directory)  # checked to be a folder by check_inputs
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
        raise InputError(
            f"image directory {str(directory)!r} holds no readable images ({', '.join(sorted(_IMAGE_SUFFIXES))})"
        )
    return torch.stack(tensors)


def image_batches(images, batch_size: int) -> ImageBatches:
    """Split ``[n, C, H, W]`` into batches of ``batch_size``."""
    return ImageBatches(batches=list(images.split(batch_size)), images=int(images.shape[0]))
