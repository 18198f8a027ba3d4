#!/usr/bin/env bash
# Build the local base image pgvpn/debian:bookworm from Debian packages alone.
#
# Why: on machines where no container registry is reachable, `FROM debian:...`
# cannot be pulled, but Debian's package mirrors can be. debootstrap builds a
# minimal bookworm root filesystem from them and `docker import` turns it into
# an image that the Dockerfiles under images/ accept as
#   --build-arg BASE_IMAGE=pgvpn/debian:bookworm
#
# Usage: scripts/make-base-image.sh [--force] [--tag NAME:TAG]
#   --force   rebuild even if the image already exists
#   --tag     image name (default pgvpn/debian:bookworm)
#
# Needs root, debootstrap and a running Docker engine. No mirror is named here:
# debootstrap uses its own default mirror.
set -euo pipefail

SUITE=bookworm
TAG=pgvpn/debian:bookworm
FORCE=0
LABEL_KEY=io.pgvpn.project
LABEL_VALUE=pgvpn

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        --tag) [[ $# -ge 2 ]] || { echo "error: --tag needs a value" >&2; exit 2; }
               TAG=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine"

if docker image inspect "$TAG" >/dev/null 2>&1 && [[ $FORCE -eq 0 ]]; then
    echo "image $TAG already exists; nothing to do (use --force to rebuild)" >&2
    exit 0
fi

START=$SECONDS
WORKDIR=$(mktemp -d "${TMPDIR:-/var/tmp}/pgvpn-base.XXXXXX")
ROOTFS=$WORKDIR/rootfs

cleanup() {
    local rc=$?
    # debootstrap mounts proc/sys (and sometimes dev) inside the target; if it
    # dies half-way they can stay mounted. Unmount them before deleting, and
    # never let rm cross into another file system.
    if [[ -d $ROOTFS ]]; then
        { findmnt -rn -o TARGET | grep -F "$ROOTFS/" | sort -r || true; } |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
    fi
    rm -rf --one-file-system "$WORKDIR"
    if [[ $rc -ne 0 ]]; then
        echo "error: base image build failed (exit $rc); temp dir removed" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "debootstrap $SUITE (variant minbase) into $ROOTFS"
# minbase = essential + apt. ca-certificates lets apt and anything else inside
# talk TLS. Output goes to stderr so stdout stays clean for callers.
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" >&2

step "adding $SUITE-updates and $SUITE-security to apt sources"
# debootstrap writes only "deb <mirror> $SUITE main". Derive the other suites
# from that same line so no mirror name is written into this script; the
# security archive lives at "<mirror>-security" on the default mirror.
SOURCES=$ROOTFS/etc/apt/sources.list
MIRROR=$(awk '$1 == "deb" {print $2; exit}' "$SOURCES")
[[ -n $MIRROR ]] || die "could not read the mirror from $SOURCES"
cat >"$SOURCES" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/}-security $SUITE-security main
EOF

step "trimming the root filesystem for container use"
# Same idea as Debian's -slim images: don't install docs, man pages or
# translations in later layers, and drop the ones already there.
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d" "$ROOTFS/etc/apt/apt.conf.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/pgvpn-slim" <<'EOF'
# pgvpn base image: keep images small (copyright files are kept).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/pgvpn-container" <<'EOF'
// pgvpn base image: no recommends by default, don't keep .debs or
// translated package lists around.
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
# Caches and host-specific files: Docker provides hostname/hosts/resolv.conf
# at run time, and a machine-id must not be shared by every container.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/log/* \
       "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
rm -f "$ROOTFS/etc/hostname" "$ROOTFS/etc/resolv.conf"
: >"$ROOTFS/etc/machine-id"

step "importing as $TAG"
# --numeric-owner: ownership must follow the rootfs's own uids, not the host's
# user names.
tar --numeric-owner --xattrs -C "$ROOTFS" -c . |
    docker import \
        --change "LABEL $LABEL_KEY=$LABEL_VALUE" \
        --change "LABEL io.pgvpn.base=debootstrap-$SUITE-minbase" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$TAG" >/dev/null

SIZE=$(docker image inspect --format '{{.Size}}' "$TAG")
step "done: $TAG ($((SIZE / 1000000)) MB) in $((SECONDS - START))s"
