"""Where a run's time went (server.phases): sums of the nodes' and the server's clocks, and what is left."""

from __future__ import annotations

import pytest

from server.phases import PHASES, phases_line, phases_markdown, time_phases


def site(train: float, val: float, **other: float) -> dict:
    return {"train-time-train": train, "val-time-evaluate": val, "name": "x", "train-loss": 0.5, **other}


def test_phases_add_the_nodes_and_the_servers_clocks_and_leave_the_rest_as_other():
    records = {
        0: {"sites": {}, "eval_seconds": 3.0, "write_seconds": 0.5, "wall_seconds": 4.0},
        1: {
            "sites": {"1": site(10.0, 1.0, **{"train-time-state-load": 0.5}), "2": site(5.0, 0.5)},
            "eval_seconds": 0.0,
            "write_seconds": 0.25,
            "wall_seconds": 20.0,
        },
    }
    phases = time_phases(records, setup_seconds=6.0, total_seconds=30.0)
    assert phases["seconds"] == {
        "set-up": 6.0,
        "site training": 15.0,
        "site validation": 1.5,
        "node overhead": 0.5,
        "global evaluation": 3.0,
        "checkpoints": 0.75,
        "other": pytest.approx(24.0 - 20.75),
    }
    assert list(phases["seconds"]) == list(PHASES) and phases["rounds"] == 24.0
    assert "| site training | 15.0 | 50 % |" in phases_markdown(phases)
    assert phases_line(phases).startswith("time: set-up 6 s, site training 15 s")


def test_sites_that_overlap_leave_no_other():
    records = {1: {"sites": {"1": site(10.0, 0.0), "2": site(10.0, 0.0)}, "wall_seconds": 12.0}}
    phases = time_phases(records, setup_seconds=1.0, total_seconds=13.0)
    assert phases["seconds"]["other"] is None and "| other | – | – |" in phases_markdown(phases)
