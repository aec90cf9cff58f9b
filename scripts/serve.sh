#!/usr/bin/env bash
# Start the whole service in the foreground under supervisord: broker, gateway on :8080, one worker.
# Defaults need no GPU and no download (MODEL_ID=tiny). Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
mkdir -p run/logs
export PATH="$PWD/.venv/bin:$PATH"
echo "gateway: http://localhost:${GATEWAY_PORT:-8080}  logs: run/logs/  status: .venv/bin/supervisorctl -c supervisord.conf status"
exec supervisord -c supervisord.conf
