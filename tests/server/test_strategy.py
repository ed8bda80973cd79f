"""The aggregation strategy (server.strategy): robust settings that cannot work are refused before any work."""

from __future__ import annotations

import pytest

from mstkd.errors import InputError
from mstkd.runconfig import RunConfig


def test_impossible_robust_settings_are_refused_before_any_work():
    from server.strategy import strategy_options

    with pytest.raises(InputError, match="needs at least 7 nodes per round"):
        strategy_options(RunConfig.parse({"strategy": "bulyan", "malicious-nodes": 1}), 4)
    with pytest.raises(InputError, match="trims no reply"):
        strategy_options(RunConfig.parse({"strategy": "fedtrimmedavg", "trim-beta": 0.2}), 4)
    assert strategy_options(RunConfig.parse({"strategy": "multikrum", "malicious-nodes": 1}), 4) == {
        "num_malicious_nodes": 1,
        "num_nodes_to_select": 3,
    }


def test_krum_below_its_node_count_is_run_with_a_warning():
    """Krum and MultiKrum keep f hostile updates out only among 2f + 3 replies (Blanchard et al., 2017); with four
    sites, f = 1 and one site sign-flipping its update, a MultiKrum run never learned (phantom-4-robust)."""
    from server.strategy import strategy_caveat

    multikrum = RunConfig.parse({"strategy": "multikrum", "malicious-nodes": 1})
    assert "needs at least 5 nodes per round" in strategy_caveat(multikrum, 4)
    assert strategy_caveat(multikrum, 5) is None
    assert strategy_caveat(RunConfig.parse({"strategy": "krum", "malicious-nodes": 2}), 6) is not None
    assert strategy_caveat(RunConfig.parse({"strategy": "fedmedian", "malicious-nodes": 1}), 4) is None
    bounded = RunConfig.parse({"update-bound": 3.0})
    assert "update-bound with min-nodes=2: a round of fewer than three replies" in strategy_caveat(bounded, 2)
    assert strategy_caveat(bounded, 3) is None and strategy_caveat(RunConfig.parse({}), 2) is None
    both = strategy_caveat(RunConfig.parse({"strategy": "krum", "update-bound": 3.0}), 2)
    assert "needs at least 5 nodes" in both and "update-bound with min-nodes=2" in both


def _evaluate_replies(scores: list[tuple[int, float]]):
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    replies = []
    for node, (cases, dice) in enumerate(scores, start=1):
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        metrics = MetricRecord({"num-examples": cases, "val-mean-dice": dice, "val-dice-WT": dice})
        replies.append(Message(RecordDict({"metrics": metrics}), reply_to=sent))
    return replies


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_with_a_robust_aggregator_a_node_claiming_every_case_cannot_choose_best_pt(tmp_path, strategy, task_identity):
    from server.runlog import RunLog
    from server.strategy import make_strategy

    # three honest sites score 0.50-0.60; a fourth claims the cap on cases and a perfect Dice
    replies = _evaluate_replies([(3, 0.50), (4, 0.55), (2, 0.60), (10_000, 1.0)])
    options = {"strategy": strategy, "trim-beta": 0.25} if strategy == "fedtrimmedavg" else {"strategy": strategy}
    robust = make_strategy(RunConfig.parse(options), runlog=RunLog(tmp_path), nodes=4 if strategy != "bulyan" else 7)
    metrics = robust.aggregate_evaluate(1, replies)
    assert metrics["val-mean-dice"] == pytest.approx(0.575)  # the median: between the honest sites' scores
    assert metrics["val-dice-WT"] == pytest.approx(0.575)
    assert "num-examples" not in metrics

    fedavg = make_strategy(RunConfig.parse({}), runlog=RunLog(tmp_path), nodes=4)
    assert fedavg.aggregate_evaluate(1, _evaluate_replies([(3, 0.50), (4, 0.55), (2, 0.60), (10_000, 1.0)]))[
        "val-mean-dice"
    ] == pytest.approx(0.9995, abs=1e-4)  # FedAvg trusts the counts, as its arrays do (docs/security.md)


def test_a_site_without_validation_cases_has_no_vote_in_the_median(task_identity):
    from server.strategy import median_metrics

    contents = [r.content for r in _evaluate_replies([(0, 0.0), (3, 0.7), (5, 0.8)])]
    assert median_metrics(contents, "num-examples")["val-mean-dice"] == pytest.approx(0.75)
    assert len(median_metrics([r.content for r in _evaluate_replies([(0, 0.0)])], "num-examples")) == 0


def _train_replies(updates: list[tuple[int, float]]):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    replies = []
    for node, (cases, value) in enumerate(updates, start=1):
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        arrays = ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": cases, "train-loss": 1.0})})
        replies.append(Message(content, reply_to=sent))
    return replies


def test_multikrum_averages_its_selection_one_vote_per_site_whatever_count_is_claimed(tmp_path, task_identity):
    from server.runlog import RunLog
    from server.strategy import make_strategy

    # three honest sites send 1.0, 1.1 and 1.6; a hostile one sends 0.95, near enough to the others to be
    # selected, and claims the cap on cases. MultiKrum (f = 1) keeps the 3 nearest to the others: 0.95, 1.0, 1.1
    updates = [(3, 1.0), (4, 1.1), (2, 1.6), (10_000, 0.95)]
    multikrum = make_strategy(
        RunConfig.parse({"strategy": "multikrum", "malicious-nodes": 1}), runlog=RunLog(tmp_path), nodes=4
    )
    arrays, _ = multikrum.aggregate_train(1, _train_replies(updates))
    # weighted by the claimed counts the hostile reply would be 99.9 % of the average (0.9501)
    assert arrays["w"].numpy() == pytest.approx([(0.95 + 1.0 + 1.1) / 3] * 3)

    fedavg = make_strategy(RunConfig.parse({}), runlog=RunLog(tmp_path), nodes=4)
    arrays, _ = fedavg.aggregate_train(1, _train_replies(updates))
    assert arrays["w"].numpy()[0] == pytest.approx(0.95, abs=1e-3)  # FedAvg trusts the counts (docs/security.md)


def _bounding_fedavg(tmp_path, bound: float):
    import numpy as np

    from server.runlog import RunLog
    from server.strategy import make_strategy

    fedavg = make_strategy(RunConfig.parse({"update-bound": bound}), runlog=RunLog(tmp_path), nodes=4)
    fedavg.bound_base = {"w": np.zeros(3, dtype=np.float32)}  # the round's global weights, as configure_train keeps
    return fedavg


def test_update_bound_scales_an_update_longer_than_k_medians_down_and_records_it(tmp_path, task_identity):
    """From a global model of 0, sites send 1.0, 1.2, 0.9 and 100 (x100, one site's update scaled). The lower median
    update is 1.0's, so at update-bound 3 the fourth becomes 3.0, its direction kept; FedAvg then averages."""
    import math

    fedavg = _bounding_fedavg(tmp_path, 3.0)
    arrays, _ = fedavg.aggregate_train(1, _train_replies([(1, 1.0), (1, 1.2), (1, 0.9), (1, 100.0)]))
    assert arrays["w"].numpy() == pytest.approx([(1.0 + 1.2 + 0.9 + 3.0) / 4] * 3)
    (bounded,) = fedavg.runlog.record(1)["bounded"]
    assert bounded["node"] == 4
    assert bounded["norm"] == pytest.approx(100 * math.sqrt(3)) and bounded["limit"] == pytest.approx(3 * math.sqrt(3))

    unbounded = _bounding_fedavg(tmp_path / "off", 0.0)
    arrays, _ = unbounded.aggregate_train(1, _train_replies([(1, 1.0), (1, 1.2), (1, 0.9), (1, 100.0)]))
    assert arrays["w"].numpy()[0] == pytest.approx(103.1 / 4)  # off: the scaled update is a quarter of the average
    assert "bounded" not in unbounded.runlog.record(1)


def test_update_bound_leaves_updates_within_it_and_ignores_unchanged_replies(tmp_path, task_identity, caplog):
    within = _bounding_fedavg(tmp_path / "within", 3.0)
    arrays, _ = within.aggregate_train(1, _train_replies([(2, 1.0), (1, 1.2), (1, 0.9), (1, 2.9)]))
    assert arrays["w"].numpy()[0] == pytest.approx((2.0 + 1.2 + 0.9 + 2.9) / 5)  # the counts still weigh
    assert "bounded" not in within.runlog.record(1) and "update-bound compares" not in caplog.text
    # two sites sent back the model they got: the median is of the updates that moved, 1.0 and 5.0 (the lower: 1.0)
    lazy = _bounding_fedavg(tmp_path / "lazy", 3.0)
    arrays, _ = lazy.aggregate_train(1, _train_replies([(1, 0.0), (1, 0.0), (1, 1.0), (1, 5.0)]))
    assert arrays["w"].numpy()[0] == pytest.approx((1.0 + 3.0) / 4)
    assert "update-bound compares 2 update(s) that moved" in caplog.text  # a round the bound cannot protect
    caplog.clear()
    still = _bounding_fedavg(tmp_path / "still", 3.0)
    arrays, _ = still.aggregate_train(1, _train_replies([(1, 0.0), (1, 0.0)]))  # nothing moved: nothing to bound
    assert arrays["w"].numpy()[0] == 0.0 and "bounded" not in still.runlog.record(1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"update-bound": 0.5}, "update-bound=0.5: give 0 .off. or a number from 1"),
        ({"update-bound": float("inf")}, "update-bound=inf: give 0"),
        ({"update-bound": 3.0, "dp": "server"}, "update-bound with dp='server'"),
        ({"update-bound": 3.0, "dp": "client"}, "update-bound with dp='client'"),
    ],
)
def test_an_update_bound_that_cannot_work_is_refused_before_any_work(options, message):
    from server.strategy import strategy_options

    with pytest.raises(InputError, match=message):
        strategy_options(RunConfig.parse(options), 4)
    assert strategy_options(RunConfig.parse({"update-bound": 1.0, "strategy": "fedmedian"}), 4) == {}
    # under SecAgg+ it bounds the lengths the nodes claim (server.secagg_average.allowed_update)
    assert strategy_options(RunConfig.parse({"update-bound": 3.0, "secagg": True}), 4) == {}
