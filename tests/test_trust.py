"""Trust at the federation boundary, each defence written as the attack: hostile and broken replies, poisoned global
models, traversal paths, pickles, secrets in errors, reused names, strict certificates and durable writes."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import simulations.adversary as adversary
from client.app import app as client_app
from client.state import SiteState
from mstkd.config import load_config
from mstkd.errors import InputError, NonFiniteState, RefusedMessage
from mstkd.model import build_networks
from mstkd.runconfig import RunConfig, check_state_key, project_config
from mstkd.train import Networks, make_optimizers, train_local
from server.app import app as server_app
from server.replies import RefusedReply, ReplyRules, check_reply
from server.report import RunFailed
from server.state import ServerCheckpoint
from tests.inproc import FAULT_REASONS, deployed_site, nodes, run_inproc, tiny_arrays, tiny_run_config


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower sets in a process before it makes messages."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finite_checkpoint(path: Path) -> bool:
    student = torch.load(path, weights_only=True)["student"]
    return all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())


# --------------------------------------------------------------------------- replies, checked one by one
# (tests/test_flwr_run.py sends every fault through `flwr run` too)


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


def test_a_header_that_lies_about_its_size_allocates_nothing():
    from messages.arrays import WireError, decode_array

    header = adversary._npy_header("float32", (10**13,))  # 40 TB claimed in 128 bytes
    lying = Array(dtype="float32", shape=(10**13,), stype="numpy.ndarray", data=header + bytes(8))
    assert len(lying.data) < 200
    with pytest.raises(WireError, match="bytes of values"):
        decode_array(lying)
    with pytest.raises(MemoryError):  # what Flower's own reader does with it
        lying.numpy()


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


def test_what_a_node_says_is_shown_as_text_in_the_report(tmp_path):
    from server.report import write_report
    from server.runlog import RunLog

    runlog = RunLog(tmp_path)
    runlog.record(1)["failures"].append(
        {"stage": "train", "node": 7, "reason": "![x](http://evil.example) | <script>", "kind": "error"}
    )
    runlog.finish(1)
    report = write_report(tmp_path, runlog, load_config(["model=tiny"]), RunConfig(), 1.0, {"round": None}).read_text()
    assert "![x](" not in report and "<script>" not in report and "\\!\\[x\\]" in report


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


# --------------------------------------------------------------------------- a run with a faulty node, in process


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


def _global_step(tmp: Path, strategy: str, attack: str | None, monkeypatch) -> float:
    """How far one round moved the global model (L2), with node 1 honest or attacking."""
    monkeypatch.setattr(adversary, "SETTINGS", {"attacks": {"0": attack}} if attack else {})
    extra = {"num-server-rounds": 1, "eval-subsets": "full", "strategy": strategy, "transport": "float32"}
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


# --------------------------------------------------------------------------- the node refuses poison


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


def test_a_float16_overflow_travels_as_float32_and_a_nan_never_leaves(caplog):
    from client.site import in_transport_dtype
    from mstkd.errors import NonFiniteUpdate

    arrays = {"student.a": np.array([1.0, 70000.0], np.float32), "student.b": np.ones(3, np.float32)}
    wired = in_transport_dtype(arrays, "float16", "h1")
    assert {v.dtype for v in wired.values()} == {np.dtype(np.float32)} and wired["student.a"][1] == 70000.0
    assert "beyond float16's range" in caplog.text
    assert {v.dtype for v in in_transport_dtype({"a": np.ones(2, np.float32)}, "float16", "h1").values()} == {
        np.dtype(np.float16)
    }
    with pytest.raises(NonFiniteUpdate):
        in_transport_dtype({"a": np.array([np.nan], np.float32)}, "float16", "h1")


@pytest.mark.parametrize("scope", ["joint", "separate"])
def test_a_nan_gradient_in_the_student_never_reaches_the_teacher(scope):
    """The loss is finite, but one student gradient is NaN (as a poisoned global model can make it): with one
    clipping coefficient for both networks the teacher's step would turn NaN too. The step is skipped, counted,
    and the teacher and the optimiser's moments stay as they were, whichever clipping scope."""
    cfg = load_config(["model=tiny", "train.amp=false", f"train.grad_clip_scope={scope}"])
    nets = Networks(*build_networks(cfg.model))
    next(nets.student.parameters()).register_hook(lambda grad: grad * float("nan"))
    teacher = {k: v.clone() for k, v in nets.teacher.state_dict().items()}
    optimizers = make_optimizers(nets, cfg.train)
    batch = {"image": torch.randn(1, 4, 32, 32, 32), "label": torch.zeros(1, 3, 32, 32, 32)}
    out = train_local(nets, optimizers, [batch], cfg, steps=3, progress=False, device=torch.device("cpu"))
    assert out["skipped_steps"] == 3  # the loss itself was finite: the check is on each network's gradients
    assert all(torch.equal(teacher[k], v) for k, v in nets.teacher.state_dict().items())
    assert not optimizers.main.state  # no moment was ever updated


def test_site_state_is_read_without_unpickling_and_never_holds_non_finite_weights(tmp_path):
    cfg = load_config(["model=tiny"])
    nets = Networks(*build_networks(cfg.model))
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(0)
    state = SiteState(tmp_path / "ok")
    state.save(nets, optimizers, rng, {"round": 1, "rounds": 1, "epoch": 1.0})
    assert state.load(nets, optimizers, rng)["round"] == 1  # weights_only reads what a node writes

    class Payload:  # anything beyond tensors and plain data: a pickle that would run code
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    hostile = SiteState(tmp_path / "hostile")
    hostile.path.parent.mkdir(parents=True)
    torch.save({"teacher": Payload(), "optimizer": {}, "disc_optimizer": {}, "rng": {}, "info": {}}, hostile.path)
    with pytest.raises(InputError, match="not readable as node state"):
        hostile.load(nets, optimizers, rng)
    assert not (tmp_path / "pwned").exists()

    for r in (2, 3):  # a newest state that does not read (a disk error, a foreign file): the one before it serves
        state.save(nets, optimizers, rng, {"round": r, "rounds": r, "epoch": float(r)})
    state.path.write_bytes(b"garbage")
    assert state.load(nets, optimizers, rng, before_round=4)["round"] == 2

    with torch.no_grad():
        next(nets.teacher.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteState, match="not saved"):
        SiteState(tmp_path / "inf").save(nets, optimizers, rng, {"round": 2, "rounds": 2, "epoch": 2.0})
    assert not (tmp_path / "inf" / "local.pt").exists()


# --------------------------------------------------------------------------- what the server keeps and reads


def test_server_state_is_arrays_and_json_and_an_old_pickle_is_refused(tmp_path):
    state = ServerCheckpoint(
        round=2,
        arrays={"student.w": np.ones(3, np.float32)},
        strategy={
            "m_t": {"student.w": np.full(3, 0.5)},
            "momentum_vector": [np.zeros(2)],
            "wrapper.clipping_norm": 0.3,
        },
        records={0: {"round": 0}, 1: {"round": 1, "sites": {"7": {"name": "a"}}}},
        best={"round": 1, "val_mean_dice": 0.4},
        state_key="run-1.abcd",
        random_state=(3, tuple(range(625)), None),
        privacy={"schema_version": 1},
    )
    state.save(tmp_path)
    with np.load(tmp_path / ServerCheckpoint.FILE, allow_pickle=False) as npz:  # plain arrays, no objects
        assert all(npz[name].dtype != object for name in npz.files)
    back = ServerCheckpoint.load(tmp_path)
    assert back.round == 2 and back.records[1]["sites"]["7"]["name"] == "a" and back.state_key == "run-1.abcd"
    assert np.array_equal(back.strategy["m_t"]["student.w"], np.full(3, 0.5))
    assert back.strategy["wrapper.clipping_norm"] == 0.3 and back.random_state[1][624] == 624

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "server_state.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(InputError, match="never loaded"):
        ServerCheckpoint.load(tmp_path / "old")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ServerCheckpoint.FILE).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match="not a readable server state"):
        ServerCheckpoint.load(tmp_path / "bad")
    state.arrays = {"student.w": np.array([np.nan], np.float32)}
    state.save(tmp_path / "nan")
    with pytest.raises(InputError, match="not finite"):
        ServerCheckpoint.load(tmp_path / "nan")


def test_a_reused_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full"})
    run_inproc(server_app, client_app, run_config, nodes())
    report = (tmp_path / "run" / "REPORT.md").read_text()
    (tmp_path / "run" / "eval" / "round_7.md").write_text("stale")
    with pytest.raises(InputError) as refused:
        run_inproc(server_app, client_app, run_config, nodes())
    assert "already holds a run" in str(refused.value) and "overwrite=true" in str(refused.value)
    assert "\n" not in str(refused.value) and (tmp_path / "run" / "REPORT.md").read_text() == report
    run_inproc(server_app, client_app, {**run_config, "overwrite": True}, nodes())
    assert not (tmp_path / "run" / "eval" / "round_7.md").exists()
    # the same run name (here: none, so run-1) twice: two state folders, neither run half-using the other's
    keys = sorted(p.name for p in (tmp_path / "work" / "nodes").iterdir())
    assert len(keys) == 2 and all(k.startswith("run-1.") for k in keys)


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


def test_overrides_that_would_read_the_environment_are_refused():
    for overrides in (
        "train.lr=${oc.env:HOME}",
        "data.cache_dir=${oc.env:SECRET,x}",
        r"train.lr=$\{oc.env:SECRET}",  # spelt so that only removing the shell escapes makes it an interpolation
        "train.lr=$'{'oc.env:SECRET}",
        'train.lr=$"{"oc.env:SECRET}',
    ):
        with pytest.raises(InputError, match="interpolation is not allowed"):
            project_config(RunConfig.parse({"model": "tiny", "overrides": overrides}))
    with pytest.raises(InputError, match="unknown model preset"):
        load_config(["model=../../configs/train"])


def test_no_case_id_path_or_secret_leaves_a_site_in_an_error(tmp_path, monkeypatch):
    """Node c has only broken cases; node b's evaluation fails with a message holding a path, a case ID and an
    environment secret. The server's records hold the failures' categories, and none of those."""
    import client.site
    from tests.conftest import write_case

    secret = "s3cr3t-" + os.urandom(4).hex()
    monkeypatch.setenv("HOSPITAL_TOKEN", secret)
    shape = (32, 32, 32)
    for i in range(3):
        for site in ("a", "b"):
            write_case(tmp_path / site, f"FeTS2022_{i:05d}", seed=i + (10 if site == "b" else 0), shape=shape)
    write_case(tmp_path / "test", "FeTS2022_09000", seed=5, shape=shape)
    broken = ("FeTS2022_00777", "FeTS2022_00778")
    for case in broken:
        write_case(tmp_path / "c", case, seed=1, shape=shape)
        (tmp_path / "c" / case / f"{case}_seg.nii.gz").write_bytes(b"not a nifti file")
    real = client.site.evaluate_site

    def leaky(context, arrays, config):
        if context.node.site_name == "b":
            raise OSError(
                f"/data/hospital-b/FeTS2022_00001/t1.nii.gz unreadable (token {os.environ['HOSPITAL_TOKEN']})"
            )
        return real(context, arrays, config)

    monkeypatch.setattr(client.site, "evaluate_site", leaky)
    run_config = tiny_run_config(
        tmp_path, **{"num-server-rounds": 1, "eval-subsets": "full", "test-data-path": str(tmp_path / "test")}
    )
    node_configs = [{"data-path": str(tmp_path / s), "site-name": s, "worker": "off"} for s in ("a", "b", "c")]
    run_inproc(server_app, client_app, run_config, node_configs)
    reasons = {f["stage"]: f["reason"] for f in _records(tmp_path / "run")[1]["failures"]}
    assert reasons == {
        "train": "data: no usable training case (details in the node's log)",
        "evaluate": "io: a file could not be read or written (details in the node's log)",
    }
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for needle in (secret, *broken, "FeTS2022_00001", "hospital-b"):
                assert needle.encode() not in text, (path.name, needle)


# --------------------------------------------------------------------------- certificates and durable writes


def test_certificates_pass_strict_x509_verification(tmp_path):
    from cryptography import x509

    from deploy.credentials import make_ca, make_server

    make_ca(tmp_path)
    make_server(tmp_path, ["link.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    for extension in (
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
        x509.KeyUsage,
        x509.ExtendedKeyUsage,
    ):
        cert.extensions.get_extension_for_class(extension)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()
    assert not errors


def test_atomic_writes_are_flushed_and_leave_nothing_behind_when_they_fail(tmp_path, monkeypatch):
    import mstkd.atomic as atomic

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    atomic.write_text(tmp_path / "a.txt", "hello")
    assert str(tmp_path) in synced and any(s.startswith(str(tmp_path / ".a.txt.")) for s in synced)
    synced.clear()
    atomic.write_bytes(tmp_path / "key", b"k" * 10, private=True)
    assert str(tmp_path) in synced  # the folder, after the rename

    def failing_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "b", b"data")
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "c.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "key"]
