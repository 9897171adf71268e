"""The exception types for bad user input and a missing optional dependency, and the two ways a message
becomes one line.

The CLI prints an :class:`InputError` or a :class:`MissingExtraError` as a single line (:func:`one_line`) and
exits 2; an error raised by another library becomes part of such a message through its first line
(:func:`first_line`). :func:`requires` wraps the imports of optional packages (the extras of setup.cfg).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["InputError", "MissingExtraError", "EXTRAS", "requires", "first_line", "one_line"]

# What each extra of setup.cfg is for; the core install (torch, numpy, scipy, transformers, accelerate) measures
# with FFNTracker and NerveCallback and writes the JSONL records without any of them.
EXTRAS = {
    "analysis": "nerve report, DataFrames and plots",
    "probe": "nerve probe and its inputs",
    "zoo": "the model zoo, scripts/ and benchmarks/",
}
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow"}  # import name -> what pip installs


class InputError(ValueError):
    """Input the user can fix (a path that is not a model, an empty text file, too few measurements, ...).

    The message is a complete sentence that says what was wrong and what to pass instead.
    """


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message; its type name when the message is empty.

    >>> first_line(OSError("no such file\\n  (while reading config.json)")), first_line(KeyError())
    ('no such file', 'KeyError')
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException | str) -> str:
    """The whole message of ``error`` on one line, runs of white space (newlines too) as one space.

    >>> one_line(InputError("dataset 'x' has no split 'test';\\n  splits: train"))
    "dataset 'x' has no split 'test'; splits: train"
    """
    return " ".join(str(error).split())


class MissingExtraError(ImportError):
    """An optional package is not installed; the message is one line naming the extra that installs it."""


@contextmanager
def requires(extra: str) -> Iterator[None]:
    """Turn a missing optional package imported inside the block into one line naming ``extra``.

    >>> with requires("analysis"):
    ...     import no_such_package_here
    Traceback (most recent call last):
    nerve_hf.errors.MissingExtraError: no_such_package_here is not installed; ... pip install 'nerve_hf[analysis]'

    Only a package that is absent is translated (a :class:`ModuleNotFoundError` whose module is not part of
    nerve_hf); any other import failure propagates as it is.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if not package or package in ("nerve_hf", "model_adapters"):
            raise
        distribution = _DISTRIBUTIONS.get(package, package)
        raise MissingExtraError(
            f"{distribution} is not installed; {EXTRAS[extra]} need it: pip install 'nerve_hf[{extra}]'"
        ) from None
