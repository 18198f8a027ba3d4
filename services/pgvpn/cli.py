"""The `pgvpn` command: run the agent, manage the schema and peers."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

import psycopg

from pgvpn import __version__, admin, bootstrap, db, migrate, routes
from pgvpn.ceiling import table_name
from pgvpn.cliargs import OneLineParser, checked, conninfo, input_file, number, whole
from pgvpn.config import (
    HEARTBEAT_SECONDS,
    MAX_BATCH_PACKETS,
    MAX_MTU,
    add_arguments,
    load_config,
    peer_name,
)
from pgvpn.errors import PgvpnError
from pgvpn.logs import args as logargs
from pgvpn.logs import cli as logcli

MAX_PROBE_SECONDS = 60.0
MAX_CEILING_SECONDS = 60.0
MAX_CEILING_BATCH_BYTES = 64 * 2**20
EPILOG = """\
examples:
  # peer a, settings from the environment as in the original blog post
  DATABASE_URL=postgresql://pgvpn_peer_a@db.example/pgvpn PGSSLROOTCERT=ca.crt \\
  PGVPN_NAME=peer-a PGVPN_PEER=peer-b \\
  TUN_IP=10.230.0.1/24 TUN_PEER=10.230.0.2 pgvpn run

  # the same from a YAML file whose keys are the setting names below
  pgvpn run --config /etc/pgvpn/peer-a.yaml

  # once, as a superuser: the roles and the database, owned by pgvpn_owner
  pgvpn db init --owner-password-file /run/secrets/pgvpn-owner
  # then, as pgvpn_owner: the schema and a login role per peer
  pgvpn db migrate
  pgvpn db add-peer peer-a --password-file /run/secrets/peer-a --address 10.230.0.1/24
  # a peer with a LAN behind it; later, its routes replaced
  pgvpn db add-peer peer-c --password-file /run/secrets/peer-c --address 10.230.0.3/24 \
      --route 192.168.50.0/24
  pgvpn db set-routes peer-c --address 10.230.0.3/24 --route 192.168.60.0/24
  # remove it: routes gone, login refused, its sessions ended; its packets stay logged
  pgvpn db remove-peer peer-c

Passwords belong in a PGPASSFILE or the DATABASE_URL environment variable, not on
the command line, where other users can read them.
"""
REMOVE_PEER = """\
Remove a peer at once, as `wg set wg0 peer KEY remove` does, in one transaction:
its routes are deleted (every agent that routes by the table drops them within a
second), its login role can no longer log in (NOLOGIN, password cleared), and its
sessions are ended, so an agent already connected is cut off.

Nothing logged is deleted: its pgvpn.peers row, its cursors and every packet it sent
or received stay, for the log tools ('pgvpn log --peer NAME'), and 'pgvpn show' lists
it as removed. 'pgvpn db add-peer NAME --password-file FILE' brings it back with a new
password; its packets are numbered on from where they stopped.

Removing a peer that is already removed says so and exits 0 (a straggling session
of its role is still ended). A name that is no peer is an error: 'pgvpn show' lists
them. A role that is more than a peer's (an attribute, a membership beyond
pgvpn_agent, a member, an object or privilege someone gave it) is refused, and then
nothing changes; what a peer can make by itself (settings, large objects, default
privileges) does not keep it from being removed.

examples:
  pgvpn db remove-peer peer-c
  pgvpn db add-peer peer-c --password-file /run/secrets/peer-c --address 10.230.0.3/24
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pgvpn", description="A VPN whose only transport is PostgreSQL: packets read "
        "from a TUN device become rows, and rows addressed to this peer become packets.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pgvpn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the tunnel agent (needs CAP_NET_ADMIN)",
        description="Create the TUN device and carry packets through the database until "
        "SIGTERM or SIGINT. Checks that the schema is the one this agent speaks (the owner "
        "migrates it).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", type=config_file, metavar="FILE", help="YAML file of settings")
    add_arguments(run)

    database = commands.add_parser("db", help="schema and peer administration (as the owner)")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    owners = [db_commands.add_parser(action, help=text, description=text)
              for action, text in (("migrate", "apply the schema migrations that are missing"),
                                   ("version", "print the schema version in place"))]
    init = db_commands.add_parser(
        "init", help="once, as a superuser: roles, database, and the owner that runs the rest",
        description="Create the owner role (no superuser, no CREATEROLE), pgvpn's group roles, "
        "the database owned by the owner, and the functions through which the owner "
        "makes and disables peer roles; take CONNECT, TEMPORARY and advisory locks in the "
        "database from PUBLIC (peers lock only their own names). A database an earlier "
        "pgvpn made is handed over to the owner. Safe to run again.")
    init.add_argument("--owner", default=bootstrap.OWNER, metavar="ROLE",
                      type=checked(bootstrap.owner_role),
                      help=f"the owner's login role (default {bootstrap.OWNER})")
    init.add_argument("--owner-password-file", metavar="FILE", type=input_file,
                      help="file holding the owner's password, or '-' for standard input "
                      "(sent as a SCRAM verifier; without it the role gets no password)")
    init.add_argument("--database", default="pgvpn", metavar="NAME",
                      type=checked(bootstrap.database_name),
                      help="the database to make or take over (default pgvpn)")
    init.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                      type=conninfo, help="a superuser's connection string, to any database "
                      "(default $DATABASE_URL or PG* vars)")
    add_peer = db_commands.add_parser(
        "add-peer", help="create (or update) a peer's login role, and add routes to it",
        description="Create a LOGIN role for a peer, member of pgvpn_agent, with a SCRAM "
        "password read from a file (or stdin with '-'), and add the tunnel addresses and "
        "subnets it routes (kept: 'set-routes' replaces them). A route that overlaps "
        "another peer's is refused.")
    add_peer.add_argument("name", type=checked(peer_name), help="peer name, e.g. peer-a")
    add_peer.add_argument("--password-file", required=True, metavar="FILE", type=input_file,
                          help="file holding the password, or '-' for standard input")
    routes.add_route_arguments(add_peer)
    set_routes = db_commands.add_parser(
        "set-routes", help="replace what a peer routes: its addresses and subnets",
        description="Replace a peer's tunnel addresses and routed subnets with exactly "
        "those given, in one transaction: on any refusal (an overlap with another "
        "peer's route) nothing changes.")
    set_routes.add_argument("name", type=checked(peer_name), help="peer name, e.g. peer-c")
    routes.add_route_arguments(set_routes)
    set_routes.add_argument("--none", action="store_true",
                            help="remove every route of the peer")
    remove_peer = db_commands.add_parser(
        "remove-peer", help="remove a peer at once: its routes, its login and its sessions",
        description=REMOVE_PEER, formatter_class=argparse.RawDescriptionHelpFormatter)
    remove_peer.add_argument("name", type=checked(peer_name), help="peer name, e.g. peer-c")
    for sub in (*owners, add_peer, set_routes, remove_peer):
        sub.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                         type=conninfo,
                         help="owner's connection string (default $DATABASE_URL or PG* vars)")
    probe = commands.add_parser(
        "probe", help="check that the tunnel carries traffic both ways (health checks)",
        description="Open a TCP connection through the tunnel to the remote end's discard "
        "port; exit 0 if its kernel's refusal (RST) comes back, 1 if nothing does.")
    probe.add_argument("address", nargs="?", default=os.environ.get("TUN_PEER"),
                       type=checked(ipaddress.ip_address),
                       help="remote tunnel address (default $TUN_PEER)")
    probe.add_argument("--timeout", type=number(0.1, MAX_PROBE_SECONDS), default=3.0,
                       help=f"seconds, 0.1-{MAX_PROBE_SECONDS} (default 3)")
    show = commands.add_parser(
        "show", help="the peers: addresses, agent up or not, what each sent and received",
        description="The `wg show` of pgvpn: each peer's tunnel addresses, whether its "
        "agent is connected (a heartbeat within the last "
        f"{3 * HEARTBEAT_SECONDS:g} s), stopped, or not responding, and the packets and "
        "bytes it sent and received since it started, as each agent reports them. A "
        "peer's connection sees only that peer; the owner's or a reader's sees all.",
        epilog="examples:\n  pgvpn show                      # as $DATABASE_URL's role\n"
        "  pgvpn show --json | jq .state   # one JSON object per peer",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    logargs.add_database_argument(show, "a peer's, a reader's or the owner's")
    logargs.add_output_arguments(show)
    ceiling = commands.add_parser(
        "ceiling", help="measure what the database ingests with no tunnel (lab bench's ceiling)",
        description="Write rows of --size bytes in batches of --batch for --seconds, the way\n"
        "this peer's uplink writes under load (its settings: connection, TLS, commit\n"
        "mode; a binary COPY per batch, then a NOTIFY), into TABLE: a table of the log's\n"
        "shape that the database owner made and lets this peer write for the run.\n"
        "Prints the rate. Never touches the packet log.",
        epilog="example (lab bench does this itself, with a table it makes and drops):\n"
        "  pgvpn ceiling pgvpn_bench.ingest --seconds 5 --size 1500 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ceiling.add_argument("table", type=checked(table_name), metavar="TABLE",
                         help="schema.table to write, of pgvpn.packets' shape")
    ceiling.add_argument("--seconds", type=number(0.1, MAX_CEILING_SECONDS), default=5.0,
                         help=f"how long to write, 0.1-{MAX_CEILING_SECONDS:g} (default 5)")
    ceiling.add_argument("--size", type=whole(1, MAX_MTU), default=1500,
                         help=f"bytes per row, 1-{MAX_MTU} (default 1500: one packet at MTU "
                         "1500)")
    ceiling.add_argument("--batch", type=whole(1, MAX_BATCH_PACKETS), default=256,
                         help=f"rows per COPY, 1-{MAX_BATCH_PACKETS} (default 256)")
    ceiling.add_argument("--config", type=config_file, metavar="FILE",
                         help="YAML file of the agent's settings (default: the environment)")
    ceiling.add_argument("--json", action="store_true", help="print the result as JSON")
    logargs.add_parsers(commands)  # log, stats, export, replay, prune, retention
    return parser


def config_file(text: str) -> Path:
    """--config: a regular file (a device or a pipe could be read forever)."""
    input_file(text)
    if text == "-" or not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_agent(args)
        if args.command == "probe":
            return run_probe(args)
        if args.command == "ceiling":
            return run_ceiling(args)
        if args.command == "show":
            return logcli.guarded(lambda: run_show(args))
        if args.command in logcli.HANDLERS:
            return logcli.run(args)
        return run_db(args)
    except PgvpnError as exc:
        print(f"pgvpn: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:  # one the code did not foresee: still one line, no traceback
        print(f"pgvpn: error: the database refused: {db.explain(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_probe(args: argparse.Namespace) -> int:
    from pgvpn.probe import tunnel_answers

    if not args.address:
        raise PgvpnError("give the remote tunnel address, or set TUN_PEER")
    try:
        answered = tunnel_answers(str(args.address), args.timeout)
    except (ValueError, OSError) as exc:
        raise PgvpnError(f"cannot probe {args.address}: {exc}") from None
    print(f"{args.address}: {'answers' if answered else 'no answer'}", file=sys.stderr)
    return 0 if answered else 1


def run_show(args: argparse.Namespace) -> int:
    from pgvpn.logs.render import print_json_lines
    from pgvpn.show import read_status, status_table

    with db.connect(args.database_url, attempts=3, application_name="pgvpn show") as conn:
        migrate.require_current(conn)
        role = conn.info.parameter_status("session_authorization") or "?"
        peers = read_status(conn)
    if not peers:
        raise PgvpnError(f"role {role} sees no peer: a peer's role sees only its own, which "
                         "the owner adds with 'pgvpn db add-peer NAME'")
    if args.json:
        print_json_lines(peer.as_json() for peer in peers)
    else:
        status_table(peers, f"pgvpn peers (as {role})").print()
    return 0


def run_ceiling(args: argparse.Namespace) -> int:
    from pgvpn.ceiling import measure
    from pgvpn.transports import Session

    if args.batch * args.size > MAX_CEILING_BATCH_BYTES:
        raise PgvpnError(f"--batch {args.batch} x --size {args.size} is more than "
                         f"{MAX_CEILING_BATCH_BYTES // 2**20} MiB a batch; lower one of them")
    config = load_config(args.config, overrides={})
    result = measure(Session(config), args.table, seconds=args.seconds, size=args.size,
                     batch=args.batch)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['mbps']:.1f} Mbit/s: {result['rows']} rows of {args.size} bytes in "
              f"{result['batches']} batches, {result['seconds']:.1f} s, into {args.table}")
    return 0


def run_agent(args: argparse.Namespace) -> int:
    from pgvpn.agent import Agent, install_signal_handlers  # late: pyroute2 is slow to import

    overrides = {k: v for k, v in vars(args).items() if k not in {"command", "config"}}
    config = load_config(args.config, overrides=overrides)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(config)
    install_signal_handlers(agent)
    agent.run()
    return 0


def run_db(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(message)s")
    if args.db_command == "init":
        password = read_secret(args.owner_password_file) if args.owner_password_file else None
        bootstrap.init_database(args.database_url, args.database, args.owner, password,
                                progress=lambda line: print(line, file=sys.stderr))
        return 0
    # read before connecting: a wrong file is the user's to fix, not the database's
    secret = read_secret(args.password_file) if args.db_command == "add-peer" else ""
    given = (routes.routes_given(args) if args.db_command in ("add-peer", "set-routes")
             else routes.Routes())
    if args.db_command == "set-routes" and args.none == bool(given.prefixes()):
        raise PgvpnError("give the peer's --address and --route options, or --none to "
                         "remove every route of it (not both)")
    with db.connect(args.database_url, attempts=3, application_name="pgvpn admin") as conn:
        if args.db_command == "migrate":
            migrate.migrate(conn)
        elif args.db_command == "version":
            print(migrate.applied_version(conn))
        elif args.db_command == "add-peer":
            with conn.transaction():  # the role and its routes, or nothing
                created = admin.ensure_peer_role(conn, args.name, secret)
                routes.add_routes(conn, args.name, given)
            print(f"role {admin.role_name(args.name)} for peer {args.name} "
                  f"{'created' if created else 'updated'}", file=sys.stderr)
            print(routes.describe(args.name, routes.peer_routes(conn).get(args.name, [])),
                  file=sys.stderr)
        elif args.db_command == "remove-peer":
            for line in admin.remove_peer(conn, args.name).report():
                print(line, file=sys.stderr)
        elif args.db_command == "set-routes":
            routes.check_peer_exists(conn, args.name)
            routes.add_routes(conn, args.name, given, replace=True)
            print(routes.describe(args.name, routes.peer_routes(conn).get(args.name, [])),
                  file=sys.stderr)
            if not given.addresses:
                print(f"note: peer {args.name} has no tunnel address now: an agent that "
                      "routes by the table sends nothing to its own address", file=sys.stderr)
    return 0


def read_secret(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise PgvpnError(f"cannot read password file {path}: {exc.strerror}") from None
    secret = text.strip()
    if not secret:
        raise PgvpnError(f"password file {path} is empty")
    return secret


if __name__ == "__main__":
    sys.exit(main())
