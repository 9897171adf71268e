"""How Python source files become a corpus, the same on every machine: a stable hash of each file's path
orders the files and decides its split, usable files are read in place, a byte cap takes a prefix of that
order, and a fingerprint names the content of the splits. The corpora built this way, and their options:
:mod:`nerve_hf.data.corpus`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nerve_hf.errors import requires

__all__ = [
    "TEST_DIRS",
    "stable_hash",
    "is_validation_path",
    "stdlib_paths",
    "read_usable",
    "in_hash_order",
    "capped_splits",
    "as_dataset_dict",
    "splits_fingerprint",
]

# Directory names never entered: installed packages, bytecode, and (optionally) the test suites,
# which are huge and hold deliberately broken encodings and syntax.
_ALWAYS_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stable_hash(text: str, salt: str = "") -> int:
    """A 64-bit hash of ``text`` that is the same in every process and on every machine.

    (Python's ``hash`` of a str is salted per process, so it cannot decide a data split.)

    >>> stable_hash("json/decoder.py") == stable_hash("json/decoder.py")
    True
    """
    digest = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_validation_path(rel_path: str, validation_percent: float) -> bool:
    """Whether a file belongs to the validation split: decided by its path alone, so stable under any cap."""
    bucket = stable_hash(rel_path, salt="split") % 10_000  # 0.01 % resolution
    return bucket < validation_percent * 100


def stdlib_paths(root: Path, include_tests: bool) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every ``.py`` file under the stdlib ``root``, sorted by relative path."""
    skipped_dirs = _ALWAYS_SKIPPED_DIRS | (frozenset() if include_tests else TEST_DIRS)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skipped_dirs]
        paths.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted((p.relative_to(root).as_posix(), p) for p in paths)


def read_usable(path: Path, max_file_bytes: int | None) -> str | None:
    """The file's text, or None when unusable: unreadable, blank, larger than ``max_file_bytes``, not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw.strip() or (max_file_bytes is not None and len(raw) > max_file_bytes):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def in_hash_order(rel_paths: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """A stable pseudo-random order (a hash of the path): any byte-capped prefix is a spread over the whole tree,
    not a run of alphabetically adjacent packages."""
    return sorted(rel_paths, key=lambda item: (stable_hash(item[0], salt="order"), item[0]))


def capped_splits(sources, max_bytes: int | None, validation_percent: float) -> dict[str, dict[str, list]]:
    """``{split: {"text": [...], "path": [...]}}`` of ``(rel, text)`` pairs taken in order until ``max_bytes``.

    A small cap may have found no validation file yet when it is reached: the next validation file is taken
    then, and only it.
    """
    splits = {"train": {"text": [], "path": []}, "validation": {"text": [], "path": []}}
    total = 0
    for rel, text in sources:
        split = "validation" if is_validation_path(rel, validation_percent) else "train"
        if max_bytes is not None and total >= max_bytes:
            if splits["validation"]["path"] or validation_percent <= 0:
                break
            if split == "train":
                continue
        splits[split]["text"].append(text)
        splits[split]["path"].append(rel)
        total += len(text.encode("utf-8"))
    return splits


def as_dataset_dict(splits: dict[str, dict[str, list]]):
    """``capped_splits``' columns as a ``datasets.DatasetDict`` of string columns ``text`` and ``path``."""
    with requires("probe"):
        import datasets

    features = datasets.Features({"text": datasets.Value("string"), "path": datasets.Value("string")})
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(columns, features=features) for name, columns in splits.items()}
    )


def splits_fingerprint(corpus: str, splits: dict[str, dict[str, list]], sources: dict, options: dict) -> dict:
    """The fingerprint of ``splits`` (as :func:`capped_splits` makes them) of corpus ``corpus``: the counts and
    hashes of :func:`nerve_hf.data.corpus.corpus_fingerprint`, with ``sources`` and ``options`` merged in."""
    rows = sorted(
        (path, split, hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text.encode("utf-8")))
        for split, columns in splits.items()
        for path, text in zip(columns["path"], columns["text"])
    )
    files_sha256 = hashlib.sha256("\n".join(row[0] for row in rows).encode()).hexdigest()
    content = hashlib.sha256()
    for path, split, digest, _ in rows:
        content.update(f"{path}\0{split}\0{digest}\n".encode())
    per_split = {
        split: {"files": sum(1 for r in rows if r[1] == split), "bytes": sum(r[3] for r in rows if r[1] == split)}
        for split in splits
    }
    return {
        "corpus": corpus,
        "id": content.hexdigest()[:16],  # names the content: paths, splits and file contents
        "files": len(rows),
        "bytes": sum(row[3] for row in rows),
        "splits": per_split,
        "files_sha256": files_sha256,  # sha256 of the sorted file list, one path per line
        "content_sha256": content.hexdigest(),  # sha256 over "path\0split\0sha256(text)\n", sorted by path
        **sources,
        "options": options,
    }
