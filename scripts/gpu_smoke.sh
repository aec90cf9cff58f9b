#!/usr/bin/env bash
# The whole service on a GPU machine, as users start it (supervisord: broker, gateway, one worker),
# with a real-size random-weight model, then a burst from the load test (scripts/test_batching.py) and a lone request.
#
#   scripts/gpu_smoke.sh [MODEL_ID] [SIZE] [BURST]      e.g. scripts/gpu_smoke.sh sdxl 1024 16
#
# Needs the project's dependencies importable by python3 (on a GPU machine without network: carried
# wheels installed to a --target folder on PYTHONPATH). Writes logs under $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-sdxl}; size=${2:-1024}; burst=${3:-16}
out=${OUT:-run}
mkdir -p run/logs "$out"
pybin=$(mktemp -d)
# supervisord.conf runs "python -m ...": point "python" at this python3 (a wrapper, not a symlink:
# a symlinked venv interpreter loses its venv).
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$pybin/python" && chmod +x "$pybin/python"
export PATH=$pybin:$PATH MODEL_ID=$model PYTHONUNBUFFERED=1
export MAX_BATCH_WAIT_TIME=${MAX_BATCH_WAIT_TIME:-2.0} GATEWAY_PORT=${GATEWAY_PORT:-8080}
url=http://127.0.0.1:$GATEWAY_PORT
python3 -m supervisor.supervisord -c supervisord.conf &
supervisor_pid=$!
trap 'kill -TERM $supervisor_pid 2>/dev/null; wait $supervisor_pid 2>/dev/null; cp run/logs/*.log "$out"/ 2>/dev/null; rm -rf "$pybin"' EXIT
for _ in $(seq 600); do
  curl -sf "$url/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -sf "$url/readyz"; echo
echo "== lone request ($model ${size}x${size}, 25 steps)"
python3 scripts/test_batching.py --url "$url" --burst 1 --width "$size" --height "$size" --steps 25 --no-stats
echo "== burst of $burst"
python3 scripts/test_batching.py --url "$url" --burst "$burst" --width "$size" --height "$size" --steps 25 --no-stats
echo "== /stats"
curl -s "$url/stats"; echo
python3 -m supervisor.supervisorctl -c supervisord.conf status
