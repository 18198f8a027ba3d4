#!/usr/bin/env python3
"""Render a Patroni configuration directory for one pgvpn database node.

Why: Patroni owns pg_hba.conf, the TLS settings and the roles it creates at
bootstrap, so everything the single-node entrypoint derived from PGVPN_* at start
must reach Patroni as configuration. Both backends run this script as root before
starting Patroni as the owner user: the Docker entrypoint (mode `patroni`) and the
netns backend, from the repository. Standard library only, so the host's python3
runs it too.

    patroni_config.py --out DIR [--owner USER]

writes into DIR (0700, owned by USER; every file 0600, owned by USER):
  00-pgvpn.yml  a copy of patroni.yml next to this script (shared settings)
  10-node.yml   this node's secrets, TLS and pg_hba (JSON, which is valid YAML)
  ca.crt, server.crt, server.key   private copies of the TLS files (SSL on/require)
Patroni loads the *.yml of DIR in sorted order and then its PATRONI_* environment
(scope, name, etcd3 host, addresses, data directory), which this script ignores.

Environment (passwords are read from files, never from argv or the environment):
  PGVPN_OWNER_PASSWORD_FILE        password of the superuser postgres
  PGVPN_REPLICATION_PASSWORD_FILE  password of the role replicator (streaming)
  PGVPN_REWIND_PASSWORD_FILE       password of the role rewind (pg_rewind)
  PGVPN_PATRONI_API_PASSWORD_FILE  password of user patroni on the REST API
  PGVPN_SSL          off (default) | on (TLS offered) | require (TLS only from the network)
  PGVPN_SSL_CA_FILE, PGVPN_SSL_CERT_FILE, PGVPN_SSL_KEY_FILE
                     needed unless PGVPN_SSL=off; replication and pg_rewind then
                     verify the other node against the CA (sslmode verify-full)
  PGVPN_HBA_CIDRS    networks of the agents, space-separated (default: private ranges)
  PGVPN_REPLICATION_CIDR  the network of the nodes (replication, pg_rewind)
  PGVPN_SOCKET_DIR   unix_socket_directories (default /run/postgresql)
  PGVPN_LOCAL_AUTH   peer (default) | trust: local socket authentication. trust is for
                     the netns backend, where root connects as postgres through a
                     private (0700) socket directory.

Exit status 2 with a one-line message for any bad input.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import re
import stat
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("patroni.yml")
SHARED = "00-pgvpn.yml"
MARKER = ".pgvpn-patroni"  # in every directory this script made or took over
NODE = "10-node.yml"
TLS_FILES = {"ca.crt": "PGVPN_SSL_CA_FILE", "server.crt": "PGVPN_SSL_CERT_FILE",
             "server.key": "PGVPN_SSL_KEY_FILE"}
PASSWORDS = {"superuser": "PGVPN_OWNER_PASSWORD_FILE",
             "replication": "PGVPN_REPLICATION_PASSWORD_FILE",
             "rewind": "PGVPN_REWIND_PASSWORD_FILE",
             "api": "PGVPN_PATRONI_API_PASSWORD_FILE"}
USERS = {"superuser": "postgres", "replication": "replicator", "rewind": "rewind",
         "api": "patroni"}
DEFAULT_HBA_CIDRS = "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7"
SSL_MODES = ("off", "on", "require")
LOCAL_AUTH = ("peer", "trust")
# Patroni 3.0.2 quotes passwords in its client's encoding, which is not always UTF-8.
NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
SOCKET_DIR_OK = re.compile(r"/[A-Za-z0-9._/-]*")
MAX_FILE = 1 << 20


class ConfigError(Exception):
    """A bad input: reported as one line, exit status 2."""


def env_choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "") or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]} "
                          f"(got {value!r})")
    return value


def env_path(env: dict[str, str], name: str) -> Path:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set")
    return Path(value)


def read_file(env: dict[str, str], name: str) -> bytes:
    """A regular file's bytes (a secret or a PEM file: small; a FIFO or device is refused)."""
    path = env_path(env, name)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat can refuse it.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError(f"{name}={path} is not a regular file")
            data = handle.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {name}={path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{name}={path} is larger than {MAX_FILE} bytes")
    return data


def read_password(env: dict[str, str], name: str) -> str:
    """One line of printable ASCII; a final newline is not part of it."""
    try:
        text = read_file(env, name).decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{name}={env[name]} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{name}={env[name]} is empty")
    if NOT_PRINTABLE_ASCII.search(text):
        raise ConfigError(f"{name}={env[name]} must be one line of printable ASCII "
                          "(Patroni 3.0.2 cannot set other passwords)")
    return text


def cidrs(env: dict[str, str], name: str, default: str | None = None) -> list[str]:
    """Networks for pg_hba, normalised; anything else (e.g. an injected method) is refused."""
    words = (env.get(name, "") or default or "").split()
    if not words:
        raise ConfigError(f"{name} is not set (space-separated networks, e.g. 10.232.0.0/24)")
    try:
        return [str(ipaddress.ip_network(word, strict=False)) for word in words]
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def hba_lines(ssl: str, local_auth: str, agent_cidrs: list[str],
              replication_cidrs: list[str]) -> list[str]:
    """pg_hba.conf: the lines of entrypoint.sh's hba_conf, plus the nodes' own roles."""
    types = {"off": ["host"], "on": ["hostssl", "host"], "require": ["hostssl"]}[ssl]
    lines = [
        f"local all all {local_auth}",
        # Patroni's own replication check through the socket (use_unix_socket_repl).
        "local replication replicator scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host all all ::1/128 scram-sha-256",
    ]
    for cidr in replication_cidrs:
        for kind in types:
            lines.append(f"{kind} replication replicator {cidr} scram-sha-256")
            # pg_rewind and Patroni's checks before it connect to database postgres.
            lines.append(f"{kind} postgres rewind {cidr} scram-sha-256")
    for cidr in agent_cidrs:
        for kind in types:
            lines.append(f"{kind} all all {cidr} scram-sha-256")
    return lines


def check_pem(env: dict[str, str], name: str, data: bytes, marker: bytes) -> None:
    if marker not in data:
        raise ConfigError(f"{name}={env[name]} is not a PEM file with {marker.decode()}")


def node_config(env: dict[str, str], out: Path) -> tuple[dict[str, object], dict[str, bytes], Path]:
    """10-node.yml's content, the TLS files to copy into out (name -> bytes), the socket dir."""
    ssl = env_choice(env, "PGVPN_SSL", SSL_MODES)
    local_auth = env_choice(env, "PGVPN_LOCAL_AUTH", LOCAL_AUTH)
    passwords = {role: read_password(env, var) for role, var in PASSWORDS.items()}
    agent_cidrs = cidrs(env, "PGVPN_HBA_CIDRS", DEFAULT_HBA_CIDRS)
    replication_cidrs = cidrs(env, "PGVPN_REPLICATION_CIDR")
    socket_dir = env.get("PGVPN_SOCKET_DIR", "") or "/run/postgresql"
    if not SOCKET_DIR_OK.fullmatch(socket_dir) or ".." in socket_dir.split("/"):
        raise ConfigError(f"PGVPN_SOCKET_DIR must be an absolute path of letters, digits "
                          f"and ._/-, without .. (got {socket_dir!r})")

    tls: dict[str, bytes] = {}
    client_tls: dict[str, str] = {}
    parameters: dict[str, str] = {"unix_socket_directories": socket_dir, "ssl": "off"}
    if ssl != "off":
        tls = {name: read_file(env, var) for name, var in TLS_FILES.items()}
        check_pem(env, "PGVPN_SSL_CA_FILE", tls["ca.crt"], b"BEGIN CERTIFICATE")
        check_pem(env, "PGVPN_SSL_CERT_FILE", tls["server.crt"], b"BEGIN CERTIFICATE")
        check_pem(env, "PGVPN_SSL_KEY_FILE", tls["server.key"], b"PRIVATE KEY")
        parameters.update(ssl="on", ssl_cert_file=str(out / "server.crt"),
                          ssl_key_file=str(out / "server.key"))
        # The other node is verified by the lab's CA and its address (certificate SANs).
        client_tls = {"sslmode": "verify-full", "sslrootcert": str(out / "ca.crt")}

    authentication = {role: {"username": USERS[role], "password": passwords[role], **client_tls}
                      for role in ("superuser", "replication", "rewind")}
    config: dict[str, object] = {
        # Unsafe requests (switchover, restart, config) also need an address on the
        # nodes' own network: a peer can send to a node's net-db address through the
        # node's link to it (Linux answers for any of its addresses on any link).
        "restapi": {"authentication": {"username": USERS["api"], "password": passwords["api"]},
                    **({"allowlist": replication_cidrs, "allowlist_include_members": True}
                       if replication_cidrs else {})},
        "postgresql": {
            "authentication": authentication,
            "pgpass": str(out / "pgpass"),
            "parameters": parameters,
            "pg_hba": hba_lines(ssl, local_auth, agent_cidrs, replication_cidrs),
        },
    }
    return config, tls, Path(socket_dir)


def owner_ids(owner: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise ConfigError(f"--owner: no such user {owner!r}") from None
    return entry.pw_uid, entry.pw_gid


def own_directory(path: Path, uid: int, gid: int, mode: int) -> None:
    """Create path (missing parents 0755) or take over an existing directory.

    An existing directory is taken over only if this script made it before (its
    marker file is there) or while it is empty (or holds a stale socket): a mistyped
    path such as / or /etc is refused, never chowned, chmodded or cleaned, whoever
    owns it.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise ConfigError(f"{path} exists and is not a directory") from None
        ours = (path / MARKER).is_file()
        if not ours and any(not e.name.startswith(".s.PGSQL.") for e in path.iterdir()):
            raise ConfigError(f"{path} is not empty and was not made by this script (no "
                              f"{MARKER}): refusing to take it over") from None
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)
    write_private(path / MARKER, b"made by pgvpn's patroni_config.py\n", uid, gid)


def write_private(path: Path, data: bytes, uid: int, gid: int) -> None:
    """Write 0600, owned by uid, atomically; a symlink planted at path is replaced, not followed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb", closefd=False) as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)


def render(env: dict[str, str], out: Path, owner: str, template: Path = TEMPLATE) -> list[Path]:
    """Write the whole directory; returns the files written. Inputs are checked first."""
    if not out.is_absolute():
        raise ConfigError(f"--out must be an absolute path (got {str(out)!r})")
    uid, gid = owner_ids(owner)
    try:
        shared = template.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the shared settings {template}: {exc.strerror}") from None
    config, tls, socket_dir = node_config(env, out)
    files = {SHARED: shared, NODE: (json.dumps(config, indent=2) + "\n").encode(), **tls}
    # With trust, the socket directory is the only gate: nobody but the owner (and root).
    local_trust = env.get("PGVPN_LOCAL_AUTH", "") == "trust"
    try:
        own_directory(out, uid, gid, 0o700)
        own_directory(socket_dir, uid, gid, 0o700 if local_trust else 0o2775)
        for name, data in files.items():
            write_private(out / name, data, uid, gid)
        # The directory is this script's: a stale file of an older run must not apply.
        for path in out.iterdir():
            if path.name not in files and (path.suffix in (".yml", ".yaml")
                                           or path.name in TLS_FILES):
                path.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
    return [out / name for name in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the configuration directory")
    parser.add_argument("--owner", default="postgres", help="the user Patroni runs as")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        written = render(dict(os.environ), args.out, args.owner, args.template)
    except ConfigError as exc:
        print(f"patroni_config: error: {exc}", file=sys.stderr)
        return 2
    print(f"patroni_config: wrote {', '.join(p.name for p in written)} in {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
