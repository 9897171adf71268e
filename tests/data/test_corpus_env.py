"""nerve_hf.data's python-env corpus (stdlib + site-packages) on a fake environment: file choice, the
hash split, the fingerprint, and the tokenizer cache keyed by it. Nothing here reads the real site-packages."""

from __future__ import annotations

import pytest

from nerve_hf.data import (
    EMBEDDED_CORPORA,
    PythonEnvCorpusConfig,
    corpus_fingerprint,
    get_tokenizer,
    load_embedded_corpus,
)
from nerve_hf.data import tokenizer as tokenizer_module
from nerve_hf.data.corpus_files import is_validation_path


def _module(i: int) -> str:
    return f'"""module {i}"""\n\n\ndef f{i}(x):\n    return x * {i} + {i % 7}\n\n\nclass C{i}:\n    y = {i}\n'


def _dist(site, name: str, version: str, files: dict[str, str], extra_record: tuple[str, ...] = ()) -> None:
    """A distribution as pip installs it: its files, and a dist-info folder with METADATA and RECORD."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    rows = [f"{rel},," for rel in (*files, *extra_record)] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


@pytest.fixture
def env(tmp_path):
    """``(options, site, stdlib)``: a fake stdlib and a fake site-packages with two distributions."""
    stdlib, site = tmp_path / "stdlib", tmp_path / "site-packages"
    for i in range(6):
        (stdlib / "lib").mkdir(parents=True, exist_ok=True)
        (stdlib / "lib" / f"mod{i}.py").write_text(_module(100 + i))
    (stdlib / "site-packages").mkdir()
    (stdlib / "site-packages" / "never.py").write_text("x = 'inside the stdlib root, but installed code'\n")
    files = {f"fake_pkg/mod{i}.py": _module(i) for i in range(30)}
    files["fake_pkg/__init__.py"] = ""  # blank: skipped
    files["fake_pkg/copy.py"] = _module(3)  # the same text as mod3.py: kept once
    files["fake_pkg/tests/test_mod.py"] = "def test():\n    assert True\n"  # a test directory: skipped
    files["fake_pkg/big.py"] = "z = 0\n" * 40_000  # 240 kB: generated data, skipped
    files["fake_pkg/data.txt"] = "not python\n"
    _dist(site, "Fake_Pkg", "1.0", files, extra_record=("../../bin/tool.py",))
    _dist(site, "other", "2.0", {"other/mod.py": _module(999)})
    options = dict(
        packages=("fake-pkg", "absent-pkg"), site_packages=str(site), stdlib_root=str(stdlib), validation_percent=20.0
    )
    return options, site, stdlib


def _paths(raw) -> list[str]:
    return list(raw["train"]["path"]) + list(raw["validation"]["path"])


def test_registered_beside_the_default_corpus():
    assert {"stdlib-code", "python-env"} <= set(EMBEDDED_CORPORA)


def test_files_are_chosen_from_the_stdlib_and_the_listed_distributions(env):
    options, site, stdlib = env
    raw = load_embedded_corpus("python-env", **options)
    paths = set(_paths(raw))
    assert {f"stdlib/lib/mod{i}.py" for i in range(6)} <= paths
    assert {f"site-packages/fake_pkg/mod{i}.py" for i in range(30) if i != 3} <= paths
    twins = {"site-packages/fake_pkg/mod3.py", "site-packages/fake_pkg/copy.py"}
    assert len(twins & paths) == 1  # identical texts: the first in hash order is kept, never both
    assert len(paths) == 36  # blank, duplicate, test, big, non-.py files and other distributions left out
    assert not any("other/" in p or "tests/" in p or "never.py" in p for p in paths)
    for row in raw["train"]:  # read in place: the text is the installed file's
        root, rel = (stdlib, row["path"][7:]) if row["path"].startswith("stdlib/") else (site, row["path"][14:])
        assert (root / rel).read_text() == row["text"]
    everything = load_embedded_corpus("python-env", **{**options, "packages": None})
    assert "site-packages/other/mod.py" in _paths(everything)


def test_deterministic_and_split_by_path_hash(env):
    options, _, _ = env
    first, again = (load_embedded_corpus("python-env", **options) for _ in range(2))
    for split in ("train", "validation"):
        assert list(first[split]["path"]) == list(again[split]["path"])
        assert list(first[split]["text"]) == list(again[split]["text"])
    train, val = set(first["train"]["path"]), set(first["validation"]["path"])
    assert train and val and not train & val
    assert all(is_validation_path(p, 20.0) for p in val) and not any(is_validation_path(p, 20.0) for p in train)
    capped = load_embedded_corpus("python-env", **options, max_bytes=1500)  # a prefix in hash order
    assert set(capped["train"]["path"]) < train and set(capped["validation"]["path"]) <= val


def test_fingerprint_counts_hashes_and_versions(env):
    options, _, _ = env
    config = PythonEnvCorpusConfig(**options)
    manifest = config.manifest()
    raw = load_embedded_corpus("python-env", **options)
    assert corpus_fingerprint("python-env", raw, **options) == manifest  # from the loaded data, the same
    assert manifest["files"] == 36 == sum(part["files"] for part in manifest["splits"].values())
    assert manifest["bytes"] == sum(len(t.encode()) for split in raw.values() for t in split["text"])
    assert manifest["packages"] == {"absent-pkg": None, "fake-pkg": "1.0"}
    assert len(manifest["files_sha256"]) == len(manifest["content_sha256"]) == 64
    assert config.fingerprint() == manifest["id"] == manifest["content_sha256"][:16]


def test_fingerprint_changes_with_any_file(env):
    options, site, _ = env
    before = PythonEnvCorpusConfig(**options).manifest()
    target = site / "fake_pkg" / "mod7.py"
    target.write_text(target.read_text().replace("x * 7", "x * 8"))  # same size, same list, other content
    edited = PythonEnvCorpusConfig(**options).manifest()
    assert edited["files_sha256"] == before["files_sha256"] and edited["bytes"] == before["bytes"]
    assert edited["id"] != before["id"] and edited["content_sha256"] != before["content_sha256"]
    (site / "fake_pkg" / "mod7.py").unlink()  # a file gone: the list changes too
    removed = PythonEnvCorpusConfig(**options).manifest()
    assert removed["files"] == 35 and removed["files_sha256"] != before["files_sha256"]


def test_tokenizer_is_trained_once_per_content_and_reused(env, tmp_path, monkeypatch):
    options, site, _ = env
    cache = tmp_path / "cache"
    first = get_tokenizer(vocab_size=300, cache_dir=cache, corpus="python-env", **options)
    (entry,) = (cache / "tokenizers").iterdir()
    assert entry.name.startswith("python-env-bpe300-" + PythonEnvCorpusConfig(**options).fingerprint())

    real_training = tokenizer_module.train_bpe_tokenizer

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer retrained although cached")

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", no_training)
    again = get_tokenizer(vocab_size=300, cache_dir=cache, corpus="python-env", **options)
    assert again.get_vocab() == first.get_vocab()

    (site / "fake_pkg" / "mod1.py").write_text(_module(1) + "extra = 1\n")  # new content: a new cache entry
    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", real_training)
    get_tokenizer(vocab_size=300, cache_dir=cache, corpus="python-env", **options)
    assert len(list((cache / "tokenizers").iterdir())) == 2
