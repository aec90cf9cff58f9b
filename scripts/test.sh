#!/usr/bin/env bash
# Run the whole test suite (CPU only, no downloads); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
