#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what is missing, then pytest.
# Extra arguments go to pytest (e.g. -k tunnel, -m "not slow").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/pytest --durations=25 "$@"
