"""A deployed node's warm worker (client.worker): the same work as in process, started once, private, and gone
with its node."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

import client.site
from client import worker
from client.context import Job, NodeContext
from mstkd.errors import InputError
from mstkd.runconfig import NodeConfig, RunConfig
from tests.helpers import ROOT, deployed_site, tiny_arrays


@pytest.fixture
def runtime(monkeypatch):
    """A short private runtime folder (a Unix socket's path must stay under ~108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="w", dir="/tmp") as short:
        monkeypatch.setenv("XDG_RUNTIME_DIR", short)
        yield Path(short) / "mstkd"


def site_node(tmp: Path, **node_config) -> NodeContext:
    run_config, config = deployed_site(tmp, **node_config)
    return NodeContext(run_id=1, node_id=7, node=NodeConfig.parse(config), run=RunConfig.parse(run_config))


def test_the_worker_does_the_same_work_once_started_and_refuses_strangers(tmp_path, runtime, caplog):
    node = site_node(tmp_path, worker="on")
    arrays = tiny_arrays()
    caplog.set_level(logging.INFO, logger="mstkd.client")
    try:
        assert worker.call(node, Job.ARRAY_NAMES) == client.site.array_names(node) == list(arrays)
        started = [r for r in caplog.records if "started the node's worker" in r.getMessage()]
        assert len(started) == 1
        sock = next(runtime.glob("*.sock"))
        assert runtime.stat().st_mode & 0o777 == 0o700
        assert next(runtime.glob("*.key")).stat().st_mode & 0o777 == 0o600

        # scoring is deterministic: the worker and this process agree to the last bit (a round is validated once a
        # run, client.sent: this process's validation is another run's)
        remote, site = worker.call(node, Job.EVALUATE_SITE, arrays, {"server-round": 1})
        local, _ = client.site.evaluate_site(NodeContext(**{**vars(node), "run_id": 2}), arrays, {"server-round": 1})
        assert site["name"] == "h1"
        assert {k: v for k, v in remote.items() if "-time-" not in k} == {
            k: v for k, v in local.items() if "-time-" not in k
        }

        updated, metrics, site = worker.call(node, Job.LOCAL_ROUND, arrays, {"server-round": 1})
        assert list(updated) == list(arrays) and site["name"] == "h1"
        assert metrics["train-steps"] == 2 and metrics["train-time-train"] > 0
        assert (tmp_path / "state" / "nodes" / "run-1" / "h1" / "local.pt").exists()

        with pytest.raises(AuthenticationError):  # someone without the key is turned away ...
            Client(str(sock), "AF_UNIX", authkey=b"not the key")
        # ... and an error in the work arrives as itself, with the worker still serving
        broken = NodeContext(**{**vars(node), "run": node.run.replace(overrides="no.such=1")})
        with pytest.raises(InputError, match="unknown config key") as raised:
            worker.call(broken, Job.EVALUATE_SITE, arrays, {})
        assert any("in the node's worker" in note and "project_config" in note for note in raised.value.__notes__)
        assert worker.call(node, Job.ARRAY_NAMES) == list(arrays)
        assert len([r for r in caplog.records if "started the node's worker" in r.getMessage()]) == 1
    finally:
        stopped = worker.stop(node)
    assert stopped and not sock.exists() and not list(runtime.glob("*.key"))  # nothing left but the lock
    assert not worker.stop(node)  # nothing left to stop


def test_a_worker_ends_with_its_node_and_when_idle(tmp_path, runtime):
    runtime.mkdir(mode=0o700)
    node = subprocess.Popen(["sleep", "2"])  # stands for Flower's task launcher on the node
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = []
    for name, extra in (("watch", ["--watch", str(node.pid)]), ("idle", ["--idle", "0.5"])):
        key = runtime / f"{name}.key"
        key.write_bytes(os.urandom(32))
        cmd = [sys.executable, "-P", "-m", "client.worker", str(runtime / f"{name}.sock"), str(key), *extra]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        node.wait()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
        assert not list(runtime.glob("*.sock")) and not list(runtime.glob("*.key"))
    finally:
        for proc in procs:
            proc.kill()


def test_worker_settings_are_checked(runtime):
    assert NodeConfig().worker == "auto" and not worker.wanted(NodeConfig())  # pytest is no per-message process
    assert worker.wanted(NodeConfig.parse({"worker": "on"})) and not worker.wanted(NodeConfig.parse({"worker": "off"}))
    assert NodeConfig.parse({"worker-idle": "60"}).worker_idle == 60.0  # a deployment's node config may be text
    with pytest.raises(InputError, match="worker='maybe'"):
        NodeConfig.parse({"worker": "maybe"})
    with pytest.raises(InputError, match="worker-idle"):
        NodeConfig.parse({"worker-idle": "-1"})
    assert worker.site_work("array_names") is worker.site_work(Job.ARRAY_NAMES) is client.site.array_names
    with pytest.raises(ValueError, match="unknown job 'release_memory'"):  # a function of client.site, not a job
        worker.site_work("release_memory")
    with pytest.raises(ValueError, match="unknown job 'train'"):  # refused before any worker starts
        worker.call(NodeContext(run_id=1, node_id=7, node=NodeConfig(), run=RunConfig()), "train")
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)  # whatever the umask
    with pytest.raises(worker.WorkerError, match="mode 0700"):
        worker.runtime_dir()


def test_a_worker_that_dies_mid_message_is_reported_and_replaced(tmp_path, runtime):
    node = site_node(tmp_path, worker="on")
    arrays = tiny_arrays()
    outcome: list[BaseException] = []

    def train() -> None:
        try:
            worker.call(node, Job.LOCAL_ROUND, arrays, {"server-round": 1})
        except BaseException as exc:
            outcome.append(exc)

    try:
        assert worker.call(node, Job.ARRAY_NAMES)  # started
        found = subprocess.run(["pgrep", "-f", f"client.worker {runtime}"], capture_output=True, text=True)
        thread = threading.Thread(target=train)
        thread.start()
        time.sleep(0.5)  # the first round prepares the site's cases first: seconds
        os.kill(int(found.stdout.split()[0]), signal.SIGKILL)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], worker.WorkerError), outcome
        assert "ended during local_round" in str(outcome[0])
        assert worker.call(node, Job.ARRAY_NAMES)  # the next message starts a new worker
    finally:
        worker.stop(node)
