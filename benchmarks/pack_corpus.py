#!/usr/bin/env python
"""Pack an embedded corpus into token files that travel to a GPU machine (the ``gpu-short`` preset's data).

    python benchmarks/pack_corpus.py        # python-env, 40 MB cap, 8192-token BPE -> benchmarks/data/gpu-short
    python benchmarks/pack_corpus.py --max-bytes 80000000 --out /tmp/packed

The GPU machine has another Python and other package versions, so its own ``python-env`` corpus would be a
different corpus; instead the corpus of *this* machine is tokenized here (by default the same 40 MB slice and
the same tokenizer as the ``cpu-long`` preset, so both presets train on the same tokens) and written as

* ``train.bin``, ``validation.bin``: the token ids of every document followed by ``<|endoftext|>``, in the
  corpus's order, as little-endian uint16 (a vocabulary of at most 65,536);
* ``tokenizer/``: the tokenizer (``save_pretrained``), to decode or to extend the data;
* ``meta.json``: the corpus fingerprint, token counts, sha256 of both token files, the tokenizer.

Reading the folder back (:func:`load_packed`, :class:`TokenBlocks`) needs numpy and torch only. The folder
is ignored by git; name it in the device tool's ``carry`` (it must stay under ~48 MB so that the working
tree stays under the 64 MiB that travels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nerve_hf from a checkout

FORMAT_VERSION = 1  # bump when the layout below changes
DTYPE = "<u2"  # little-endian uint16
DEFAULT_OUT = REPO / "benchmarks" / "data" / "gpu-short"
DEFAULT_CORPUS = "python-env"
DEFAULT_MAX_BYTES = 40_000_000  # the cpu-long preset's corpus cap: the same tokens on CPU and GPU
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_LIMIT_MB = 48.0  # refuse to write more: the working tree that travels is capped at 64 MiB


@dataclass(frozen=True)
class Packed:
    train: "object"  # numpy memmap, uint16 [tokens]
    validation: "object"
    meta: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _token_stream(texts, tokenizer, batch: int = 256):
    """uint16 ids of every text followed by eos, concatenated (fast tokenizer, batched)."""
    import numpy as np

    parts = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            parts.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=DTYPE))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=DTYPE)


def pack(
    out: str | Path = DEFAULT_OUT,
    corpus: str = DEFAULT_CORPUS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    limit_mb: float = DEFAULT_LIMIT_MB,
    cache_dir: str | None = None,
) -> dict:
    """Tokenize ``corpus`` (capped at ``max_bytes``) with its locally trained BPE and write ``out``; returns meta."""
    from nerve_hf.data import corpus_fingerprint, get_tokenizer, load_embedded_corpus

    if vocab_size > 65536:
        raise ValueError(f"uint16 token files hold a vocabulary of at most 65536, not {vocab_size}")
    options = {"max_bytes": max_bytes}
    tokenizer = get_tokenizer(vocab_size=vocab_size, cache_dir=cache_dir, corpus=corpus, **options)
    raw = load_embedded_corpus(corpus, **options)
    fingerprint = corpus_fingerprint(corpus, raw, **options)
    streams = {split: _token_stream(list(raw[split]["text"]), tokenizer) for split in ("train", "validation")}
    size_mb = sum(s.nbytes for s in streams.values()) / 1e6
    if size_mb > limit_mb:
        raise ValueError(f"{size_mb:.1f} MB of tokens is over the {limit_mb:g} MB limit; lower --max-bytes")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, stream in streams.items():
        stream.tofile(out / f"{split}.bin")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": f"local byte-level BPE, {len(tokenizer)} tokens, trained on {corpus}",
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": "uint16",
        "tokens": {split: int(stream.size) for split, stream in streams.items()},
        "sha256": {split: _sha256(out / f"{split}.bin") for split in streams},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no packed corpus at {folder}: make it with `python benchmarks/pack_corpus.py --out {folder}` "
            "(on a machine with the environment whose corpus it packs)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')}, this reader wants {FORMAT_VERSION}")
    return meta


def load_packed(folder: str | Path, verify: bool = True) -> Packed:
    """The token files of ``folder`` as read-only memmaps, their sha256 checked against ``meta.json``."""
    import numpy as np

    folder = Path(folder)
    meta = read_meta(folder)
    arrays = {}
    for split in ("train", "validation"):
        path = folder / f"{split}.bin"
        if verify and _sha256(path) != meta["sha256"][split]:
            raise ValueError(f"{path}: sha256 differs from meta.json; re-pack or re-copy the folder")
        arrays[split] = np.memmap(path, dtype=DTYPE, mode="r")
        if arrays[split].size != meta["tokens"][split]:
            raise ValueError(f"{path}: {arrays[split].size} tokens, meta.json says {meta['tokens'][split]}")
    return Packed(arrays["train"], arrays["validation"], meta)


class TokenBlocks:
    """Consecutive ``block_size``-token blocks of a token stream as LM examples (``input_ids`` = ``labels``);
    the tail that fills no block is dropped. A ``torch.utils.data.Dataset`` by duck typing (len, getitem)."""

    def __init__(self, tokens, block_size: int, limit: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.tokens, self.block_size = tokens, block_size
        n = len(tokens) // block_size
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch

        if not 0 <= index < self.n:
            raise IndexError(index)
        start = index * self.block_size
        ids = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder to write (default: {DEFAULT_OUT})")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"embedded corpus (default: {DEFAULT_CORPUS})")
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help=f"corpus cap in bytes (default: {DEFAULT_MAX_BYTES})"
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary (default: 8192)")
    parser.add_argument("--limit-mb", type=float, default=DEFAULT_LIMIT_MB, help="largest token files to write, MB")
    args = parser.parse_args(argv)
    meta = pack(args.out, args.corpus, args.max_bytes, args.vocab_size, args.limit_mb)
    print(
        f"wrote {args.out}: {meta['tokens']['train']:,} train + {meta['tokens']['validation']:,} validation tokens, "
        f"corpus {meta['fingerprint']['corpus']} {meta['fingerprint']['id']} ({meta['fingerprint']['files']} files)"
    )
    return meta


if __name__ == "__main__":
    main()
