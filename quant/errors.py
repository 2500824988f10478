"""One place for how the suite reports a user's mistake.

Every CLI wraps its body in :func:`cli_entry`; anything raised as :class:`UserError` becomes a single
``error: ...`` line on stderr and exit status 2 (the convention of argparse, so a bad flag and a bad file look
the same to a calling script); Ctrl-C exits 130 and SIGTERM 143, each with one line. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import functools
import signal
import sys
import threading
from typing import Callable

from quant import quiet

EXIT_USAGE = 2
EXIT_NO_PASS = 3  # quant.search finished, and no recipe passes the gate (a script can tell it from success)


class UserError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


class EnvironmentProblem(UserError):
    """The machine or the cache, not the recipe: a full or read-only disk, a damaged cache entry.

    Still one line and exit status 2, but a search stops on it instead of pruning the trial as if the recipe
    were at fault (which would also never retry it)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds like Ctrl-C (files saved, locks released)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a ``main(argv=None)``: UserError → one line + exit 2; Ctrl-C → exit 130; SIGTERM → exit 143.

    Both signals unwind through the command (a search saves its report on the way out) and end with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return fn(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except Terminated:
            print("terminated (SIGTERM)", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130
        except OSError as exc:
            # A path the user gave that no file system takes (4 KiB long, a symlink loop) fails in whatever
            # pathlib call meets it first: still the user's input, one line.
            if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
                raise
            name = str(exc.filename or "")
            print(f"error: {name[:60]}{'…' if len(name) > 60 else ''}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def one_line_errors(message: Callable[[type, list[dict]], str]):
    """A pydantic wrap validator for a declared model: its ValidationError becomes one UserError line,
    ``message(cls, errors)`` (pydantic's error dicts, in field order). Used as ``_one_line = one_line_errors(f)``."""
    from pydantic import ValidationError, model_validator

    def one_line(cls, data, handler):
        try:
            return handler(data)
        except ValidationError as exc:
            raise UserError(message(cls, exc.errors(include_url=False))) from None

    return model_validator(mode="wrap")(classmethod(one_line))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one ``error: ...`` line and exit 2, like every other bad input.
    ``--help`` shows every option on a line of its own with its default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true",
                          help="also show what the libraries print and warn (ModelOpt, transformers, ...)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        quiet.configure(parsed.verbose)  # before any library is imported: they read some settings then
        return parsed, rest

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and not any(default is v for v in (None, False, argparse.SUPPRESS))
                and "default" not in text and action.nargs != 0):
            text = f"{text} (default: %(default)s)".strip()
        return text


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse itself turns the ValueError into exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (an index)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32 - 1] (what numpy's and torch's generators take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {value}")
    return value
