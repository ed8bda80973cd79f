"""Faults, in process: failing and silent nodes, skipped rounds, missing nodes, a site with no usable case."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from client.app import app as client_app
from server.app import app as server_app
from tests.helpers import InProcGrid, by_name, nodes, run_inproc, server_context, tiny_run_config, write_case
from tests.helpers import run_records as _records
from tests.helpers import server_round as _round


class Faulty:
    """A ClientApp stand-in that misbehaves on chosen (node, round) train calls and otherwise calls the app."""

    def __init__(self, node: int, rounds: set[int], mode: str) -> None:
        self.node, self.rounds, self.mode = node, rounds, mode
        self.release = threading.Event()

    def __call__(self, message, context):
        hit = (
            message.metadata.message_type == "train" and context.node_id == self.node and _round(message) in self.rounds
        )
        if hit and self.mode == "raise":
            raise RuntimeError("scanner archive unreachable")
        if hit and self.mode == "hang":
            self.release.wait(120)
            raise RuntimeError("released after the test")
        return client_app(message, context)


def test_a_node_that_raises_mid_round_is_logged_and_the_round_aggregates_the_others(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 3, "eval-subsets": "full"})
    grid = run_inproc(server_app, Faulty(node=2, rounds={2}, mode="raise"), run_config, nodes())
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    (failure,) = records[2]["failures"]
    assert failure["stage"] == "train" and failure["node"] == 2 and "scanner archive unreachable" in failure["reason"]
    assert "skipped" not in records[2]
    trained = {name for name, s in by_name(records[2]).items() if "train-loss" in s}
    assert trained == {"site-1", "site-3"}  # node 2 (site-2) is left out of round 2 only
    assert {name for name, s in by_name(records[3]).items() if "train-loss" in s} == {"site-1", "site-2", "site-3"}
    assert records[1]["failures"] == records[3]["failures"] == []
    assert sum(r.has_error() for r in grid.replies) == 1


def _asked(grid, stage: str, server_round: int) -> set[int]:
    return {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == stage and _round(m) == server_round}


@pytest.mark.slow
def test_a_node_that_hangs_past_the_timeout_sits_rounds_out_doubling(tmp_path, capsys):
    """Silent in round 1's training, node 3 is not asked to validate round 1's model (it is still at work) and sits
    round 2 out; silent again in round 3, it sits out rounds 4 and 5; it answers in round 6 and is asked as before.
    With min-nodes 3 (every node) it would sit nothing out: the round needs it (tests/server/test_silence.py)."""
    settings = {"num-server-rounds": 7, "eval-subsets": "full", "round-timeout": 8.0, "eval-every": 7, "min-nodes": 2}
    run_config = tiny_run_config(tmp_path, **settings)  # min-nodes 2: a round may go on with two of the three
    faulty = Faulty(node=3, rounds={1, 3}, mode="hang")
    try:
        grid = run_inproc(server_app, faulty, run_config, nodes())
    finally:
        faulty.release.set()
    records = _records(tmp_path / "run")
    for r in (1, 3):
        (failure,) = records[r]["failures"]
        assert failure["node"] == 3 and "no reply within the round timeout (8 s)" in failure["reason"]
        assert _asked(grid, "train", r) == {1, 2, 3} and _asked(grid, "evaluate", r) == {1, 2}
    assert [records[r].get("rested") for r in range(1, 8)] == [None, [3], None, [3], [3], None, None]
    assert _asked(grid, "train", 2) == _asked(grid, "train", 4) == _asked(grid, "train", 5) == {1, 2}
    assert _asked(grid, "train", 6) == _asked(grid, "evaluate", 6) == {1, 2, 3}
    assert "site-3" in {name for name, s in by_name(records[6]).items() if "train-loss" in s}
    assert all("skipped" not in records[r] for r in range(1, 8)) and "global" in records[7]
    assert "nodes 3 sat out (silent before)" in (tmp_path / "run" / "REPORT.md").read_text()
    assert "round 2/7: 2/2 sites (sat out: 3)" in capsys.readouterr().err


def test_with_rest_silent_0_a_silent_node_is_asked_every_stage(tmp_path):
    run_config = tiny_run_config(
        tmp_path,
        **{"num-server-rounds": 2, "eval-subsets": "full", "round-timeout": 8.0, "eval-every": 2, "rest-silent": 0},
    )
    faulty = Faulty(node=3, rounds={1}, mode="hang")
    try:
        grid = run_inproc(server_app, faulty, run_config, nodes())
    finally:
        faulty.release.set()
    records = _records(tmp_path / "run")
    assert [f["node"] for f in records[1]["failures"]] == [3] and records[2]["failures"] == []
    assert _asked(grid, "evaluate", 1) == _asked(grid, "train", 2) == {1, 2, 3}
    assert "rested" not in records[2] and "global" in records[2]


def test_too_few_replies_skip_the_round_and_keep_the_model(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full", "min-replies": 3})
    grid = run_inproc(server_app, Faulty(node=1, rounds={1}, mode="raise"), run_config, nodes())
    records = _records(tmp_path / "run")
    assert records[1]["skipped"].startswith("2 of 3 nodes replied")
    assert "skipped" not in records[2]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    first = {k: v.numpy() for k, v in next(m for m in sent if _round(m) == 1).content["arrays"].items()}
    second = {k: v.numpy() for k, v in next(m for m in sent if _round(m) == 2).content["arrays"].items()}
    assert all(np.array_equal(first[k], second[k]) for k in first)  # round 1 changed nothing


def test_missing_nodes_skip_rounds_instead_of_waiting_forever(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full", "node-wait": 0.5})
    grid = InProcGrid(client_app, run_config, nodes())
    grid.offline = {3}
    from server.report import RunFailed

    with pytest.raises(RunFailed, match="no round aggregated"):  # so flwr ls and the launchers say failed
        server_app(grid, server_context(grid, run_config))
    records = _records(tmp_path / "run")
    assert [r.get("skipped") for r in records[1:]] == ["2 of 3 nodes connected after 0.5 s"] * 2
    # the connected nodes were asked for their voxel size (the plan goes on without the missing one); no round ran
    assert {(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent} == {("query", 1), ("query", 2)}
    assert "**FAILED: no round aggregated (0 of 2 rounds aggregated).**" in (tmp_path / "run" / "REPORT.md").read_text()


def test_a_site_with_no_usable_case_fails_its_replies_and_the_rounds_go_on(tmp_path):
    shape = (32, 32, 32)  # the tiny preset's crop
    for i in range(3):
        for site in ("a", "b"):
            write_case(tmp_path / site, f"FeTS2022_{i:05d}", seed=i + (10 if site == "b" else 0), shape=shape)
    write_case(tmp_path / "test", "FeTS2022_09000", seed=5, shape=shape)
    for case in ("FeTS2022_00200", "FeTS2022_00201"):  # site c: every case broken
        write_case(tmp_path / "c", case, seed=1, shape=shape)
        (tmp_path / "c" / case / f"{case}_seg.nii.gz").write_bytes(b"not a nifti file")
    run_config = tiny_run_config(
        tmp_path,
        **{
            "num-server-rounds": 2,
            "eval-subsets": "full",
            "test-data-path": str(tmp_path / "test"),
        },
    )
    node_configs = [{"data-path": str(tmp_path / s), "site-name": s} for s in ("a", "b", "c")]
    run_inproc(server_app, client_app, run_config, node_configs)
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        train_failures = [f for f in rec["failures"] if f["stage"] == "train"]
        # the server hears the category and a short code; which cases broke, and where, stays in the node's log
        assert len(train_failures) == 1
        assert train_failures[0]["reason"] == "data: no usable training case (details in the node's log)"
        assert "skipped" not in rec
        assert {n for n, s in by_name(rec).items() if "train-loss" in s} == {"a", "b"}
