"""The ClientApp (client.app), called as on a deployed node: it answers a packed message in kind, and refuses a
poisoned global model, a state key that leaves its state folder and a work-dir chosen by the run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.app import app as client_app
from client.app import site_runner
from client.secagg import secagg_train
from messages import signed_keys
from messages.arrays import is_packed, pack, unpack
from mstkd.errors import RefusedMessage
from mstkd.runconfig import check_state_key
from tests.helpers import deployed_site, secagg_stage, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def test_the_node_answers_a_packed_message_in_kind(tmp_path):
    run_config, node_config = deployed_site(tmp_path, worker="off")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    arrays = ArrayRecord({k: Array(v) for k, v in tiny_arrays("float16").items()})

    def ask(kind: str, content: RecordDict) -> RecordDict:
        return client_app(Message(content, dst_node_id=1, message_type=kind), context).content

    def evaluate(server_round: int) -> RecordDict:
        return RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})

    plain_scores = ask(MessageType.EVALUATE, evaluate(1))["metrics"]
    packed_scores = ask(MessageType.EVALUATE, pack(evaluate(2)))["metrics"]  # one validation a round
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


def _fit_message(arrays: dict, server_round: int) -> Message:
    """A legacy fit message, as Flower's SecAgg+ workflow sends one to be trained (and masked)."""
    values = [np.asarray(value, dtype=np.float32) for value in arrays.values()]  # the federated arrays' order
    fitins = FitIns(ndarrays_to_parameters(values), {"server-round": server_round, "state-key": "run-1.test"})
    return Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=5, message_type=MessageType.TRAIN)


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
    again); a NaN epoch would reach the learning rate; a proximal term the run config does not set changes what the
    site approved. Each is refused before the site's state is touched."""
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
        ("proximal-mu", 0.5, "proximal-mu 0.5 is not this run's (fedavg)"),  # a run config a site approved
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


SETUP = {"sample_num": 3, "clipping_range": 8.0, "target_range": 4194304, "mod_range": 2**32, "max_weight": 10.0}
"""A SecAgg+ set-up as this project's server sends it for three nodes (share_num 3 and threshold 2 added)."""


def test_a_site_that_requires_secure_aggregation_sends_no_update_outside_it(tmp_path, monkeypatch):
    """node config require-secagg=3 (this node is node 5): every message that breaks the site's terms is refused
    before any work, stage by stage of SecAgg+; the protocol's messages that keep to them reach Flower's SecAgg+
    client (here a stand-in that records them)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    import client.secagg as secagg

    _, context = _node(tmp_path)
    context.node_config["require-secagg"] = "3"  # as a deployed node's --node-config gives it: text
    worked = []

    def flowers_client(msg, ctx, call_next):  # a stand-in that, as Flower's, fails on a set-up it cannot read
        configs = msg.content["secaggplus_configs"]
        if configs["stage"] == Stage.SETUP and "clipping_range" not in configs:
            raise KeyError("clipping_range")
        worked.append(msg)
        return msg

    monkeypatch.setattr(secagg, "secaggplus_mod", flowers_client)
    terms = "node refused: this site sends its update only under secure aggregation among 3 nodes or more"

    def refused(message: Message, why: str) -> None:
        reply = client_app(message, context)
        assert reply.has_error() and reply.error.reason.startswith(terms), reply.error.reason
        assert why in reply.error.reason and "\n" not in reply.error.reason, reply.error.reason

    refused(_train_message(tiny_arrays(), 1), "this run asked for it in the clear")
    routed = _train_message(tiny_arrays(), 1)  # Flower hands train.<name> to the same train function
    routed.metadata.message_type = "train.default"
    refused(routed, "it answers train, evaluate and query messages only")
    assert not list((tmp_path / "state").rglob("local.pt"))  # no training ran

    for shares, threshold in ((3, 1), (4, 2), (2, 2), ("3\nx", 2)):
        shown = shares if isinstance(shares, int) else "?"
        refused(secagg_stage(Stage.SETUP, **SETUP, share_num=shares, threshold=threshold), f"({threshold} of {shown}")
    refused(secagg_stage(Stage.SETUP, **{**SETUP, "mod_range": 2}, share_num=3, threshold=2), "2^32 values")
    keys = {"5": [b"a", b"b"], "6": [b"c", b"d"], "7": [b"e", b"f"]}
    client_app(secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=2), context)
    refused(secagg_stage(Stage.SHARE_KEYS, **{"5": keys["5"], "6": keys["6"]}), "this round has 2")
    refused(secagg_stage(Stage.SHARE_KEYS, **{**keys, "06": [b"g", b"h"]}), "a node that is not a node id")
    refused(secagg_stage(Stage.SHARE_KEYS, **{"6": [b"c"], "7": [b"e"], "8": [b"g"]}), "leaves this node out")
    # 2t nodes or more: two lists of survivors, each signed by t of them, need share no signer
    refused(secagg_stage(Stage.SHARE_KEYS, **keys, **{"8": [b"g", b"h"]}), "4 nodes are not fewer than twice its")
    refused(secagg_stage(signed_keys.SURVIVORS, active_nids=[5, 6]), "survivors were asked for before its key")
    client_app(secagg_stage(Stage.SHARE_KEYS, **keys), context)
    # masked with one partner only, whose key the other nodes' unmasking answers could then rebuild
    refused(secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6], ctxts=[b"x"]), "masked with 1 of the round's 2")
    refused(secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6, 9], ctxts=[b"x", b"y"]), "masked with 2")
    collect = secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6, 7], ctxts=[b"x", b"y"])
    collect.content["fitins.config"] = ConfigRecord({"server-round": 1})  # as the server's workflow names it
    client_app(collect, context)
    for survivors in ([5], [5, 5, 6], [5, 6, 9], [5, -1]):  # the consistency round's list, before it is signed
        refused(secagg_stage(signed_keys.SURVIVORS, active_nids=survivors), "survivors")
    answered = client_app(secagg_stage(signed_keys.SURVIVORS, active_nids=[5, 6, 7]), context)
    assert dict(answered.content["secaggplus_configs"]) == {}  # a node without a secagg-key signs nothing
    for alive, dead, why in (
        ([5, 6], [6], "names a node twice"),  # both secrets of node 6 in one answer
        ([6, 7], [5], "names this node dead"),
        ([5, 6, 9], [], "one not in the round"),
        ([5], [6], "fewer nodes alive than the threshold"),
    ):
        refused(secagg_stage(Stage.UNMASK, active_nids=alive, dead_nids=dead), why)
    client_app(secagg_stage(Stage.UNMASK, active_nids=[5, 6], dead_nids=[7]), context)
    assert [m.content["secaggplus_configs"]["stage"] for m in worked] == [
        Stage.SETUP,
        Stage.SHARE_KEYS,
        Stage.COLLECT_MASKED_VECTORS,
        Stage.UNMASK,
    ]
    # the terms remember a stage only once Flower's client has taken it. After a set-up Flower refused (here one of
    # 101 shares, threshold 100, without clipping_range), Flower still holds the last good set-up's threshold 2:
    # had the terms kept 100, a key exchange and a one-partner request would pass them, and Flower would mask with
    # one partner at threshold 2
    client_app(secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=2), context)
    unreadable = {k: v for k, v in SETUP.items() if k != "clipping_range"}
    assert client_app(secagg_stage(Stage.SETUP, **unreadable, share_num=101, threshold=100), context).has_error()
    refused(secagg_stage(Stage.SHARE_KEYS, **keys), "did not follow its set-up")
    refused(secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6], ctxts=[b"x"]), "before its key exchange")
    client_app(secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=2), context)
    client_app(secagg_stage(Stage.SHARE_KEYS, **keys), context)
    refused(secagg_stage(Stage.SHARE_KEYS, **keys), "did not follow its set-up")  # a second key exchange
    context.node_config["require-secagg"] = "0"  # off: a plain train message trains
    own = "node refused: secure aggregation: a list of survivors that is not node ids, this node's among them"
    for survivors in ([6, 7], [5, -1]):  # the node's own part, whatever its terms: node ids, itself among them
        assert client_app(secagg_stage(signed_keys.SURVIVORS, active_nids=survivors), context).error.reason == own
    # a round named 1.0, which training would take as round 1 a second time (client.sent records whole numbers)
    collect = secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6, 7], ctxts=[b"x", b"y"])
    collect.content["fitins.config"] = ConfigRecord({"server-round": 1.0})
    assert client_app(collect, context).error.reason.endswith("the message's server-round is not a whole number")
    assert not client_app(_train_message(tiny_arrays(), 2), context).has_error()  # round 1 went masked


def test_under_secure_aggregation_a_node_seeds_each_training_afresh():
    """A node trained twice from the same state with the same seed sends the same update, which sums over groups of
    nodes that differ in one would give away: under SecAgg+ the node draws a seed of its own for each training,
    whatever the server's message says."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters

    from client.context import SECAGG_SEED, Job
    from client.secagg import secagg_train

    seeds = []

    def do_job(job: Job, *args):
        if job == Job.ARRAY_NAMES:
            return ["w"]
        arrays, config, _ = args
        seeds.append(config[SECAGG_SEED])
        return arrays, {"num-examples": 1}, {"name": "h1"}

    fitins = FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {"server-round": 1, SECAGG_SEED: 7})
    message = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=5, message_type="train")
    for _ in range(3):
        assert not secagg_train(message, do_job).has_error()
    assert len(set(seeds)) == 3 and 7 not in seeds, seeds


def test_a_train_message_under_another_name_is_clipped_as_a_train_message(tmp_path):
    """Flower routes train.<name> to the train function and its mods: client-side DP clips it too."""
    _, context = _node(tmp_path)
    arrays = tiny_arrays()
    message = _train_message(arrays, 1)
    message.metadata.message_type = "train.default"
    message.content["config"][KEY_CLIPPING_NORM] = 0.01
    reply = client_app(message, context)
    assert not reply.has_error()
    update = [reply.content["arrays"][k].numpy().astype(np.float64) - arrays[k].astype(np.float64) for k in arrays]
    assert reply.content["metrics"]["update-norm"] > 0.1
    assert np.sqrt(sum(float(np.sum(u**2)) for u in update)) <= 0.01 * 1.01


def test_secure_aggregation_under_another_train_name_is_refused_not_sent_unmasked(tmp_path):
    """Flower's SecAgg+ client masks only messages of type train and passes train.<name> on: such a message with
    the protocol's record would have trained and replied unmasked."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    _, context = _node(tmp_path)
    message = secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=2)
    message.metadata.message_type = "train.default"
    reply = client_app(message, context)
    assert reply.has_error() and reply.error.reason == (
        "node refused: secure aggregation runs on train messages only, not on train.<name> ones"
    )


def test_a_round_whose_work_would_outlive_its_message_is_refused_and_nothing_is_saved(tmp_path):
    run_config, context = _node(tmp_path)
    expired = _train_message(tiny_arrays(), 1)
    expired.metadata.created_at -= 100  # made 100 s ago, to live 10 s: Flower would drop any reply to it
    expired.metadata.ttl = 10
    reply = client_app(expired, context)
    assert (
        reply.error.reason
        == "node refused: this message's deadline (the message's expiry) passed before its work began"
    )
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=5, message_type=MessageType.QUERY)
    query.metadata.created_at -= 100
    query.metadata.ttl = 10
    assert "deadline (the message's expiry) passed" in client_app(query, context).error.reason
    context.node_config["max-work-seconds"] = 1e-9  # the site's own cap, whatever the message allows
    capped = client_app(_train_message(tiny_arrays(), 1), context)
    assert capped.error.reason == (
        "node refused: this message's deadline (this site's max-work-seconds) passed before its work began"
    )
    del context.node_config["max-work-seconds"]
    # a run config that asks for more than the message's 660 s: refused once the pace shows it, in seconds
    run_config["local-steps"] = 1_000_000
    started = time.monotonic()
    message = _train_message(tiny_arrays(), 1)
    message.metadata.ttl = 660
    reply = client_app(message, context)
    assert "node refused: this round's 1000000 steps would end past its deadline (the message's" in reply.error.reason
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "state").rglob("local.pt"))  # each round dropped whole, its state unsaved
    run_config["local-steps"] = 2  # round 1 was answered (refused once training began: client.sent), so round 2
    assert not client_app(_train_message(tiny_arrays(), 2), context).has_error()
    assert list((tmp_path / "state").rglob("local.pt"))  # the round in time is saved


def test_what_a_run_config_sets_for_privacy_binds_the_messages_of_its_run(tmp_path):
    """A site approves a run config (a plan, deploy/plans.py); the server's messages cannot take back what it sets:
    with dp='client' a train message must name the clipping (the run's dp-clip when fixed), and with secagg=true a
    train message in the clear is refused. Each refusal comes before any work."""
    run_config, context = _node(tmp_path)
    arrays = tiny_arrays()

    def reply(settings: dict, config: dict, run_id: int = 1):  # each answered one a run of its own: one update a round
        message = _train_message(arrays, 1)
        message.content["config"] = ConfigRecord({**message.content["config"], **config})
        run = run_config | settings
        return client_app(message, Context(run_id, 5, context.node_config, RecordDict(), run))

    fixed = {"dp": "client", "dp-clip": 2.0, "min-nodes": 3}
    adaptive = fixed | {"dp-clipping": "adaptive"}
    for settings, config, reason in [
        (fixed, {}, "(dp='client', fixed)"),
        (fixed, {KEY_CLIPPING_NORM: 1e300, "dp-clipping": "fixed"}, "(dp='client', fixed)"),
        (fixed, {KEY_CLIPPING_NORM: 2.0}, "(dp='client', fixed)"),
        (adaptive, {KEY_CLIPPING_NORM: 0.7, "dp-clipping": "fixed"}, "(dp='client', adaptive)"),
        (adaptive, {"dp-clipping": "adaptive"}, "(dp='client', adaptive)"),  # no norm: the update would leave unclipped
        ({"secagg": True, "min-nodes": 3}, {}, "this run's secagg=true sends this site's update only under secure"),
    ]:
        refused = reply(settings, config)
        assert refused.has_error() and reason in refused.error.reason, (settings, config, refused.error.reason)
    assert not list(tmp_path.rglob("local.pt"))  # nothing trained
    assert not reply(fixed, {KEY_CLIPPING_NORM: 2.0, "dp-clipping": "fixed"}, 2).has_error()
    done = reply(adaptive, {KEY_CLIPPING_NORM: 0.7, "dp-clipping": "adaptive"}, 3)  # the norm moves round to round
    assert not done.has_error() and done.content["metrics"]["norm_bit"] in (0, 1)
    assert not reply({"dp": "server", "min-nodes": 3}, {}, 4).has_error()  # the server clips: nothing asked of the node


def test_a_run_with_secagg_holds_its_rounds_to_the_protocols_terms_without_require_secagg(tmp_path, monkeypatch):
    """A site that approves a plan with secagg=true but sets no require-secagg: its node refused only a train message
    in the clear, so a set-up of another mask range or whose threshold was 1 of 3 (one share gives a secret away), and
    an unmasking request naming a node both alive and dead (both its secrets), reached Flower's SecAgg+ client. The
    run's secagg=true now sets the protocol's terms with a floor of 2 nodes; an honest round keeps to them."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    import client.secagg as secagg

    _, context = _node(tmp_path)
    context.run_config.update({"secagg": True, "min-nodes": 3})
    worked = []
    monkeypatch.setattr(secagg, "secaggplus_mod", lambda msg, ctx, call_next: worked.append(msg) or msg)
    terms = "node refused: this run's secagg=true sends this site's update only under secure aggregation; "

    def refused(message: Message, why: str) -> None:
        reply = client_app(message, context)
        assert reply.has_error() and reply.error.reason.startswith(terms + why), reply.error.reason

    refused(secagg_stage(Stage.SETUP, **{**SETUP, "mod_range": 2}, share_num=3, threshold=2), "this round's masks")
    refused(secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=1), "this round's threshold (1 of 3) is not")
    assert not worked
    keys = {"5": [b"a", b"b"], "6": [b"c", b"d"], "7": [b"e", b"f"]}
    client_app(secagg_stage(Stage.SETUP, **SETUP, share_num=3, threshold=2), context)
    refused(secagg_stage(Stage.SHARE_KEYS, **keys, **{"8": [b"g", b"h"]}), "this round's 4 nodes are not fewer")
    client_app(secagg_stage(Stage.SHARE_KEYS, **keys), context)
    refused(secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6], ctxts=[b"x"]), "this node would be masked with 1 of")
    refused(secagg_stage(Stage.UNMASK, active_nids=[5, 6], dead_nids=[6]), "this round's unmasking names a node twice")
    assert [m.content["secaggplus_configs"]["stage"] for m in worked] == [Stage.SETUP, Stage.SHARE_KEYS]


def test_a_node_sends_one_update_and_one_validation_a_round_of_a_run(tmp_path):
    """Asked again for a round it has trained (under another state key, for another model, or masked after in the
    clear) or validated, a node refuses before any work: a server of other code than the run's would learn how the
    site's cases answer each model it sends. A round 0, or none, is not a training round; a legacy fit message
    outside SecAgg+ is not answered."""
    _, context = _node(tmp_path)
    arrays = tiny_arrays()

    def refused(message: Message, reason: str) -> None:
        reply = client_app(message, context)
        assert reply.has_error() and reason in reply.error.reason, reply.error.reason

    assert not client_app(_train_message(arrays, 1), context).has_error()
    other = {k: v * 0.5 for k, v in arrays.items()}
    refused(_train_message(other, 1, state_key="run-1.other"), "answered round 1 of this run for its update already")
    refused(_train_message(arrays, 1.0), "answered round 1 of this run for its update already")
    refused(_train_message(arrays, 0), "the message's server-round 0 is before round 1")
    # the training a masked update comes from (Flower's SecAgg+ client calls it with the legacy fit message)
    for server_round, reason in ((1, "answered round 1 of this run for its update already"), (0, "before round 1")):
        masked = _fit_message(arrays, server_round)
        with pytest.raises(RefusedMessage, match=reason):
            secagg_train(masked, site_runner(masked, context))
    legacy = RecordDict({"fitins.parameters": ArrayRecord(), "fitins.config": ConfigRecord({"server-round": 2})})
    refused(Message(legacy, dst_node_id=5, message_type=MessageType.TRAIN), "a legacy fit message outside SecAgg+")
    assert not list((tmp_path / "state").rglob("*other*"))  # refused before any work

    def evaluate(model: dict, server_round: int) -> Message:
        config = ConfigRecord({"server-round": server_round, "state-key": "run-1.test"})
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}), "config": config})
        return Message(content, dst_node_id=5, message_type=MessageType.EVALUATE)

    assert not client_app(evaluate(arrays, 1), context).has_error()
    refused(evaluate(other, 1), "answered round 1 of this run for its validation already")
    refused(evaluate(other, 0), "the message's server-round 0 is before round 1")  # the server validates no round 0
    assert not client_app(_train_message(arrays, 2), context).has_error()
    assert not client_app(evaluate(other, 2), context).has_error()
    fresh = Context(2, 5, context.node_config, RecordDict(), context.run_config)  # another run asks for its round 1
    assert not client_app(_train_message(arrays, 1, state_key="run-2.test"), fresh).has_error()
