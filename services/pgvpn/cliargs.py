"""Command-line values checked while parsing, before anything is done: one line, exit 2.

Shared by `pgvpn` and `lab`, so that both report a bad value the same way,
`<prog>: error: argument --x: <what is wrong> (see '<prog> <command> --help')`,
with no usage block and no traceback, and so that nothing (a connection, a lab, a
file) is made for a command that was going to fail on its arguments anyway.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

T = TypeVar("T")
_WHOLE = re.compile(r"[+-]?[0-9]{1,30}")
NAME_MAX = 255  # bytes in one file name on Linux


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit 2 (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        root = self.prog.split()[0]
        self.exit(2, f"{root}: error: {one_line(message)} (see '{self.prog} --help')\n")


def one_line(text: object) -> str:
    """A message on one line: a multi-line one (a server's, a tool's) joined with ' / '."""
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse type whose ValueError message is kept, not replaced by
    argparse's 'invalid <function> value'."""
    def wrapper(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            message = str(exc)
            raise argparse.ArgumentTypeError(
                message if repr(text) in message else f"{text!r}: {message}") from None

    wrapper.__name__ = parse.__name__
    return wrapper


def whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number from `low` to `high`: say the bound in the option's help too."""
    def parse(text: str) -> int:
        if not _WHOLE.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number "
                                              f"(use {low}-{high})")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {low}-{high}")
        return value

    return parse


def number(low: float, high: float) -> Callable[[str], float]:
    """A finite number from `low` to `high` (nan and inf are refused, not passed on)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a number {low:g}-{high:g}")
        return value

    return parse


def conninfo(text: str) -> str:
    """A libpq connection string or URL that parses; empty means the PG* variables.

    The value is never repeated in the message: it may hold a password.
    """
    try:
        conninfo_to_dict(text)
    except psycopg.Error:
        raise argparse.ArgumentTypeError(
            "not a valid libpq connection string or URL (from the option or $DATABASE_URL; "
            "not shown, as it may hold a password)") from None
    return text


def path_check(check: Callable[[str], T]) -> Callable[[str], T]:
    """A path check whose every OS error (a name too long, a loop) is one line too."""
    def wrapper(text: str) -> T:
        if not text:
            raise argparse.ArgumentTypeError("an empty path")
        try:
            return check(text)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc.strerror}") from None

    wrapper.__name__ = check.__name__
    return wrapper


@path_check
def output_dir(text: str) -> Path:
    """A directory that exists or can be made, checked without leaving anything behind."""
    path = Path(text)
    ancestor = path.absolute()
    while not ancestor.exists():
        if len(os.fsencode(ancestor.name)) > NAME_MAX:
            raise argparse.ArgumentTypeError(f"{text!r}: a name longer than {NAME_MAX} bytes")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {ancestor} is not a directory")
    try:  # root may write almost anywhere by the mode bits, yet /proc still refuses
        os.rmdir(tempfile.mkdtemp(prefix=".pgvpn-check-", dir=ancestor))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot create a directory in "
                                          f"{ancestor}: {exc.strerror}") from None
    return path


@path_check
def output_file(text: str) -> str:
    """'-' (stdout) or a file that can be written, in a directory that exists."""
    if text == "-":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r}: not writable")
        return text
    parent = path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no directory {parent}")
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: a name longer than {NAME_MAX} bytes")
    try:
        handle, probe = tempfile.mkstemp(prefix=".pgvpn-check-", dir=parent)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot create a file in {parent}: "
                                          f"{exc.strerror}") from None
    os.close(handle)
    os.unlink(probe)
    return text


@path_check
def input_file(text: str) -> str:
    """'-' (stdin) or an existing file that can be read."""
    if text == "-":
        return text
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: not readable")
    return text
