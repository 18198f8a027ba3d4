"""A replicated database on the namespace backend: each node runs Patroni in its own
namespace, configured by the same script the Docker image runs
(images/postgres/patroni_config.py), with its named volume a directory of the lab's
state. etcd (the dcs host) needs nothing of its own: it runs as a plain host does."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lab.backends import netnspg
from lab.backends.base import LabError, Progress, run
from lab.topology import ROOT, Host

if TYPE_CHECKING:
    from lab.backends.netns import NetnsBackend

RENDERER = ROOT / "images" / "postgres" / "patroni_config.py"
READY_TIMEOUT = 120.0  # a standby's first start copies the primary (pg_basebackup)
STOP_TIMEOUT = 30.0  # Patroni stops postgres with a checkpoint


def volume_root(backend: NetnsBackend) -> Path:
    return backend.root / "volumes"


def volume_path(backend: NetnsBackend, host: Host, value: str) -> str:
    """A path inside one of the host's named volumes, as it is on this machine: the
    volume is a directory of the lab's state (removed by `lab down`)."""
    for volume, target in host.volumes.items():
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(volume_root(backend) / volume) + value[len(target.rstrip("/")):]
    return value


def node_directory(backend: NetnsBackend, node: Host) -> Path:
    """The node's volume (its /var/lib/pgvpn): data, sockets, Patroni's configuration."""
    if len(node.volumes) != 1:
        raise LabError(f"{node.name}: a database node needs exactly one named volume")
    return volume_root(backend) / next(iter(node.volumes))


def socket_directory(backend: NetnsBackend, node: Host) -> Path:
    return node_directory(backend, node) / "run"


def prepare_volumes(backend: NetnsBackend, host: Host) -> None:
    """Each volume of the host, made once; postgres must reach a node's data below it."""
    for directory in (backend.root.parent, backend.root, volume_root(backend)):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    for volume in host.volumes:
        path = volume_root(backend) / volume
        path.mkdir(exist_ok=True)
        if host.patroni:
            shutil.chown(path, "postgres", "postgres")


def start_node(backend: NetnsBackend, node: Host, progress: Progress) -> None:
    """Render the node's Patroni configuration (as root: it copies the secrets it needs,
    owned by postgres), then run Patroni as postgres; ready when its REST API says its
    postgres runs (the leader's, or a standby's that has copied the primary)."""
    from lab.cluster import Cluster

    bindir = netnspg.postgres_bindir(15)
    if bindir is None:
        raise LabError("PostgreSQL 15's server binaries are missing: apt-get install "
                       "postgresql-15")
    if shutil.which("patroni") is None:
        raise LabError("patroni is missing: run scripts/setup.sh (apt-get install patroni "
                       "python3-etcd)")
    prepare_volumes(backend, node)
    home = node_directory(backend, node)
    env = backend.agent_environment(node)
    env.update({"PGVPN_SOCKET_DIR": str(socket_directory(backend, node)),
                # the socket directory is postgres's own: root connects as postgres there
                "PGVPN_LOCAL_AUTH": "trust", "HOME": str(home),
                "PATH": f"{bindir}:{env['PATH']}"})
    config = home / "patroni.d"
    run([sys.executable, str(RENDERER), "--out", str(config), "--owner", "postgres"],
        env=env).check(f"writing {node.name}'s Patroni configuration")
    progress(f"starting {node.name} (Patroni)")
    backend.spawn(node.name, [*netnspg.AS_POSTGRES, "patroni", str(config)], env)
    cluster = Cluster(backend, backend.topology)

    def running() -> bool:
        try:
            status, _ = cluster.request("/health", via=node)
        except LabError:
            return False
        return status == 200

    backend.wait_started(node.name, ready=running,
                         alive=lambda: backend.service_pid(node.name) is not None,
                         condition="run postgres under Patroni", timeout=READY_TIMEOUT,
                         poll=0.5)


def stop_node(backend: NetnsBackend, node: Host, *, kill: bool) -> None:
    """A clean stop (SIGTERM: Patroni stops postgres, handing the lead over), or a crash:
    SIGKILL to every process of the namespace at once, as a container's death."""
    pid = backend.service_pid(node.name)
    namespace = backend.namespace(node.name)
    if pid is not None and not kill:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while backend.service_pid(node.name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (pids := namespace_pids(namespace)) and time.monotonic() < deadline:
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reaps it if we are its parent
        time.sleep(0.1)
    if namespace_pids(namespace):
        raise LabError(f"processes of {node.name} survived SIGKILL")
    (backend.root / f"{node.name}.pid").unlink(missing_ok=True)


def namespace_pids(namespace: str) -> list[int]:
    return [int(p) for p in run(["ip", "netns", "pids", namespace]).stdout.split()]
