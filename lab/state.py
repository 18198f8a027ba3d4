"""The lab's state directory: settings of the running lab and its secrets (mode 0600)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.topology import COMPOSE_FILE

# Several labs may coexist (e.g. tests beside a user's lab): each has a name that
# prefixes everything it makes; it must start with "pgvpn" so ownership stays visible.
LAB_NAME = os.environ.get("PGVPN_LAB_NAME", "pgvpn")
if not re.fullmatch(r"pgvpn[a-z0-9-]{0,10}", LAB_NAME):
    # at import, so that no code of the lab ever runs under a name it would not own;
    # worded and numbered like every other error of the `lab` command
    print(f"lab: error: PGVPN_LAB_NAME={LAB_NAME!r}: use 'pgvpn' plus up to 10 of [a-z0-9-]",
          file=sys.stderr)
    raise SystemExit(2)
BUILD_LOG = "build.log"
STATE_DIR = Path(os.environ.get("PGVPN_LAB_DIR", f"/var/tmp/{LAB_NAME}-lab"))


@dataclass
class LabSettings:
    backend: str
    mtu: int
    profile: str
    # Agents reach postgres over TLS, verifying its certificate; False (`lab up --no-tls`)
    # lets them connect in plaintext, which is only for measuring what TLS costs.
    tls: bool = True
    # TCP segmentation offload on the agents' TUN devices (PGVPN_OFFLOAD); False
    # (`--offload off`) logs one row per packet on the wire, to measure what it gains.
    offload: bool = True
    # Queue control at the agents' uplinks (PGVPN_QUEUE_TARGET_MS, CoDel's target);
    # 0 (`--queue-control off`) queues whatever TCP sends.
    queue_target_ms: int = 0
    # How agents pick each packet's receiver (PGVPN_ROUTING): "peer", the topology's
    # fixed pairs; "table" (`--routing table`), the owner's routing table (pgvpn.routes).
    routing: str = "peer"
    # The topology file (`lab up --topology FILE`): compose.yaml, or e.g. topologies/fleet.yaml.
    topology: str = str(COMPOSE_FILE)


def settings_path() -> Path:
    return STATE_DIR / "lab.json"


def saved_topology_path() -> Path:
    """The copy of the topology file the running lab was made from: what every later
    command reads, so that editing, moving or deleting the file changes no running lab."""
    return STATE_DIR / "topology.yaml"


def load_settings() -> LabSettings | None:
    try:
        return LabSettings(**json.loads(settings_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save_settings(settings: LabSettings) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(json.dumps(asdict(settings)))


# The password of the owner role (pgvpn.bootstrap.OWNER): the controller's alone, so
# it is no compose secret; compose.yaml's "owner" is the server superuser's.
OWNER_SECRET = "pgvpn-owner"


def secrets_dir() -> Path:
    return STATE_DIR / "secrets"


def ensure_secrets(names: list[str], pgpass_users: dict[str, str]) -> dict[str, str]:
    """Create random passwords once; peers' files are in PGPASSFILE format.

    Returns secret name -> password. Files are 0600 and never printed.
    """
    directory = secrets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords = {}
    for name in names:
        path = directory / name
        if path.exists():
            text = path.read_text().strip()
            passwords[name] = text.rsplit(":", 1)[-1] if name in pgpass_users else text
            continue
        password = secrets.token_urlsafe(24)
        content = (f"*:*:*:{pgpass_users[name]}:{password}\n" if name in pgpass_users
                   else password + "\n")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(content)
        passwords[name] = password
    return passwords


def build_log_path() -> Path:
    """Where image builds write their whole output (apt, debootstrap, Docker)."""
    return STATE_DIR / BUILD_LOG


def remove_state(*, keep_build_log: bool = False) -> None:
    """Remove the lab's state; a failed first `up` keeps the build log it points to."""
    if keep_build_log and build_log_path().exists():
        for entry in STATE_DIR.iterdir():
            if entry.name != BUILD_LOG:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        return
    shutil.rmtree(STATE_DIR, ignore_errors=True)
