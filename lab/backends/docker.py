"""The Docker backend: compose.yaml brings the topology up and down; the docker SDK
does health, exec, logs and the label-based inventory.

Everything the lab makes carries the label io.pgvpn.project=<lab name>, and `destroy`
finds what to remove by that label alone, so it works even after a crash.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import state, tls
from lab.backends.base import (
    SCRATCH_HOST,
    TUN_DEVICE,
    Backend,
    ExecResult,
    HostState,
    LabError,
    Progress,
    run,
)
from lab.topology import LABEL, ROOT, Host, Topology, session_attrs
from pgvpn import bootstrap

PUBLIC_BASE = "debian:bookworm-slim"
LOCAL_BASE = "pgvpn/debian:bookworm"
BUILD_ERROR_LINES = 15  # of the build log, in the error of a failed build
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 10
PATRONI_STOP_TIMEOUT = 30


IMAGE_SOURCES = ("pyproject.toml", "services", "sql", "images")


def source_digest() -> str:
    """A short hash of every file the images are built from."""
    digest = hashlib.sha256()
    for top in IMAGE_SOURCES:
        base = ROOT / top
        paths = sorted(base.rglob("*")) if base.is_dir() else [base]
        for path in paths:
            relative = path.relative_to(ROOT)
            if path.is_file() and ".wheelhouse" not in relative.parts \
                    and "__pycache__" not in relative.parts:
                digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else `docker-compose` (v1), else None."""
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, topology: Topology, env: dict[str, str] | None = None) -> None:
        super().__init__(topology, env)
        self._client: Any = None
        # Images are tagged by what they are built from: the same sources give the same
        # tag, so `lab up` on a healthy lab rebuilds and recreates nothing, and a changed
        # agent can never hide behind an old image of the same name.
        self.env.setdefault("PGVPN_IMAGE_TAG", source_digest())

    # ----------------------------------------------------------------- engine
    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=30)
                self._client.ping()
            except docker.errors.DockerException as exc:
                self._client = None
                raise LabError(self._engine_problem(exc)) from None
        return self._client

    @staticmethod
    def _engine_problem(exc: Exception) -> str:
        text = str(exc)
        if "Permission denied" in text:
            return ("permission denied on the Docker socket: run as root or join the "
                    "'docker' group")
        if "No such file" in text or "Connection refused" in text:
            return "no Docker engine answers (is dockerd running? is DOCKER_HOST right?)"
        return f"the Docker engine cannot be used: {text}"

    def available(self) -> str | None:
        try:
            import docker  # noqa: F401
        except ImportError:
            return "the docker Python SDK is not installed (pip install docker)"
        try:
            self.client  # noqa: B018  (connects and pings)
        except LabError as exc:
            return str(exc)
        if compose_command() is None:
            return "neither 'docker compose' nor 'docker-compose' is installed"
        if not Path("/dev/net/tun").exists():
            return "/dev/net/tun is missing on the Docker host: modprobe tun"
        return None

    def compose_argv(self, *args: str) -> list[str]:
        command = compose_command()
        if command is None:
            raise LabError("neither 'docker compose' nor 'docker-compose' is installed")
        return [*command, "--project-directory", str(ROOT), "-f", str(self.topology.path),
                "-p", state.LAB_NAME, *args]

    def compose(self, *args: str, timeout: float = 600) -> ExecResult:
        return run(self.compose_argv(*args), timeout=timeout, env=self.env)

    def build_step(self, what: str, argv: list[str], timeout: float) -> None:
        """Run one step of an image build with its whole output (hundreds of lines of
        apt, debootstrap and Docker) appended to the build log; a failure says which
        step, shows the log's last lines and where the rest is."""
        path = state.build_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as build_log:
            build_log.write(f"\n===== {what}: {' '.join(argv)}\n")
            build_log.flush()
            start = build_log.tell()  # the error shows this step's lines only
            try:
                done = subprocess.run(argv, env=self.env, timeout=timeout, check=False,
                                      stdin=subprocess.DEVNULL, stdout=build_log,
                                      stderr=subprocess.STDOUT)
            except subprocess.TimeoutExpired:
                raise LabError(f"{what} did not finish within {timeout:.0f}s; its output: "
                               f"{path}") from None
        if done.returncode != 0:
            with path.open("rb") as build_log:
                build_log.seek(start)
                step_output = build_log.read().decode(errors="replace")
            tail = step_output.splitlines()[-BUILD_ERROR_LINES:]
            raise LabError(f"{what} failed (exit {done.returncode}); its last lines:\n"
                           + "\n".join(tail) + f"\nthe whole build log: {path}")

    # ----------------------------------------------------------------- images
    def _base_image(self, progress: Progress) -> str:
        """The public base where a registry answers; else one made here by debootstrap."""
        import docker

        for image in (PUBLIC_BASE, LOCAL_BASE):
            try:
                self.client.images.get(image)
                return image
            except docker.errors.ImageNotFound:
                pass
        progress(f"pulling {PUBLIC_BASE}")
        try:
            self.client.images.pull(PUBLIC_BASE)
            return PUBLIC_BASE
        except docker.errors.APIError:
            progress(f"no registry answers: building {LOCAL_BASE} locally with debootstrap "
                     f"(a few minutes, once; output in {state.build_log_path()})")
        self.build_step(f"building the local base image {LOCAL_BASE}",
                        [str(ROOT / "scripts" / "make-base-image.sh")], timeout=1800)
        return LOCAL_BASE

    def _images_present(self) -> bool:
        import docker

        for service in self.topology.hosts:
            name = "pgvpn-agent" if self.topology.hosts[service].role in ("agent", "host") \
                else "pgvpn-postgres"  # the database image runs etcd too
            try:
                self.client.images.get(f"{name}:{self.env['PGVPN_IMAGE_TAG']}")
            except docker.errors.ImageNotFound:
                return False
        return True

    def build_images(self, progress: Progress) -> None:
        if self._images_present():
            return
        state.build_log_path().unlink(missing_ok=True)  # this build's output only
        self.env["PGVPN_BASE_IMAGE"] = self._base_image(progress)
        progress("building the wheelhouse (pgvpn and its dependencies)")
        self.build_step("building the wheelhouse",
                        [str(ROOT / "scripts" / "build-wheelhouse.sh")], timeout=900)
        progress(f"building images from {self.env['PGVPN_BASE_IMAGE']} "
                 f"(output in {state.build_log_path()})")
        self.build_step("building the images", self.compose_argv("build"), timeout=1800)

    def remove_images(self, progress: Progress) -> None:
        """Every image pgvpn built (agent, postgres, every tag, and the local base), but
        one a container still uses: another lab's, which must keep running. The base
        goes last, once nothing is built on it."""
        import docker

        in_use: dict[str, str] = {}
        for container in self.client.containers.list(all=True):
            in_use.setdefault(container.attrs["Image"], container.name)
        images = self.client.images.list(filters={"label": f"{LABEL}=pgvpn"})
        images.sort(key=lambda image: LOCAL_BASE in image.tags)
        for image in images:
            name = ", ".join(image.tags) or image.short_id
            if image.id in in_use:
                progress(f"keeping image {name}: container {in_use[image.id]} uses it")
                continue
            progress(f"removing image {name}")
            try:
                self.client.images.remove(image.id, force=True)
            except docker.errors.APIError as exc:  # e.g. a child image built elsewhere
                progress(f"keeping image {name}: {exc.explanation or exc}")

    # ------------------------------------------------------------- lifecycle
    def create(self, progress: Progress) -> None:
        self.build_images(progress)

    def start(self, host: Host, progress: Progress) -> None:
        progress(f"starting {host.name}")
        # up -d recreates the container when its settings (mtu, profile) changed
        self.compose("up", "-d", "--no-deps", "--no-build", host.name).check(
            f"starting {host.name}")
        self.wait_started(host.name, ready=lambda: self._ready(host),
                          alive=lambda: self._alive(host.name),
                          condition=f"bring its TUN device {TUN_DEVICE} up"
                          if host.role == "agent" else "become ready",
                          timeout=READY_TIMEOUT, poll=0.3)

    def _alive(self, host: str) -> bool:
        container = self._container(host)
        return container is not None and container.status not in {"exited", "dead"}

    def _ready(self, host: Host) -> bool:
        container = self._container(host.name)
        if container is None or container.status != "running":
            return False
        if host.role != "agent":  # its healthcheck says it is ready (a plain host may
            health = container.attrs["State"].get("Health", {}).get("Status")  # have none)
            return health == "healthy" or (health is None and host.role == "host")
        try:
            return bool(self.tunnel_addresses(host.name))
        except LabError:  # it stopped between the two looks: wait_started asks alive()
            return False

    def stop(self, host: Host) -> None:
        # Patroni stops postgres with a checkpoint, and hands the lead over first
        grace = PATRONI_STOP_TIMEOUT if host.patroni else STOP_TIMEOUT
        self.compose("stop", "-t", str(grace), host.name).check(f"stopping {host.name}")

    def kill(self, host: Host) -> None:
        container = self._container(host.name)
        if container is not None and container.status == "running":
            container.kill(signal="SIGKILL")
            container.wait(timeout=STOP_TIMEOUT)

    def destroy(self, progress: Progress) -> None:
        label = {"label": f"{LABEL}={state.LAB_NAME}"}
        for container in self.client.containers.list(all=True, filters=label):
            progress(f"removing container {container.name}")
            container.remove(force=True)
        for network in self.client.networks.list(filters=label):
            progress(f"removing network {network.name}")
            network.remove()
        for volume in self.client.volumes.list(filters=label):
            progress(f"removing volume {volume.name}")
            volume.remove(force=True)

    # ------------------------------------------------------------ operations
    def ensure_scratch_host(self, progress: Progress) -> str:
        """A container of the agent image with no network at all, for replays."""
        if self._container(SCRATCH_HOST) is None:
            progress(f"container {state.LAB_NAME}-{SCRATCH_HOST} (scratch host for replays, "
                     "no network)")
            self.client.containers.run(
                f"pgvpn-agent:{self.env['PGVPN_IMAGE_TAG']}", ["infinity"],
                entrypoint=["sleep"], name=f"{state.LAB_NAME}-{SCRATCH_HOST}", detach=True,
                network_mode="none", cap_add=["NET_ADMIN"], devices=["/dev/net/tun"],
                sysctls={"net.ipv6.conf.all.disable_ipv6": "0"},
                labels={LABEL: state.LAB_NAME, "com.docker.compose.service": SCRATCH_HOST})
        container = self._container(SCRATCH_HOST)
        if container is None or container.status != "running":
            raise LabError(f"the scratch container did not start: {self.logs(SCRATCH_HOST, 5)}")
        return SCRATCH_HOST

    def _container(self, host: str) -> Any:
        if host not in self.topology.hosts and host != SCRATCH_HOST:
            raise LabError(f"no host {host!r} in the lab; hosts: {', '.join(self.topology.hosts)}")
        found = self.client.containers.list(all=True, filters={"label": [
            f"{LABEL}={state.LAB_NAME}", f"com.docker.compose.service={host}"]})
        if found:
            found[0].reload()
        return found[0] if found else None

    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 60) -> ExecResult:
        import docker
        import requests

        container = self._container(host)
        if container is None or container.status != "running":
            raise LabError(f"{host} is not running; see 'lab status'")
        api = docker.APIClient(timeout=timeout + 5)  # the HTTP timeout bounds the exec
        try:
            exec_id = api.exec_create(container.id, list(argv), stdout=True, stderr=True)
            stdout, stderr = api.exec_start(exec_id, demux=True)
            code = api.exec_inspect(exec_id)["ExitCode"]
        except requests.exceptions.ReadTimeout:
            raise LabError(f"{' '.join(argv[:4])} in {host} did not finish within "
                           f"{timeout:.0f}s") from None
        finally:
            api.close()
        return ExecResult(int(code), (stdout or b"").decode(errors="replace"),
                          (stderr or b"").decode(errors="replace"))

    def logs(self, host: str, tail: int = 100) -> str:
        container = self._container(host)
        if container is None:
            return ""
        return str(container.logs(tail=tail).decode(errors="replace"))

    def admin_conninfo(self, dbname: str = "pgvpn", *, superuser: bool = False,
                       replica: bool = False) -> str:
        # every node's address on the first agent's network: the host reaches it (as
        # that network's gateway), and the node admits clients from it as it does agents
        first_agent = self.topology.agents[0]
        addresses = ",".join(str(self.topology.database_address_for(first_agent, node))
                             for node in self.topology.databases)
        # compose.yaml's secret "owner" is the server's superuser (postgres) password.
        user, secret = (("postgres", "owner") if superuser
                        else (bootstrap.OWNER, state.OWNER_SECRET))
        password = (state.secrets_dir() / secret).read_text().strip()
        # The operator's connection crosses the lab's network too: TLS, verified.
        return (f"host={addresses} port=5432 user={user} dbname={dbname} "
                f"password={password} sslmode=verify-full "
                f"sslrootcert={state.secrets_dir() / tls.CA_CERT}"
                + session_attrs(self.topology, replica))

    def exists(self) -> bool:
        label = {"label": f"{LABEL}={state.LAB_NAME}"}
        return bool(self.client.containers.list(all=True, filters=label)
                    or self.client.networks.list(filters=label)
                    or self.client.volumes.list(filters=label))

    def states(self) -> list[HostState]:
        result = []
        for host in self.topology.hosts.values():
            container = self._container(host.name)
            running = container is not None and container.status == "running"
            health = (container.attrs["State"].get("Health", {}).get("Status", "")
                      if container is not None else "")
            result.append(HostState(
                host.name, host.role, running,
                {net: str(addr) for net, addr in host.addresses.items()},
                self.tunnel_addresses(host.name) if running and host.role == "agent" else [],
                f"container {container.name}" + (f", {health}" if health else "")
                if container is not None else "container missing"))
        return result
