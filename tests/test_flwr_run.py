"""A real ``flwr run`` of the app (simulation engine, Ray), checked through ``flwr ls --format json``."""

from __future__ import annotations

import json

import pytest

from simulations.launch import flower_simulation, superlink_pids


@pytest.mark.slow
def test_flwr_run_completes_and_the_superlink_is_stopped(tmp_path):
    run_config = {
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
    result = flower_simulation(
        run_config, nodes=2, cpus_per_node=1, flwr_home=tmp_path / "flwr", log=tmp_path / "flwr.log", timeout=900
    )
    assert result.completed, f"{result.status}: {result.details}\n{result.log.read_text()[-3000:]}"
    rounds = [json.loads(line)["round"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert (tmp_path / "run" / "best.pt").exists()
    assert superlink_pids(tmp_path / "flwr") == []
