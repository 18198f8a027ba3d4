"""The agent: one TUN device, two pumps (TUN -> database, database -> TUN), a control loop.

Where things happen:
- packets are read from the TUN in `Agent.pump_up`, written to it in `Agent.pump_down`;
- with routing 'table', `Agent.pump_up` picks each packet's receiver (pgvpn.routing)
  and the control loop follows the owner's route changes (kernel routes included);
- how they are committed and read back is the transport profile's business
  (pgvpn.transports); this module never writes SQL for the data path;
- the control connection registers the peer, keeps partitions ahead and heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING

import psycopg

from pgvpn import db, dbhosts, locks, migrate, tlspolicy
from pgvpn.admin import role_name
from pgvpn.badinput import BadInputLog
from pgvpn.config import HEARTBEAT_SECONDS, AgentConfig, check_database_hosts
from pgvpn.errors import PgvpnError
from pgvpn.packets import packet_problem
from pgvpn.queuecontrol import CoDel, UplinkReads
from pgvpn.routing import ROUTES_MIN_INTERVAL, RouteFollower, RoutingTable, destination
from pgvpn.transports import PROFILES, Downlink, Session, Uplink
from pgvpn.transports.base import Counters
from pgvpn.tun import TunDevice

if TYPE_CHECKING:
    from pgvpn.metrics import MetricsServer

log = logging.getLogger("pgvpn.agent")

MAINTENANCE_RETRY = 60.0  # seconds until a failed log maintenance is tried again
STATS_EVERY = 1.0


class Agent:
    control: psycopg.Connection  # heartbeat and maintenance; replaced after a loss

    def __init__(self, config: AgentConfig) -> None:
        check_database_hosts(config)
        self.config = config
        self.profile = PROFILES[config.profile]
        self.mtu = self.profile.default_mtu(config.mtu)
        self.session = Session(config)
        self.dropped_from_tun = 0
        # CoDel at the uplink (pgvpn.queuecontrol), if PGVPN_QUEUE_TARGET_MS asks for it
        self.queue = CoDel(config.queue_target_ms / 1000) if config.queue_target_ms else None
        self.skipped_rows = 0
        self.bad_frames = BadInputLog(f"dropped frames read from {config.tun_name} that are "
                                      "not IPv4/IPv6 packets")
        senders = config.peer if config.routing == "peer" else "its senders"
        self.bad_rows = BadInputLog(f"skipped logged rows from {senders} that are not "
                                    "packets for this TUN")
        if config.routing == "table" and not self.profile.routes_by_table:
            raise PgvpnError(f"profile {config.profile} carries one fixed pair of peers, as "
                             "in the blog's posts: set PGVPN_PEER with PGVPN_ROUTING unset or "
                             "'peer', or use profile batched to route by the owner's table")
        # routing 'table': follows the owner's routes (None: every packet to `peer`)
        self.routes: RouteFollower | None = None
        self.unrouted = 0
        self.unrouted_log = BadInputLog(f"dropped packets read from {config.tun_name} to an "
                                        "address no other peer routes")
        self.failure: BaseException | None = None
        self.uplink: Uplink | None = None
        self.downlink: Downlink | None = None
        self.started_at: datetime | None = None  # the database's clock, at _register
        self.heartbeat_ok = False  # the last heartbeat reached the database

    @property
    def stop(self) -> threading.Event:
        return self.session.stop

    def run(self) -> None:
        """Run until SIGTERM/SIGINT or a fatal error; raises PgvpnError on the latter.

        The metrics server comes first: a port that is taken stops the agent before it
        touches the database or the TUN device."""
        metrics = self._serve_metrics()
        try:
            self._run()
        finally:
            if metrics is not None:
                metrics.close()

    def _run(self) -> None:
        # The agent only checks the schema (the owner migrates): every wait is bounded.
        control = self.control = self.session.connect("control", statements=True)
        with control:
            migrate.require_current(control)
            self._check_identity(control)
            maintained = self._housekeep("partition maintenance at start",
                                         self._ensure_partitions, MAINTENANCE_RETRY)
            security = tlspolicy.describe(control)
            risk = tlspolicy.risks(control)
            if risk:
                log.warning("peer %s: %s", self.config.name, risk)
            offload = self.config.offload and self.profile.carries_offload
            with TunDevice(self.config.tun_name, self.mtu, offload=offload) as tun:
                addresses = [self.config.tun_ip]
                if self.config.tun_ip6 is not None:
                    addresses.append(self.config.tun_ip6)
                tun.configure(addresses)
                if self.config.routing == "table":
                    databases, problems = dbhosts.addresses(self.config.database_url)
                    for problem in problems:
                        log.warning("routes: %s: no route guards it", problem)
                    self.routes = RouteFollower(self.config.name, tun, addresses, databases)
                    self.routes.follow(control)  # read before any packet is
                self.session.offload = tun.offload
                uplink = self.profile.open_uplink(self.session)
                downlink = self.profile.open_downlink(self.session)
                self.uplink, self.downlink = uplink, downlink  # for the metrics
                # Registered only now that the links hold this peer's locks: an agent
                # refused as a duplicate never touches the running one's row.
                self._register(self.control)
                log.info("peer %s: %s on %s (%s, mtu %d, %s) -> %s via %s (%s), "
                         "profile %s, %s commit", self.config.name, tun.name,
                         ", ".join(map(str, addresses)), "v4+v6" if len(addresses) > 1 else
                         "v4" if self.config.tun_ip.version == 4 else "v6", self.mtu,
                         self._describe_offload(tun),
                         f"peer {self.config.peer} ({self.config.tun_peer})"
                         if self.routes is None else
                         "the peers of the owner's routing table (pgvpn.routes)",
                         db.describe_target(self.config.database_url), security,
                         self.profile.name,
                         "synchronous" if self.config.synchronous_commit else "asynchronous")
                threads = [
                    threading.Thread(target=self._guard, args=(self.pump_up, tun, uplink),
                                     name="pump-up", daemon=True),
                    threading.Thread(target=self._guard, args=(self.pump_down, tun, downlink),
                                     name="pump-down", daemon=True),
                ]
                for thread in threads:
                    thread.start()
                try:
                    self._control_loop(uplink, downlink, maintained)
                finally:
                    self.stop.set()
                    for thread in threads:
                        thread.join(timeout=5)
                    uplink.close()
                    downlink.close()
                    self._last_heartbeat()
        if self.failure is not None:
            if isinstance(self.failure, PgvpnError):
                raise self.failure
            raise PgvpnError(f"agent stopped: {self.failure!r}") from self.failure
        log.info("peer %s: stopped; sent %d packets, received %d", self.config.name,
                 uplink.counters.packets, downlink.counters.packets)

    def _describe_offload(self, tun: TunDevice) -> str:
        """The TUN's offload, and the uplink's queue control if any, for the start line."""
        queue = (f", queue control {self.config.queue_target_ms} ms"
                 if self.config.queue_target_ms else "")
        return self._offload_state(tun) + queue

    def _offload_state(self, tun: TunDevice) -> str:
        if tun.offload:
            return "offload on"
        if tun.offload_refused:
            return f"offload off: {tun.offload_refused}"
        if not self.profile.carries_offload:
            return f"offload off: profile {self.profile.name} logs one packet per row"
        return "offload off: PGVPN_OFFLOAD=false"

    def _serve_metrics(self) -> MetricsServer | None:
        """Prometheus metrics on --metrics-listen, read from the pumps' own counters
        (zero until the links are open)."""
        if not self.config.metrics_listen:
            return None
        from pgvpn.metrics import MetricsServer, Readings  # late: only when asked for

        def read() -> Readings:
            up, down = self._counters()
            remote = self.config.peer if self.config.routing == "peer" else ""
            return Readings(self.config.name, remote or "", up, down,
                            self.dropped_from_tun, self.skipped_rows, self.unrouted,
                            self.queue.drops if self.queue is not None else 0)

        return MetricsServer(self.config.metrics_listen, read)

    def _counters(self) -> tuple[Counters, Counters]:
        """The links' counters (up, down) as they are now: zero until they are open."""
        return (self.uplink.counters if self.uplink is not None else Counters(),
                self.downlink.counters if self.downlink is not None else Counters())

    def _guard(self, pump: object, tun: TunDevice, link: Uplink | Downlink) -> None:
        """Run a pump; its error stops the whole agent: one that says what to do
        (PgvpnError) as that one line, an unexpected one loudly, with its traceback."""
        try:
            pump(tun, link)  # type: ignore[operator]
        except PgvpnError as exc:  # says what to do: run() raises it, the CLI prints it
            self.failure = exc
            self.stop.set()
        except BaseException as exc:
            log.exception("%s failed", threading.current_thread().name)
            self.failure = exc
            self.stop.set()

    def pump_up(self, tun: TunDevice, uplink: Uplink) -> None:
        """TUN -> database: read every packet queued, send them as one batch (with
        queue control: CoDel may drop one, and sparse flows go in a batch of their own
        first; pgvpn.queuecontrol)."""
        reads = UplinkReads(tun, self.config.batch_packets, self.queue)
        while not self.stop.is_set():
            packets = self._valid_packets(tun, reads.read(0.2))
            for batch in reads.batches(packets):
                self._send(tun, uplink, batch)

    def _valid_packets(self, tun: TunDevice, frames: list[bytes]) -> list[bytes]:
        """The frames that are IP packets; the others are counted and reported."""
        packets = []
        for frame in frames:
            problem = packet_problem(tun.packet_of(frame))
            if problem is None:
                packets.append(frame)
            else:
                self.dropped_from_tun += 1
                self.bad_frames.report(problem)
        return packets

    def _send(self, tun: TunDevice, uplink: Uplink, packets: list[bytes]) -> None:
        """One batch to the fixed peer, or one per receiver by the routing table."""
        if self.routes is None:
            uplink.send(packets)
            return
        # the control loop may swap in a newer table meanwhile: one table a batch
        for receiver, group in self._route(tun, self.routes.table, packets).items():
            uplink.send_to(receiver, group)

    def _route(self, tun: TunDevice, routing: RoutingTable, frames: list[bytes]
               ) -> dict[str, list[bytes]]:
        """The frames by receiver, each group in the order read; a packet to no other
        peer's route is counted and dropped (the agent never guesses)."""
        groups: dict[str, list[bytes]] = {}
        for frame in frames:
            packet = tun.packet_of(frame)
            receiver = routing.receiver_of(packet)
            if receiver is None:
                self.unrouted += 1
                self.unrouted_log.report(f"to {destination(packet)}")
            else:
                groups.setdefault(receiver, []).append(frame)
        return groups

    def pump_down(self, tun: TunDevice, downlink: Downlink) -> None:
        """Database -> TUN: write each committed packet addressed to us."""
        counters = downlink.counters
        while not self.stop.is_set():
            for frame in downlink.receive(timeout=0.5):
                problem = tun.frame_problem(frame)
                if problem is None:
                    try:
                        if tun.write(frame):
                            counters.add_delivered(len(tun.packet_of(frame)))
                    except OSError as exc:  # what the checks missed; the kernel decides
                        problem = f"the TUN device refused it: {exc.strerror}"
                if problem is not None:
                    self._skip_row(problem)
            for problem in downlink.take_unfetched():
                self._skip_row(problem)

    def _skip_row(self, problem: str) -> None:
        self.skipped_rows += 1
        self.bad_rows.report(problem)

    def _check_identity(self, control: psycopg.Connection) -> None:
        """The database knows each peer by its role: make sure it is this peer's.

        Packets are logged with the role's peer as sender, whatever this agent's
        settings say, so a mismatch would send (and read) as the wrong peer.
        """
        row = control.execute("SELECT pgvpn.current_peer(), session_user").fetchone()
        peer, role = row if row else (None, "?")
        expected = role_name(self.config.name)
        if peer is None:
            raise PgvpnError(f"connected as role {role}, which is no peer's role: peer "
                             f"{self.config.name} connects as {expected} (the database owner "
                             f"creates it with 'pgvpn db add-peer {self.config.name}')")
        if peer != self.config.name:
            raise PgvpnError(f"connected as role {role}, the role of peer {peer}, but this "
                             f"agent is peer {self.config.name}: connect as {expected}, or "
                             f"set name to {peer}")

    def _register(self, control: psycopg.Connection) -> None:
        """This peer's row, as `pgvpn show` reads it: addresses, and an agent started now
        that has carried nothing yet (the owner made the row; an older one may not have)."""
        v4, v6 = self._addresses()
        row = control.execute(
            "INSERT INTO pgvpn.peers (name, tunnel_addr, tunnel_addr6, last_seen, "
            "agent_started) VALUES (%s, %s, %s, now(), now()) "
            "ON CONFLICT (name) DO UPDATE SET tunnel_addr = EXCLUDED.tunnel_addr, "
            "tunnel_addr6 = EXCLUDED.tunnel_addr6, last_seen = EXCLUDED.last_seen, "
            "agent_started = EXCLUDED.agent_started, sent_packets = 0, sent_bytes = 0, "
            "received_packets = 0, received_bytes = 0 RETURNING agent_started",
            [self.config.name, v4, v6]).fetchone()
        self.started_at = row[0] if row else None
        self.heartbeat_ok = True

    def _addresses(self) -> tuple[str, str | None]:
        address6 = self.config.tun_ip6
        return str(self.config.tun_ip.ip), str(address6.ip) if address6 is not None else None

    def _ensure_partitions(self, control: psycopg.Connection) -> None:
        """Partitions ahead. The wait for another session's maintenance lock is bounded
        (lock_timeout) and says whom it waits for, so that it is never silent (a peer
        may not take the lock itself, sql/007: it looks for a holder instead)."""
        held_by = "; ".join(map(str, locks.holders(control, locks.MAINTENANCE_LOCK)))
        if held_by:
            log.warning("partition maintenance: waiting up to %gs for the lock %s, held by %s",
                        self.config.lock_timeout, locks.MAINTENANCE_LOCK, held_by)
        control.execute("SELECT pgvpn.ensure_partitions()")

    def _housekeep(self, job: str, action: Callable[[psycopg.Connection], object],
                   retry_in: float) -> bool:
        """Run a housekeeping job on the control connection; True if it succeeded.

        A failure is logged and the job tried again later, never raised: only the
        data path's own fatal errors stop the agent. A lost control connection is
        replaced (or, if the database is unreachable, on a later try).
        """
        try:
            action(self.control)
            return True
        except psycopg.Error as exc:
            lost = db.is_connection_lost(exc)
            log.warning("%s failed: %s%s; trying again in %gs", job, db.explain(exc),
                        " (control connection lost)" if lost else "", retry_in)
            if lost:
                self.control.close()
                try:
                    self.control = self.session.connect("control", attempts=1,
                                                        statements=True)
                except (PgvpnError, psycopg.Error) as again:
                    log.warning("control connection: %s", again)
            return False

    def _heartbeat(self, control: psycopg.Connection, *, stopping: bool = False) -> None:
        """last_seen, and the whole report `pgvpn show` reads (so that a row another
        process overwrote is right again within a beat); the last one, `stopping`,
        says the agent is gone (agent_started NULL)."""
        up, down = self._counters()
        v4, v6 = self._addresses()
        control.execute(
            "UPDATE pgvpn.peers SET last_seen = now(), tunnel_addr = %s, tunnel_addr6 = %s, "
            "agent_started = %s, sent_packets = %s, sent_bytes = %s, received_packets = %s, "
            "received_bytes = %s WHERE name = %s",
            [v4, v6, None if stopping else self.started_at, up.packets, up.bytes,
             down.packets, down.bytes, self.config.name])

    def _last_heartbeat(self) -> None:
        """Final counts and 'stopped', once the pumps are done; only over a control
        connection whose last heartbeat went through, so that a database that is gone
        cannot hold the exit up (a row left to age says 'not responding' instead)."""
        if self.heartbeat_ok:
            with contextlib.suppress(psycopg.Error):
                self._heartbeat(self.control, stopping=True)
        self.control.close()  # a reconnected one; closing the original again is harmless

    def _control_loop(self, uplink: Uplink, downlink: Downlink, maintained: bool) -> None:
        """Heartbeat, log maintenance, debug counters, and in routing 'table' the
        owner's route changes; cheap and rare by design."""
        interval = self.config.maintenance_interval
        next_heartbeat = next_stats = next_routes = time.monotonic()
        next_maintenance = next_heartbeat + (interval if maintained
                                             else min(interval, MAINTENANCE_RETRY))
        while not self.stop.is_set():
            if self.routes is None or not self.heartbeat_ok or time.monotonic() < next_routes:
                self.stop.wait(0.2)
            elif self._housekeep("following the routing table", self.routes.follow,
                                 HEARTBEAT_SECONDS):
                next_routes = self.routes.read_at + ROUTES_MIN_INTERVAL
            else:
                next_routes = time.monotonic() + HEARTBEAT_SECONDS
            if self.stop.is_set():
                break
            now = time.monotonic()
            if now >= next_heartbeat:
                self.heartbeat_ok = self._housekeep("heartbeat", self._heartbeat,
                                                    HEARTBEAT_SECONDS)
                next_heartbeat = now + HEARTBEAT_SECONDS
            if now >= next_maintenance:
                retry_in = min(interval, MAINTENANCE_RETRY)
                done = self._housekeep("partition maintenance", self._ensure_partitions,
                                       retry_in)
                next_maintenance = now + (interval if done else retry_in)
            for bad in (self.bad_frames, self.bad_rows, self.unrouted_log):  # a burst's count
                if now >= bad.next_at:
                    bad.flush()
            if now >= next_stats and log.isEnabledFor(logging.DEBUG):
                up, down = uplink.counters, downlink.counters
                log.debug("up %d pkts %d B %d batches | down %d pkts %d B %d batches | "
                          "dropped %d skipped %d reconnects %d", up.packets, up.bytes,
                          up.batches, down.packets, down.bytes, down.batches,
                          self.dropped_from_tun, self.skipped_rows,
                          up.reconnects + down.reconnects)
                next_stats = now + STATS_EVERY


def install_signal_handlers(agent: Agent) -> None:
    """SIGTERM and SIGINT ask the agent to stop cleanly (TUN removed, cursor saved)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        agent.stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
