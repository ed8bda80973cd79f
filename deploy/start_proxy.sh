#!/usr/bin/env bash
# The coordinator's public address: nginx forwards the Fleet API (what the hospitals' nodes use) to the
# SuperLink on loopback and refuses everything else, so that no stranger can submit a run or register a node.
# Usage: deploy/start_proxy.sh [PUBLIC_HOST:PORT] [SUPERLINK_LOOPBACK_HOST:PORT]
#   (default 0.0.0.0:9093 -> 127.0.0.1:9092, where deploy/start_superlink.sh listens by default)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$HERE/proxy.py" --public "${1:-0.0.0.0:9093}" --superlink "${2:-127.0.0.1:9092}" \
    --creds "${CREDS:-$HERE/generated}" --state "${STATE:-${CREDS:-$HERE/generated}/proxy}"
