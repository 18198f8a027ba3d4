"""Every `lab` and `pgvpn` argument is checked before anything is done.

A bad value ends the command with exactly one line on stderr, naming what was
wrong, exit code 2, no traceback, and nothing left behind: no namespace, no state
directory, no file, no connection attempt. No lab is needed or started: the
commands run under a lab name nobody uses, with no reachable database, Docker
engine or `ip` (so that even a command that wrongly passed its checks could not
build anything, and its error would not name the bad argument), and every
generated command line holds at least one invalid argument.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgvpn.config import RESERVED_PEER_NAMES
from pgvpn.transports import PROFILES
from tests.conftest import ROOT

FUZZ_LAB = "pgvpn-fuzz"
ENV = {"PGVPN_LAB_NAME": FUZZ_LAB, "PATH": "/nonexistent-pgvpn-fuzz",
       "DOCKER_HOST": "unix:///nonexistent-pgvpn-fuzz.sock",
       "DATABASE_URL": "host=/nonexistent-pgvpn-fuzz connect_timeout=1",
       "PYTHONPATH": f"{ROOT}:{ROOT / 'services'}"}
TIMEOUT = 30  # seconds: a check that waits for anything has gone wrong


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory with the files and the folder the paths below refer to."""
    assert not Path(f"/var/tmp/{FUZZ_LAB}-lab").exists(), "the fuzz lab name is in use"
    path = tmp_path_factory.mktemp("cli")
    (path / "file").write_text("x")
    (path / "agent.yaml").write_text("{}\n")  # a valid, empty settings file
    (path / "dir").mkdir()
    yield path


def run_cli(program: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    module = {"lab": "lab.cli", "pgvpn": "pgvpn.cli"}[program]
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, cwd=cwd, env={**ENV, **(env or {})}, timeout=TIMEOUT,
                          check=False)


def left_behind(cwd: Path) -> list[str]:
    """What a refused command must not have made: the fuzz lab's state, namespaces, files."""
    found = sorted(p.name for p in cwd.iterdir() if p.name not in {"file", "agent.yaml", "dir"})
    found += [str(p) for p in (cwd / "dir").iterdir()]
    if (cwd / "file").read_text() != "x":
        found.append("file was written")
    if Path(f"/var/tmp/{FUZZ_LAB}-lab").exists():
        found.append(f"/var/tmp/{FUZZ_LAB}-lab")
    listing = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
    found += [n["name"] for n in json.loads(listing or "[]")
              if n["name"].startswith(FUZZ_LAB + "-")]
    found += [name for name in ("pgvpn0", "pgvpn-replay") if Path(f"/sys/class/net/{name}")
              .exists()]
    return found


def assert_refused(done: subprocess.CompletedProcess[str], program: str, culprit: str,
                   cwd: Path) -> None:
    """Exit 2, one line on stderr that names the culprit, nothing else done or made."""
    what = f"{program} -> {done.stderr!r}"
    assert done.returncode == 2, what
    assert "Traceback" not in done.stderr, what
    assert done.stderr.startswith(f"{program}: error: ") and done.stderr.count("\n") == 1, what
    assert culprit.lower() in done.stderr.lower(), f"{what} does not name {culprit!r}"
    assert done.stdout == "", what
    assert left_behind(cwd) == []


# --------------------------------------------------------------- known cases
KNOWN = [
    ("lab", ["bench", "--json", "/missing/dir/x.json"], "no directory /missing/dir"),
    ("lab", ["bench", "--out", "/proc/x"], "cannot create a directory in /proc"),
    ("lab", ["bench", "--out", "{cwd}/file/x"], "is not a directory"),
    ("lab", ["bench", "--json", "{cwd}/dir"], "is a directory"),
    ("lab", ["bench", "--duration", "0"], "--duration: '0': must be 1-3600"),
    ("lab", ["bench", "--duration", "-5"], "--duration: '-5': must be 1-3600"),
    ("lab", ["bench", "--duration", "3601"], "must be 1-3600"),
    ("lab", ["bench", "--duration", "nan"], "'nan' is not a whole number"),
    ("lab", ["bench", "--duration", "2.5"], "'2.5' is not a whole number"),
    ("lab", ["bench", "--profile", ","], "unknown profile"),
    ("lab", ["up", "--mtu", "0"], "--mtu: '0': must be 576-65535"),
    ("lab", ["up", "--backend", "vmware"], "invalid choice: 'vmware'"),
    ("lab", ["logs", "nohost"], "no host 'nohost'"),
    ("lab", ["logs", "--tail", "0"], "--tail: '0': must be 1-100000"),
    ("lab", ["exec", "nohost", "--", "true"], "no host 'nohost'"),
    ("lab", ["exec", "peer-a"], "give a command after --"),
    ("lab", ["restart", "db"], "no host 'db'"),
    ("lab", ["packets", "--since", "5m", "--until", "10m"], "the window is empty"),
    ("lab", ["packets", "--data"], "--data needs --json"),
    ("lab", ["stats", "--top", "0"], "--top: '0': must be 1-1000000"),
    ("lab", ["export", "--pcap", "/proc/x.pcap"], "cannot create a file in /proc"),
    ("lab", ["replay", "--since", "1m", "--into", "postgres"], "--into: 'postgres'"),
    ("lab", ["replay", "--since", "1m", "--speed", "nan"], "--speed: 'nan'"),
    ("lab", ["replay", "--since", "1m", "--max", "0"], "--max: '0'"),
    ("lab", ["status", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ("pgvpn", ["run", "--max-replay-age", "nan"], "max_replay_age = 'nan'"),
    ("pgvpn", ["run", "--max-replay-age", "1e308"], "max_replay_age = '1e308'"),
    ("pgvpn", ["run", "--batch-packets", "0"], "batch_packets = '0'"),
    ("pgvpn", ["run", "--tun-name", "a:b"], "tun_name = 'a:b'"),
    ("pgvpn", ["run", "--metrics-listen", "localhost:9108"], "metrics_listen = 'localhost:9108'"),
    ("pgvpn", ["run", "--config", "{cwd}/dir"], "is a directory"),
    ("pgvpn", ["probe", "--timeout", "inf", "10.230.0.2"], "--timeout: 'inf'"),
    ("pgvpn", ["probe", "10.230.0.999"], "argument address"),
    ("pgvpn", ["ceiling", "pgvpn.packets"], "the ceiling never writes schema pgvpn"),
    ("pgvpn", ["ceiling", "bench"], "give the table as schema.table"),
    ("pgvpn", ["ceiling", "pgvpn_bench.ingest\n"], "give the table as schema.table"),
    ("pgvpn", ["ceiling", "b.i", "--batch", "65536", "--size", "65535"],
     "more than 64 MiB a batch"),
    ("pgvpn", ["db", "add-peer", "reader", "--password-file", "{cwd}/file"], "is reserved"),
    ("pgvpn", ["db", "add-peer", "peer-a\n", "--password-file", "{cwd}/file"], "argument name"),
    ("pgvpn", ["log", "--peer", "peer-a\n"], "bad peer name"),
    ("pgvpn", ["run", "--name", "peer-a\n"], "name = 'peer-a\\n'"),
    ("pgvpn", ["db", "add-peer", "peer-x", "--password-file", "/missing"], "no such file"),
    ("pgvpn", ["db", "migrate", "--database-url", "postgresql://u:secret@[::1"],
     "not a valid libpq connection string"),
    ("pgvpn", ["log", "--since", "99999999999w"], "longer than 36500d"),
    ("pgvpn", ["log", "--port", "²"], "bad port"),
    ("pgvpn", ["log", "-n", "-1"], "-n/--lines: '-1'"),
    ("pgvpn", ["export", "--pcap", "/missing/dir/x.pcap"], "no directory /missing/dir"),
    ("pgvpn", ["replay", "--input", "/missing.pcap"], "no such file"),
    ("pgvpn", ["replay", "--since", "1m", "--tun", "a/b"], "--tun: 'a/b'"),
    ("pgvpn", ["prune", "--older-than", "0s"], "must be longer than zero"),
    ("pgvpn", ["retention", "--partition-step", "7h"], "a divisor of a day"),
    ("pgvpn", ["retention", "--ahead", "400d"], "must be 2h-31d"),
]
KNOWN_ENV = [
    ("lab", {"PGVPN_LAB_NAME": "../etc"}, ["status"], "PGVPN_LAB_NAME='../etc'"),
    ("pgvpn", {"PGVPN_MAX_REPLAY_AGE": "inf"}, ["run"], "(from $PGVPN_MAX_REPLAY_AGE)"),
    ("pgvpn", {"DATABASE_URL": "postgresql://u:secret@[::1"}, ["log"], "--database-url"),
]


@pytest.mark.parametrize(("program", "argv", "message"), KNOWN,
                         ids=[" ".join([p, *a]) for p, a, _ in KNOWN])
def test_known_bad_arguments(scratch: Path, program: str, argv: list[str],
                             message: str) -> None:
    done = run_cli(program, [a.replace("{cwd}", str(scratch)) for a in argv], scratch)
    assert_refused(done, program, message, scratch)
    assert "secret" not in done.stderr


@pytest.mark.parametrize(("program", "env", "argv", "message"), KNOWN_ENV)
def test_known_bad_environment(scratch: Path, program: str, env: dict[str, str],
                               argv: list[str], message: str) -> None:
    done = run_cli(program, argv, scratch, env)
    assert_refused(done, program, message, scratch)
    assert "secret" not in done.stderr


# --------------------------------------------------------------- fuzzing
# Text as a user could type it (no NUL, no lone surrogates: argv cannot carry them).
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"),
               max_size=20)
LETTERS = st.text(st.characters(categories=("Ll", "Lu")), min_size=1, max_size=12)
ODD_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "0x10", "1_0", "",
                               " ", "1,5", "½", "٣", "--1"])
_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)


def whole_bad(low: int, high: int) -> st.SearchStrategy[str]:
    """Anything but a whole number from low to high."""
    outside = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1))
    return st.one_of(outside.map(str), ODD_NUMBERS, st.floats().map(str).filter(
        lambda t: not t.endswith(".0") or not low <= float(t) <= high),
        TEXT.filter(lambda t: not _WHOLE.fullmatch(t.strip()) or not low <= int(t) <= high))


def number_bad(low: float, high: float, *, above_low: bool = False
               ) -> st.SearchStrategy[str]:
    """Anything but a finite number from low (or above it) to high."""
    def bad(text: str) -> bool:
        try:
            value = float(text)
        except ValueError:
            return True
        return not (low < value if above_low else low <= value) or not value <= high
    outside = st.one_of(st.floats(max_value=low, exclude_max=not above_low),
                        st.floats(min_value=high, exclude_min=True))
    return st.one_of(outside.map(repr), ODD_NUMBERS.filter(bad), TEXT.filter(bad))


DURATION_BAD = st.one_of(st.sampled_from(["0s", "0m", "7", "7x", "1h-5m", "-1d", "1e3s",
                                          "99999999999w", "36501d", "forever"]),
                         LETTERS.filter(lambda t: t.lower() != "forever"))
WHEN_BAD = st.one_of(st.sampled_from(["yesterday", "99999999999w", "2025-13-01", "10:99",
                                      "-5m", "5"]),
                     LETTERS.filter(lambda t: t.strip().lower() != "now"))
HOSTS = ["postgres", "peer-a", "peer-b"]
PEER_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,56}")
ROLE_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
DATABASE_RE = re.compile(r"[a-z_][a-z0-9_-]{0,62}")
TABLE_RE = re.compile(r"(?!pgvpn\.|pgvpn_admin\.)[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}")


@dataclass
class Option:
    """One option: how it is written, a valid value and invalid ones (None: a flag)."""

    flag: str
    good: st.SearchStrategy[str] | None = None
    bad: st.SearchStrategy[str] | None = None
    culprit: str = ""  # what the error line must name (default: the flag)

    def tokens(self, value: str | None) -> list[str]:
        if self.flag.startswith("-"):
            return [self.flag] if value is None else [f"{self.flag}={value}"]
        return [value or ""]


@dataclass
class Command:
    program: str
    words: list[str]
    options: list[Option]
    required: list[Option] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)  # after everything (exec's command)
    unknown: bool = True  # may an unknown option be its bad part (not where it is data)


def choice(flag: str, good: list[str]) -> Option:
    return Option(flag, st.sampled_from(good), TEXT.filter(lambda t: t not in good))


PEER_BAD = st.sampled_from(["peer-a\n", "Peer-A", "peer_a", "-peer", "x" * 58, "peer a"])
PEER_OPTIONS = [Option(f, st.sampled_from(["peer-a", "peer-b"]), st.one_of(
    PEER_BAD, TEXT.filter(lambda t: not all(PEER_RE.fullmatch(p) for p in t.split(",") if p)
                          or not t.strip(",")))) for f in ("--peer", "--sender")]
FILTERS = [*PEER_OPTIONS,
           Option("--port", st.sampled_from(["80", "5201,443"]),
                  st.one_of(whole_bad(0, 65535).filter(lambda t: "," not in t), st.just(","))),
           Option("--proto", st.sampled_from(["tcp", "icmp,udp", "17"]),
                  st.one_of(LETTERS.filter(lambda t: t.lower() not in {
                      "icmp", "igmp", "tcp", "udp", "ipv6", "gre", "esp", "ah", "icmpv6",
                      "sctp", "udplite"}), st.sampled_from(["256", "-1", "²"]))),
           Option("--host", st.sampled_from(["10.230.0.2", "fd00:230::/64"]),
                  st.one_of(LETTERS, st.sampled_from(["10.0.0.300", "10.0.0.0/33",
                                                      "fe80::1%eth0", "::/129"]))),
           Option("--since", st.sampled_from(["1h", "2025-11-25T14:30"]), WHEN_BAD)]
LOG_COMMON = [*FILTERS, Option("--json")]
PATH_OUT_BAD = st.sampled_from(["/missing-pgvpn-fuzz/x", "/proc/x", "{cwd}/dir",
                                "{cwd}/file/x", "x" * 300, ""])
# a folder that does not exist yet is fine (it is made): /missing-pgvpn-fuzz/x is not bad
DIR_OUT_BAD = st.sampled_from(["/proc/x", "{cwd}/file", "{cwd}/file/x", "x" * 300, ""])
PATH_IN_BAD = st.sampled_from(["/missing-pgvpn-fuzz", "{cwd}/dir", "{cwd}/nothing"])
URL = Option("--database-url", st.just("host=/nonexistent-pgvpn-fuzz"),
             st.sampled_from(["host", "postgresql://[::1", "no_such_option=1", "host='x"]))
REPLAY = [Option("--speed", st.sampled_from(["0", "2.5"]), number_bad(0, 1e6)),
          Option("--max", st.sampled_from(["1", "500"]), whole_bad(1, 1_000_000)),
          Option("--max-gap", st.just("1s"), DURATION_BAD), Option("--dry-run")]
LAB_SETTINGS = [choice("--backend", ["auto", "netns", "docker"]),
                Option("--mtu", st.sampled_from(["576", "1500", "65535"]),
                       whole_bad(576, 65535)),
                Option("--no-tls"),
                # "both" is good for bench only: never offered as a bad value to either
                Option("--queue-control", st.sampled_from(["on", "off"]),
                       TEXT.filter(lambda t: t not in ("on", "off", "both")))]

LAB = [
    Command("lab", ["check"], []), Command("lab", ["down"], [Option("--images")]),
    Command("lab", ["status"], [Option("--json")]),
    Command("lab", ["up"], [*LAB_SETTINGS, choice("--profile", list(PROFILES))]),
    Command("lab", ["exec"], [], [Option("host", st.sampled_from(HOSTS), TEXT.filter(
        lambda t: t not in [*HOSTS, "replay"] and not t.startswith("-")), "argument host")],
        tail=["--", "true"], unknown=False),
    Command("lab", ["logs"], [Option("--tail", st.just("5"), whole_bad(1, 100_000)),
                              Option("host", st.sampled_from(HOSTS), TEXT.filter(
                                  lambda t: t not in HOSTS and not t.startswith("-")),
                                  "argument host")]),
    *[Command("lab", [word], [Option("--kill")] if word != "start" else [],
              [Option("host", st.sampled_from(HOSTS), TEXT.filter(
                  lambda t: t not in HOSTS and not t.startswith("-")), "argument host")])
      for word in ("restart", "stop", "start")],
    Command("lab", ["bench"], [
        *LAB_SETTINGS, Option("--duration", st.just("2"), whole_bad(1, 3600)),
        Option("--out", st.just("{cwd}/out"), DIR_OUT_BAD),
        Option("--json", st.sampled_from(["-", "{cwd}/report.json"]), PATH_OUT_BAD),
        Option("--profile", st.sampled_from(["batched", "all", "blog-v1,batched"]),
               LETTERS.filter(lambda t: t not in [*PROFILES, "all"]))]),
    Command("lab", ["packets"], [*LOG_COMMON, Option("--lines", st.just("5"),
                                                     whole_bad(0, 10**9))]),
    Command("lab", ["stats"], [*LOG_COMMON, choice("--by", ["flow", "host", "peer"]),
                               Option("--top", st.just("3"), whole_bad(1, 1_000_000))]),
    Command("lab", ["export"], FILTERS, [Option("--pcap", st.just("{cwd}/x.pcap"),
                                                PATH_OUT_BAD)]),
    Command("lab", ["replay"], [*FILTERS, *REPLAY, Option(
        "--into", st.sampled_from(["replay", "peer-b"]),
        TEXT.filter(lambda t: t not in {"replay", "peer-a", "peer-b"}))]),
]
PGVPN = [
    Command("pgvpn", ["run"], [
        Option("--name", st.just("peer-a"), st.one_of(PEER_BAD, TEXT.filter(
            lambda t: not PEER_RE.fullmatch(t) or t in RESERVED_PEER_NAMES)), "name ="),
        Option("--tun-ip", st.just("10.230.0.1/24"), st.one_of(LETTERS, st.sampled_from(
            ["10.230.0.1", "10.0.0.1/33", "::1/200"])), "tun_ip ="),
        Option("--mtu", st.just("1500"), whole_bad(576, 65535), "mtu ="),
        Option("--tun-name", st.just("pgvpn9"), st.sampled_from(
            ["", "a b", "a/b", "a:b", "x" * 16, ".", "é"]), "tun_name ="),
        Option("--max-replay-age", st.just("30"), number_bad(0, 365 * 86400, above_low=True),
               "max_replay_age ="),
        Option("--batch-packets", st.just("64"), whole_bad(1, 65536), "batch_packets ="),
        Option("--config", st.just("{cwd}/agent.yaml"), PATH_IN_BAD)]),
    Command("pgvpn", ["db", "migrate"], [URL]), Command("pgvpn", ["db", "version"], [URL]),
    Command("pgvpn", ["db", "init"], [URL], [
        Option("--owner", st.just("pgvpn_owner"), TEXT.filter(
            lambda t: not t.startswith("-") and (not ROLE_RE.fullmatch(t) or t in {
                "pgvpn_agent", "pgvpn_reader", "pgvpn_peermaker"}))),
        Option("--database", st.just("pgvpn"), TEXT.filter(
            lambda t: not t.startswith("-") and not DATABASE_RE.fullmatch(t))),
        Option("--owner-password-file", st.just("{cwd}/file"), PATH_IN_BAD)]),
    Command("pgvpn", ["db", "add-peer"], [URL], [
        Option("name", st.just("peer-c"), TEXT.filter(
            lambda t: not t.startswith("-") and (not PEER_RE.fullmatch(t)
                                                 or t in RESERVED_PEER_NAMES)),
            "argument name"),
        Option("--password-file", st.just("{cwd}/file"), PATH_IN_BAD)]),
    Command("pgvpn", ["probe"], [
        Option("--timeout", st.just("1"), number_bad(0.1, 60)),
        Option("address", st.just("10.230.0.2"), LETTERS, "argument address")]),
    Command("pgvpn", ["ceiling"], [
        Option("--seconds", st.just("1"), number_bad(0.1, 60)),
        Option("--size", st.just("1500"), whole_bad(1, 65535)),
        Option("--batch", st.just("64"), whole_bad(1, 65536)),
        Option("--config", st.just("{cwd}/agent.yaml"), PATH_IN_BAD)], [
        Option("table", st.just("pgvpn_bench.ingest"), st.one_of(TEXT.filter(
            lambda t: not t.startswith("-") and not TABLE_RE.fullmatch(t)),
            st.sampled_from(["pgvpn.packets", "pgvpn_admin.x"])), "argument TABLE")]),
    Command("pgvpn", ["log"], [*LOG_COMMON, URL]),
    Command("pgvpn", ["stats"], [*LOG_COMMON, URL]),
    Command("pgvpn", ["export"], [*FILTERS, URL], [Option("--pcap", st.just("{cwd}/x.pcap"),
                                                          PATH_OUT_BAD)]),
    Command("pgvpn", ["replay"], [*FILTERS, *REPLAY, URL, Option(
        "--tun", st.just("pgvpn9"), st.sampled_from(["a b", "x" * 16, "a:b", "é"]))]),
    Command("pgvpn", ["prune"], [URL, Option("--older-than", st.just("7d"), DURATION_BAD),
                                 Option("--dry-run")]),
    Command("pgvpn", ["retention"], [
        URL, Option("--keep", st.sampled_from(["7d", "forever"]), st.one_of(
            DURATION_BAD.filter(lambda t: t != "forever"), st.just("30s"))),
        Option("--partition-step", st.sampled_from(["1d", "1h"]), st.one_of(
            DURATION_BAD, st.sampled_from(["7h", "32d", "30s", "1.5d"]))),
        Option("--ahead", st.just("3d"), st.one_of(DURATION_BAD,
                                                   st.sampled_from(["1h", "32d"])))]),
]


@st.composite
def bad_command_line(draw: st.DrawFn, commands: list[Command]) -> tuple[Command, list[str], str]:
    """A command line with valid values for some options and exactly one bad part."""
    command = draw(st.sampled_from(commands))
    options = command.options + command.required
    culprits = [o for o in options if o.bad is not None]
    kinds = ["value"] * bool(culprits) + ["unknown"] * command.unknown
    kind = draw(st.sampled_from(kinds))
    bad = draw(st.sampled_from(culprits)) if kind == "value" else None
    chosen = draw(st.lists(st.sampled_from(command.options), unique_by=lambda o: o.flag,
                           max_size=3)) if command.options else []
    argv = list(command.words)
    for option in {o.flag: o for o in [*chosen, *command.required]}.values():
        if option is not bad:
            argv += option.tokens(draw(option.good) if option.good is not None else None)
    if bad is not None:
        assert bad.bad is not None
        argv += bad.tokens(draw(bad.bad))
        return command, [*argv, *command.tail], bad.culprit or bad.flag
    unknown = "--no-such-" + draw(LETTERS).lower()
    return command, [*argv, unknown, *command.tail], unknown


def fuzz(commands: list[Command], data: st.DataObject, cwd: Path) -> None:
    command, argv, culprit = data.draw(bad_command_line(commands))
    argv = [a.replace("{cwd}", str(cwd)) for a in argv]
    assert_refused(run_cli(command.program, argv, cwd), command.program, culprit, cwd)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzzed_lab_command_lines_are_refused_cleanly(scratch: Path, data: st.DataObject
                                                      ) -> None:
    fuzz(LAB, data, scratch)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzzed_pgvpn_command_lines_are_refused_cleanly(scratch: Path, data: st.DataObject
                                                        ) -> None:
    fuzz(PGVPN, data, scratch)
