"""Restarting a run, in process: a server killed mid-run resumes to the same result; a reused out-dir is refused
unless resumed or overwritten."""

from __future__ import annotations

import pytest
import torch

from client.app import app as client_app
from mstkd.errors import InputError
from server.app import app as server_app
from server.state import ServerCheckpoint
from tests.helpers import InProcGrid, nodes, run_inproc, server_context, tiny_run_config
from tests.helpers import run_records as _records
from tests.helpers import server_round as _round


class ServerKilled(BaseException):
    """Stands for the server process dying (not an Exception: nothing may catch it)."""


class KillAtRound(InProcGrid):
    """The server dies once the nodes have answered round ``round``'s ``stage`` messages, before it uses the replies
    (``train``: they trained and it did not aggregate; ``evaluate``: the round's new global model has left it)."""

    def __init__(self, *args, round: int, stage: str = "train", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round, self.kill_stage = round, stage

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == self.kill_stage and _round(m) == self.kill_round for m in messages):
            raise ServerKilled
        return replies


@pytest.mark.slow
def test_a_server_killed_after_round_2_resumes_to_the_same_result(tmp_path):
    extra = {"num-server-rounds": 3, "eval-subsets": "full", "eval-every": 1, "transport": "float32"}
    whole = tiny_run_config(tmp_path / "whole", **extra)
    run_inproc(server_app, client_app, whole, nodes())

    broken = tiny_run_config(tmp_path / "crash", **extra)
    grid = KillAtRound(client_app, broken, nodes(), round=3)
    with pytest.raises(ServerKilled):
        server_app(grid, server_context(grid, broken))
    run = tmp_path / "crash" / "run"
    assert ServerCheckpoint.load(run).round == 2
    resumed = {**broken, "resume-from": str(run), "out-dir": ""}
    run_inproc(server_app, client_app, resumed, nodes())

    a, b = _records(tmp_path / "whole" / "run"), _records(run)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for key, value in a[3]["global"].items():
        assert b[3]["global"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    final_a = torch.load(tmp_path / "whole" / "run" / "last.pt", weights_only=True)["student"]
    final_b = torch.load(run / "last.pt", weights_only=True)["student"]
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-5) for k in final_a)


def test_a_reused_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full", "run-name": "study"})
    run_inproc(server_app, client_app, run_config, nodes())
    report = (tmp_path / "run" / "REPORT.md").read_text()
    (tmp_path / "run" / "eval" / "round_7.md").write_text("stale")
    with pytest.raises(InputError) as refused:
        run_inproc(server_app, client_app, run_config, nodes())
    assert "already holds a run" in str(refused.value) and "overwrite=true" in str(refused.value)
    assert "\n" not in str(refused.value) and (tmp_path / "run" / "REPORT.md").read_text() == report
    run_inproc(server_app, client_app, {**run_config, "overwrite": True}, nodes())
    assert not (tmp_path / "run" / "eval" / "round_7.md").exists()
    # the same run name twice: two state folders, neither run half-using the other's
    keys = sorted(p.name for p in (tmp_path / "work" / "nodes").iterdir())
    assert len(keys) == 2 and all(k.startswith("study.") for k in keys)


def test_a_dp_run_killed_after_a_release_counts_it_and_resumes_only_with_its_noise(tmp_path):
    """A release reached the nodes before it was counted, and the server's state (the account resume-from reads) was
    written only at the round's end: a server killed in between resumed with the release uncounted and released the
    round again. And a DP run resumed with dp='off' was taken, under a report that still showed the old epsilon."""
    extra = {"num-server-rounds": 2, "eval-subsets": "full", "dp": "server", "dp-clip": 1.0, "dp-noise": 1.0}
    broken = tiny_run_config(tmp_path, **extra)
    grid = KillAtRound(client_app, broken, nodes(), round=2, stage="evaluate")
    with pytest.raises(ServerKilled):
        server_app(grid, server_context(grid, broken))
    run = tmp_path / "run"
    assert ServerCheckpoint.load(run).round == 1
    resumed = {**broken, "resume-from": str(run), "out-dir": ""}
    with pytest.raises(InputError, match="resume it with the same dp settings"):
        run_inproc(server_app, client_app, {**resumed, "dp": "off"}, nodes())
    run_inproc(server_app, client_app, resumed, nodes())
    records = _records(run)
    assert [r["privacy"]["releases"] for r in records[1:]] == [1, 3]  # round 2 left the server twice


@pytest.mark.slow
def test_a_dp_run_restored_from_an_older_copy_of_its_folder_counts_every_release_the_server_made(tmp_path):
    """The account lived only in the run folder: restored from a copy made before round 2 and resumed, round 2's
    release, which the sites had had, was no longer counted (2 releases reported where 3 were made). The server's
    own copy of the account (<work-dir>/privacy/<state key>.json) keeps it."""
    import shutil

    extra = {"num-server-rounds": 2, "eval-subsets": "full", "dp": "server", "dp-clip": 1.0, "dp-noise": 1.0}
    config = tiny_run_config(tmp_path, **extra)
    grid = KillAtRound(client_app, config, nodes(), round=2, stage="train")  # stopped after round 1's end
    with pytest.raises(ServerKilled):
        server_app(grid, server_context(grid, config))
    run, backup = tmp_path / "run", tmp_path / "backup"
    shutil.copytree(run, backup)  # the copy of the folder after round 1: one release
    resumed = {**config, "resume-from": str(run), "out-dir": ""}
    run_inproc(server_app, client_app, resumed, nodes())
    assert _records(run)[2]["privacy"]["releases"] == 2
    shutil.rmtree(run)
    shutil.copytree(backup, run)  # restored from the older copy; round 2 runs again
    run_inproc(server_app, client_app, resumed, nodes())
    assert _records(run)[2]["privacy"]["releases"] == 3
    (kept,) = (tmp_path / "work" / "privacy").iterdir()
    assert kept.name == f"{ServerCheckpoint.load(run).state_key}.json" and (kept.parent.stat().st_mode & 0o077) == 0
