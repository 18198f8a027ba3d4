#!/usr/bin/env bash
# Build wheels for pgvpn and all of its dependencies into images/.wheelhouse/.
#
# Why: the images install Python packages with
#   pip install --no-index --find-links images/.wheelhouse pgvpn
# so a `docker build` needs no access to a package index, and every image gets
# exactly the versions resolved here. The host Python and the bookworm image's
# Python are both 3.11 on glibc, so the manylinux wheels pip picks here fit.
#
# Usage: scripts/build-wheelhouse.sh [--extras LIST] [--keep]
#   --extras LIST  also include optional dependencies, e.g. "lab" or "lab,dev"
#   --keep         don't empty the wheelhouse first (default: start clean, so
#                  stale versions can't be picked up by an image)
#
# Python: $PYTHON if set, else <repo>/.venv/bin/python if present, else python3.
# pip uses its default index (and whatever pip config/env the machine has).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELHOUSE=$REPO_ROOT/images/.wheelhouse
EXTRAS=
KEEP=0

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --extras) [[ $# -ge 2 ]] || { echo "error: --extras needs a value" >&2; exit 2; }
                  EXTRAS=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    PY=$REPO_ROOT/.venv/bin/python
else
    PY=python3
fi
command -v "$PY" >/dev/null || die "python not found: $PY"
[[ -f $REPO_ROOT/pyproject.toml ]] || die "no pyproject.toml in $REPO_ROOT"

PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $PYVER != 3.11 ]]; then
    # Wheels with C extensions are tagged per Python version; the images run
    # Debian bookworm's python3 (3.11) and would not find matching wheels.
    echo "warning: $PY is Python $PYVER; the images use Python 3.11" >&2
fi

START=$SECONDS
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/pgvpn-wheelhouse.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# Build from a clean copy of the source, not the work tree: setuptools builds
# in place and never empties build/, so a module deleted from the tree would
# live on in the wheel; it would also leave build/ and *.egg-info behind.
# In a git checkout the copy is what git would see (tracked + untracked, not
# ignored); otherwise everything but the usual local state.
step "staging the source in $STAGE"
if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO_ROOT" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
        tar -C "$REPO_ROOT" --null -T - -cf - | tar -C "$STAGE" -xf -
else
    tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=images \
        --exclude=reports -cf - . | tar -C "$STAGE" -xf -
fi

SPEC=$STAGE
[[ -z $EXTRAS ]] || SPEC="$STAGE[$EXTRAS]"

if [[ $KEEP -eq 0 ]]; then
    rm -rf "$WHEELHOUSE"
fi
mkdir -p "$WHEELHOUSE"

step "pip wheel ${SPEC/#"$STAGE"/<repo>} -> ${WHEELHOUSE#"$REPO_ROOT"/} (python $PYVER: $PY)"
"$PY" -m pip wheel --wheel-dir "$WHEELHOUSE" "$SPEC" >&2

# A wheel tagged plain linux_* was compiled on this host from an sdist and may
# depend on host libraries the image lacks; manylinux/pure wheels are safe.
mapfile -t LOCAL_BUILT < <(find "$WHEELHOUSE" -name '*-linux_*.whl' -printf '%f\n')
if [[ ${#LOCAL_BUILT[@]} -gt 0 ]]; then
    echo "warning: built on this host (not manylinux), check they run in the image:" >&2
    printf '  %s\n' "${LOCAL_BUILT[@]}" >&2
fi

COUNT=$(find "$WHEELHOUSE" -name '*.whl' | wc -l)
step "done: $COUNT wheels in ${WHEELHOUSE#"$REPO_ROOT"/} in $((SECONDS - START))s"
find "$WHEELHOUSE" -name '*.whl' -printf '%f\n' | sort
