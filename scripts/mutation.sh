#!/usr/bin/env bash
# Mutation testing of pgvpn's pure modules with mutmut: how many deliberately broken
# copies of the code (mutants) do the lab-free unit tests catch?
#
# Why: a passing suite says the tests run, not that they check anything. A mutant
# that survives is a change to the code that no test notices.
#
# Usage: scripts/mutation.sh [--budget SECONDS] [--jobs N] [--keep] [--min PERCENT]
#   --budget SECONDS  stop mutmut after this long (default 1200); unchecked mutants
#                     then count as not killed
#   --jobs N          mutants tested at once (default: the number of cores)
#   --keep            keep the scratch copy and print its path (to look at survivors
#                     with `mutmut show NAME` / `mutmut results` inside it)
#   --min PERCENT     exit 1 if the overall score is below this (default 85)
#
# Modules: packets.py (packet checks), copyformat.py (COPY encoding), config.py
# (settings, peer names: which peer every packet goes to), cliargs.py (command-line
# values), timespec.py (durations), logs/filter.py (log filters). Tests: only those
# that need no lab (TESTS below); the lab fixtures are replaced in the copy by ones
# that fail, so none can start.
# Everything happens in a scratch copy under $TMPDIR: the repo is never modified.
# Score = (killed + timed out) / all mutants, per module and overall.
# Needs the venv with the dev extras (scripts/setup.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGVPN_VENV:-$ROOT/.venv}"
BUDGET=1200
JOBS=$(nproc)
KEEP=0
MIN=85

MODULES=(packets.py copyformat.py config.py cliargs.py timespec.py logs/filter.py)
# Lab-free tests of those modules (no lab fixture, no database, no TUN).
TESTS=(
    tests/test_packets.py
    tests/test_copyformat.py
    tests/test_config.py
    tests/test_arg_values.py
    tests/test_timespec.py
    tests/test_filters.py
    tests/test_log_tools.py::test_durations_people_type
    tests/test_log_tools.py::test_bad_durations_say_how_to_write_one
    tests/test_log_tools.py::test_short_form_reads_back_to_within_its_precision
    tests/test_log_tools.py::test_times_are_durations_ago_or_iso
    tests/test_log_tools.py::test_filter_options_become_one_where_clause
    tests/test_log_tools.py::test_no_filter_selects_everything_and_raw_columns_need_no_decoding
    tests/test_log_tools.py::test_bad_filters_are_one_clear_error
    tests/test_log_tools.py::test_protocols_and_networks
)

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --budget|--jobs|--min)
            [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || { echo "error: $1 needs a whole number" >&2; exit 2; }
            case "$1" in --budget) BUDGET=$2 ;; --jobs) JOBS=$2 ;; --min) MIN=$2 ;; esac
            shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[[ -x $VENV/bin/mutmut ]] || die "no mutmut in $VENV: run scripts/setup.sh (dev extras)"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/pgvpn-mutation.XXXXXX")
if [[ $KEEP -eq 1 ]]; then
    trap 'step "scratch copy kept in $SCRATCH"' EXIT
else
    trap 'rm -rf "$SCRATCH"' EXIT
fi

# mutmut names a mutant after the file's path below the project root ("src/" is
# dropped), and the tests import "pgvpn.x": so the copy puts the package at src/pgvpn,
# where mutmut also puts it first on sys.path (ahead of the venv's editable install).
step "copying the package and the tests to $SCRATCH"
mkdir -p "$SCRATCH/src"
tar -C "$ROOT/services" --exclude=__pycache__ -cf - pgvpn | tar -C "$SCRATCH/src" -xf -
tar -C "$ROOT" --exclude=__pycache__ -cf - tests | tar -C "$SCRATCH" -xf -
cat >>"$SCRATCH/tests/conftest.py" <<'EOF'


# scripts/mutation.sh: no test of a mutation run may bring a lab up.
@pytest.fixture(scope="session")
def netns_lab() -> Iterator[LabHandle]:
    pytest.fail("a mutation run uses lab-free tests only")
    yield  # type: ignore[unreachable]


@pytest.fixture(scope="session")
def docker_lab() -> Iterator[LabHandle]:
    pytest.fail("a mutation run uses lab-free tests only")
    yield  # type: ignore[unreachable]
EOF

toml_list() { local first=1; printf '['; for item; do
    ((first)) || printf ', '; first=0; printf '"%s"' "$item"; done; printf ']'; }
only=()
for module in "${MODULES[@]}"; do only+=("src/pgvpn/$module"); done
cat >"$SCRATCH/pyproject.toml" <<EOF
[tool.mutmut]
source_paths = ["src/pgvpn"]
only_mutate = $(toml_list "${only[@]}")
pytest_add_cli_args_test_selection = $(toml_list "${TESTS[@]}")
pytest_add_cli_args = ["-p", "no:cacheprovider"]
use_git_change_detection = false

[tool.pytest.ini_options]
pythonpath = ["."]
markers = ["integration: lab", "docker: lab", "slow: long"]
EOF

cd "$SCRATCH"
START=$SECONDS
step "mutmut run (${#MODULES[@]} modules, ${#TESTS[@]} test selections, $JOBS at once, at most ${BUDGET}s)"
status=0
timeout --signal=TERM --kill-after=30 "$BUDGET" \
    "$VENV/bin/mutmut" run --max-children "$JOBS" >mutmut.log 2>&1 || status=$?
ELAPSED=$((SECONDS - START))
if [[ $status -eq 124 ]]; then
    step "stopped after the ${BUDGET}s budget: unchecked mutants count as not killed"
elif [[ $status -ne 0 ]]; then
    tail -n 30 mutmut.log >&2
    die "mutmut run exited $status (log above)"
fi

step "scores (mutmut took ${ELAPSED}s)"
"$VENV/bin/python" - "$MIN" "${MODULES[@]}" <<'EOF'
"""Per-module and overall score from mutmut's result files (mutants/src/pgvpn/*.meta)."""
import json
import sys
from pathlib import Path

# mutmut's exit codes: 1 and 3 (tests failed) killed; 36, 24, 152, 255, -24 timed out.
KILLED = {1, 3}
TIMEOUT = {36, 24, 152, 255, -24}
minimum, modules = float(sys.argv[1]), sys.argv[2:]
rows, survivors = [], []
for module in modules:
    meta = Path("mutants/src/pgvpn") / f"{module}.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    killed = sum(code in KILLED for code in codes.values())
    timeout = sum(code in TIMEOUT for code in codes.values())
    survivors += [name for name, code in codes.items() if code not in KILLED | TIMEOUT]
    rows.append((module, killed, timeout, len(codes)))
total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
print(f"{'module':<16} {'killed':>7} {'timeout':>8} {'mutants':>8} {'score':>7}")
for module, killed, timeout, count in [*rows, ("overall", *total)]:
    score = 100 * (killed + timeout) / count if count else 0.0
    print(f"{module:<16} {killed:>7} {timeout:>8} {count:>8} {score:>6.1f}%")
if survivors:
    print(f"\nnot killed ({len(survivors)}; see them with `mutmut show NAME` in a --keep copy):")
    print("\n".join(f"  {name}" for name in sorted(survivors)))
overall = 100 * (total[0] + total[1]) / total[2] if total[2] else 0.0
sys.exit(0 if overall >= minimum else 1)
EOF
