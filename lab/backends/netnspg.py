"""PostgreSQL in the namespace backend's database host: its binaries, its data
directory, and the access and TLS settings written at every start (as the Docker
image's entrypoint does in its container)."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from lab import state
from lab.backends.base import LabError, run
from lab.topology import SECRETS_DIR, Host, Topology

AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
POSTGRES_SETTINGS = """
# pgvpn lab: tuned for a packet log on a small machine
shared_buffers = 256MB
wal_buffers = 16MB
max_wal_size = 2GB
checkpoint_timeout = 15min
max_connections = 50
synchronous_commit = on
log_min_messages = warning
# Dead clients noticed within seconds, not the kernel's 2 h: their sessions end and
# release the sender's and receiver's advisory locks (README "Liveness").
tcp_keepalives_idle = 10
tcp_keepalives_interval = 5
tcp_keepalives_count = 3
tcp_user_timeout = 30s
client_connection_check_interval = 5s
"""


def postgres_bindir(version: int | None = None) -> Path | None:
    """The newest installed PostgreSQL server's bin directory (or that of `version`)."""
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/{version or '*'}/bin/postgres"),
                        key=lambda p: int(Path(p).parent.parent.name))
    return Path(candidates[-1]).parent if candidates else None


def initdb(bindir: Path, data: Path, sockets: Path, port: int) -> None:
    """A new data directory, owned by postgres, with the lab's settings."""
    for directory in (data, sockets):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "postgres", "postgres")
        directory.chmod(0o700)  # sockets: only root and postgres may connect
    run([*AS_POSTGRES, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
         "-E", "UTF8", "--auth-local=trust", "--auth-host=scram-sha-256"],
        timeout=120).check("initdb")
    # every address of its namespace, which has only its links and loopback: a
    # network a larger topology links later is listened on as it appears
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(POSTGRES_SETTINGS + "listen_addresses = '*'\n"
                   f"unix_socket_directories = '{sockets}'\nport = {port}\n")


def configure(data: Path, host: Host, topology: Topology) -> bool:
    """Write pg_hba.conf and the TLS files as compose.yaml's environment says.

    As the Docker image's entrypoint does: PGVPN_SSL=require accepts agents over
    TLS only, `on` also in plaintext, `off` offers no TLS. Done at every start
    (and on `lab up` of a running lab), so a changed setting takes effect.
    Returns True if anything changed.
    """
    ssl = host.environment.get("PGVPN_SSL", "off")
    kinds = {"require": ["hostssl"], "on": ["hostssl", "hostnossl"], "off": ["host"]}
    if ssl not in kinds:
        raise LabError(f"PGVPN_SSL={ssl!r} in compose.yaml: use off, on or require")
    # the networks the file lets agents connect from, as the image's entrypoint reads them
    subnets = (host.environment.get("PGVPN_HBA_CIDRS", "").split()
               or [str(n.subnet) for n in topology.networks.values()])
    hba = ["# written by the lab at every start (lab/backends/netnspg.py)", "local all all trust"]
    hba += [f"{kind} pgvpn +pgvpn_agent {subnet} scram-sha-256"
            for subnet in subnets for kind in kinds[ssl]]
    files = {data / "pg_hba.conf": ("\n".join(hba) + "\n").encode()}
    if ssl != "off":
        for variable, target in (("PGVPN_SSL_CERT_FILE", "server.crt"),
                                 ("PGVPN_SSL_KEY_FILE", "server.key")):
            source = local_path(host.environment.get(variable, ""))
            if not source.is_file():
                raise LabError(f"{variable}: {source} is missing; 'lab up' makes it")
            files[data / target] = source.read_bytes()
    changed = False
    for path, content in files.items():
        if path.exists() and path.read_bytes() == content:
            continue
        # postgres refuses a key that others may read: 0600 from the first byte
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
        shutil.chown(path, "postgres", "postgres")
        changed = True
    return changed

def local_path(value: str) -> Path:
    """Where a compose secret (/run/secrets/NAME) is on this host: the lab's secrets."""
    if value.startswith(SECRETS_DIR + "/"):
        return state.secrets_dir() / value.removeprefix(SECRETS_DIR + "/")
    return Path(value)
