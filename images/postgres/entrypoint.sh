#!/usr/bin/env bash
# pgvpn PostgreSQL entrypoint.
#
# On first start (empty $PGDATA, default /var/lib/pgvpn/data): initdb,
# pg_hba.conf for scram-sha-256 over TCP, the owner password if given, then
# every /docker-entrypoint-initdb.d/*.sh once, against a temporary server
# that listens on the Unix socket only. Hooks run as the postgres user
# with PGHOST/PGUSER/PGDATABASE set, so a plain `psql` inside them works (peer
# authentication). No SQL is applied here: the schema belongs to `pgvpn
# db migrate`, run by the lab after the server is up.
#
# Then: exec postgres in the foreground as PID 1. The image's STOPSIGNAL is
# SIGINT, which postgres treats as a fast shutdown.
#
# Environment (read at first start only):
#   PGVPN_OWNER_PASSWORD_FILE
#                       file holding a password for the superuser "postgres",
#                       so the lab controller can log in over TCP (SCRAM). It may
#                       be a root-only secret: it is read before privileges drop.
#   PGVPN_HBA_CIDRS     networks allowed to connect over TCP with a password
#                       (default: the private ranges Docker allocates from)
#   PGVPN_SSL           off (default) | on (TLS offered, plaintext accepted)
#                       | require (TLS required from the network)
#   PGVPN_SSL_CERT_FILE, PGVPN_SSL_KEY_FILE
#                       the server's certificate and key (e.g. Compose secrets made
#                       by the lab's own CA, lab/tls.py); read at every start, as
#                       root, so the key may be a root-only secret. Without them
#                       PGVPN_SSL=on|require makes a self-signed certificate once.
#   PGVPN_INITDB_ARGS   extra initdb arguments, e.g. --data-checksums
#
# PGVPN_SSL, PGVPN_HBA_CIDRS and the certificate files are applied at every start:
# pg_hba.conf is rewritten from them, so changing them needs only a restart.
#
# Usage: entrypoint.sh [postgres [-c name=value ...]] | etcd [FLAG ...] | patroni
#        | entrypoint.sh CMD ...
#
# Mode etcd (the HA lab's consensus store, docs/ha-plan.md): etcd configured by its
# ETCD_* variables alone (ETCD_DATA_DIR is required), run as postgres.
#
# Mode patroni (a node of the replicated cluster): as root,
# /usr/local/lib/pgvpn/patroni_config.py renders /run/pgvpn/patroni.d from the
# PGVPN_* variables above plus PGVPN_REPLICATION_PASSWORD_FILE,
# PGVPN_REWIND_PASSWORD_FILE, PGVPN_PATRONI_API_PASSWORD_FILE, PGVPN_SSL_CA_FILE and
# PGVPN_REPLICATION_CIDR (see that script); then Patroni runs as PID 1, as postgres,
# with its PATRONI_* variables. Patroni runs initdb, writes pg_hba.conf and starts
# postgres itself: nothing of the postgres mode's first-start work applies.
# Stop it with SIGTERM (as PID 1, Patroni ignores the image's SIGINT).
set -euo pipefail

PGDATA=${PGDATA:-/var/lib/pgvpn/data}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
SOCKDIR=/run/postgresql
TLSDIR=/run/pgvpn-tls
INITDIR=/docker-entrypoint-initdb.d
MARKER=$PGDATA/.pgvpn-init-incomplete
export PGDATA

log() { printf 'pgvpn-entrypoint: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Anything but the server (bash, psql, ...) is run as asked.
if [[ $# -eq 0 ]]; then
    set -- postgres
elif [[ $1 == -* ]]; then
    set -- postgres "$@"
fi

POSTGRES_HOME=/var/lib/postgresql
as_postgres=(setpriv --reuid=postgres --regid=postgres --init-groups
             env HOME=$POSTGRES_HOME USER=postgres LOGNAME=postgres)

if [[ $1 == etcd ]]; then
    shift
    [[ -n ${ETCD_DATA_DIR:-} ]] || die "the etcd mode needs ETCD_DATA_DIR (etcd reads its ETCD_* variables)"
    # Its parent is handed to postgres: never / itself.
    [[ $ETCD_DATA_DIR == /?*/?* ]] \
        || die "ETCD_DATA_DIR must be an absolute path inside a directory (got '$ETCD_DATA_DIR')"
    if [[ $(id -u) -ne 0 ]]; then
        exec etcd "$@"
    fi
    # A fresh volume may be root's: etcd creates its data directory (0700) itself.
    mkdir -p "$(dirname "$ETCD_DATA_DIR")"
    chown postgres:postgres "$(dirname "$ETCD_DATA_DIR")"
    log "starting etcd as postgres (data in $ETCD_DATA_DIR)"
    exec "${as_postgres[@]}" etcd "$@"
fi

if [[ $1 == patroni ]]; then
    [[ $# -eq 1 ]] || die "the patroni mode takes no arguments (PATRONI_* and PGVPN_* variables configure it)"
    [[ $(id -u) -eq 0 ]] || die "the patroni mode starts as root (it reads root-only secrets, then runs as postgres)"
    export PATRONI_POSTGRESQL_DATA_DIR=${PATRONI_POSTGRESQL_DATA_DIR:-$PGDATA}
    [[ $PATRONI_POSTGRESQL_DATA_DIR == /?*/?* ]] \
        || die "PATRONI_POSTGRESQL_DATA_DIR must be an absolute path inside a directory (got '$PATRONI_POSTGRESQL_DATA_DIR')"
    # Patroni creates the data directory (0700) itself; its parent must be postgres'.
    data_parent=$(dirname "$PATRONI_POSTGRESQL_DATA_DIR")
    mkdir -p "$data_parent"
    chown postgres:postgres "$data_parent"
    if [[ -d $PATRONI_POSTGRESQL_DATA_DIR ]]; then
        chown postgres:postgres "$PATRONI_POSTGRESQL_DATA_DIR"
        chmod 700 "$PATRONI_POSTGRESQL_DATA_DIR"
    fi
    confdir=/run/pgvpn/patroni.d
    python3 /usr/local/lib/pgvpn/patroni_config.py --out "$confdir" --owner postgres \
        || die "cannot write Patroni's configuration (see above)"
    log "starting patroni as postgres (configuration in $confdir)"
    exec "${as_postgres[@]}" patroni "$confdir"
fi

if [[ $1 != postgres ]]; then
    exec "$@"
fi

# As root: make the data and socket directories the postgres user's (a fresh
# volume or bind mount may be root-owned), then re-run this script as postgres.
if [[ $(id -u) -eq 0 ]]; then
    mkdir -p "$PGDATA" "$SOCKDIR"
    chown postgres:postgres "$PGDATA" "$SOCKDIR"
    chmod 700 "$PGDATA"
    chmod 2775 "$SOCKDIR"
    # A secret mounted 0600 root (compose file secrets) is unreadable for
    # postgres: hand over a private copy, deleted once the password is set.
    if [[ -n ${PGVPN_OWNER_PASSWORD_FILE:-} && ! -f $PGDATA/PG_VERSION ]]; then
        [[ -r $PGVPN_OWNER_PASSWORD_FILE ]] \
            || die "cannot read PGVPN_OWNER_PASSWORD_FILE=$PGVPN_OWNER_PASSWORD_FILE"
        install -m 600 -o postgres -g postgres \
            "$PGVPN_OWNER_PASSWORD_FILE" "$SOCKDIR/.pgvpn-owner-password"
        export PGVPN_OWNER_PASSWORD_FILE=$SOCKDIR/.pgvpn-owner-password
    fi
    # The same for the TLS key: postgres refuses a key it does not own or that
    # others may read, so it gets its own 0600 copy outside the data directory.
    if [[ -n ${PGVPN_SSL_CERT_FILE:-}${PGVPN_SSL_KEY_FILE:-} ]]; then
        [[ -r ${PGVPN_SSL_CERT_FILE:-} && -r ${PGVPN_SSL_KEY_FILE:-} ]] \
            || die "cannot read PGVPN_SSL_CERT_FILE and PGVPN_SSL_KEY_FILE (both are needed)"
        install -d -m 700 -o postgres -g postgres "$TLSDIR"
        install -m 644 -o postgres -g postgres "$PGVPN_SSL_CERT_FILE" "$TLSDIR/server.crt"
        install -m 600 -o postgres -g postgres "$PGVPN_SSL_KEY_FILE" "$TLSDIR/server.key"
        export PGVPN_SSL_CERT_FILE=$TLSDIR/server.crt PGVPN_SSL_KEY_FILE=$TLSDIR/server.key
    fi
    exec env HOME=/var/lib/postgresql USER=postgres LOGNAME=postgres \
        setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

hba_conf() {
    local cidrs=${PGVPN_HBA_CIDRS:-10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7}
    local ssl=$1 types cidr t
    case $ssl in
        off) types="host" ;;
        on) types="hostssl host" ;;
        require) types="hostssl" ;;
    esac
    cat <<'EOF'
# Written by the pgvpn entrypoint at every start, from PGVPN_SSL and PGVPN_HBA_CIDRS.
# TYPE    DATABASE  USER  ADDRESS          METHOD
# Local socket: only the matching OS user (postgres, for admin and hooks).
local     all       all                    peer
# Loopback inside the container (pg_isready health check, tools).
host      all       all   127.0.0.1/32     scram-sha-256
host      all       all   ::1/128          scram-sha-256
# Other containers on the lab's networks, password (SCRAM) required.
EOF
    for cidr in $cidrs; do
        for t in $types; do
            printf '%-9s all       all   %-16s scram-sha-256\n' "$t" "$cidr"
        done
    done
}

init_cluster() {
    local ssl=${PGVPN_SSL:-off}
    case $ssl in off|on|require) ;; *) die "PGVPN_SSL must be off, on or require (got '$ssl')" ;; esac

    log "initialising a new cluster in $PGDATA"
    # C.UTF-8: UTF8 text with code-point ordering, identical on every glibc.
    # shellcheck disable=SC2086  # PGVPN_INITDB_ARGS is a word list on purpose
    "$PGBIN/initdb" -D "$PGDATA" --username=postgres \
        --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 ${PGVPN_INITDB_ARGS:-} >&2
    # initdb needs an empty directory, so the marker can only go in now. It
    # stays until the hooks have run: a half-done init is refused, not reused.
    : >"$MARKER"

    hba_conf "$ssl" >"$PGDATA/pg_hba.conf"

    {
        echo
        echo "# pgvpn: image settings, then local overrides (later lines win)."
        echo "include '/etc/pgvpn/postgresql.conf'"
        echo "include_dir '/etc/pgvpn/conf.d'"
    } >>"$PGDATA/postgresql.conf"

    if [[ $ssl != off && -z ${PGVPN_SSL_CERT_FILE:-} ]]; then
        log "generating a self-signed TLS certificate (PGVPN_SSL=$ssl)"
        openssl req -new -x509 -days 3650 -nodes -subj "/CN=$HOSTNAME" \
            -newkey rsa:2048 -keyout "$PGDATA/server.key" \
            -out "$PGDATA/server.crt" 2>/dev/null || die "openssl could not make a certificate"
        chmod 600 "$PGDATA/server.key"
        printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" \
            >>"$PGDATA/postgresql.conf"
    fi

    local hooks=()
    if [[ -d $INITDIR ]]; then
        mapfile -t hooks < <(find "$INITDIR" -maxdepth 1 -name '*.sh' \( -type f -o -type l \) | sort)
    fi
    local pwfile=${PGVPN_OWNER_PASSWORD_FILE:-}
    if [[ -n $pwfile ]]; then
        [[ -r $pwfile ]] || die "cannot read PGVPN_OWNER_PASSWORD_FILE=$pwfile"
        [[ -s $pwfile ]] || die "PGVPN_OWNER_PASSWORD_FILE=$pwfile is empty"
    fi
    if [[ ${#hooks[@]} -gt 0 || -n $pwfile ]]; then
        log "starting a temporary server (socket only) for first-time setup"
        "$PGBIN/pg_ctl" -D "$PGDATA" -w -t 60 -o "-c listen_addresses='' -k $SOCKDIR" start >&2
        if [[ -n $pwfile ]]; then
            log "setting the password of role postgres from PGVPN_OWNER_PASSWORD_FILE"
            # psql reads the file itself (backticks in \set), so the password
            # never appears on a command line; :'pw' quotes it as a literal.
            PGHOST=$SOCKDIR "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres \
                >/dev/null <<SQL || die "could not set the password of role postgres"
\\set pw \`cat '$pwfile'\`
ALTER ROLE postgres PASSWORD :'pw';
SQL
            # Remove the private copy made above (never the caller's file).
            [[ $pwfile != "$SOCKDIR/.pgvpn-owner-password" ]] || rm -f "$pwfile"
        fi
        local hook
        for hook in "${hooks[@]}"; do
            log "running init hook $hook"
            PGHOST=$SOCKDIR PGUSER=postgres PGDATABASE=postgres bash "$hook" \
                || die "init hook $hook failed"
        done
        "$PGBIN/pg_ctl" -D "$PGDATA" -w -t 60 -m fast stop >&2
    fi

    rm -f "$MARKER"
    log "cluster initialised"
}

if [[ -f $MARKER ]]; then
    die "a previous first-time initialisation of $PGDATA did not finish; remove the volume and start again"
elif [[ -f $PGDATA/PG_VERSION ]]; then
    log "using the existing cluster in $PGDATA (PostgreSQL $(cat "$PGDATA/PG_VERSION"))"
elif [[ -z $(ls -A "$PGDATA") ]]; then
    init_cluster
else
    die "$PGDATA is neither empty nor a PostgreSQL data directory; refusing to touch it"
fi

ssl=${PGVPN_SSL:-off}
case $ssl in off|on|require) ;; *) die "PGVPN_SSL must be off, on or require (got '$ssl')" ;; esac
hba_conf "$ssl" >"$PGDATA/pg_hba.conf"
tls_args=()
if [[ $ssl != off && -n ${PGVPN_SSL_CERT_FILE:-} ]]; then
    tls_args=(-c ssl=on -c "ssl_cert_file=$PGVPN_SSL_CERT_FILE"
              -c "ssl_key_file=$PGVPN_SSL_KEY_FILE")
    log "TLS with $PGVPN_SSL_CERT_FILE (PGVPN_SSL=$ssl)"
elif [[ $ssl != off && ! -f $PGDATA/server.crt ]]; then
    die "PGVPN_SSL=$ssl but no certificate: give PGVPN_SSL_CERT_FILE and PGVPN_SSL_KEY_FILE"
elif [[ $ssl == off ]]; then
    tls_args=(-c ssl=off)
fi

shift   # drop "postgres"
log "starting postgres"
exec "$PGBIN/postgres" -D "$PGDATA" "${tls_args[@]}" "$@"
