"""nerve_hf.data: the embedded stdlib corpus, the locally trained tokenizer, block packing, source loading."""

import json
import sysconfig
import time
from pathlib import Path

import datasets
import pytest

from nerve_hf.data import (
    EMBEDDED_CORPORA,
    HUB_TEXT_DATASETS,
    StdlibCorpusConfig,
    cache_root,
    get_tokenizer,
    group_texts,
    load_embedded_corpus,
    load_raw_datasets,
    load_stdlib_corpus,
    tokenize_and_group,
)
from nerve_hf.data import tokenizer as tokenizer_module
from nerve_hf.data.corpus_files import is_validation_path

SMALL = 400_000  # corpus cap for these tests: ~25 files, fast to load and to train a tokenizer on
CODE = 'def f(x, *, π=3.14):\n\t"""ünïcode — docstring"""\n    return {"a": [x ** 2]}  # trailing\n\n'


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_bytes=SMALL)


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nerve_cache")


@pytest.fixture(scope="module")
def trained(tokenizer_cache):
    """(tokenizer, seconds to train it) for a 512-token vocabulary on the small corpus."""
    start = time.perf_counter()
    tok = get_tokenizer(vocab_size=512, cache_dir=tokenizer_cache, max_bytes=SMALL)
    return tok, time.perf_counter() - start


# --- corpus -------------------------------------------------------------------------------------------


def test_corpus_is_deterministic(corpus):
    again = load_stdlib_corpus(max_bytes=SMALL)
    for split in ("train", "validation"):
        assert list(corpus[split]["path"]) == list(again[split]["path"])
        assert list(corpus[split]["text"]) == list(again[split]["text"])


def test_corpus_content_is_the_stdlib_source(corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    assert corpus["train"].column_names == ["text", "path"]
    assert corpus["train"].num_rows >= 10 and corpus["validation"].num_rows >= 1
    for row in corpus["train"].select(range(5)):
        assert row["path"].endswith(".py")
        assert (root / row["path"]).read_text(encoding="utf-8") == row["text"]
    all_paths = list(corpus["train"]["path"]) + list(corpus["validation"]["path"])
    assert not any(
        part in ("site-packages", "test", "tests", "__pycache__") for p in all_paths for part in p.split("/")
    )
    total = sum(len(t.encode()) for t in list(corpus["train"]["text"]) + list(corpus["validation"]["text"]))
    # the cap stops adding files once reached: at most one file (<= max_file_bytes) past it
    assert SMALL <= total <= SMALL + StdlibCorpusConfig().max_file_bytes


def test_split_is_disjoint_and_decided_by_path_alone(corpus):
    train, val = set(corpus["train"]["path"]), set(corpus["validation"]["path"])
    assert train and val and not train & val
    assert all(is_validation_path(p, 5.0) for p in val)
    assert not any(is_validation_path(p, 5.0) for p in train)
    # a bigger cap adds files but never moves one across the split
    bigger = load_stdlib_corpus(max_bytes=4 * SMALL)
    assert train <= set(bigger["train"]["path"])
    assert val <= set(bigger["validation"]["path"])
    assert not set(bigger["train"]["path"]) & set(bigger["validation"]["path"])
    big_val_share = bigger["validation"].num_rows / (bigger["train"].num_rows + bigger["validation"].num_rows)
    assert 0.0 < big_val_share < 0.2


def test_unusable_files_are_skipped(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    (tmp_path / "empty.py").write_text("  \n")
    (tmp_path / "huge.py").write_text("y = 2\n" * 50_000)
    (tmp_path / "notes.txt").write_text("not python")
    for skipped in ("site-packages", "__pycache__", "test"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "mod.py").write_text("z = 3\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "inner.py").write_text("w = 4\n")

    ds = load_stdlib_corpus(root=str(tmp_path), max_bytes=None, validation_percent=0.0, max_file_bytes=100_000)
    assert sorted(ds["train"]["path"]) == ["good.py", "pkg/inner.py"]
    assert ds["validation"].num_rows == 0
    with_tests = load_stdlib_corpus(root=str(tmp_path), max_bytes=None, validation_percent=0.0, include_tests=True)
    assert "test/mod.py" in list(with_tests["train"]["path"])


def test_registry():
    assert "stdlib-code" in EMBEDDED_CORPORA
    ds = load_embedded_corpus("stdlib-code", max_bytes=50_000)
    assert isinstance(ds, datasets.DatasetDict) and set(ds) == {"train", "validation"}
    with pytest.raises(ValueError, match="stdlib-code"):
        load_embedded_corpus("no-such-corpus")


# --- tokenizer ----------------------------------------------------------------------------------------


def test_tokenizer_round_trips_code(trained, corpus):
    tok, _ = trained
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    for text in [CODE, corpus["validation"][0]["text"][:2000]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE merges learned something
    assert tok.decode(tok("a")["input_ids"]) == "a"  # no special tokens added silently


def test_tokenizer_is_cached_on_disk(trained, tokenizer_cache, monkeypatch):
    tok, train_seconds = trained
    entries = list((tokenizer_cache / "tokenizers").iterdir())
    assert len(entries) == 1 and "bpe512" in entries[0].name and "py3." in entries[0].name
    assert not [p for p in entries if ".tmp-" in p.name]  # staging directory cleaned up

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer retrained although cached")

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", no_training)
    start = time.perf_counter()
    again = get_tokenizer(vocab_size=512, cache_dir=tokenizer_cache, max_bytes=SMALL)
    load_seconds = time.perf_counter() - start
    assert again.get_vocab() == tok.get_vocab()
    assert again(CODE)["input_ids"] == tok(CODE)["input_ids"]
    assert load_seconds < train_seconds


def test_tokenizer_cache_key_and_location(tmp_path, monkeypatch):
    monkeypatch.setenv("NERVE_HF_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("NERVE_HF_CACHE")
    assert cache_root() == Path.home() / ".cache" / "nerve_hf"
    a = StdlibCorpusConfig(max_bytes=SMALL).fingerprint()
    assert a != StdlibCorpusConfig(max_bytes=2 * SMALL).fingerprint()
    assert tokenizer_module.tokenizer_cache_key(512, "stdlib-code", a) != tokenizer_module.tokenizer_cache_key(
        1024, "stdlib-code", a
    )
    with pytest.raises(ValueError, match="unknown embedded corpus"):
        get_tokenizer(corpus="nope", cache_dir=tmp_path)


# --- packing into blocks ------------------------------------------------------------------------------


def test_group_texts_chunks():
    batch = {"input_ids": [list(range(10)), list(range(10, 17)), [17, 18]]}  # 19 tokens
    out = group_texts(batch, block_size=4)
    assert out["input_ids"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # 3 tokens dropped
    assert out["labels"] == out["input_ids"] and out["labels"] is not out["input_ids"]
    assert group_texts({"input_ids": [[1, 2]]}, block_size=4) == {"input_ids": [], "labels": []}
    with pytest.raises(ValueError):
        group_texts(batch, block_size=0)


def test_tokenize_and_group_dataset_dict(trained, corpus):
    tok, _ = trained
    block = 48
    blocks = tokenize_and_group(corpus, tok, block_size=block)
    for split in ("train", "validation"):
        assert blocks[split].column_names == ["input_ids", "labels"]
        lengths = {len(ids) for ids in list(blocks[split]["input_ids"])}
        assert lengths == {block}
        # one map batch holds the whole split: exactly floor(total tokens / block) blocks
        n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in list(corpus[split]["text"]))
        assert blocks[split].num_rows == n_tokens // block
    first_doc = tok(corpus["train"][0]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [i for row in list(blocks["train"]["input_ids"]) for i in row]
    assert flat[: len(first_doc)] == first_doc[: len(flat)]  # documents in order, eos after each


def test_tokenize_and_group_streaming_matches(trained):
    tok, _ = trained
    texts = [CODE * (i + 1) for i in range(6)]
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts, "id": list(range(6))})})
    mapped = tokenize_and_group(ds, tok, block_size=16, text_column="content", append_eos=False)
    streamed = tokenize_and_group(
        datasets.IterableDatasetDict({"train": ds["train"].to_iterable_dataset()}),
        tok,
        16,
        text_column="content",
        append_eos=False,
    )
    assert isinstance(streamed, datasets.IterableDatasetDict)
    assert [row["input_ids"] for row in streamed["train"]] == list(mapped["train"]["input_ids"])
    with pytest.raises(ValueError, match="text column"):
        tokenize_and_group(ds, tok, 16, text_column="text")


# --- loading sources ----------------------------------------------------------------------------------


def test_load_raw_embedded_default_and_streaming():
    raw, column = load_raw_datasets(embedded_options={"max_bytes": 50_000})
    assert column == "text" and isinstance(raw, datasets.DatasetDict)
    stream, _ = load_raw_datasets("stdlib-code", streaming=True, embedded_options={"max_bytes": 50_000})
    assert isinstance(stream, datasets.IterableDatasetDict)
    assert [r["path"] for r in stream["validation"]] == list(raw["validation"]["path"])
    no_val, _ = load_raw_datasets(streaming=True, embedded_options={"max_bytes": 50_000, "validation_percent": 0})
    assert list(no_val["validation"]) == [] and len(list(no_val["train"])) > 0


def test_small_cap_still_has_validation():
    tiny = load_stdlib_corpus(max_bytes=1)
    assert tiny["train"].num_rows <= 1 and tiny["validation"].num_rows == 1


def test_load_raw_files(tmp_path):
    rows = [{"text": f"line {i}\nprint({i})\n", "other": i} for i in range(40)]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw, column = load_raw_datasets(
        train_file=str(jsonl), validation_split_percentage=10, cache_dir=str(tmp_path / "hf")
    )
    assert column == "text"
    assert raw["train"].num_rows == 36 and raw["validation"].num_rows == 4
    assert raw["validation"][0]["text"] == rows[0]["text"] and raw["train"][0]["text"] == rows[4]["text"]

    txt_train, txt_val = tmp_path / "a.txt", tmp_path / "b.txt"
    txt_train.write_text("alpha\nbeta\ngamma\n")
    txt_val.write_text("delta\n")
    raw, _ = load_raw_datasets(train_file=str(txt_train), validation_file=str(txt_val), cache_dir=str(tmp_path / "hf"))
    assert list(raw["train"]["text"]) == ["alpha\n", "beta\n", "gamma\n"]  # keep_linebreaks
    assert list(raw["validation"]["text"]) == ["delta\n"]

    with pytest.raises(ValueError, match="same format"):
        load_raw_datasets(train_file=str(jsonl), validation_file=str(txt_val))
    with pytest.raises(ValueError, match="unsupported extension"):
        load_raw_datasets(train_file=str(tmp_path / "x.parquet"))
    with pytest.raises(ValueError, match="not both"):
        load_raw_datasets(dataset_name="allenai/c4", train_file=str(jsonl))


def test_hub_table_names_the_right_text_columns():
    assert HUB_TEXT_DATASETS["codeparrot/codeparrot-clean"].text_column == "content"
    assert HUB_TEXT_DATASETS["allenai/c4"].config == "en"
    assert HUB_TEXT_DATASETS["HuggingFaceFW/fineweb"].config == "sample-10BT"


# --- Hub datasets, read from local copies in the Hub's layout (tests/hub_copies.py) -------------------


def test_hub_c4_uses_its_default_config_and_validation_split(hub, tmp_path):
    from hub_copies import c4_copy

    train, validation = [f"web page {i} " * 3 for i in range(7)], [f"held out {i}" for i in range(3)]
    hub.serve_dataset("allenai/c4", c4_copy(tmp_path / "c4", train, validation))
    raw, column = load_raw_datasets("allenai/c4", cache_dir=str(tmp_path / "cache"))  # config "en" from the table
    assert column == "text" and isinstance(raw, datasets.DatasetDict)
    assert list(raw["train"]["text"]) == train and list(raw["validation"]["text"]) == validation
    stream, _ = load_raw_datasets("allenai/c4", streaming=True, streaming_validation_docs=1)
    assert isinstance(stream, datasets.IterableDatasetDict)
    assert [r["text"] for r in stream["validation"]] == validation  # the Hub's split, not a held-out head
    assert [r["text"] for r in stream["train"]] == train
    other, _ = load_raw_datasets("allenai/c4", dataset_config_name="en.noblocklist", cache_dir=str(tmp_path / "cache"))
    assert list(other["validation"]["text"]) == [t.upper() for t in validation]
    with pytest.raises(ValueError, match="realnewslike"):  # a config the repository does not have
        load_raw_datasets("allenai/c4", dataset_config_name="realnewslike", cache_dir=str(tmp_path / "cache"))


def test_hub_codeparrot_reads_content_and_holds_out_validation(hub, tmp_path):
    from hub_copies import codeparrot_copy

    contents = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    hub.serve_dataset("codeparrot/codeparrot-clean", codeparrot_copy(tmp_path / "cp", contents))
    raw, column = load_raw_datasets(
        "codeparrot/codeparrot-clean", validation_split_percentage=10, cache_dir=str(tmp_path / "cache")
    )
    assert column == "content"  # the table's column, not "text"
    assert list(raw["validation"][column]) == contents[:4] and list(raw["train"][column]) == contents[4:]
    stream, column = load_raw_datasets("codeparrot/codeparrot-clean", streaming=True, streaming_validation_docs=5)
    assert column == "content"
    assert [r["content"] for r in stream["validation"]] == contents[:5]
    assert [r["content"] for r in stream["train"]] == contents[5:]
    assert set(next(iter(stream["train"]))) == {"repo_name", "path", "content", "license"}


def test_hub_fineweb_sample_config_streams(hub, tmp_path):
    from hub_copies import fineweb_copy

    texts = [f"a fine web document number {i}" for i in range(12)]
    hub.serve_dataset("HuggingFaceFW/fineweb", fineweb_copy(tmp_path / "fw", texts))
    stream, column = load_raw_datasets("HuggingFaceFW/fineweb", streaming=True, streaming_validation_docs=2)
    assert column == "text"
    assert [r["text"] for r in stream["validation"]] == texts[:2]
    assert [r["text"] for r in stream["train"]] == texts[2:]


def test_hub_dataset_unreachable_offline_names_the_hub(hub):
    with pytest.raises(ConnectionError, match="nobody/no-such-dataset"):
        load_raw_datasets("nobody/no-such-dataset", streaming=True)
