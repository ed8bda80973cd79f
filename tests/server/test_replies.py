"""Replies checked one by one at the federation boundary (server.replies), each defence written as the attack.
(tests/integration/test_flwr_run.py sends every fault through `flwr run` too.)"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

import simulations.adversary as adversary
from messages.clipping import clip_update, update_norm
from server.replies import RefusedReply, ReplyRules, check_reply, printable
from tests.helpers import FAULT_REASONS, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def _honest_exchange(dtype: str = "float16") -> tuple[Message, Message, ReplyRules]:
    """A train message with the tiny model, and the reply an honest node sends (the model moved a little)."""
    arrays = tiny_arrays(dtype)
    sent = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": ConfigRecord({})}),
        dst_node_id=3,
        message_type=MessageType.TRAIN,
    )
    moved = {k: (v.astype(np.float32) + 0.01).astype(dtype) for k, v in arrays.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in moved.items()}),
            "metrics": MetricRecord({"num-examples": 4, "train-loss": 1.5}),
            "site": ConfigRecord({"name": "site-1", "device": "cpu"}),
        }
    )
    rules = ReplyRules.of(ArrayRecord({k: Array(v) for k, v in arrays.items()}), max_examples=10_000)
    return sent, Message(content, reply_to=sent), rules


@pytest.mark.parametrize("fault", adversary.FAULTS)
def test_every_faulty_reply_is_refused_with_a_reason(fault):
    sent, reply, rules = _honest_exchange()
    clean = check_reply(reply.content, "train", rules)  # the honest reply passes, as float32
    assert {a.dtype for a in clean["arrays"].values()} == {"float32"}
    adversary.corrupt(fault, sent, reply)
    with pytest.raises(RefusedReply) as refused:
        check_reply(reply.content, "train", rules)
    assert FAULT_REASONS[fault] in str(refused.value)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


@pytest.mark.parametrize(
    "content, reason",
    [
        ({"metrics": MetricRecord({"num-examples": 1})}, "no 'arrays' record"),
        ({"arrays": ArrayRecord(), "metrics": MetricRecord(), "leak": ConfigRecord({"x": "y"})}, "unexpected record"),
    ],
)
def test_replies_of_the_wrong_shape_are_refused(content, reason):
    _, _, rules = _honest_exchange()
    with pytest.raises(RefusedReply, match=reason):
        check_reply(RecordDict(content), "train", rules)


def test_dice_scores_outside_zero_to_one_are_refused():
    """A validation Dice of 1e300 would make its round best.pt for ever."""
    _, _, rules = _honest_exchange()
    evaluate = RecordDict({"metrics": MetricRecord({"num-examples": 2, "val-mean-dice": 1e300})})
    with pytest.raises(RefusedReply, match="val-mean-dice = 1e[+]300 lies outside"):
        check_reply(evaluate, "evaluate", rules)
    evaluate["metrics"] = MetricRecord({"num-examples": 2, "val-mean-dice": 0.7, "val-share-WT": -0.1})
    with pytest.raises(RefusedReply, match="val-share-WT"):
        check_reply(evaluate, "evaluate", rules)


def _train_reply(arrays: dict[str, np.ndarray], **metrics) -> RecordDict:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4, "train-loss": 1.5, **metrics})})


def test_with_client_side_dp_an_update_longer_than_the_clipping_norm_is_refused():
    """dp='client': the server's noise is calibrated to the clipping norm it sends; a node that skips clipping would
    move the average without bound. An update clipped and then rounded to float16 is longer than the norm; the node
    aims lower so that what travels is within it, and the server allows nothing more."""
    arrays, clip = tiny_arrays("float16"), 0.5
    sent = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})})
    sent["config"] = ConfigRecord({KEY_CLIPPING_NORM: clip})
    rules = ReplyRules.of(ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}), 10_000, sent=sent)
    base = {k: v.astype(np.float64) for k, v in arrays.items()}
    rng = np.random.default_rng(0)
    trained = {k: (v + rng.normal(0.0, 0.01, v.shape)).astype(np.float16) for k, v in base.items()}
    length = update_norm(base, trained)
    assert length > 10 * clip

    clipped, scaled = clip_update(base, trained, clip)
    assert scaled and {v.dtype for v in clipped.values()} == {np.dtype(np.float16)}
    assert clip * 0.999 < update_norm(base, clipped) <= clip
    check_reply(_train_reply(clipped), "train", rules)
    rounded_after = {k: (base[k] + (v - base[k]) * clip / length).astype(np.float16) for k, v in trained.items()}
    assert update_norm(base, rounded_after) > clip  # clipped, then rounded: past the norm by the rounding
    for reply in (trained, rounded_after, clip_update(base, trained, 1.01 * clip)[0]):
        with pytest.raises(RefusedReply, match=r"longer than the clipping norm 0.5: not clipped"):
            check_reply(_train_reply(reply), "train", rules)
    assert ReplyRules.of(ArrayRecord(), 10_000, sent=RecordDict({"config": ConfigRecord({})})).clip is None


def test_clipping_works_in_float64_whatever_the_transport_dtype():
    """Float16 squares overflow past a norm of 256: an update that long would be scaled to nothing, not to the norm.
    A norm below float16's spacing leaves no room for any update."""
    sent = {"w": np.zeros(1000, np.float16)}
    clipped, scaled = clip_update(sent, {"w": np.full(1000, 10.0, np.float16)}, 2.0)  # an update of norm 316
    assert scaled and clipped["w"].dtype == np.float16
    assert 1.99 < update_norm(sent, clipped) <= 2.0
    kept, scaled = clip_update(sent, {"w": np.full(1000, 0.01, np.float16)}, 2.0)
    assert not scaled and np.array_equal(kept["w"], np.full(1000, 0.01, np.float16))
    ones = {"w": np.ones(1000, np.float16)}  # spacing 0.001 per weight: no update of norm 1e-5 can travel
    nothing, scaled = clip_update(ones, {"w": np.full(1000, 1.5, np.float16)}, 1e-5)
    assert scaled and update_norm(ones, nothing) <= 1e-5


def test_adaptive_clippings_bit_must_be_0_or_1():
    """Adaptive clipping counts the replies whose update was clipped; the bit is logged among the train metrics,
    whose average must stay a share."""
    _, _, rules = _honest_exchange()
    rules = ReplyRules(rules.shapes, rules.max_examples, ("norm_bit",))
    for bit, ok in ((0, True), (1, True), (2, False), (0.5, False)):
        content = _train_reply({k: np.zeros(v, np.float16) for k, v in rules.shapes.items()}, norm_bit=bit)
        if ok:
            check_reply(content, "train", rules)
        else:
            with pytest.raises(RefusedReply, match="norm_bit = .* is not 0 or 1"):
                check_reply(content, "train", rules)


def test_metric_values_must_be_finite_numbers_and_site_text_is_trimmed():
    sent, reply, rules = _honest_exchange()
    reply.content["metrics"]["train-loss"] = float("inf")
    with pytest.raises(RefusedReply, match="metric train-loss is not finite"):
        check_reply(reply.content, "train", rules)
    sent, reply, rules = _honest_exchange()
    reply.content["site"] = ConfigRecord({"name": "a\nb|" + "x" * 500, "secret-path": "/data/x"})
    clean = check_reply(reply.content, "train", rules)
    assert set(clean["site"].keys()) == {"name"} and "\n" not in clean["site"]["name"]
    assert len(clean["site"]["name"]) <= 200


def test_a_node_text_as_long_as_a_message_allows_is_trimmed_without_copying_it():
    """A node chooses its error reason and its name; only the characters a log line shows are looked at."""
    import tracemalloc

    text = "\u4e00\n" * 500_000  # each character would become a string of its own if the whole text were cleaned
    tracemalloc.start()
    try:
        shown = printable(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shown == ("\u4e00 " * 100)[:197] + "..."
    assert peak < 100_000, peak


@pytest.mark.parametrize(
    "stage, name, value, reason",
    [
        # the site's record holds the server's own text and checked counts: a metric of that name replaced them
        ("evaluate", "val-collapse", 1.0, "not one of evaluate metrics"),  # a text key: the state no longer resumed
        ("train", "train-examples", 1e300, "not one of train metrics"),  # past the checked num-examples
        ("train", "device", 1.0, "not one of train metrics"),
        ("evaluate", "train-loss", 123.0, "not one of evaluate metrics"),  # overwrote the round's train loss
        ("train", "val-mean-dice", 1.0, "not one of train metrics"),
        ("train", "train-time-train", -1e6, "lies outside 0 .. a week"),  # a negative phase in phases.json
        ("evaluate", "val-time-evaluate", 3e38, "lies outside 0 .. a week"),  # summed to Infinity
    ],
)
def test_a_metric_cannot_take_another_stages_name_a_name_the_server_writes_or_an_impossible_clock(
    stage, name, value, reason
):
    _, reply, rules = _honest_exchange()
    content = reply.content if stage == "train" else RecordDict({"metrics": MetricRecord({"num-examples": 2})})
    content["metrics"]["val-mean-dice" if stage == "evaluate" else "train-loss"] = 0.5
    check_reply(content, stage, rules)  # honest
    content["metrics"][name] = value
    with pytest.raises(RefusedReply, match=reason):
        check_reply(content, stage, rules)
