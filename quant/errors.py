"""One place for how the suite reports a user's mistake.

Every CLI wraps its body in :func:`cli_entry`; anything raised as :class:`UserError` becomes a single
``error: ...`` line on stderr and exit status 2 (the convention of argparse, so a bad flag and a bad file look
the same to a calling script). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


class EnvironmentProblem(UserError):
    """The machine or the cache, not the recipe: a full or read-only disk, a damaged cache entry.

    Still one line and exit status 2, but a search stops on it instead of pruning the trial as if the recipe
    were at fault (which would also never retry it)."""


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a ``main(argv=None)``: UserError → one line + exit 2; Ctrl-C → exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one ``error: ...`` line and exit 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse itself turns the ValueError into exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
