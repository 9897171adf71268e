"""The one exception type for bad user input, and the two ways a message becomes one line.

The CLI prints an :class:`InputError` as a single line (:func:`one_line`) and exits 2; an error raised by
another library becomes part of such a message through its first line (:func:`first_line`).
"""

from __future__ import annotations

__all__ = ["InputError", "first_line", "one_line"]


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
