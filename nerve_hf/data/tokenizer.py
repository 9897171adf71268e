"""A byte-level BPE tokenizer trained locally on the embedded corpus, cached on disk.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on the corpus's train
split the first time it is asked for, saved with ``save_pretrained``, and loaded from disk afterwards.
It follows GPT-2's conventions (byte-level pre-tokenizer, ``<|endoftext|>`` as bos/eos/unk) and adds a
separate ``<|pad|>`` token, so padding never masks a real end-of-text label.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from nerve_hf.data.corpus import DEFAULT_CORPUS, embedded_corpus

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 8192  # small vocabulary: a cheap LM head on CPU, still ~3.5 bytes per token on code
EOS_TOKEN = "<|endoftext|>"  # GPT-2's document separator, also bos and unk
PAD_TOKEN = "<|pad|>"  # distinct from eos so label masking of pads never hides a real eos
MODEL_MAX_LENGTH = 1024  # GPT-2's context length; scripts choose their own block size below it
_FORMAT_VERSION = 1  # bump when the training recipe below changes, so old caches are not reused


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``nerve_hf`` caches artefacts: ``cache_dir``, else ``$NERVE_HF_CACHE``, else ``~/.cache/nerve_hf``.
    A path that exists but is not a folder is refused (an ``InputError`` naming where it came from)."""
    if cache_dir is not None:
        return _folder(Path(cache_dir), "the cache folder")
    env = os.environ.get("NERVE_HF_CACHE")
    if env:
        return _folder(Path(env), "NERVE_HF_CACHE")
    return _folder(Path.home() / ".cache" / "nerve_hf", "the cache folder")


def _folder(path: Path, source: str) -> Path:
    from nerve_hf.errors import InputError

    existing = next((p for p in (path, *path.parents) if p.exists()), None)  # the folder itself or the nearest above
    if existing is not None and not existing.is_dir():
        inside = "" if existing == path else f" (inside {str(existing)!r}, a file)"
        raise InputError(f"{source} {str(path)!r} is not a folder{inside}; point it at a folder")
    return path


def tokenizer_cache_key(vocab_size: int, corpus: str, corpus_fingerprint: str) -> str:
    """Directory name of a cached tokenizer: everything that changes the trained merges is in it."""
    py = "py{}.{}.{}".format(*sys.version_info[:3])
    return f"{corpus}-bpe{vocab_size}-{corpus_fingerprint}-{py}-v{_FORMAT_VERSION}"


def train_bpe_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE ``transformers.PreTrainedTokenizerFast`` on an iterable of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # code: decode must give back the exact bytes
    )


def get_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike | None = None,
    corpus: str = DEFAULT_CORPUS,
    **corpus_options,
):
    """The byte-level BPE tokenizer of an embedded corpus, trained once and then loaded from disk.

    ``corpus_options`` go to the corpus loader (e.g. ``max_bytes=1_000_000``) and are part of the cache
    key, together with ``vocab_size`` and the Python version (which decides the stdlib's content).
    Concurrent callers (pytest-xdist workers) each train into a private temporary directory and the
    first to finish publishes it with an atomic rename.
    """
    from transformers import PreTrainedTokenizerFast

    entry = embedded_corpus(corpus)
    fingerprint = entry.config_cls(**corpus_options).fingerprint()
    root = cache_root(cache_dir) / "tokenizers"
    target = root / tokenizer_cache_key(vocab_size, corpus, fingerprint)

    if (target / "tokenizer.json").is_file():
        logger.info("loading cached tokenizer from %s", target)
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    logger.info(
        "training a %d-token byte-level BPE tokenizer on %s (first use; cached at %s)", vocab_size, corpus, target
    )
    train = entry.load(**corpus_options)["train"]
    tokenizer = train_bpe_tokenizer(train["text"], vocab_size=vocab_size)

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        tokenizer.save_pretrained(str(staging))
        try:
            os.rename(staging, target)  # atomic; fails if another process published first
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))
