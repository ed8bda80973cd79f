"""Start a SuperLink or a SuperNode with TLS and node authentication, and stop them with all their children.

Both helpers start the process in its own session, so :func:`stop_group` can end it together
with the ``flower-superexec`` children it spawns. Used by the deployment test; the shell scripts
beside this file type the same commands for a person.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def flower_bin(name: str) -> str:
    """A Flower executable beside this interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def start_superlink(creds: Path, *, port: int, state: Path, log: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """``flower-superlink`` with TLS (``creds``/ca.crt, server.pem, server.key) and SuperNode authentication."""
    state.mkdir(parents=True, exist_ok=True)
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(creds / "ca.crt"),
        "--ssl-certfile",
        str(creds / "server.pem"),
        "--ssl-keyfile",
        str(creds / "server.key"),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(state / "state.db"),
    ]
    return subprocess.Popen(
        cmd, env=_env(state), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def start_supernode(
    creds: Path, key: Path, *, superlink: str, port: int, node_config: dict[str, str], home: Path, log: Path
) -> subprocess.Popen:
    """``flower-supernode`` for one site: trusts ``creds``/ca.crt, authenticates with ``key``."""
    home.mkdir(parents=True, exist_ok=True)
    config = " ".join(f'{k}="{v}"' for k, v in node_config.items())
    cmd = [
        flower_bin("flower-supernode"),
        "--root-certificates",
        str(creds / "ca.crt"),
        "--auth-supernode-private-key",
        str(key),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        config,
    ]
    return subprocess.Popen(cmd, env=_env(home), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process's whole session (it and its children), SIGKILL what is left after ``timeout``."""
    if proc.poll() is not None and proc.returncode is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive their parent
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
