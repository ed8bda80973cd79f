"""Hostile nodes, in process: poisoned and impersonating replies cost only their senders, a model that never
changes is a failure, FedMedian keeps a scaled update out, an overflowing aggregate leaves no trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

import simulations.adversary as adversary
from client.app import app as client_app
from server.app import app as server_app
from server.report import RunFailed
from server.state import ServerCheckpoint, finite_memory
from tests.helpers import nodes, run_inproc, tiny_run_config
from tests.helpers import run_records as _records

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def _finite_checkpoint(path: Path) -> bool:
    student = torch.load(path, weights_only=True)["student"]
    return all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())


def test_a_node_sending_nan_and_one_claiming_another_name_cost_only_themselves(tmp_path, monkeypatch):
    """Node 1 poisons its replies with NaN; node 2 calls itself site-3. The round aggregates nodes 2 and 3, and
    node 2 cannot overwrite site-3's record (records are keyed by the node id Flower authenticated)."""

    def imposter(message, context):
        reply = adversary.app(message, context)
        if context.node_id == 2 and reply.has_content() and "site" in reply.content.config_records:
            reply.content["site"]["name"] = "site-3"
        return reply

    monkeypatch.setattr(adversary, "SETTINGS", {"attacks": {"0": "nan"}})
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "eval-subsets": "full"})
    run_inproc(server_app, imposter, run_config, nodes())
    records = _records(tmp_path / "run")
    for rec in records[1:]:
        (failure,) = rec["failures"]
        assert failure["node"] == 1 and failure["stage"] == "train"
        assert failure["reason"].startswith("refused: 2 non-finite values in ")
        assert "skipped" not in rec
        trained = {key: s["name"] for key, s in rec["sites"].items() if "train-loss" in s}
        assert trained == {"2": "site-3", "3": "site-3"}  # both kept, neither overwritten
    assert _finite_checkpoint(tmp_path / "run" / "last.pt")
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "**Outcome: 2 of 2 rounds aggregated, 2 replies refused.**" in report
    assert "node 1 (train): refused: 2 non-finite values in" in report
    columns = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "site-3@2/train-loss" in columns and "site-3@3/train-loss" in columns


def test_a_run_whose_model_never_changes_is_a_failure(tmp_path):
    """Every node sends back the model it was given: rounds 'aggregate', yet nothing was learned."""

    def lazy(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == "train" and reply.has_content():
            reply.content["arrays"] = message.content["arrays"]
        return reply

    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full"})  # float16 on the wire
    with pytest.raises(RunFailed, match="the global model never changed"):
        run_inproc(server_app, lazy, run_config, nodes())
    assert "FAILED: the global model never changed" in (tmp_path / "run" / "REPORT.md").read_text()


def _global_step(tmp: Path, strategy: str, attack: str | None, monkeypatch, **options) -> float:
    """How far one round moved the global model (L2), with node 1 honest or attacking."""
    monkeypatch.setattr(adversary, "SETTINGS", {"attacks": {"0": attack}} if attack else {})
    extra = {"num-server-rounds": 1, "eval-subsets": "full", "strategy": strategy, "transport": "float32", **options}
    run_inproc(server_app, adversary.app, tiny_run_config(tmp, **extra), nodes())
    record = _records(tmp / "run")[1]
    assert not record["failures"]  # a poisoned update is well-formed: only the aggregator helps
    return record["step_norm"]


def test_fedmedian_keeps_a_scaled_update_out_of_the_global_model(tmp_path, monkeypatch):
    steps = {
        (strategy, attack): _global_step(tmp_path / f"{strategy}-{attack}", strategy, attack, monkeypatch)
        for strategy in ("fedavg", "fedmedian")
        for attack in (None, "scale")
    }
    # FedAvg takes its share of the x100 update; the median of three ignores the one outlier
    assert steps[("fedavg", "scale")] > 10 * steps[("fedavg", None)]
    assert steps[("fedmedian", "scale")] < 2 * steps[("fedmedian", None)]


def test_update_bound_scales_a_scaled_update_down_under_fedavg(tmp_path, monkeypatch):
    """Node 1 sends its update x100. With update-bound 3 FedAvg takes it at 3 times the round's median update at
    most, and says so in the round's record and the report; honest updates, within the bound, are not touched."""
    bound = {"update-bound": 3.0}
    honest = _global_step(tmp_path / "honest", "fedavg", None, monkeypatch)
    assert _global_step(tmp_path / "honest-bounded", "fedavg", None, monkeypatch, **bound) == honest
    assert "bounded" not in _records(tmp_path / "honest-bounded" / "run")[1]
    attacked = _global_step(tmp_path / "attacked", "fedavg", "scale", monkeypatch, **bound)
    assert attacked < 3 * honest  # unbounded, more than 10 times (the FedMedian test above)
    (bounded,) = _records(tmp_path / "attacked" / "run")[1]["bounded"]
    assert bounded["node"] == 1 and bounded["norm"] > 30 * bounded["limit"] / 3
    report = (tmp_path / "attacked" / "run" / "REPORT.md").read_text()
    assert "node 1's update (norm " in report and "scaled down to update-bound's" in report


def test_update_bound_measures_updates_from_the_model_as_sent(tmp_path):
    """Nodes 1 and 2 send back the float16 model they got, node 3 trains. Measured from the server's float32 model,
    the two echoes would be float16's rounding error long, the lower median that error, and node 3's update cut to
    three times it; measured from the model as sent they did not move, and node 3's update is the median."""

    def two_echo(message, context):
        reply = client_app(message, context)
        if context.node_id in (1, 2) and message.metadata.message_type == "train" and reply.has_content():
            reply.content["arrays"] = message.content["arrays"]
        return reply

    steps = []
    for bound in (0.0, 3.0):
        extra = {"num-server-rounds": 1, "eval-subsets": "full", "update-bound": bound}  # float16 on the wire
        run_inproc(server_app, two_echo, tiny_run_config(tmp_path / f"bound-{bound}", **extra), nodes())
        record = _records(tmp_path / f"bound-{bound}" / "run")[1]
        assert "bounded" not in record and "skipped" not in record
        steps.append(record["step_norm"])
    assert steps[0] == steps[1] > 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow this test makes
def test_finite_replies_whose_aggregate_overflows_skip_the_round_and_leave_no_trace(tmp_path):
    """In round 1 every node sends weights of 3e38, finite in float32; FedAvgM with a server step of 2 takes the model
    past float32's range. That aggregate is not taken, and the momentum it had already stored is undone: round 2,
    honest, aggregates as if round 1 had never happened."""

    def huge_in_round_1(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == "train" and message.content["config"]["server-round"] == 1:
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(
                {k: Array(np.full(v.shape, 3e38, np.float32)) for k, v in arrays.items()}
            )
        return reply

    extra = {"num-server-rounds": 2, "eval-subsets": "full", "transport": "float32", "strategy": "fedavgm"}
    run_inproc(server_app, huge_in_round_1, tiny_run_config(tmp_path, **extra, **{"server-lr": 2.0}), nodes())
    records = _records(tmp_path / "run")
    assert records[1]["skipped"] == "the aggregate is not finite" and not records[1]["failures"]  # each reply was fine
    assert "skipped" not in records[2] and records[2]["model_norm"] < 1e3
    assert _finite_checkpoint(tmp_path / "run" / "last.pt")
    state = ServerCheckpoint.load(tmp_path / "run")  # what a resume would restore: finite too
    assert state.round == 2 and all(np.isfinite(v).all() for v in state.strategy["momentum_vector"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow this test makes
@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_one_reply_that_overflows_the_second_moment_skips_its_round_only(tmp_path, strategy):
    """In round 1 node 1 sends every weight shifted by 1e20, finite in float32. FedAdam's and FedYogi's second moment
    (the squared update) overflows to inf while their step stays finite, at 0: the round used to be taken, and every
    later round, honest ones too, moved the model by 0 (and the state could not be resumed). Now the round is
    skipped, its moments undone, and round 2 learns."""

    def shifted_in_round_1(message, context):
        reply = client_app(message, context)
        if (
            context.node_id == 1
            and message.metadata.message_type == "train"
            and message.content["config"]["server-round"] == 1
        ):
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: Array(v.numpy() + np.float32(1e20)) for k, v in arrays.items()})
        return reply

    extra = {"num-server-rounds": 2, "eval-subsets": "full", "transport": "float32", "strategy": strategy}
    run_inproc(server_app, shifted_in_round_1, tiny_run_config(tmp_path, **extra), nodes())
    records = _records(tmp_path / "run")
    assert records[1]["skipped"] == "the strategy's memory (momentum, moments) is not finite"
    assert not records[1]["failures"]  # the reply itself was well-formed
    assert "skipped" not in records[2] and records[2]["step_norm"] > 0
    state = ServerCheckpoint.load(tmp_path / "run")  # what a resume would restore: finite
    assert state.round == 2 and "v_t" in state.strategy and finite_memory(state.strategy)
