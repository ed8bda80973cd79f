"""The ClientApp (client.app), called as on a deployed node: it answers a packed message in kind, and refuses a
poisoned global model, a state key that leaves its state folder and a work-dir chosen by the run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.app import app as client_app
from messages.arrays import is_packed, pack, unpack
from mstkd.errors import RefusedMessage
from mstkd.runconfig import check_state_key
from tests.helpers import deployed_site, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def test_the_node_answers_a_packed_message_in_kind(tmp_path):
    run_config, node_config = deployed_site(tmp_path, worker="off")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})

    def ask(kind: str, content: RecordDict) -> RecordDict:
        return client_app(Message(content, dst_node_id=1, message_type=kind), context).content

    evaluate = RecordDict({"arrays": arrays, "config": ConfigRecord()})
    plain_scores = ask(MessageType.EVALUATE, evaluate)["metrics"]
    packed_scores = ask(MessageType.EVALUATE, pack(evaluate))["metrics"]
    assert {k: v for k, v in plain_scores.items() if "-time-" not in k} == {
        k: v for k, v in packed_scores.items() if "-time-" not in k
    }

    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    reply = ask(MessageType.TRAIN, pack(train))
    assert is_packed(reply) and list(reply["arrays"]) == ["float16"]
    assert list(unpack(reply)["arrays"]) == list(arrays)

    # client-side differential privacy clips the unpacked update, whatever way it travels
    context.run_config["transport"] = "float32"
    clip = 0.01
    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, KEY_CLIPPING_NORM: clip})})
    clipped = unpack(ask(MessageType.TRAIN, pack(train)))
    update = [clipped["arrays"][k].numpy() - arrays[k].numpy().astype(np.float32) for k in arrays]
    assert clipped["metrics"]["update-norm"] > 10 * clip  # the update before clipping
    assert np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update)) <= clip * 1.001


def _node(tmp_path: Path) -> tuple[dict, Context]:
    run_config, node_config = deployed_site(tmp_path, worker="off")
    return run_config, Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def _train_message(arrays: dict, server_round: int, state_key: str = "run-1.test") -> Message:
    config = ConfigRecord({"server-round": server_round, "lr": 1e-3, "state-key": state_key})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def test_a_node_refuses_a_global_model_that_is_not_finite_and_keeps_its_state(tmp_path):
    _, context = _node(tmp_path)
    arrays = tiny_arrays()
    assert not client_app(_train_message(arrays, 1), context).has_error()
    state = next((tmp_path / "state").rglob("local.pt"))
    before = hashlib.sha256(state.read_bytes()).hexdigest()

    poisoned = dict(arrays)
    name = next(iter(poisoned))
    poisoned[name] = poisoned[name].copy()
    poisoned[name].flat[0] = np.nan
    reply = client_app(_train_message(poisoned, 2), context)
    assert reply.has_error()
    assert reply.error.reason == f"node refused: the global model is not finite (1 values in {name})"
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before  # not touched, and still finite
    payload = torch.load(state, weights_only=True)
    assert all(torch.isfinite(v).all() for v in payload["teacher"].values() if v.is_floating_point())


def test_a_node_refuses_a_round_epoch_or_mu_out_of_range_and_keeps_its_state(tmp_path):
    """A round far beyond the run's last would make every later round look late to the site's state (never saved
    again); a NaN epoch would reach the learning rate. Each is refused before the site's state is touched."""
    run_config, context = _node(tmp_path)
    arrays = tiny_arrays()
    assert not client_app(_train_message(arrays, 1), context).has_error()
    state = next((tmp_path / "state").rglob("local.pt"))
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    last = run_config["num-server-rounds"]
    for key, value, reason in (
        ("server-round", 10**12, f"server-round is not a finite number in 0..{last}"),
        ("server-round", 1.5, "server-round is not a whole number"),
        ("server-round", "2", f"server-round is not a finite number in 0..{last}"),
        ("epoch", float("nan"), "epoch is not a finite number in 0.."),
        ("proximal-mu", -1.0, "proximal-mu is not a finite number in 0..inf"),
        ("proximal-mu", float("inf"), "proximal-mu is not a finite number in 0..inf"),
    ):
        message = _train_message(arrays, 2)
        message.content["config"][key] = value
        reply = client_app(message, context)
        assert reply.has_error() and reply.error.reason.startswith(f"node refused: the message's {reason}"), key
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("key", ["../../escaped", "/tmp/absolute", "a/b", "..", ".hidden", ""])
def test_a_state_key_that_leaves_the_state_folder_is_refused(tmp_path, key):
    _, context = _node(tmp_path)
    if key:
        with pytest.raises(RefusedMessage, match="not a plain folder name"):
            check_state_key(key)
    reply = client_app(_train_message(tiny_arrays(), 1, state_key=key or "../x"), context)
    assert reply.has_error() and reply.error.reason.startswith("node refused: state key ")
    assert not list(tmp_path.rglob("local.pt"))  # nothing written anywhere
    assert not (tmp_path.parent / "escaped").exists()


def test_a_deployed_node_never_writes_where_the_run_config_says(tmp_path, monkeypatch):
    """The run submitter's work-dir is ignored by a deployed node: its state lives under its own state folder."""
    _, context = _node(tmp_path)
    elsewhere = tmp_path / "chosen-by-the-run"
    context = Context(
        run_id=1,
        node_id=5,
        node_config={k: v for k, v in context.node_config.items() if k != "state-dir"},
        state=RecordDict(),
        run_config=context.run_config | {"work-dir": str(elsewhere)},
    )
    home = tmp_path / "home"
    monkeypatch.setenv("MSTKD_HOME", str(home))
    assert not client_app(_train_message(tiny_arrays(), 1), context).has_error()
    assert not elsewhere.exists() and list((home / "nodes").rglob("local.pt"))


def _secagg_stage(stage: str, **configs) -> Message:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def test_a_site_that_requires_secure_aggregation_sends_no_update_outside_it(tmp_path, monkeypatch):
    """node config require-secagg=3: a plain train message, a set-up whose threshold is half the shares or less,
    and a key exchange among fewer than 3 nodes are refused before any work; the protocol's messages that keep
    to the terms reach Flower's SecAgg+ client (which here fails on its own checks, not on the site's terms)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    import client.secagg as secagg

    _, context = _node(tmp_path)
    context.node_config["require-secagg"] = "3"  # as a deployed node's --node-config gives it: text
    worked = []
    monkeypatch.setattr(secagg, "secaggplus_mod", lambda msg, ctx, call_next: worked.append(msg) or msg)
    terms = "node refused: this site sends its update only under secure aggregation among 3 nodes or more"
    plain = client_app(_train_message(tiny_arrays(), 1), context)
    assert plain.has_error() and plain.error.reason == f"{terms} (require-secagg); this run asked for it in the clear"
    assert not list((tmp_path / "state").rglob("local.pt"))  # no training ran
    setup = {Key.SAMPLE_NUMBER: 3, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 4194304, Key.MOD_RANGE: 4294967296}
    setup[Key.MAX_WEIGHT] = 10.0
    for shares, threshold in ((3, 1), (4, 2), (2, 2), ("3", 2)):
        reply = client_app(_secagg_stage(Stage.SETUP, **setup, share_num=shares, threshold=threshold), context)
        assert reply.has_error() and reply.error.reason.startswith(terms), (shares, threshold)
        assert f"set-up ({threshold} of {shares} shares) is not" in reply.error.reason
    two = {"1": [b"a", b"b"], "2": [b"c", b"d"]}
    reply = client_app(_secagg_stage(Stage.SHARE_KEYS, **two), context)
    assert reply.has_error() and reply.error.reason.endswith("this round has 2")
    assert not worked
    client_app(_secagg_stage(Stage.SETUP, **setup, share_num=3, threshold=2), context)
    client_app(_secagg_stage(Stage.SHARE_KEYS, **two, **{"3": [b"e", b"f"]}), context)
    assert len(worked) == 2
    context.node_config["require-secagg"] = "0"  # off: a plain train message trains
    assert not client_app(_train_message(tiny_arrays(), 1), context).has_error()
