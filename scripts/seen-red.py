#!/usr/bin/env python3
"""Show that the integration tests catch what they promise to: break the code on
purpose, one break at a time, run the test that holds that promise, and expect it red.

Each break replaces one exact piece of the source (it must occur exactly once) and is
undone before the next, whatever happens. The pgTAP checks have their own breaks
(tests/weakenings.py, run in every CI); mutation testing covers the pure modules
(scripts/mutation.sh). This covers the promises only a running lab can show. It is
slow (a lab per break, about a minute each), so it is run by hand:

    scripts/seen-red.py            # every break
    scripts/seen-red.py NAME ...   # some of them (names: --list)

Exit status 0 only if every break turned its test red.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
# its own lab: yours, and the test suite's, are never touched (PGVPN_SEEN_RED_LAB names
# another, for two runs side by side)
LAB_NAME = os.environ.get("PGVPN_SEEN_RED_LAB", "pgvpn-red")
# What a broken build may leave behind (a break of the rollback leaves a whole lab):
# the session's labs and tests/test_docker_lab.py's.
LEFT_BEHIND = (LAB_NAME, f"{LAB_NAME}-d", f"{LAB_NAME}-l")


@dataclass(frozen=True)
class Break:
    name: str
    path: str
    old: str
    new: str
    test: str
    docker: bool = False  # run the test on the Docker lab (else on netns)


BREAKS = [
    Break("no-sender-lock", "services/pgvpn/transports/batched.py",
          '        take_own_lock(conn, "sender", self.config.name)\n',
          "        pass  # broken: any number of writers per sender\n",
          "tests/test_writers.py::"
          "test_a_second_agent_with_the_same_name_is_refused_and_the_first_runs_on"),
    Break("resend-a-committed-batch", "services/pgvpn/transports/batched.py",
          "            if self.committed_seq >= first_seq:",
          "            if False:",
          "tests/test_writers.py::"
          "test_a_batch_whose_commit_reply_was_lost_is_logged_once_and_the_stream_goes_on"),
    Break("agent-skips-the-schema-version", "services/pgvpn/agent.py",
          "            migrate.require_current(control)\n", "",
          "tests/test_upgrade.py::test_an_agent_on_an_old_schema_says_who_must_migrate"),
    Break("no-heartbeat", "services/pgvpn/agent.py",
          '            "UPDATE pgvpn.peers SET last_seen = now(), tunnel_addr = %s, '
          'tunnel_addr6 = %s, "\n',
          '            "UPDATE pgvpn.peers SET tunnel_addr = %s, tunnel_addr6 = %s, "\n',
          "tests/test_lifecycle.py::test_the_heartbeat_moves_last_seen"),
    Break("asynchronous-commit", "services/pgvpn/transports/base.py",
          "            if not config.synchronous_commit:\n",
          "            if True:\n",
          "tests/test_applied.py::test_agent_sessions_commit_synchronously_unless_told_otherwise"),
    Break("mtu-not-passed-on", "lab/controller.py",
          '"PGVPN_MTU": str(settings.mtu),', '"PGVPN_MTU": "1500",',
          "tests/test_applied.py::test_up_with_another_mtu_restarts_the_agents_with_it"),
    Break("dry-run-drops", "services/pgvpn/logs/retention.py",
          "        if dry_run:\n            continue\n",
          "        if False:\n            continue\n",
          "tests/test_prune.py::test_a_dry_run_names_what_would_go_and_drops_nothing"),
    Break("prune-locks-the-log", "services/pgvpn/logs/retention.py",
          '        conn.execute(sql.SQL("DROP TABLE {}").format(table))\n',
          "        with conn.transaction():\n"
          '            conn.execute("LOCK TABLE pgvpn.packets IN ACCESS EXCLUSIVE MODE")\n'
          '            conn.execute("SELECT pg_sleep(1.5)")\n'
          '        conn.execute(sql.SQL("DROP TABLE {}").format(table))\n',
          "tests/test_prune.py::test_prune_drops_only_old_partitions_while_iperf3_runs"),
    Break("follow-stops-after-the-first-page", "services/pgvpn/logs/cli.py",
          "    if args.follow:\n        for p in logquery.follow(",
          "    if False:\n        for p in logquery.follow(",
          "tests/test_follow.py::test_follow_prints_new_packets_once_and_filtered"),
    Break("peers-may-lock-cursors", "sql/008_no_peer_stops_traffic.sql",
          "REVOKE UPDATE ON pgvpn.cursors, pgvpn.peers FROM pgvpn_agent;\n", "",
          "tests/test_trust.py::"
          "test_a_peer_holding_all_it_can_in_an_open_transaction_stops_no_traffic"),
    Break("scram-by-hand-without-saslprep", "services/pgvpn/bootstrap.py",
          "    return conn.pgconn.encrypt_password(password.encode(), role.encode(),\n"
          '                                        b"scram-sha-256").decode()\n',
          "    import base64, hashlib, hmac, os  # noqa\n"
          "    salt = os.urandom(16)\n"
          '    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 4096)\n'
          '    client = hmac.new(salted, b"Client Key", "sha256").digest()\n'
          '    server = hmac.new(salted, b"Server Key", "sha256").digest()\n'
          "    b64 = lambda b: base64.b64encode(b).decode()  # noqa\n"
          '    return (f"SCRAM-SHA-256$4096:{b64(salt)}$"\n'
          '            f"{b64(hashlib.sha256(client).digest())}:{b64(server)}")\n',
          "tests/test_trust.py::test_the_owner_adds_a_peer_whose_unicode_password_logs_in"),
    Break("small-batch-numbered-backwards", "services/pgvpn/transports/batched.py",
          "    SELECT %(first)s + batch.ordinality - 1,",
          "    SELECT %(first)s + 4 - batch.ordinality,",
          "tests/test_writers.py::test_a_batch_of_a_few_packets_is_logged_in_the_order_read"),
    Break("metrics-count-nothing", "services/pgvpn/metrics.py",
          "family.add_metric([now.name, now.peer, direction], getattr(counters, field))",
          "family.add_metric([now.name, now.peer, direction], 0)",
          "tests/test_lab.py::"
          "test_agents_serve_metrics_that_count_what_their_tun_devices_carried"),
    Break("ceiling-may-write-the-log", "services/pgvpn/ceiling.py",
          "    if match[1] in FORBIDDEN_SCHEMAS:", "    if False:",
          "tests/test_ceiling.py::test_the_ceiling_says_what_is_wrong_before_writing_anything"),
    Break("offload-header-unchecked", "services/pgvpn/tun.py",
          "        return packet_problem(packet) or header_problem(header, packet, self.mtu)",
          "        return packet_problem(packet)",
          "tests/test_offload_tunnel.py::"
          "test_rows_with_lying_offload_headers_are_skipped_and_reported"),
    Break("export-writes-rows-whole", "services/pgvpn/logs/cli.py",
          "            if args.super_packets:", "            if True:",
          "tests/test_offload_tunnel.py::test_the_log_tools_count_packets_on_the_wire"),
    Break("remove-peer-deletes-the-peer", "services/pgvpn/admin.py",
          "    return Removal(peer, routes, role_found, was_login, sessions)\n",
          '    conn.execute("DELETE FROM pgvpn.peers WHERE name = %s", [peer])\n'
          "    return Removal(peer, routes, role_found, was_login, sessions)\n",
          "tests/test_remove_peer.py::"
          "test_a_removed_peer_is_cut_off_at_once_and_its_log_stays"),
    Break("remove-peer-leaves-its-sessions", "sql/init_peer_roles.sql",
          "        IF pg_catalog.pg_terminate_backend(backend, 5000) THEN\n",
          "        IF false THEN\n",
          "tests/test_remove_peer.py::"
          "test_a_removed_peer_is_cut_off_at_once_and_its_log_stays"),
    Break("no-rollback", "lab/controller.py",
          "            if first:\n", "            if first and False:\n",
          "tests/test_docker_lab.py::test_a_first_up_whose_agent_dies_is_rolled_back",
          docker=True),
]


def failed_in_its_call(junit: Path) -> bool:
    """True if the test itself failed (an assertion, in its body), not its setup: a
    break that keeps the lab from coming up proves nothing about the test."""
    if not junit.exists():
        return False
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    return any(case.find("failure") is not None for case in cases)


def run_broken(brk: Break) -> tuple[bool, float, str]:
    """(went red, seconds, the test's last lines), with the break undone afterwards."""
    path = ROOT / brk.path
    original = path.read_text()
    if original.count(brk.old) != 1:
        raise SystemExit(f"seen-red: {brk.name}: the text to break occurs "
                         f"{original.count(brk.old)} times in {brk.path}, not once")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seen-red-") as scratch:
        junit = Path(scratch) / "junit.xml"
        try:
            path.write_text(original.replace(brk.old, brk.new))
            marker = "docker" if brk.docker else "not docker"
            done = subprocess.run(
                [str(ROOT / ".venv" / "bin" / "pytest"), "-q", "-x", "-p", "no:cacheprovider",
                 "-m", marker, f"--junitxml={junit}", brk.test], cwd=ROOT,
                capture_output=True, text=True, check=False, timeout=1800,
                env={**os.environ, "PGVPN_TEST_LAB_NAME": LAB_NAME})
            output = done.stdout
        except subprocess.TimeoutExpired:
            output = "the test did not finish within 1800 s"
        finally:
            path.write_text(original)
            for lab in LEFT_BEHIND:
                subprocess.run([str(ROOT / ".venv" / "bin" / "lab"), "down"], cwd=ROOT,
                               env={**os.environ, "PGVPN_LAB_NAME": lab},
                               capture_output=True, check=False, timeout=600)
        red = failed_in_its_call(junit)
    tail = "\n".join(output.strip().splitlines()[-3:])
    return red, time.monotonic() - started, tail


def stop_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so that the break is undone."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        print("\n".join(f"{b.name}: {b.test}" for b in BREAKS))
        return 0
    chosen = [b for b in BREAKS if not argv or b.name in argv]
    unknown = set(argv) - {b.name for b in BREAKS}
    if unknown:
        print(f"seen-red: no such break: {', '.join(sorted(unknown))} (see --list)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    green = []
    print("| break | test | outcome | seconds |\n|---|---|---|---:|")
    for brk in chosen:
        red, seconds, tail = run_broken(brk)
        print(f"| {brk.name} | `{brk.test.split('::')[-1]}` | "
              f"{'red' if red else '**GREEN**'} | {seconds:.0f} |", flush=True)
        if not red:
            green.append(brk.name)
            print(tail, file=sys.stderr)
    if green:
        print(f"seen-red: these breaks went unnoticed: {', '.join(green)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
