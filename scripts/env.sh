# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and install the project.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 2
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV" >&2
    "$(pick_python)" -m venv "$VENV"
fi

STAMP="$VENV/.mstkd-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "==> installing mstkd and its dependencies into $VENV" >&2
    quiet_pip() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v '^WARNING: Location' >&2); }
    quiet_pip --upgrade pip
    # A plain `torch` requirement resolves to a multi-GB CUDA build; install a known
    # build first when none is present (override with TORCH_SPEC, e.g. for a GPU box).
    if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        quiet_pip "${TORCH_SPEC:-torch==2.13.0}"
    fi
    quiet_pip -e "$ROOT[dev,lesion,mlflow]"
    # panoptica (mstkd score --lesion) pins rich<14, which flwr rules out: its other dependencies
    # come with the `lesion` extra above, panoptica itself without its pins (a no-op once installed).
    quiet_pip --no-deps "panoptica==2.1.7"
    echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
