#!/usr/bin/env bash
# Start the whole service in the foreground under supervisord: broker, gateway on :8080, and one
# worker per GPU of this host (GPU_IDS=0,2 picks some; no GPU: one CPU worker). Defaults need no GPU
# and no download (MODEL_ID=tiny). Stop with Ctrl-C.
#   ./scripts/serve.sh --workers-only   only this host's GPU workers, for the broker at BROKER_WORKER_ADDRESS
#   ./scripts/serve.sh --no-workers     only broker and gateway (every worker runs on other hosts)
# run/supervisord.conf is generated from supervisord.conf each time (python -m launcher.supervisor_config).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
mkdir -p run/logs
export PATH="$PWD/.venv/bin:$PATH"
python -m launcher.supervisor_config --output run/supervisord.conf "$@"
if [[ " $* " != *" --workers-only "* ]]; then
  echo "gateway: http://localhost:${GATEWAY_PORT:-8080}"
fi
echo "logs: run/logs/  status: .venv/bin/supervisorctl -c run/supervisord.conf status"
exec supervisord -c run/supervisord.conf
