"""Unit tests: settings from YAML, environment and command line, and their errors."""

from __future__ import annotations

import argparse
import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgvpn import config as config_module
from pgvpn.config import REQUIRED, SETTINGS, add_arguments, interface_name, load_config
from pgvpn.errors import ConfigError, PgvpnError

BASE_ENV = {"PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b", "TUN_IP": "10.230.0.1/24",
            "TUN_PEER": "10.230.0.2"}


def test_environment_alone_is_enough_and_defaults_apply() -> None:
    config = load_config(environ=BASE_ENV)
    assert (config.name, config.peer, str(config.tun_ip), str(config.tun_peer)) == (
        "peer-a", "peer-b", "10.230.0.1/24", "10.230.0.2")
    assert (config.mtu, config.profile, config.synchronous_commit) == (1500, "batched", True)


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.yaml"
    file.write_text("name: from-file\npeer: peer-b\ntun_ip: 10.9.0.1/24\ntun_peer: 10.9.0.2\n"
                    "mtu: 1400\n")
    config = load_config(file, environ={"PGVPN_MTU": "9000"}, overrides={"mtu": "65000"})
    assert config.name == "from-file" and config.mtu == 65000
    assert load_config(file, environ={"PGVPN_MTU": "9000"}).mtu == 9000
    assert load_config(file, environ={}).mtu == 1400


@pytest.mark.parametrize(("env", "message"), [
    ({"TUN_IP": "10.230.0.1"}, "prefix length"),
    ({"TUN_IP": "10.230.0.300/24"}, "tun_ip"),
    ({"PGVPN_MTU": "100"}, "between 576 and 65535"),
    ({"PGVPN_MTU": "big"}, "mtu"),
    ({"PGVPN_PROFILE": "fastest"}, "unknown profile"),
    ({"PGVPN_NAME": "Peer A"}, "lower-case"),
    ({"PGVPN_PEER": "peer-a"}, "cannot tunnel to itself"),
    ({"TUN_PEER": "fd00::2"}, "same family"),
    ({"PGVPN_SYNCHRONOUS_COMMIT": "maybe"}, "true or false"),
    ({"PGVPN_METRICS_LISTEN": "localhost:9108"}, "metrics_listen.*an IP address"),
    ({"PGVPN_METRICS_LISTEN": "127.0.0.1"}, "give ADDR:PORT"),
    ({"PGVPN_METRICS_LISTEN": "127.0.0.1:0"}, "port 1-65535"),
    ({"PGVPN_METRICS_LISTEN": "127.0.0.1:65536"}, "port 1-65535"),
    ({"PGVPN_METRICS_LISTEN": "::1:9108"}, r"\[::1\]:9108"),
    ({"PGVPN_METRICS_LISTEN": "127.0.0.1:9\uff1108"}, "give ADDR:PORT"),  # a wide digit
])
def test_bad_values_name_the_setting_and_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={**BASE_ENV, **env})


def test_missing_settings_are_listed_with_their_variables() -> None:
    with pytest.raises(ConfigError, match=r"name \(\$PGVPN_NAME\), tun_ip \(\$TUN_IP\)"):
        load_config(environ={"PGVPN_PEER": "peer-b"})


def test_routing_follows_whether_a_peer_is_set() -> None:
    """A fixed peer routes every packet to it; none routes by the owner's table."""
    assert load_config(environ=BASE_ENV).routing == "peer"
    fleet = load_config(environ={"PGVPN_NAME": "peer-a", "TUN_IP": "10.230.0.1/24"})
    assert (fleet.routing, fleet.peer, fleet.tun_peer) == ("table", None, None)
    assert load_config(environ={**BASE_ENV, "PGVPN_ROUTING": "table"}).routing == "table"
    with pytest.raises(ConfigError, match="routing 'peer' sends every packet to one peer: "
                                          r"set peer \(\$PGVPN_PEER\)"):
        load_config(environ={"PGVPN_NAME": "peer-a", "TUN_IP": "10.230.0.1/24",
                             "PGVPN_ROUTING": "peer"})
    with pytest.raises(ConfigError, match=r"routing = 'mesh' \(from \$PGVPN_ROUTING\): use "
                                          "peer or table"):
        load_config(environ={**BASE_ENV, "PGVPN_ROUTING": "mesh"})
    with pytest.raises(ConfigError, match="set PGVPN_PEER"):
        _ = fleet.fixed_peer  # a blog profile's question, refused in table routing


def test_a_blog_profile_cannot_route_by_the_table() -> None:
    from pgvpn.agent import Agent

    fleet = load_config(environ={"PGVPN_NAME": "peer-a", "TUN_IP": "10.230.0.1/24",
                                 "PGVPN_PROFILE": "blog-v1"})
    with pytest.raises(PgvpnError, match="profile blog-v1 carries one fixed pair of peers"):
        Agent(fleet)


def test_yaml_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("nmae: peer-a\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*nmae"):
        load_config(unknown, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_secrets_are_masked_in_descriptions() -> None:
    config = load_config(environ={**BASE_ENV, "DATABASE_URL": "postgresql://u:hunter2@h/db"})
    assert "hunter2" not in str(config.describe())


def test_cli_reports_a_bad_config_in_one_line_without_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run", "--mtu", "70000"],
                          capture_output=True, text=True, env={**BASE_ENV, "PATH": "/usr/bin"},
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pgvpn: error: mtu = '70000' (from --mtu): must be a whole number between 576 and "
        "65535")


def squeezed(text: str) -> str:
    """Text with argparse's line wrapping undone (it also breaks lines after a hyphen)."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def test_help_documents_every_setting_with_its_variable() -> None:
    """Every setting of the table (config.SETTINGS), not a list kept by hand: its flag,
    its variable, its help, default and whether it is required."""
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run", "--help"],
                          capture_output=True, text=True, check=True)
    shown = squeezed(done.stdout)
    for setting in SETTINGS:
        flag = f"--{setting.key.replace('_', '-')} {setting.env}"
        default = "" if setting.default in (None, "") else f" (default {setting.default})"
        required = " [required]" if setting.key in REQUIRED else ""
        described = squeezed(f"{setting.help}{default}{required}; env ${setting.env}")
        assert f"{flag} {described}" in shown, setting.key
    assert shown.count("; env $") == len(SETTINGS)


WHOLE = "must be a whole number between"
SECONDS = "must be a number of seconds, more than 0 and at most"
DAY = f"{SECONDS} 86400 (a day)"
YEAR = f"{SECONDS} 31536000 (a year)"
IFACE = "interface names have 1-15 printable ASCII characters, no '/', ':' or spaces"


@pytest.mark.parametrize(("variable", "value", "problem"), [
    ("PGVPN_MTU", "575", f"{WHOLE} 576 and 65535"),
    ("PGVPN_MTU", "65536", f"{WHOLE} 576 and 65535"),
    ("PGVPN_MTU", "1500.0", f"{WHOLE} 576 and 65535"),
    # Arabic-Indic digits: str.isdigit() says yes, but they are no ASCII number
    ("PGVPN_MTU", "\u0661\u0665\u0660\u0660", f"{WHOLE} 576 and 65535"),
    ("PGVPN_BATCH_PACKETS", "0", f"{WHOLE} 1 and 65536"),
    ("PGVPN_KEEPALIVE_COUNT", "101", f"{WHOLE} 1 and 100"),
    ("PGVPN_MAX_REPLAY_AGE", "0", YEAR),
    ("PGVPN_MAX_REPLAY_AGE", "31536000.5", YEAR),
    ("PGVPN_MAX_REPLAY_AGE", "nan", YEAR),
    ("PGVPN_MAX_REPLAY_AGE", "inf", YEAR),
    ("PGVPN_MAX_REPLAY_AGE", "forever", YEAR),  # no number: the rule, not Python's words
    ("PGVPN_TCP_USER_TIMEOUT", "0", DAY),
    ("PGVPN_TCP_USER_TIMEOUT", "86400.5", DAY),
    ("PGVPN_TCP_USER_TIMEOUT", "-inf", DAY),
    ("PGVPN_TCP_USER_TIMEOUT", "nan", DAY),
    ("PGVPN_TCP_USER_TIMEOUT", "10s", DAY),
    ("PGVPN_SYNCHRONOUS_COMMIT", "maybe", "use true or false"),
    ("PGVPN_TUN_NAME", "sixteen-chars-xx", IFACE),
    ("PGVPN_TUN_NAME", ".", IFACE),
    ("PGVPN_TUN_NAME", "..", IFACE),
    ("PGVPN_TUN_NAME", "tün0", IFACE),
    ("PGVPN_TUN_NAME", "tun\t0", IFACE),
    ("PGVPN_TUN_NAME", "a/b", IFACE),
    ("PGVPN_TUN_NAME", "a:b", IFACE),
    ("PGVPN_TUN_NAME", "a b", IFACE),
    ("PGVPN_NAME", "peer_a", "use 1-57 characters: lower-case letters, digits or '-'"),
    ("PGVPN_NAME", "reader", "'reader' is reserved (pgvpn_reader is one of pgvpn's own roles)"),
    ("TUN_IP", "10.230.0.1", "give an address with its prefix length, e.g. 10.230.0.1/24"),
    ("PGVPN_PROFILE", "fastest", "unknown profile; choose one of batched, batched-jumbo, "
     "blog-v1, blog-v2, notify-only"),
])
def test_each_bad_value_gets_its_own_exact_message(variable: str, value: str,
                                                   problem: str) -> None:
    environ = {**BASE_ENV, variable: value}
    key = variable.removeprefix("PGVPN_").lower()
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    assert str(caught.value) == f"{key} = {value!r} (from ${variable}): {problem}"


@pytest.mark.parametrize(("variable", "value", "key", "expected"), [
    ("PGVPN_MTU", " 576 ", "mtu", 576), ("PGVPN_MTU", "65535", "mtu", 65535),
    ("PGVPN_MAX_REPLAY_AGE", "0.5", "max_replay_age", 0.5),
    ("PGVPN_MAX_REPLAY_AGE", "31536000", "max_replay_age", 31536000.0),
    ("PGVPN_TCP_USER_TIMEOUT", "0.5", "tcp_user_timeout", 0.5),
    ("PGVPN_TCP_USER_TIMEOUT", "86400", "tcp_user_timeout", 86400.0),
    ("PGVPN_TUN_NAME", "fifteen-chars-x", "tun_name", "fifteen-chars-x"),
    ("PGVPN_TUN_NAME", "a", "tun_name", "a"),
    ("PGVPN_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("PGVPN_LOG_LEVEL", "warning", "log_level", "WARNING"),
    ("PGVPN_LOG_LEVEL", "Error", "log_level", "ERROR"),
    ("TUN_IP6", "fd00:230::1/64", "tun_ip6", ipaddress.ip_interface("fd00:230::1/64")),
])
def test_values_at_their_limits_are_accepted(variable: str, value: str, key: str,
                                             expected: object) -> None:
    assert getattr(load_config(environ={**BASE_ENV, variable: value}), key) == expected


@pytest.mark.parametrize("word", ["1", "true", "YES", " On "])
def test_true_words(word: str) -> None:
    assert load_config(environ={**BASE_ENV, "PGVPN_ALLOW_PLAINTEXT": word}).allow_plaintext


@pytest.mark.parametrize("word", ["0", "FALSE", "no", "off"])
def test_false_words(word: str) -> None:
    environ = {**BASE_ENV, "PGVPN_SYNCHRONOUS_COMMIT": word}
    assert load_config(environ=environ).synchronous_commit is False


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("TUN_IP6", "10.1.0.1/24", "tun_ip6 10.1.0.1/24 is not an IPv6 address"),
    ("PGVPN_LOG_LEVEL", "verbose", "log_level 'VERBOSE': use DEBUG, INFO, WARNING or ERROR"),
    ("PGVPN_PEER", "peer-a", "name and peer are both 'peer-a': a peer cannot tunnel to itself"),
    ("TUN_PEER", "10.230.0.1", "tun_peer 10.230.0.1 must be another address of the same "
     "family as tun_ip 10.230.0.1/24"),
])
def test_settings_that_contradict_each_other(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={**BASE_ENV, variable: value})
    assert str(caught.value) == message


def test_secrets_are_not_repeated_in_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={**BASE_ENV, "DATABASE_URL": "postgresql://u:hunter2@[::1"})
    assert str(caught.value) == ("database_url = (not shown) (from $DATABASE_URL): not a valid "
                                 "libpq connection string or URL")


def test_errors_name_the_command_line_option_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=BASE_ENV, overrides={"max_replay_age": "0"})
    assert str(caught.value) == f"max_replay_age = '0' (from --max-replay-age): {YEAR}"
    file = tmp_path / "agent.yaml"
    file.write_text("mtu: 100\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ=BASE_ENV)
    assert str(caught.value) == f"mtu = 100 (from {file}): {WHOLE} 576 and 65535"
    file.write_text("- name\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ=BASE_ENV)
    assert str(caught.value) == f"config file {file} must be a mapping of setting: value"
    file.write_text("nmae: a\nmtuu: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ=BASE_ENV)
    assert str(caught.value).startswith(f"config file {file}: unknown setting(s) mtuu, nmae; "
                                        "known: name, peer, routing, database_url, tun_ip, ")


def test_missing_settings_message() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"PGVPN_NAME": "peer-a"})
    assert str(caught.value) == "missing setting: tun_ip ($TUN_IP); see 'pgvpn run --help'"


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in BASE_ENV.items():
        monkeypatch.setenv(variable, value)
    assert load_config().name == "peer-a"


def test_descriptions_are_plain_text() -> None:
    described = load_config(environ={**BASE_ENV, "DATABASE_URL": "host=db"}).describe()
    assert (described["database_url"], described["mtu"], described["tun_ip"]) == (
        "***", "1500", "10.230.0.1/24")
    assert described["tun_ip6"] is None and described["allow_plaintext"] == "False"
    assert load_config(environ=BASE_ENV).describe()["database_url"] == ""


def test_every_setting_has_an_option_that_documents_it() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (group,) = [g for g in parser._action_groups if g.title == "settings"]
    assert group.description == (
        "each may also come from the YAML file (--config) or the environment; the command "
        "line wins, then the environment, then the file")
    options = {a.option_strings[0]: a for a in group._group_actions}
    assert list(options) == [f"--{s.key.replace('_', '-')}" for s in SETTINGS]
    assert all(a.default is None and a.dest == s.key and a.metavar == s.env
               for a, s in zip(options.values(), SETTINGS, strict=True))
    assert options["--mtu"].help == ("TUN MTU (576-65535); 65000 is fastest (default 1500); "
                                     "env $PGVPN_MTU")
    assert options["--name"].help == ("this peer's name; packets it sends are logged with it "
                                      "as sender [required]; env $PGVPN_NAME")
    assert options["--database-url"].help == (
        "libpq connection string or URL; empty means the PG* environment variables; "
        "env $DATABASE_URL")
    assert parser.parse_args(["--max-replay-age", "5"]).max_replay_age == "5"


def test_whole_numbers_between_limits() -> None:
    """The factory behind every whole-number setting, at and beyond both limits (the
    settings table builds its parsers once, at import)."""
    parse = config_module._whole(2, 4)
    assert [parse(text) for text in ("2", " 3 ", "4")] == [2, 3, 4]
    for text in ("1", "5", "-3", "+3", "3.0", "three", "", "\u0663"):
        with pytest.raises(ValueError) as caught:
            parse(text)
        assert str(caught.value) == "must be a whole number between 2 and 4"


def test_interface_names_the_kernel_takes() -> None:
    assert [interface_name(n) for n in ("tunX0", "a", "x" * 15)] == ["tunX0", "a", "x" * 15]
    with pytest.raises(ValueError, match="1-15 printable ASCII"):
        interface_name("")


def test_metrics_listen_takes_an_address_and_port_or_nothing() -> None:
    for value in ("", "127.0.0.1:9108", "0.0.0.0:1", "[::1]:65535", "[::]:9108"):
        assert load_config(environ={**BASE_ENV, "PGVPN_METRICS_LISTEN": value}
                           ).metrics_listen == value


def test_metrics_on_a_port_in_use_say_so() -> None:
    """A real socket holds the port: the agent's metrics server refuses in one line."""
    import socket

    from pgvpn.metrics import MetricsServer

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PgvpnError, match=rf"cannot serve metrics on 127.0.0.1:{port}: "
                           "Address already in use"):
            MetricsServer(f"127.0.0.1:{port}", lambda: None)  # type: ignore[arg-type,return-value]
