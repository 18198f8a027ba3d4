"""Unit tests: settings from YAML, environment and command line, and their errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgvpn.config import REQUIRED, SETTINGS, load_config
from pgvpn.errors import ConfigError

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
])
def test_bad_values_name_the_setting_and_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={**BASE_ENV, **env})


def test_missing_settings_are_listed_with_their_variables() -> None:
    with pytest.raises(ConfigError, match=r"peer \(\$PGVPN_PEER\).*tun_peer \(\$TUN_PEER\)"):
        load_config(environ={"PGVPN_NAME": "peer-a", "TUN_IP": "10.230.0.1/24"})


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
