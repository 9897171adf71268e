"""The embedded offline corpus: the Python standard library's own source files.

This is the offline stand-in for ``codeparrot/codeparrot-clean`` (DESIGN §6): real Python code that every
machine running ``nerve_hf`` already has on disk. The corpus is deterministic for a given interpreter:
files are chosen and split by a stable hash of their path relative to the stdlib root, never by
``random`` or by directory listing order.

    >>> from nerve_hf.data import load_embedded_corpus
    >>> corpus = load_embedded_corpus("stdlib-code", max_bytes=200_000)
    >>> sorted(corpus), corpus["train"].column_names
    (['train', 'validation'], ['text', 'path'])
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEFAULT_CORPUS = "stdlib-code"  # the corpus every entry point reads when it is given no data
DEFAULT_MAX_BYTES = 3_000_000  # corpus cap in UTF-8 bytes: ~0.9M GPT-2-style tokens, keeps the demo fast
DEFAULT_VALIDATION_PERCENT = 5.0  # share of files (by path hash) that go to the validation split
DEFAULT_MAX_FILE_BYTES = 200_000  # larger files are generated data (pydoc_data/topics.py), not code

# Directory names never entered: installed packages, bytecode, and (optionally) the test suites,
# which are huge and hold deliberately broken encodings and syntax.
_ALWAYS_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True)
class StdlibCorpusConfig:
    """Which stdlib files make up the corpus. Every field takes part in :meth:`fingerprint`."""

    max_bytes: int | None = DEFAULT_MAX_BYTES  # stop adding files once this many bytes are in (then add one
    # validation file if none came yet); None = all
    validation_percent: float = DEFAULT_VALIDATION_PERCENT  # % of files (by path hash) held out
    include_tests: bool = False  # also walk test/, tests/ and idle_test/ directories
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES  # skip single files larger than this; None = keep
    root: str | None = field(default=None)  # stdlib directory; None = the running interpreter's

    def resolved_root(self) -> Path:
        return Path(self.root or sysconfig.get_paths()["stdlib"])

    def fingerprint(self) -> str:
        """A short string naming this corpus, for cache keys (tokenizers trained on it)."""
        name = f"cap{self.max_bytes or 'all'}-val{self.validation_percent:g}-file{self.max_file_bytes or 'all'}"
        if self.include_tests:
            name += "-tests"
        if self.root is not None:
            name += f"-root{stable_hash(str(self.root)) % 10**8:08d}"
        return name


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


def iter_stdlib_sources(config: StdlibCorpusConfig) -> list[tuple[str, str]]:
    """``(relative posix path, source text)`` of every usable ``.py`` file, in a stable pseudo-random order.

    Unusable files are skipped: not UTF-8, empty, or larger than ``config.max_file_bytes``.
    The order (a hash of the path) makes any ``max_bytes`` prefix a spread over the whole library, not a
    run of alphabetically adjacent packages.
    """
    root = config.resolved_root()
    skipped_dirs = _ALWAYS_SKIPPED_DIRS | (frozenset() if config.include_tests else _TEST_DIRS)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skipped_dirs]
        paths.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))

    rel_paths = sorted((p.relative_to(root).as_posix(), p) for p in paths)
    rel_paths.sort(key=lambda item: stable_hash(item[0], salt="order"))

    sources = []
    for rel, path in rel_paths:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if not raw.strip() or (config.max_file_bytes is not None and len(raw) > config.max_file_bytes):
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        sources.append((rel, text))
    return sources


def load_stdlib_corpus(config: StdlibCorpusConfig | None = None, **overrides):
    """The stdlib code corpus as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    Columns: ``text`` (the file's source) and ``path`` (relative to the stdlib root). Keyword
    ``overrides`` replace fields of ``config`` (e.g. ``max_bytes=500_000``).
    """
    from dataclasses import replace

    import datasets

    config = replace(config or StdlibCorpusConfig(), **overrides)
    splits = {"train": {"text": [], "path": []}, "validation": {"text": [], "path": []}}
    total = 0
    for rel, text in iter_stdlib_sources(config):
        split = "validation" if is_validation_path(rel, config.validation_percent) else "train"
        if config.max_bytes is not None and total >= config.max_bytes:
            # cap reached; a small cap may have found no validation file yet: take the next one, only it
            if splits["validation"]["path"] or config.validation_percent <= 0:
                break
            if split == "train":
                continue
        splits[split]["text"].append(text)
        splits[split]["path"].append(rel)
        total += len(text.encode("utf-8"))

    features = datasets.Features({"text": datasets.Value("string"), "path": datasets.Value("string")})
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(columns, features=features) for name, columns in splits.items()}
    )


@dataclass(frozen=True)
class EmbeddedCorpus:
    """A corpus that needs no network: a name for CLIs and the function that builds it."""

    name: str  # what ``--dataset NAME`` says
    load: Callable  # (**options) -> datasets.DatasetDict with train/validation and a ``text`` column
    config_cls: type  # dataclass of the loader's options; its ``fingerprint()`` names a cache entry
    description: str  # one line for ``--help`` texts


EMBEDDED_CORPORA: dict[str, EmbeddedCorpus] = {
    "stdlib-code": EmbeddedCorpus(
        name="stdlib-code",
        load=load_stdlib_corpus,
        config_cls=StdlibCorpusConfig,
        description="Python source of the running interpreter's standard library (offline codeparrot stand-in)",
    ),
}


def embedded_corpus(name: str) -> EmbeddedCorpus:
    """The entry of :data:`EMBEDDED_CORPORA` called ``name``; ValueError naming the known ones otherwise."""
    try:
        return EMBEDDED_CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown embedded corpus {name!r}; known: {sorted(EMBEDDED_CORPORA)}") from None


def load_embedded_corpus(name: str = DEFAULT_CORPUS, **options):
    """Build the embedded corpus ``name`` (a key of :data:`EMBEDDED_CORPORA`)."""
    return embedded_corpus(name).load(**options)
