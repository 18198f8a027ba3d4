#!/usr/bin/env bash
# Install what pgvpn needs and is missing: Debian packages, then the project venv.
# Idempotent and quiet when everything is already there. Run as root (apt, TUN).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGVPN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf 'setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    say "run as root: the lab needs network namespaces, TUN devices and apt"; exit 1
fi

# Debian packages: PostgreSQL server (the namespace lab runs it), iperf3 and ping
# (the bench), iproute2 (namespaces), debootstrap (the offline Docker base image),
# openssl (the lab's CA and server certificate), tshark (tests read pcaps with it),
# pg_prove (runs tests/pgtap/ against a lab's database), nft (the liveness tests cut
# an agent's path to the database), Patroni and etcd (the replicated topology,
# topologies/ha.yaml; python3-etcd is imported by Patroni's etcd3 client too).
declare -A NEEDED=(
    [postgres]="postgresql" [iperf3]="iperf3" [ping]="iputils-ping" [ip]="iproute2"
    [ss]="iproute2" [setpriv]="util-linux" [debootstrap]="debootstrap"
    [openssl]="openssl" [tshark]="tshark" [pg_prove]="libtap-parser-sourcehandler-pgtap-perl"
    [nft]="nftables" [patroni]="patroni" [etcd]="etcd-server" [etcdctl]="etcd-client"
)
missing=()
for tool in "${!NEEDED[@]}"; do
    if [[ $tool == postgres ]]; then
        compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=("${NEEDED[$tool]}")
    else
        command -v "$tool" >/dev/null || missing+=("${NEEDED[$tool]}")
    fi
done
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=("python3-venv")
/usr/bin/python3 -c 'import etcd' 2>/dev/null || missing+=("python3-etcd")
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# Server extensions the database checks use (tests/test_database_checks.py): pgTAP
# and plpgsql_check, for every installed server version (the namespace lab runs
# the newest). Only known once the server is installed, hence a second pass.
extensions=()
for bindir in /usr/lib/postgresql/*/bin; do
    [[ -x $bindir/postgres ]] || continue
    major=$(basename "$(dirname "$bindir")")
    [[ -f /usr/share/postgresql/$major/extension/pgtap.control ]] \
        || extensions+=("postgresql-$major-pgtap")
    [[ -f /usr/share/postgresql/$major/extension/plpgsql_check.control ]] \
        || extensions+=("postgresql-$major-plpgsql-check")
done
if ((${#extensions[@]})); then
    say "installing PostgreSQL extensions: ${extensions[*]}"
    ((${#missing[@]})) || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${extensions[@]}" >/dev/null
fi
# etcd-server starts a system etcd on :2379 and patroni enables its unit; the lab runs
# its own in namespaces or containers, so stop and disable the system ones.
if [[ -d /run/systemd/system ]]; then
    for unit in etcd patroni; do
        if systemctl is-enabled --quiet "$unit" 2>/dev/null \
                || systemctl is-active --quiet "$unit" 2>/dev/null; then
            say "stopping and disabling the system $unit service"
            systemctl disable --now --quiet "$unit" || true
        fi
    done
elif [[ -x /etc/init.d/etcd ]]; then
    # No systemd: init-d-script started it with a pid file (unless policy-rc.d said no).
    pid=$(cat /run/etcd.pid 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ && $(readlink "/proc/$pid/exe" 2>/dev/null) == /usr/bin/etcd ]]; then
        say "stopping the system etcd (pid $pid)"
        kill "$pid" && rm -f /run/etcd.pid
    fi
    update-rc.d etcd disable >/dev/null 2>&1 || true
fi
if ss -Htln 'sport = :2379' 2>/dev/null | grep -q .; then
    say "note: something listens on :2379 in the root namespace; the lab's etcd does not use it"
fi
# The Debian package starts a cluster of its own; the lab runs its own servers.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
    say "note: a system PostgreSQL cluster is running; the lab does not use it"
fi

if [[ ! -x $VENV/bin/python ]]; then
    say "creating the venv in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.pgvpn-installed"
if [[ ! -f $stamp || $ROOT/pyproject.toml -nt $stamp ]]; then
    say "installing pgvpn and its Python dependencies into the venv"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$ROOT[lab,dev]"
    touch "$stamp"
fi
say "ready: $VENV/bin/pgvpn, $VENV/bin/lab"
