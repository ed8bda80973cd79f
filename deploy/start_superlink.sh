#!/usr/bin/env bash
# Start the SuperLink at the coordinating site, with TLS and SuperNode authentication.
# Usage: deploy/start_superlink.sh [HOST] [PORT]   (default 127.0.0.1 9092; state in deploy/generated/superlink)
# It listens on loopback: its one port also serves the unauthenticated Control API (flwr run, node registration).
# Hospitals reach it through deploy/start_proxy.sh, which forwards the Fleet API only (docs/security.md).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CREDS="${CREDS:-$HERE/generated}"
HOST="${1:-127.0.0.1}"
PORT="${2:-9092}"
STATE="${STATE:-$CREDS/superlink}"
# a new state folder is private: its database holds every message, each node's update among them
[ -d "$STATE" ] || mkdir -p -m 700 "$STATE"
for f in ca.crt server.pem server.key; do
    [ -f "$CREDS/$f" ] || { echo "error: $CREDS/$f missing; run python deploy/credentials.py ca / server first" >&2; exit 2; }
done
export FLWR_HOME="$STATE" FLWR_TELEMETRY_ENABLED=0
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # Flower looks for work every 1 s otherwise
exec flower-superlink --ssl-ca-certfile "$CREDS/ca.crt" --ssl-certfile "$CREDS/server.pem" \
    --ssl-keyfile "$CREDS/server.key" --enable-supernode-auth --host "$HOST" --port "$PORT" \
    --disable-runtime-dependency-installation --database "$STATE/state.db"
