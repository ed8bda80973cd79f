"""Start a SuperLink or a SuperNode with TLS and node authentication, and stop them with all their children.

Both helpers start the process in its own session, so :func:`stop_group` can end it together
with the ``flower-superexec`` children it spawns. :func:`start_local_federation` starts a whole
federation on 127.0.0.1 (SuperLink, registered node keys, one SuperNode per site) for the
deployment test and benchmark; the shell scripts beside this file type the same commands for a
person.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.approval import APP_DIGEST, read_approved, write_gate

TASK_POLL = "0.2"
CONFIG_KEY = re.compile(r"[A-Za-z0-9_-]+")
CONFIG_VALUE_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
"""What Flower's ``--node-config`` cannot carry in a value: it splits ``key="value"`` pairs at the next quote
(``flwr.common.config.parse_config_args``) and reads the value as a TOML string, where a backslash escapes."""


def node_config_arg(node_config: dict[str, str]) -> str:
    """``node_config`` as Flower's ``--node-config`` argument, ``key="value" ...``.

    Raises:
        ValueError: a key that is not a plain name, or a value with a quote, a backslash or a control
            character (which would end it early and add keys of its own), in one line.
    """
    for key, value in node_config.items():
        if not CONFIG_KEY.fullmatch(key):
            raise ValueError(f"node-config key {key!r}: use letters, digits, '_' and '-' only")
        if CONFIG_VALUE_UNSAFE.search(str(value)):
            raise ValueError(
                f"node-config {key} {str(value)!r}: a quote, backslash or control character cannot pass "
                "through Flower's --node-config; rename it"
            )
    return " ".join(f'{k}="{v}"' for k, v in node_config.items())


def flower_bin(name: str) -> str:
    """A Flower executable beside this interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _env(flwr_home: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != APP_DIGEST},  # only the gate may name an approved app
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # how often Flower's task launcher looks for work (default 1 s, paid by every message)
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL),
    }


def start_superlink(creds: Path, *, port: int, state: Path, log: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """``flower-superlink`` with TLS (``creds``/ca.crt, server.pem, server.key) and SuperNode authentication. A new
    ``state`` folder is its user's only: its database holds every message, each node's update among them."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    creds: Path,
    key: Path,
    *,
    superlink: str,
    port: int,
    node_config: dict[str, str],
    home: Path,
    log: Path,
    threads: int | None = None,
    approved: Path | None = None,
) -> subprocess.Popen:
    """``flower-supernode`` for one site: trusts ``creds``/ca.crt, authenticates with ``key``.

    ``threads`` caps the CPU threads of the site's training (``OMP_NUM_THREADS``), for several
    nodes sharing one machine as simulated nodes share it; by default PyTorch uses every core.
    ``approved``: the site's approval list; the node then runs only the apps it names (:mod:`deploy.approval`).

    Raises:
        ValueError: a node config Flower cannot carry (:func:`node_config_arg`), or an approval list that cannot
            be read, before anything starts.
    """
    config = node_config_arg({"secagg-key": os.path.abspath(key), **node_config})  # it also signs its SecAgg+ keys
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # the apps it installs, its state; a new one is private
    env = _env(home) | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    if approved is not None:  # Flower starts each message's ClientApp process by name: the gate's comes first
        env["PATH"] = os.pathsep.join([str(write_gate(home / "approval-gate", approved)), env["PATH"]])
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
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def flwr_cli(
    args: list[str], home: Path, *, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``flwr ARGS`` with its configuration (``config.toml``) in ``home``; output captured."""
    cmd = [flower_bin("flwr"), *args]
    return subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start_local_federation(
    procs: list[subprocess.Popen],
    work: Path,
    creds: Path,
    nodes: dict[str, tuple[Path, dict[str, str]]],
    *,
    port: int,
    node_ports: list[int],
    connection: str = "local",
    threads: int | None = None,
    node_address: str | None = None,
    approved: dict[str, Path] | None = None,
) -> Path:
    """A SuperLink with TLS and node authentication on 127.0.0.1:``port``, each key of ``nodes`` (site ->
    (private key, node config)) registered with it and one SuperNode per site, logs in ``work``. The nodes
    connect to ``node_address`` (default: the SuperLink itself; a proxy's public address, see
    :mod:`deploy.proxy`).

    Every process started is appended to ``procs`` as it starts, so the caller stops them all (with
    :func:`stop_group`) even when this fails half-way. Returns the ``flwr`` CLI home whose
    ``config.toml`` names the SuperLink ``connection``. ``threads``, and ``approved`` (site -> its approval list):
    see :func:`start_supernode`.

    Raises:
        ValueError: a node config that Flower's ``--node-config`` cannot carry (:func:`node_config_arg`), or an
            approval list that cannot be read, before anything starts.
        RuntimeError: the SuperLink exited or did not start within a minute, or a key was not registered.
    """
    for _, node_config in nodes.values():
        node_config_arg(node_config)
    for approved_list in (approved or {}).values():
        read_approved(approved_list)
    cli = work / "cli"
    cli.mkdir(parents=True, exist_ok=True)
    (cli / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n'
    )
    log = work / "link.log"
    procs.append(start_superlink(creds, port=port, state=work / "link", log=log))
    deadline = time.monotonic() + 60
    while "Uvicorn running" not in log.read_text():
        if procs[-1].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not start; see {log}")
        time.sleep(0.5)
    for site, (key, _) in nodes.items():
        out = flwr_cli(["supernode", "register", str(key.with_suffix(".pub")), connection], cli)
        if "registered" not in out.stdout:
            raise RuntimeError(f"registering {site}'s key failed: {out.stdout}{out.stderr}")
    for (site, (key, node_config)), node_port in zip(nodes.items(), node_ports, strict=True):
        procs.append(
            start_supernode(
                creds,
                key,
                superlink=node_address or f"127.0.0.1:{port}",
                port=node_port,
                node_config=node_config,
                home=work / "nodes" / site,
                log=work / f"{site}.log",
                threads=threads,
                approved=(approved or {}).get(site),
            )
        )
    return cli


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
