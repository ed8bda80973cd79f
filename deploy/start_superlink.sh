#!/usr/bin/env bash
# Start the SuperLink at the coordinating site, with TLS and SuperNode authentication.
# Usage: deploy/start_superlink.sh [HOST] [PORT]   (default 0.0.0.0 9093; state in deploy/generated/superlink)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CREDS="${CREDS:-$HERE/generated}"
HOST="${1:-0.0.0.0}"
PORT="${2:-9093}"
STATE="${STATE:-$CREDS/superlink}"
mkdir -p "$STATE"
for f in ca.crt server.pem server.key; do
    [ -f "$CREDS/$f" ] || { echo "error: $CREDS/$f missing; run python deploy/credentials.py ca / server first" >&2; exit 2; }
done
export FLWR_HOME="$STATE" FLWR_TELEMETRY_ENABLED=0
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # Flower looks for work every 1 s otherwise
exec flower-superlink --ssl-ca-certfile "$CREDS/ca.crt" --ssl-certfile "$CREDS/server.pem" \
    --ssl-keyfile "$CREDS/server.key" --enable-supernode-auth --host "$HOST" --port "$PORT" \
    --disable-runtime-dependency-installation --database "$STATE/state.db"
