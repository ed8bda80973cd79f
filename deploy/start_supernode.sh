#!/usr/bin/env bash
# Start one hospital's SuperNode. Its data stay on its disk; only the student and discriminator leave.
# Usage: deploy/start_supernode.sh SITE_NAME DATA_DIR SUPERLINK_HOST:PORT [MODALITIES] [LOCAL_PORT]
#   SITE_NAME   the name its key was made and registered with (deploy/generated/nodes/SITE_NAME)
#   DATA_DIR    the site's case folders (FeTS or BraTS 2023 naming)
#   MODALITIES  optional, e.g. flair,t1,t2 when the site lacks T1ce (default: what every case has)
#   LOCAL_PORT  optional port of the node's local API (default 9094; differ when nodes share a machine)
#   APPROVED    optional, in the environment: the site's approval list; the node then runs only the app
#               versions it names (python deploy/approval.py approve CHECKOUT --list FILE)
#   REQUIRE_SECAGG  optional, in the environment: N > 0, the site's update leaves only under secure aggregation
#               among N nodes or more (node config require-secagg)
#   MAX_WORK_SECONDS  optional, in the environment: no message's training holds the node longer (node config
#               max-work-seconds; work past it is dropped, unsent)
#   DISCLOSURE_LOG  optional, in the environment: where the node logs every reply it sends (default
#               STATE/disclosures.jsonl; off: none; node config disclosure-log)
#   SECAGG_PEERS  optional, with REQUIRE_SECAGG: the consortium's node public keys (one .pub line each); the node
#               then takes part only in rounds whose every SecAgg+ key one of them signed (node config secagg-peers)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CREDS="${CREDS:-$HERE/generated}"
[ $# -ge 3 ] || { sed -n '3,17p' "$0" >&2; exit 2; }
fail() { echo "error: ${*//[[:cntrl:]]/?}" >&2; exit 2; }  # one line, whatever the arguments hold
SITE="$1"; LINK="$3"; MODS="${4:-}"; LOCAL="${5:-9094}"
# SITE names files, as in deploy/credentials.py: 1..64 letters, digits, . _ -, the first a letter or digit (no
# ranges: some locales stretch them past ASCII). The values go into --node-config as key="value", which Flower
# splits at the next quote and reads as TOML strings (a backslash escapes): a quote, backslash or control
# character is refused before anything starts.
ALNUM=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789
case "$SITE" in
    [$ALNUM]*) ;;
    *) fail "site name '$SITE': use letters, digits, '.', '_', '-', starting with a letter or digit" ;;
esac
case "$SITE" in *[!$ALNUM._-]*) fail "site name '$SITE': use letters, digits, '.', '_', '-' only" ;; esac
[ "${#SITE}" -le 64 ] || fail "site name '$SITE': at most 64 characters"
DATA="$(CDPATH='' cd -- "$2" 2>/dev/null && pwd)" || fail "no data folder '$2'"
absolute() { case "$1" in "" | /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # the ClientApp runs elsewhere
STATE="$(absolute "${STATE:-$CREDS/supernodes/$SITE}")"
KEY="$(absolute "$CREDS/nodes/$SITE")"
SECAGG_PEERS="$(absolute "${SECAGG_PEERS:-}")"
case "${DISCLOSURE_LOG:-}" in [oO][fF][fF]) ;; *) DISCLOSURE_LOG="$(absolute "${DISCLOSURE_LOG:-}")" ;; esac
for value in "$DATA" "$STATE" "$MODS" "${DISCLOSURE_LOG:-}" "$KEY" "$SECAGG_PEERS"; do
    case "$value" in
        *[\"\\]* | *[[:cntrl:]]*) fail "'$value': a quote, backslash or control character cannot pass --node-config" ;;
    esac
done
case "${REQUIRE_SECAGG:-}" in
    *[!0-9]*) fail "REQUIRE_SECAGG='$REQUIRE_SECAGG': give a whole number of nodes (0: off)" ;;
esac
case "${MAX_WORK_SECONDS:-}" in
    *[!0-9]*) fail "MAX_WORK_SECONDS='$MAX_WORK_SECONDS': give a whole number of seconds (0: no cap)" ;;
esac
[ -z "$SECAGG_PEERS" ] || [ "${REQUIRE_SECAGG:-0}" -gt 0 ] || fail "SECAGG_PEERS needs REQUIRE_SECAGG (it checks SecAgg+ keys)"
[ -f "$KEY" ] || fail "no key $KEY; run python deploy/credentials.py node $SITE"
# a new state folder is private: the node's state and the apps it installs
[ -d "$STATE" ] || mkdir -p -m 700 "$STATE"
# APPROVED=FILE: the node runs only the app versions the site's list approves (deploy/approval.py). Flower starts
# each message's ClientApp process as flwr-clientapp from PATH: the gate's comes first.
if [ -n "${APPROVED:-}" ]; then
    GATE="$(python "$HERE/approval.py" install-gate "$STATE/approval-gate" --list "$APPROVED")" || exit 2
    export PATH="$GATE:$PATH"
fi
# the node's key also signs its SecAgg+ round keys, so that sites that check them know them for its own
CONFIG="data-path=\"$DATA\" site-name=\"$SITE\" state-dir=\"$STATE\" secagg-key=\"$KEY\""
[ -n "$MODS" ] && CONFIG="$CONFIG modalities=\"$MODS\""
[ -n "${REQUIRE_SECAGG:-}" ] && CONFIG="$CONFIG require-secagg=\"$REQUIRE_SECAGG\""
[ -n "${MAX_WORK_SECONDS:-}" ] && CONFIG="$CONFIG max-work-seconds=\"$MAX_WORK_SECONDS\""
[ -n "$SECAGG_PEERS" ] && CONFIG="$CONFIG secagg-peers=\"$SECAGG_PEERS\""
[ -n "${DISCLOSURE_LOG:-}" ] && CONFIG="$CONFIG disclosure-log=\"$DISCLOSURE_LOG\""
unset MSTKD_APPROVED_APP  # only the approval gate names an approved app (deploy/approval.py APP_DIGEST)
export FLWR_HOME="$STATE" FLWR_TELEMETRY_ENABLED=0
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # Flower looks for work every 1 s otherwise
exec flower-supernode --root-certificates "$CREDS/ca.crt" --auth-supernode-private-key "$KEY" \
    --superlink "$LINK" --port "$LOCAL" --node-config "$CONFIG"
