#!/usr/bin/env bash
# Run the whole test suite (sets up .venv on first use). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
