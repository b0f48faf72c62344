"""Errors for search-space files: each broken rule is a :class:`Problem`, all in one :class:`SpaceError`.

A space file is checked as a whole, so a user sees every mistake at once instead of fixing them one run at a
time. Each problem names the file, the dotted field path (``space.lr``, ``budget.epochs``), the offending
value and the rule it breaks, usually with the fix.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _Missing:
    """The value of a required field that the file leaves out."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""Stands in for :attr:`Problem.value` when the field is absent."""


@dataclass(frozen=True)
class Problem:
    """One broken rule in a space file.

    Attributes:
        file: The file (or ``<json>`` / ``<dict>`` for in-memory data) the problem is in.
        field: Dotted path of the field, e.g. ``space.lr`` or ``budget.epochs``; ``line N`` for YAML syntax
            errors and ``(top level)`` for the document itself.
        value: The offending value (:data:`MISSING` for an absent required field).
        rule: The rule the value breaks, usually followed by how to fix it.
    """

    file: str
    field: str
    value: Any
    rule: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field} = {self.value!r}: {self.rule}"


class Problems:
    """Collects the problems of one file, in the order found.

    With ``once_per_value`` a field and value get one problem: validation meets one fault in every combination
    that holds the value.
    """

    def __init__(self, file: str, *, once_per_value: bool = False) -> None:
        self.file = file
        self.items: list[Problem] = []
        self._once_per_value = once_per_value
        self._seen: set[tuple[str, str]] = set()

    def add(self, field: str, value: Any, rule: str) -> None:
        key = (field, repr(value))
        if self._once_per_value and key in self._seen:
            return
        self._seen.add(key)
        self.items.append(Problem(self.file, field, value, rule))


class UserError(Exception):
    """Wrong input from the user (a file, a flag, a name), never a bug: its message names the problem and the fix.

    Every command-line error derives from it; ``dettune`` prints the message without a traceback, exit status 2.
    """


class SpaceError(UserError):
    """A space file (or its JSON form) breaks one or more rules.

    Attributes:
        problems: Every problem found, in file order as far as possible.
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


USAGE_ERROR = 2
"""The exit status of a command that ends with a :class:`UserError`."""


class NotFound(UserError, LookupError):
    """Something the user named (a search, trial, run, store or file) is not where they said."""


class BadArgument(UserError, ValueError):
    """A command-line value breaks its rule (a range, a character it may not hold)."""


class DamagedFile(UserError):
    """A file dettune wrote for later (a search's saved settings) no longer reads back: edited, cut short."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """``"FileNotFoundError: <first line of its message>"``, at most ``limit`` characters: a reason for a table."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


DETTUNE_PACKAGES = ("spaces", "tracking_names", "cocodata", "mmconfigs", "trainers", "results", "search")
"""Our top-level packages: an error raised in their code is a bug (tests/test_layout.py keeps the list whole)."""
_PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in DETTUNE_PACKAGES)


def root_cause(error: BaseException) -> BaseException:
    """The innermost chained exception, e.g. the missing module behind mmengine's ``Failed to import``."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def raised_by_dettune(error: BaseException) -> bool:
    """Whether ``error``'s :func:`root_cause` was raised in dettune's own code: a bug, not something a library
    raised while running the user's config or data (mmengine re-raises a class's error as its own)."""
    frames = traceback.extract_tb(root_cause(error).__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE_DIRS)
