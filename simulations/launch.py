"""Run the Flower app with ``flwr run`` on a private local SuperLink, and stop that SuperLink afterwards.

``flwr run . <connection>`` with the ``:local:`` connection starts a detached simulation
SuperLink that outlives the command, listens on fixed ports, and ``flwr run`` exits 0 even
when the run fails. :func:`flower_simulation` takes care of all three: it gives the run its own
``FLWR_HOME`` and free loopback ports, reads the final status from ``flwr ls --format json``,
and stops the SuperLink it started, by PID, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit``, so that ``finally`` blocks still stop the SuperLink this process started."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value) -> str:
    """A run-config value in the TOML syntax ``flwr run --run-config`` expects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def flwr_cli() -> str:
    """The ``flwr`` command of this Python environment (else the one on the PATH)."""
    local = Path(sys.executable).with_name("flwr")
    return str(local) if local.exists() else "flwr"


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of SuperLink processes whose database lives in ``flwr_home`` (Linux ``/proc``)."""
    needle = str(flwr_home / "local-superlink").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmdline and needle in cmdline:
            pids.append(int(proc.name))
    return pids


def descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids`` (Linux ``/proc``): a SuperLink's SuperExec, simulation engine and Ray workers."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM ``pids`` and everything below them, then SIGKILL whatever is still alive after ``timeout`` s."""
    pids = [*pids, *descendants(pids)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class FlowerRun:
    """What came out of one ``flwr run``."""

    status: str  # e.g. finished:completed, finished:failed
    run_id: str | None
    seconds: float
    log: Path
    details: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def flower_simulation(
    run_config: dict,
    *,
    extra: str = "",
    nodes: int,
    flwr_home: Path,
    log: Path,
    cpus_per_node: float = 2,
    gpus_per_node: float = 0.0,
    timeout: float = 3600,
    app: Path = ROOT,
    echo: bool = False,
    env: dict[str, str] | None = None,
) -> FlowerRun:
    """``flwr run <app> --stream`` in simulation with ``nodes`` SuperNodes; the SuperLink is stopped afterwards.

    ``run_config`` values are written as TOML; ``extra`` is appended verbatim (``"num-server-rounds=3"``);
    ``env`` adds environment variables, which the SuperLink, the simulation engine and its workers inherit.
    """
    flwr_home = flwr_home.resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        # flwr starts flower-superlink and friends by name: find them beside this interpreter
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        **(env or {}),
    }
    overrides = " ".join([*(f"{k}={toml_value(v)}" for k, v in run_config.items()), extra]).strip()
    federation = (
        f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_node} client-resources-num-gpus={gpus_per_node}"
    )
    cmd = [flwr_cli(), "run", str(app), "--stream", "--federation-config", federation]
    if overrides:
        cmd += ["--run-config", overrides]
    start = time.perf_counter()
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if echo and "[mstkd]" in line:
                    print(line.rstrip(), file=sys.stderr, flush=True)
                if time.perf_counter() - start > timeout:
                    proc.kill()
                    break
            proc.wait()
        seconds = time.perf_counter() - start
        listing = subprocess.run(
            [flwr_cli(), "ls", "--format", "json"], env=env, capture_output=True, text=True, timeout=120
        )
        runs = {str(r["run-id"]): r for r in json.loads(listing.stdout or "{}").get("runs", [])}
        printed = log.read_text()
        started = re.search(r"Successfully started run (\d+)", printed)
        if started is None or started[1] not in runs:  # no run of this call (the SuperLink keeps earlier ones):
            return FlowerRun("not-started", None, seconds, log, printed.strip()[-800:])  # the log says why
        this = runs[started[1]]
        return FlowerRun(this["status"], started[1], seconds, log, str(this.get("status-details")))
    finally:
        stop(superlink_pids(flwr_home))
