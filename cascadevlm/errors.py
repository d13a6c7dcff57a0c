"""How entry points report the project's own errors: one line, ``error: <message>``, exit status 2.

``--debug`` (or the environment variable ``CASCADEVLM_DEBUG=1``) shows the traceback instead.
Unexpected exceptions (bugs) always show their traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CASCADEVLM_DEBUG"
# The project's own errors: a message meant for the user, printed as one line (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def parser_kwargs() -> dict:
    """Parser options for the entry points: parse errors raise instead of printing usage (the entry
    points print them as one line). A fresh dict each call: LightningCLI fills in the ones it is given."""
    return {"exit_on_error": False}


def is_user_error(exc: BaseException) -> bool:
    """A command-line parse error, an exception class of this package, or a ValueError /
    FileNotFoundError / KeyError raised by this package's own code (anything else is a bug: traceback)."""
    if isinstance(exc, argparse.ArgumentError):
        return True
    if type(exc).__module__.startswith("cascadevlm."):
        return True
    if not isinstance(exc, USER_ERRORS):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    # by file, not module name: a module run with ``python -m`` is called __main__
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


# jsonargparse's refusal of a value for an ``X | None`` option: its internals (subtypes, each one's error)
_UNION_ERROR = re.compile(
    r'^Parser key "(?P<key>[^"]+)":\s*Does not validate against any of the Union subtypes\s*'
    r"Subtypes:\s*\[(?P<types>[^\]]*)\].*?Given value:\s*(?P<value>.*)$",
    re.S,
)
_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "NoneType": "null",
    "str": "a string",
    "bool": "true or false",
}
_NOT_FINITE = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", ".nan", ".inf", "-.inf")


def readable_parse_error(msg: str) -> str:
    """``msg``, with jsonargparse's union-type dump (``Does not validate against any of the Union subtypes
    ...``) replaced by the option, what it takes and the value given."""
    match = _UNION_ERROR.match(msg.strip())
    if match is None:
        return msg
    names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", match["types"])
    words = [_TYPE_WORDS.get(n, n) for n in names] or [match["types"].strip()]
    value = match["value"].strip()
    if value.lower() in _NOT_FINITE and "a number" in words:
        words = ["a finite number" if w == "a number" else w for w in words]
        return f"--{match['key']}: expected {' or '.join(words)}, got {value} (NaN and infinity are not accepted here)"
    return f"--{match['key']}: expected {' or '.join(words)}, got {value}"


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (KeyError's repr quotes removed; jsonargparse's union dumps
    made readable)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return readable_parse_error(re.sub(r"\s*\n\s*", " ", str(msg)).strip()) or type(exc).__name__


def project_error(exc: BaseException) -> BaseException:
    """The project's own error behind a library's wrapper, else ``exc``: jsonargparse re-raises what a
    class's ``__init__`` refused as "Does not validate against any of the Union subtypes" (a traceback
    and a dump of the namespace); the user needs the refusal itself."""
    cause = exc.__cause__
    while not is_user_error(exc) and cause is not None:
        if is_user_error(cause) and not isinstance(cause, argparse.ArgumentError):
            return cause
        cause = cause.__cause__
    return exc


def one_line_errors(entry: Callable) -> Callable:
    """Wrap an entry point: the project's own errors print as ``error: <message>`` on stderr and exit 2,
    without a traceback; ``--debug`` (removed from the arguments) or ``CASCADEVLM_DEBUG=1`` re-raises."""

    @functools.wraps(entry)
    def run(args: list[str] | None = None):
        argv = sys.argv[1:] if args is None else list(args)
        debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        if DEBUG_FLAG in argv:
            argv = [a for a in argv if a != DEBUG_FLAG]
            if args is None:
                sys.argv[1:] = argv
        try:
            return entry(None if args is None else argv)
        except Exception as exc:
            if debug or not is_user_error(project_error(exc)):
                raise
            print(f"error: {one_line(project_error(exc))}", file=sys.stderr)
            raise SystemExit(2) from None

    return run
