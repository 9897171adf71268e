"""The one exception type for bad user input: the CLI prints its message as a single line and exits 2."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Input the user can fix (a path that is not a model, an empty text file, too few measurements, ...).

    The message is a complete sentence that says what was wrong and what to pass instead.
    """
