"""Unit tests: the argument checks `pgvpn` and `lab` share (pgvpn.cliargs), in-process.

tests/test_cli_args.py runs the real commands; these call the checks directly, to
their limits and exact messages, so that they need no subprocess and no lab.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest

from pgvpn.cliargs import (
    OneLineParser,
    checked,
    conninfo,
    input_file,
    number,
    one_line,
    output_dir,
    output_file,
    path_check,
    whole,
)


def refusal(check: object, text: str) -> str:
    """The message an argparse type check raises for `text`."""
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        check(text)  # type: ignore[operator]
    return str(caught.value)


def test_errors_are_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        OneLineParser(prog="pgvpn run").error("bad value\n  from the server\n\n")
    assert caught.value.code == 2
    assert capsys.readouterr().err == ("pgvpn: error: bad value / from the server "
                                       "(see 'pgvpn run --help')\n")
    assert one_line(" a \n\n b ") == "a / b"


def test_checked_keeps_the_message_and_names_the_value() -> None:
    def port(text: str) -> int:
        if text == "quoted":
            raise ValueError("'quoted' is no port")
        if not text.isdigit():
            raise ValueError("not a port")
        return int(text)

    check = checked(port)
    assert (check("80"), check.__name__) == (80, "port")
    assert refusal(check, "x") == "'x': not a port"
    assert refusal(check, "quoted") == "'quoted' is no port"


def test_whole_numbers_to_both_limits() -> None:
    check = whole(1, 10)
    assert [check(t) for t in ("1", " 10 ", "+5", "007")] == [1, 10, 5, 7]
    assert refusal(check, "0") == "'0': must be 1-10"
    assert refusal(check, "11") == "'11': must be 1-10"
    assert refusal(check, "-1") == "'-1': must be 1-10"
    assert refusal(check, "2.5") == "'2.5' is not a whole number (use 1-10)"
    assert refusal(check, "9" * 31) == f"{'9' * 31!r} is not a whole number (use 1-10)"


def test_numbers_are_finite_and_within_limits() -> None:
    check = number(0.5, 2)
    assert [check(t) for t in ("0.5", "2", "1e0")] == [0.5, 2.0, 1.0]
    for text in ("0.4", "2.01", "nan", "inf", "-inf"):
        assert refusal(check, text) == f"{text!r}: must be a number 0.5-2"
    assert refusal(check, "fast") == "'fast' is not a number"


def test_connection_strings_are_parsed_but_never_repeated() -> None:
    assert conninfo("") == "" and conninfo("host=db port=5432") == "host=db port=5432"
    assert refusal(conninfo, "postgresql://u:secret@[::1") == (
        "not a valid libpq connection string or URL (from the option or $DATABASE_URL; not "
        "shown, as it may hold a password)")


def test_an_output_directory_is_checked_without_leaving_anything(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper"
    assert output_dir(str(target)) == target
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert refusal(output_dir, str(tmp_path / "file" / "sub")) == (
        f"{str(tmp_path / 'file' / 'sub')!r}: {tmp_path / 'file'} is not a directory")
    long = tmp_path / ("n" * 256) / "sub"
    # the kernel refuses to look a name that long up, before any check of ours
    assert refusal(output_dir, str(long)) == f"{str(long)!r}: File name too long"
    assert refusal(output_dir, "/proc/pgvpn-x").startswith(
        "'/proc/pgvpn-x': cannot create a directory in /proc: ")
    assert refusal(output_dir, "") == "an empty path"
    assert output_dir.__name__ == "output_dir"


def test_an_output_file_is_checked_without_leaving_anything(tmp_path: Path) -> None:
    assert output_file("-") == "-"
    new = str(tmp_path / "out.pcap")
    assert output_file(new) == new and list(tmp_path.iterdir()) == []
    (tmp_path / "old").write_text("x")
    assert output_file(str(tmp_path / "old")) == str(tmp_path / "old")
    assert (tmp_path / "old").read_text() == "x"
    assert refusal(output_file, str(tmp_path)) == f"{str(tmp_path)!r} is a directory"
    missing = tmp_path / "missing" / "out"
    assert refusal(output_file, str(missing)) == (
        f"{str(missing)!r}: no directory {tmp_path / 'missing'}")
    long = str(tmp_path / ("n" * 256))
    assert refusal(output_file, long) == f"{long!r}: File name too long"
    assert refusal(output_file, "/proc/x.pcap").startswith(
        "'/proc/x.pcap': cannot create a file in /proc: ")


def test_an_input_file_must_exist_and_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "in").write_text("x")
    assert input_file("-") == "-" and input_file(str(tmp_path / "in")) == str(tmp_path / "in")
    missing = str(tmp_path / "missing")
    assert refusal(input_file, missing) == f"{missing!r}: no such file"
    assert refusal(input_file, str(tmp_path)) == f"{str(tmp_path)!r} is a directory"
    long = str(tmp_path / ("n" * 300))
    assert refusal(input_file, long) == f"{long!r}: File name too long"


def test_path_checks_turn_os_errors_into_one_line() -> None:
    """The wrapper itself (applied at import, so its own test): an empty path is refused
    before the check runs, and an OSError becomes '<path>: <reason>'."""
    def looping(text: str) -> str:
        if text == "loop":
            raise OSError(errno.ELOOP, "Too many levels of symbolic links")
        return text.upper()

    check = path_check(looping)
    assert (check("a"), check.__name__) == ("A", "looping")
    assert refusal(check, "loop") == "'loop': Too many levels of symbolic links"
    assert refusal(check, "") == "an empty path"
