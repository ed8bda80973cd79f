#!/usr/bin/env bash
# The main job (sets up .venv on first use): the default federated demo with `flwr run`.
# Extra arguments go to `python -m simulations.demo`, e.g. --run-config "num-server-rounds=3".
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m simulations.demo "$@"
