#!/usr/bin/env bash
# Run the main job (sets up .venv on first use). Extra arguments go to `mstkd demo`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec mstkd demo "$@"
