"""One validation path for every option set: ``NerveConfig``, ``ProbeConfig`` and run_clm's ``--nerve_*`` flags.

An option set is a dataclass whose fields are made with :func:`option`: a default, a one-line help text
(what ``HfArgumentParser`` and the docs show) and a check. :class:`Validated` runs a field's check every
time the field is assigned, at construction and afterwards, so a wrong type or range is refused where it
is given, with an error that names the option:

>>> from dataclasses import dataclass
>>> @dataclass
... class Example(Validated):
...     every_n_steps: int = option(100, "measure every N-th step", positive_int)
>>> Example(every_n_steps="5")
Traceback (most recent call last):
...
nerve_hf.options.OptionTypeError: every_n_steps must be a positive integer, got '5' (str)
>>> Example(every_n_steps=0)
Traceback (most recent call last):
...
nerve_hf.options.OptionValueError: every_n_steps must be a positive integer, got 0
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Optional, Sequence

from nerve_hf.errors import InputError

__all__ = [
    "OptionError",
    "OptionTypeError",
    "OptionValueError",
    "Validated",
    "option",
    "boolean",
    "positive_int",
    "token_cap",
    "at_least",
    "optional",
    "positive_number",
    "one_of",
    "int_list",
    "is_integer",
    "text",
    "device",
    "mapping",
    "OptionConflictError",
    "OptionFixedError",
    "FixedList",
    "FixedDict",
    "command_line_fields",
    "from_command_line",
]

Check = Callable[[str, Any], Any]  # (option name, value) -> value (possibly normalised); raises OptionError


class OptionError(InputError):
    """An option of the wrong type or out of range. ``option`` is the name it was checked under."""

    def __init__(self, option: str, requirement: str, value: Any, *, show_type: bool = False) -> None:
        self.option, self.requirement, self.value, self.show_type = option, requirement, value, show_type
        shown = f"{value!r} ({type(value).__name__})" if show_type else repr(value)
        super().__init__(f"{option} must be {requirement}, got {shown}")

    def renamed(self, option: str) -> "OptionError":
        """The same error under another name (a command-line flag instead of a field name)."""
        return type(self)(option, self.requirement, self.value, show_type=self.show_type)


class OptionValueError(OptionError):
    """The option has the right type but a value out of range (a ``ValueError``)."""


class OptionConflictError(InputError):
    """Options that are each valid but cannot go together; the message names both (``options``: their names)."""

    def __init__(self, message: str, options: Sequence[str] = ()) -> None:
        self.message, self.options = message, tuple(options)
        super().__init__(message)

    def renamed(self, rename: Callable[[str], str]) -> "OptionConflictError":
        """The same error with each option's name as ``rename`` gives it (a command-line flag)."""
        message = self.message
        for name in self.options:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}\b", rename(name), message)
        return type(self)(message, self.options)


class OptionTypeError(OptionError, TypeError):
    """The option has the wrong type (both a ``ValueError`` and a ``TypeError``)."""

    def __init__(self, option: str, requirement: str, value: Any, *, show_type: bool = True) -> None:
        super().__init__(option, requirement, value, show_type=show_type)


def option(default: Any, help: str, check: Check, **metadata: Any) -> Any:
    """A dataclass field with its help text and check (``default_factory`` for list defaults)."""
    metadata = {"help": help, "check": check, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Validated:
    """Mixin for option dataclasses: every assignment to a field made by :func:`option` is checked.

    A subclass may set ``option_name`` to a function that turns a field name into the name its errors
    show (a command-line flag, for a config that a CLI fills in).
    """

    option_name: Optional[Callable[[str], str]] = None

    def __setattr__(self, name: str, value: Any) -> None:
        check = _checks(type(self)).get(name)
        fixed = self.__dict__.get("_fixed_by")
        if check is not None and fixed is not None:
            raise OptionFixedError(f"{name} cannot change: {fixed}")
        if check is not None:
            try:
                value = check(name, value)
            except OptionError as error:
                rename = type(self).option_name
                raise (error.renamed(rename(name)) if rename else error) from None
        object.__setattr__(self, name, value)

    def fix(self, reason: str) -> None:
        """Refuse every later change of an option, with ``reason`` (why the options are fixed now) in the
        error: for a config that an object in use was built from. Assignments raise
        :class:`OptionFixedError`; list- and dict-valued options become :class:`FixedList` /
        :class:`FixedDict`, equal to the list or dict they were, whose in-place edits raise it too.

        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Example(Validated):
        ...     layers: list = option([0, 1], "blocks", int_list)
        >>> example = Example()
        >>> example.fix("it is in use")
        >>> example.layers == [0, 1]
        True
        >>> example.layers.append(2)
        Traceback (most recent call last):
        ...
        nerve_hf.options.OptionFixedError: layers cannot change: it is in use
        """
        object.__setattr__(self, "_fixed_by", reason)
        for name in _checks(type(self)):
            value = getattr(self, name)
            if isinstance(value, list) and not isinstance(value, FixedList):
                object.__setattr__(self, name, FixedList(value, name=name, reason=reason))
            elif isinstance(value, dict) and not isinstance(value, FixedDict):
                object.__setattr__(self, name, FixedDict(value, name=name, reason=reason))


class OptionFixedError(InputError, AttributeError):
    """An option changed after the object built from it started (see :meth:`Validated.fix`)."""


def _refuse(method: str):
    def refused(self, *args, **kwargs):
        if self._option is None:  # a copy made by calling the class (dataclasses.asdict/replace): editable
            return getattr(super(type(self), self), method)(*args, **kwargs)
        raise OptionFixedError(f"{self._option} cannot change: {self._reason}")

    refused.__name__ = method
    return refused


class FixedList(list):
    """The list value of a fixed option: reads as the list it was (an equal ``list``); every in-place edit
    (``append``, ``x[0] = ...``, ``+=``, ``sort``, ...) raises :class:`OptionFixedError` naming the option.
    Copies (``list(x)``, ``copy.deepcopy``, pickling) are plain lists; one made by calling the class without
    ``name`` (as ``dataclasses.asdict`` and ``dataclasses.replace`` do) is editable like a list."""

    def __init__(self, items=(), *, name: Optional[str] = None, reason: str = "it is fixed") -> None:
        super().__init__(items)
        self._option, self._reason = name, reason

    for _method in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse"):
        locals()[_method] = _refuse(_method)
    del _method
    __setitem__ = _refuse("__setitem__")
    __delitem__ = _refuse("__delitem__")
    __iadd__ = _refuse("__iadd__")
    __imul__ = _refuse("__imul__")

    def __reduce_ex__(self, protocol):
        return list, (list(self),)


class FixedDict(dict):
    """The dict value of a fixed option, as :class:`FixedList` for lists."""

    def __init__(self, items=(), *, name: Optional[str] = None, reason: str = "it is fixed") -> None:
        super().__init__(items)
        self._option, self._reason = name, reason

    for _method in ("pop", "popitem", "clear", "update", "setdefault"):
        locals()[_method] = _refuse(_method)
    del _method
    __setitem__ = _refuse("__setitem__")
    __delitem__ = _refuse("__delitem__")
    __ior__ = _refuse("__ior__")

    def __reduce_ex__(self, protocol):
        return dict, (dict(self),)


def _checks(cls) -> dict[str, Check]:
    cached = cls.__dict__.get("_option_checks")
    if cached is None:
        cached = {f.name: f.metadata["check"] for f in fields(cls) if "check" in f.metadata}
        type.__setattr__(cls, "_option_checks", cached)
    return cached


# ----------------------------------------------------------------------------- checks
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _is_numpy_bool(value)


def _is_numpy_bool(value: Any) -> bool:
    numpy = sys.modules.get("numpy")  # never imported here: a NumPy scalar exists only if NumPy is loaded
    return numpy is not None and isinstance(value, numpy.bool_)


def _is_numpy_vector(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray) and value.ndim == 1


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool (Python's or NumPy's)."""
    return _is_int(value)


def boolean(name: str, value: Any) -> bool:
    """True or False, also as a NumPy boolean (not 0/1, not a string)."""
    if _is_numpy_bool(value):
        return bool(value)
    if not isinstance(value, bool):
        raise OptionTypeError(name, "True or False", value)
    return value


def at_least(minimum: int, requirement: Optional[str] = None) -> Check:
    """An integer (not a bool, not a float) of at least ``minimum``."""
    requirement = requirement or f"an integer of at least {minimum}"

    def check(name: str, value: Any) -> int:
        if not _is_int(value):
            raise OptionTypeError(name, requirement, value)
        if value < minimum:
            raise OptionValueError(name, requirement, value)
        return int(value)

    return check


positive_int = at_least(1, "a positive integer")
token_cap = at_least(2, "an integer of at least 2 (a covariance needs two tokens)")  # every max_tokens


def positive_number(name: str, value: Any) -> float:
    """A finite real number > 0 (int or float, not a bool)."""
    requirement = "a positive number"
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or _is_numpy_bool(value):
        raise OptionTypeError(name, requirement, value)
    if not (math.isfinite(value) and value > 0):
        raise OptionValueError(name, requirement, value)
    return value if isinstance(value, int) else float(value)


def optional(check: Check) -> Check:
    """``None`` or what ``check`` accepts."""

    def checked(name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(name, value)
        except OptionError as error:
            raise type(error)(name, f"None or {error.requirement}", value) from None

    return checked


def one_of(choices: Sequence[str]) -> Check:
    """One of the strings ``choices``."""
    requirement = "one of " + ", ".join(repr(c) for c in choices)

    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionTypeError(name, requirement, value)
        if value not in choices:
            raise OptionValueError(name, requirement, value)
        return value

    return check


def int_list(name: str, value: Any) -> list[int]:
    """A non-empty list (or tuple) of integers, returned as a new list."""
    requirement = "a non-empty list of integers such as [0, -1]"
    if _is_numpy_vector(value):
        value = list(value)  # a 1-D NumPy array: its items are NumPy scalars, checked below
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise OptionTypeError(name, requirement, value)
    if not value:
        raise OptionValueError(name, requirement, value)
    if not all(_is_int(item) for item in value):
        raise OptionTypeError(name, requirement, value)
    return [int(item) for item in value]


def text(name: str, value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise OptionTypeError(name, "a string", value)
    return value


def device(name: str, value: Any) -> Any:
    """A device that exists on this machine: a string torch parses (``"cpu"``, ``"cuda:1"``) or a
    ``torch.device``; its accelerator must be available and its index below the device count."""
    import torch

    requirement = "a device such as 'cpu' or 'cuda:0'"
    if not isinstance(value, (str, torch.device)):
        raise OptionTypeError(name, requirement, value)
    try:
        parsed = torch.device(value)
    except (RuntimeError, ValueError):
        raise OptionValueError(name, requirement, value) from None
    if parsed.type == "cpu":
        return value
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if parsed.type == "meta" or available is None or not available():
        raise OptionValueError(name, f"{requirement} that exists here (no {parsed.type} device is available)", value)
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise OptionValueError(
            name, f"{requirement} that exists here ({count} {parsed.type} device(s): index 0..{count - 1})", value
        )
    return value


def mapping(name: str, value: Any) -> dict:
    """A dict with string keys."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise OptionTypeError(name, "a dict with string keys", value)
    return dict(value)  # the option's own copy: never a fixed option's FixedDict, never the caller's dict


# ----------------------------------------------------------------------------- command lines
def command_line_fields(cls, prefix: str) -> list[tuple[str, Any, Any]]:
    """``make_dataclass`` fields for ``HfArgumentParser``: each field of option set ``cls`` as
    ``<prefix><name>``, with its type, default and help (and ``choices``), without the check and without
    the ``group`` and ``metavar`` that ``nerve probe``'s own parser reads."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        metadata = {k: v for k, v in f.metadata.items() if k not in ("check", "group", "metavar")}
        metadata["help"] = metadata["help"].replace("%", "%%")  # argparse %-formats help ("k % n" would crash --help)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f"{prefix}{f.name}", hints[f.name], field(default=default, metadata=metadata)))
    return out


def from_command_line(cls, values: dict[str, Any], prefix: str):
    """``cls(**values)`` for values named ``<prefix><field>``; an :class:`OptionError` names the flag."""
    try:
        return cls(**{name[len(prefix) :]: value for name, value in values.items()})
    except OptionError as error:
        raise error.renamed(f"--{prefix}{error.option}") from None
    except OptionConflictError as error:
        raise error.renamed(lambda name: f"--{prefix}{name}") from None
