"""A node's disclosure log (client.disclosures): every reply it sends, written before it leaves, and read back."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import disclosures
from client.app import app as client_app
from deploy import approval
from messages.arrays import pack
from mstkd.runconfig import NodeConfig
from tests.helpers import deployed_site, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def _ask(context: Context, kind: str, arrays: dict, config: dict) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": ConfigRecord(config)}
    )
    return client_app(Message(pack(content), dst_node_id=5, message_type=kind), context)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_deployed_node_logs_every_reply_it_sends_before_it_leaves(tmp_path, monkeypatch):
    monkeypatch.setenv(disclosures.APP_DIGEST, "d" * 64)  # as the approval gate sets it
    run_config, node_config = deployed_site(tmp_path, worker="off")
    context = Context(run_id=7, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)
    arrays = tiny_arrays()
    trained = _ask(context, MessageType.TRAIN, arrays, {"server-round": 1, "state-key": "run-7.test"})
    scored = _ask(context, MessageType.EVALUATE, arrays, {"server-round": 1})
    poisoned = dict(arrays, **{next(iter(arrays)): np.full_like(next(iter(arrays.values())), np.nan)})
    refused = _ask(context, MessageType.TRAIN, poisoned, {"server-round": 2, "state-key": "run-7.test"})
    assert not trained.has_error() and not scored.has_error() and refused.has_error()

    path = tmp_path / "state" / "disclosures.jsonl"  # the default: the node's state folder
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    train, evaluate, error = _lines(path)
    assert [e["type"] for e in (train, evaluate, error)] == ["train", "evaluate", "train"]
    assert {e["run"] for e in (train, evaluate, error)} == {7} and train["node"] == 5 and train["app"] == "d" * 64
    # what left, as it left: the packed arrays' count, size and hash, the metrics and texts as sent
    sent = trained.content.array_records["arrays"]
    digest = hashlib.sha256()
    for name, array in sent.items():
        digest.update(f"{name}\0{array.dtype}\0{list(array.shape)}\0".encode() + array.data)
    assert train["arrays"]["arrays"] == {
        "count": len(sent),
        "bytes": sum(len(a.data) for a in sent.values()),
        "sha256": digest.hexdigest(),
    }
    assert train["metrics"]["metrics"] == dict(trained.content["metrics"])
    assert train["configs"]["site"] == dict(trained.content["site"])
    assert evaluate["metrics"]["metrics"] == dict(scored.content["metrics"]) and evaluate["arrays"] == {}
    assert error["error"] == {"code": refused.error.code, "reason": refused.error.reason} and "arrays" not in error

    result = disclosures.summary(path)
    assert result["unreadable"] == [] and list(result["runs"]) == [7]
    seen = result["runs"][7]
    assert seen["replies"] == {"train": 2, "evaluate": 1} and seen["errors"] == {refused.error.reason: 1}
    assert seen["bytes"] == train["arrays"]["arrays"]["bytes"] and "metrics.train-loss" in seen["metrics"]
    assert "site.name" in seen["configs"] and seen["apps"] == ["d" * 64] and seen["nodes"] == [5]


def test_a_reply_that_cannot_be_logged_does_not_leave(tmp_path):
    run_config, node_config = deployed_site(tmp_path, worker="off")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("someone else's file\n")
    link = tmp_path / "log.jsonl"
    link.symlink_to(elsewhere)
    node_config["disclosure-log"] = str(link)
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)
    reply = _ask(context, MessageType.EVALUATE, tiny_arrays(), {"server-round": 1})
    assert reply.has_error() and reply.error.reason == disclosures.REFUSED
    assert elsewhere.read_text() == "someone else's file\n"  # never written through the link


def test_where_the_log_goes_and_when_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MSTKD_HOME", str(tmp_path / "home"))
    deployed = NodeConfig.parse({"data-path": "/data"})
    assert disclosures.log_path(deployed) == tmp_path / "home" / "disclosures.jsonl"
    assert (
        disclosures.log_path(NodeConfig.parse({"data-path": "/d", "state-dir": "/s"})).as_posix()
        == "/s/disclosures.jsonl"
    )
    assert disclosures.log_path(NodeConfig.parse({"data-path": "/d", "disclosure-log": "off"})) is None
    simulated = {"partition-id": 0, "num-partitions": 2}
    assert disclosures.log_path(NodeConfig.parse(simulated)) is None
    chosen = NodeConfig.parse(simulated | {"disclosure-log": str(tmp_path / "sim.jsonl")})
    assert disclosures.log_path(chosen) == tmp_path / "sim.jsonl"


def test_values_are_logged_as_sent_or_as_their_size_and_hash():
    assert disclosures._value(0.5) == 0.5 and disclosures._value(3) == 3 and disclosures._value("h1") == "h1"
    # JSON has no NaN, and a text may say "nan"
    assert disclosures._value(math.nan) == {"float": "nan"} and disclosures._value(-math.inf) == {"float": "-inf"}
    assert disclosures._value(b"key") == {"bytes": 3, "sha256": hashlib.sha256(b"key").hexdigest()}
    long = "x" * (disclosures.SHORT_TEXT + 1)
    assert disclosures._value(long) == {"chars": len(long), "sha256": hashlib.sha256(long.encode()).hexdigest()}
    shares = disclosures._value([b"\x01", b"\x02"])
    assert shares["items"] == 2 and shares != disclosures._value([b"\x01", b"\x03"])
    assert shares != disclosures._value(["01", "02"])  # the items' type is hashed too


def test_a_line_cut_off_by_a_crash_costs_only_itself(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    empty = {"app": None, "arrays": {}, "metrics": {}, "configs": {}}
    disclosures.append(path, {"run": 1, "type": "train", "time": "t0"} | empty)
    with path.open("ab") as handle:
        handle.write(b'{"run": 1, "type": "tr')  # a write cut off
    disclosures.append(path, {"run": 2, "type": "evaluate", "time": "t1"} | empty)
    assert [n for n, line in disclosures.read_log(path) if line is None] == [2]
    assert sorted(disclosures.summary(path)["runs"]) == [1, 2]
    assert disclosures.main([str(path), "--run", "2"]) == 1  # the cut line is reported, and the exit says so
    out = capsys.readouterr().out
    assert "run 2: t1 to t1: 1 evaluate; 0.00 MB sent" in out and "run 1" not in out and "line 2" in out
    assert disclosures.main([str(tmp_path / "none.jsonl")]) == 2


def test_a_log_is_the_node_users_own_plain_file_and_a_failed_write_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text('{"run": 1}\n')
    path.chmod(0o644)
    disclosures.append(path, {"run": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().count("\n") == 2  # made private
    (tmp_path / "other-name").hardlink_to(path)
    with pytest.raises(OSError, match="has another name"):
        disclosures.append(path, {"run": 3})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="plain file"):
        disclosures.append(tmp_path / "fifo", {"run": 3})

    before = (tmp_path / "other-name").read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(disclosures.os, "fsync", failing_fsync)
    (tmp_path / "other-name").unlink()
    with pytest.raises(OSError, match="I/O error"):
        disclosures.append(path, {"run": 4})
    assert path.read_bytes() == before  # the reply was not sent: its line is not left behind


def test_the_summary_reads_a_log_from_elsewhere_line_by_line_without_a_traceback(tmp_path, capsys):
    good = {"run": 1, "type": "train", "time": "2026-12-07T06:00:00+00:00", "app": None, "arrays": {}}
    good |= {"metrics": {"metrics": {"train-loss": 1.0}}, "configs": {}}
    bad = [
        good | {"arrays": {"arrays": {"bytes": "12 MB"}}},
        good | {"arrays": {"arrays": {"bytes": None}}},
        good | {"arrays": {"arrays": {"bytes": -5_000_000}}},
        good | {"arrays": {"arrays": {"bytes": True}}},
        good | {"run": True},
        good | {"time": None},
        good | {"metrics": ["train-loss"]},
        good | {"error": "oops"},
    ]
    lines = [json.dumps(good | {"time": "2026-12-07T07:00:00+00:00"}), json.dumps(good), *map(json.dumps, bad)]
    infinite = json.dumps(good | {"arrays": {"arrays": {"bytes": 1}}}).replace('"bytes": 1}', '"bytes": 1e999}')
    lines += ["[" * 100_000, infinite]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = disclosures.summary(path)
    assert result["unreadable"] == list(range(3, len(lines) + 1))
    seen = result["runs"][1]
    assert (seen["first"], seen["last"]) == ("2026-12-07T06:00:00+00:00", "2026-12-07T07:00:00+00:00")  # not file order
    assert seen["replies"] == {"train": 2} and seen["unapproved"] == 2 and seen["bytes"] == 0
    assert disclosures.main([str(path), "--json"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out)["runs"]["1"]["replies"] == {"train": 2}
    assert disclosures.main([str(path)]) == 1
    assert "app: none named for 2 replies" in capsys.readouterr().out
    os.mkfifo(tmp_path / "fifo")
    assert disclosures.main([str(tmp_path / "fifo")]) == 2  # refused, not waited on
    assert "not a plain file" in capsys.readouterr().err


def test_a_masked_update_sent_as_byte_strings_counts_as_sent(tmp_path):
    """Under SecAgg+ the update leaves as a config record's list of byte strings, not as arrays."""
    masked = [b"\x01" * 1000, b"\x02" * 500]
    line = {"run": 3, "node": 5, "type": "train", "time": "t", "app": None, "arrays": {}, "metrics": {}}
    line["configs"] = {"secaggplus": {"masked_parameters": disclosures._value(masked), "stage": "collect"}}
    assert line["configs"]["secaggplus"]["masked_parameters"]["bytes"] == 1500
    disclosures.append(tmp_path / "log.jsonl", line)
    seen = disclosures.summary(tmp_path / "log.jsonl")["runs"][3]
    assert seen["bytes"] == 1500 and seen["configs"] == ["secaggplus.masked_parameters", "secaggplus.stage"]


def test_the_gate_and_the_app_agree_on_where_the_digest_travels():
    assert approval.APP_DIGEST == disclosures.APP_DIGEST
