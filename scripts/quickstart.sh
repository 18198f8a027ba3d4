#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, bring the lab up on the
# default backend (Docker when an engine answers, else network namespaces), run the
# bench and print its report. The lab stays up afterwards: `lab down` removes it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/lab up "$@"
.venv/bin/lab bench --duration "${PGVPN_BENCH_SECONDS:-10}"
echo "the lab is still up: '.venv/bin/lab status', '.venv/bin/lab down'" >&2
