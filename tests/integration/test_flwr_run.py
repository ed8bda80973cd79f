"""A real ``flwr run`` of the app (simulation engine, Ray), checked through ``flwr ls --format json``."""

from __future__ import annotations

import json
import sys

import pytest

from simulations.launch import flower_simulation, flwr_cli, superlink_pids
from tests.helpers import ROOT


def _tiny_run(tmp_path) -> dict:
    return {
        "model": "tiny",
        "num-server-rounds": 2,
        "local-steps": 2,
        "phantom-cases": 12,
        "phantom-shape": "48 48 32",
        "eval-subsets": "full",
        "min-nodes": 2,
        "work-dir": str(tmp_path / "work"),
        "out-dir": str(tmp_path / "run"),
        "overrides": "train.amp=false",
    }


def test_the_bundle_every_node_receives_holds_the_apps_packages_only(tmp_path):
    """``flwr run`` sends the app's bundle (FAB) to every node. Flower's default file list took every .py, .md,
    .toml and .yaml file of the coordinator's checkout, so a run folder kept there sent its REPORT.md (every site's
    scores) and config.yaml to each hospital, and any Python file lying about went too."""
    import shutil
    import subprocess
    import zipfile

    app = tmp_path / "app"
    shutil.copytree(
        ROOT, app, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "__pycache__", "*.fab", "build")
    )
    (app / "results" / "run-1").mkdir(parents=True)
    for name in ("REPORT.md", "config.yaml", "run_config.toml"):
        (app / "results" / "run-1" / name).write_text("site-a: 0.91\n")
    (app / "settings_local.py").write_text("TOKEN = 'secret'\n")
    done = subprocess.run([flwr_cli(), "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    assert {n.split("/")[0] for n in names} == {
        ".info",
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "mstkd",
        "client",
        "server",
        "messages",
        "simulations",
    }
    assert {"client/app.py", "server/app.py", "mstkd/configs/model/lite.yaml", "simulations/adversary.py"} <= names
    from simulations.adversary import hostile_app  # the robustness arms' copy of the app builds too

    hostile, _ = hostile_app(tmp_path / "hostile", {1: "scale"})
    done = subprocess.run([flwr_cli(), "build", "--app", str(hostile)], cwd=hostile, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(
        n.startswith(("simulations/results/", "simulations/fets/")) or n.endswith(".md") and "/" in n for n in names
    )


@pytest.mark.slow
def test_flwr_run_completes_and_the_superlink_is_stopped(tmp_path):
    run_config = _tiny_run(tmp_path)
    result = flower_simulation(
        run_config, nodes=2, cpus_per_node=1, flwr_home=tmp_path / "flwr", log=tmp_path / "flwr.log", timeout=900
    )
    assert result.completed, f"{result.status}: {result.details}\n{result.log.read_text()[-3000:]}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["round"] for r in records if r.get("global")] == [2]  # by default only the last round is scored
    assert (tmp_path / "run" / "best.pt").exists()
    assert superlink_pids(tmp_path / "flwr") == []


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux only")
def test_flwr_run_spreads_sites_over_an_existing_two_node_ray_cluster(tmp_path, monkeypatch):
    """The simulation engine attaches to the cluster named by RAY_ADDRESS (how a user goes past one machine):
    two Ray nodes on one loopback address with one CPU each, two sites of one CPU each, so each node must run one.

    127.0.0.2, not 127.0.0.1: a driver given 127.0.0.1 or localhost swaps it for the machine's network address
    (``ray._private.services.resolve_ip_for_localhost``), where a cluster bound to loopback does not listen.
    The cluster's address is not written to /tmp/ray/ray_current_cluster, where any other ``ray.init()`` on
    the machine (another simulation running meanwhile) would find and join it."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.2", "object_store_memory": 300 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        result = flower_simulation(
            _tiny_run(tmp_path),
            nodes=2,
            cpus_per_node=1,
            flwr_home=tmp_path / "flwr",
            log=tmp_path / "flwr.log",
            timeout=900,
        )
        assert result.completed, f"{result.status}: {result.details}\n{result.log.read_text()[-3000:]}"
    finally:
        cluster.shutdown()
    assert superlink_pids(tmp_path / "flwr") == []
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    used = {site["ray-node"] for r in records for site in r["sites"].values() if "train-loss" in site}
    assert used == node_ids  # every site trained on a node of this cluster, and both nodes trained


FAULT_PAIRS = [
    ("nan", "shape"),
    ("dtype", "missing"),
    ("extra", "examples-0"),
    ("examples-negative", "examples-nan"),
    ("examples-huge", "truncated"),
    ("oversized", "huge-header"),
]


@pytest.mark.slow
@pytest.mark.parametrize("faults", FAULT_PAIRS, ids=["+".join(p) for p in FAULT_PAIRS])
def test_faulty_nodes_never_stop_or_poison_a_flwr_run(tmp_path, faults):
    """Three tiny sites, two rounds, through Flower's simulation engine: two nodes send broken train replies (one
    fault each, every round); the run completes, each broken reply is refused with its reason in rounds 1 and 2,
    the honest site's updates make the global model, and ``last.pt`` is finite."""
    import torch

    from simulations.adversary import hostile_app
    from tests.helpers import FAULT_REASONS

    app, env = hostile_app(tmp_path / "app", dict(enumerate(faults)))
    run_config = {**_tiny_run(tmp_path), "phantom-cases": 18, "min-nodes": 3}
    result = flower_simulation(
        run_config,
        nodes=3,
        cpus_per_node=1,
        flwr_home=tmp_path / "flwr",
        log=tmp_path / "flwr.log",
        timeout=900,
        app=app,
        env=env,
    )
    assert result.completed, f"{result.status}: {result.details}\n{result.log.read_text()[-3000:]}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert "skipped" not in record
        reasons = sorted(f["reason"] for f in record["failures"] if f["stage"] == "train")
        assert len(reasons) == 2 and all(r.startswith("refused: ") for r in reasons), reasons
        for fault in faults:
            assert any(FAULT_REASONS[fault] in r for r in reasons), (fault, reasons)
        assert {s["name"] for s in record["sites"].values() if "train-loss" in s} == {"site-3"}
    student = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["student"]
    assert all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())
    assert "**Outcome: 2 of 2 rounds aggregated, 4 replies refused.**" in (tmp_path / "run" / "REPORT.md").read_text()
    assert superlink_pids(tmp_path / "flwr") == []
