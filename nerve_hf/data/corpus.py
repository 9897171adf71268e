"""The embedded offline corpora: Python source files that are already on the machine.

These are the offline stand-ins for ``codeparrot/codeparrot-clean`` (DESIGN §6), real Python code read in
place (never copied anywhere):

* ``stdlib-code`` (the default): the running interpreter's standard library (~11 MB of usable files
  without its test suites);
* ``python-env``: the standard library plus the ``.py`` files that a fixed list of installed distributions
  (torch, transformers, numpy, scipy, ...) put into ``site-packages`` (~175 MB in all here), for runs that
  need more tokens than the stdlib holds.

Both are deterministic for a given environment: files are chosen and split by a stable hash of their path,
never by ``random`` or by directory listing order. :func:`corpus_fingerprint` names the exact content of a
loaded corpus (file count, bytes, hashes of the file list and of the contents, package versions). The
file rules both corpora share (hash order, split, byte cap, fingerprint): :mod:`nerve_hf.data.corpus_files`.

    >>> from nerve_hf.data import load_embedded_corpus
    >>> corpus = load_embedded_corpus("stdlib-code", max_bytes=200_000)
    >>> sorted(corpus), corpus["train"].column_names
    (['train', 'validation'], ['text', 'path'])
"""

from __future__ import annotations

import hashlib
import platform
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nerve_hf.data.corpus_files import (
    TEST_DIRS,
    as_dataset_dict,
    capped_splits,
    in_hash_order,
    read_usable,
    splits_fingerprint,
    stable_hash,
    stdlib_paths,
)

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VALIDATION_PERCENT",
    "DEFAULT_MAX_FILE_BYTES",
    "StdlibCorpusConfig",
    "iter_stdlib_sources",
    "load_stdlib_corpus",
    "DEFAULT_ENV_PACKAGES",
    "STDLIB_PREFIX",
    "SITE_PREFIX",
    "normalize_name",
    "PythonEnvCorpusConfig",
    "load_python_env_corpus",
    "corpus_fingerprint",
    "EmbeddedCorpus",
    "EMBEDDED_CORPORA",
    "embedded_corpus",
    "load_embedded_corpus",
]

DEFAULT_CORPUS = "stdlib-code"  # the corpus every entry point reads when it is given no data
DEFAULT_MAX_BYTES = 3_000_000  # corpus cap in UTF-8 bytes: ~0.9M GPT-2-style tokens, keeps the demo fast
DEFAULT_VALIDATION_PERCENT = 5.0  # share of files (by path hash) that go to the validation split
DEFAULT_MAX_FILE_BYTES = 200_000  # larger files are generated data (pydoc_data/topics.py), not code


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


def iter_stdlib_sources(config: StdlibCorpusConfig) -> list[tuple[str, str]]:
    """``(relative posix path, source text)`` of every usable ``.py`` file, in a stable pseudo-random order.

    Unusable files are skipped: not UTF-8, empty, or larger than ``config.max_file_bytes``.
    """
    sources = []
    for rel, path in in_hash_order(stdlib_paths(config.resolved_root(), config.include_tests)):
        text = read_usable(path, config.max_file_bytes)
        if text is not None:
            sources.append((rel, text))
    return sources


def load_stdlib_corpus(config: StdlibCorpusConfig | None = None, **overrides):
    """The stdlib code corpus as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    Columns: ``text`` (the file's source) and ``path`` (relative to the stdlib root). Keyword
    ``overrides`` replace fields of ``config`` (e.g. ``max_bytes=500_000``).
    """
    from dataclasses import replace

    config = replace(config or StdlibCorpusConfig(), **overrides)
    return as_dataset_dict(capped_splits(iter_stdlib_sources(config), config.max_bytes, config.validation_percent))


# --------------------------------------------------------------------------- python-env: stdlib + site-packages

# Distributions whose ``.py`` files join the stdlib's in ``python-env``: this project's runtime dependencies
# and the large pure-Python libraries they bring (names normalised as in PEP 503). A fixed list, so that
# tools installed beside them (linters, doc builders) never change the corpus; missing ones are skipped and
# recorded as absent in the fingerprint.
DEFAULT_ENV_PACKAGES = (
    "accelerate",
    "datasets",
    "evaluate",
    "huggingface-hub",
    "matplotlib",
    "networkx",
    "numpy",
    "pandas",
    "pillow",
    "pyarrow",
    "safetensors",
    "scikit-learn",
    "scipy",
    "sympy",
    "tensorboard",
    "timm",
    "tokenizers",
    "torch",
    "torchvision",
    "tqdm",
    "transformers",
)
STDLIB_PREFIX = "stdlib/"  # python-env paths: stdlib/<path under the stdlib root> ...
SITE_PREFIX = "site-packages/"  # ... and site-packages/<path as in the distribution's RECORD>


def normalize_name(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PythonEnvCorpusConfig:
    """Which files make up ``python-env``. Its :meth:`fingerprint` names the content, not just these options."""

    packages: tuple[str, ...] | None = DEFAULT_ENV_PACKAGES  # distributions read from site-packages; None = all
    max_bytes: int | None = None  # stop adding files (in hash order) once this many bytes are in; None = all
    validation_percent: float = DEFAULT_VALIDATION_PERCENT  # % of files (by path hash) held out
    include_tests: bool = False  # also files under test/, tests/ and idle_test/ directories
    include_stdlib: bool = True  # also the standard library (as the stdlib-code corpus walks it)
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES  # skip single files larger than this (generated data)
    stdlib_root: str | None = None  # None = the running interpreter's stdlib
    site_packages: str | None = None  # None = the running interpreter's purelib (the active venv's site-packages)

    def resolved_site_packages(self) -> Path:
        return Path(self.site_packages or sysconfig.get_paths()["purelib"])

    def distributions(self) -> dict[str, object]:
        """``{normalised name: importlib.metadata.Distribution}`` of the selected distributions found."""
        from importlib import metadata

        found = {}
        for dist in metadata.distributions(path=[str(self.resolved_site_packages())]):
            name = normalize_name(dist.metadata["Name"] or "")
            if name and name not in found and (self.packages is None or name in self._wanted()):
                found[name] = dist
        return dict(sorted(found.items()))

    def _wanted(self) -> set[str]:
        return {normalize_name(p) for p in self.packages or ()}

    def package_versions(self) -> dict[str, str | None]:
        """Version of every selected distribution (None: not installed), for the fingerprint."""
        found = {name: dist.version for name, dist in self.distributions().items()}
        if self.packages is None:
            return found
        return {name: found.get(name) for name in sorted(self._wanted())}

    def paths(self) -> list[tuple[str, Path]]:
        """``(corpus path, file)`` of every candidate ``.py`` file, sorted by corpus path (before any filter)."""
        rel_paths = []
        if self.include_stdlib:
            root = Path(self.stdlib_root or sysconfig.get_paths()["stdlib"])
            rel_paths += [(STDLIB_PREFIX + rel, path) for rel, path in stdlib_paths(root, self.include_tests)]
        site = self.resolved_site_packages()
        skipped = {"__pycache__"} | (set() if self.include_tests else set(TEST_DIRS))
        seen = set()
        for dist in self.distributions().values():
            for file in dist.files or ():
                rel = file.as_posix()
                parts = rel.split("/")
                if not rel.endswith(".py") or ".." in parts or skipped & set(parts[:-1]) or rel in seen:
                    continue
                seen.add(rel)
                rel_paths.append((SITE_PREFIX + rel, site / rel))
        return sorted(rel_paths)

    def sources(self) -> list[tuple[str, str]]:
        """``(corpus path, text)`` of the usable files in hash order, exact duplicates dropped (first kept)."""
        sources, seen = [], set()
        for rel, path in in_hash_order(self.paths()):
            text = read_usable(path, self.max_file_bytes)
            if text is None:
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest not in seen:  # vendored copies, identical stubs: one copy only, never in both splits
                seen.add(digest)
                sources.append((rel, text))
        return sources

    def splits(self) -> dict[str, dict[str, list]]:
        return capped_splits(self.sources(), self.max_bytes, self.validation_percent)

    def sources_info(self) -> dict:
        """What the corpus was read from, for the fingerprint."""
        return {
            "python": platform.python_version(),
            "stdlib": self.include_stdlib,
            "packages": self.package_versions(),
        }

    def manifest(self) -> dict:
        """The full fingerprint (see :func:`corpus_fingerprint`), computed by reading every selected file."""
        return splits_fingerprint("python-env", self.splits(), self.sources_info(), self._options())

    def fingerprint(self) -> str:
        """A short name of the exact content, for cache keys: it changes whenever any selected file does."""
        return self.manifest()["id"]

    def _options(self) -> dict:
        from dataclasses import asdict

        options = asdict(self)
        options["packages"] = None if self.packages is None else sorted(self._wanted())
        return options


def load_python_env_corpus(config: PythonEnvCorpusConfig | None = None, **overrides):
    """The ``python-env`` corpus (stdlib + selected site-packages) as a ``DatasetDict`` (train/validation).

    Columns ``text`` and ``path`` (``stdlib/...`` or ``site-packages/...``); ``overrides`` replace fields of
    ``config`` (e.g. ``max_bytes=50_000_000``). Files are read where they are installed.
    """
    from dataclasses import replace

    config = replace(config or PythonEnvCorpusConfig(), **overrides)
    if config.packages is not None:
        config = replace(config, packages=tuple(config.packages))  # a JSON list from a settings file
    return as_dataset_dict(config.splits())


# --------------------------------------------------------------------------- fingerprints


def corpus_fingerprint(name: str, raw, **options) -> dict:
    """The fingerprint of a loaded embedded corpus ``raw`` (the DatasetDict that ``name``'s loader made with
    ``options``): ``id``, ``files``, ``bytes``, per-split counts, ``files_sha256`` (of the sorted file list),
    ``content_sha256``, the Python version and, for ``python-env``, the versions of the packages read.

    >>> raw = load_embedded_corpus("stdlib-code", max_bytes=20_000)
    >>> fp = corpus_fingerprint("stdlib-code", raw, max_bytes=20_000)
    >>> fp["files"] == raw["train"].num_rows + raw["validation"].num_rows, len(fp["files_sha256"])
    (True, 64)
    """
    from dataclasses import asdict, replace

    entry = embedded_corpus(name)
    config = replace(entry.config_cls(), **options)
    splits = {split: {"path": list(part["path"]), "text": list(part["text"])} for split, part in raw.items()}
    if isinstance(config, PythonEnvCorpusConfig):
        return splits_fingerprint(name, splits, config.sources_info(), config._options())
    sources = {"python": platform.python_version(), "stdlib_root": str(config.resolved_root())}
    return splits_fingerprint(name, splits, sources, asdict(config))


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
    "python-env": EmbeddedCorpus(
        name="python-env",
        load=load_python_env_corpus,
        config_cls=PythonEnvCorpusConfig,
        description="the standard library plus the site-packages source of torch, transformers, numpy, scipy, ...",
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
