"""What a node sent, kept on its own disk (client.sent): a node started again within a run, or two messages of a run
handled at once, still send one update and one validation a round; a round whose work failed is given back; the record
is the node user's own file, never written through a link."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Stage

import client.worker
from client.app import app as client_app
from client.sent import record_path
from tests.helpers import deployed_site, secagg_stage, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def _node(tmp_path: Path, run_id: int = 1) -> Context:
    run_config, node_config = deployed_site(tmp_path, worker="off")
    return Context(run_id=run_id, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def _again(context: Context) -> Context:
    """The same node and run with the run state of a fresh process: a SuperNode started again, or another message's
    process, which Flower hands the run state as it was before this one's."""
    return Context(context.run_id, context.node_id, context.node_config, RecordDict(), context.run_config)


def _message(kind: str, server_round: int, state_key: str = "run-1.test", scale: float = 1.0) -> Message:
    arrays = ArrayRecord({k: Array(v * scale) for k, v in tiny_arrays().items()})
    config = ConfigRecord({"server-round": server_round, "lr": 1e-3, "state-key": state_key})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type=kind)


def _reason(reply: Message) -> str:
    return reply.error.reason if reply.has_error() else ""


def test_a_node_started_again_within_a_run_sends_no_second_update_or_validation(tmp_path):
    context = _node(tmp_path)
    assert not client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert not client_app(_message(MessageType.EVALUATE, 1), context).has_error()
    restarted = _again(context)
    train = client_app(_message(MessageType.TRAIN, 1, "run-1.other", 0.5), restarted)
    assert "sent its update for round 1 of this run already" in _reason(train)
    validate = client_app(_message(MessageType.EVALUATE, 1, scale=0.5), restarted)
    assert "sent its validation for round 1 of this run already" in _reason(validate)
    assert not client_app(_message(MessageType.TRAIN, 2), restarted).has_error()  # the run goes on
    # another run of the same node, and another node of the same folder (simulated nodes share one), start afresh
    assert not client_app(_message(MessageType.TRAIN, 1), _node(tmp_path / "b", run_id=2)).has_error()
    other_node = Context(context.run_id, 6, context.node_config, RecordDict(), context.run_config)
    assert not client_app(_message(MessageType.TRAIN, 1, "run-1.six"), other_node).has_error()
    lines = [json.loads(line) for line in record_path(context).read_text().splitlines()]
    assert [(line["kind"], line["round"], line["event"]) for line in lines] == [
        ("update", 1, "taken"),
        ("validation", 1, "taken"),
        ("update", 2, "taken"),
    ]


def test_of_two_messages_of_a_run_handled_at_once_one_only_gets_the_round(tmp_path, monkeypatch):
    """Flower starts a process for each message and hands each the run state as it was: a record kept in that state
    let both of two messages of one round train, the second taking back the first one's entry."""
    context = _node(tmp_path)
    working, finish = threading.Event(), threading.Event()
    site_work = client.worker.site_work

    def held(job):  # the first training waits, inside its work, until the second message has been answered
        work = site_work(job)
        if job != "local_round" or working.is_set():
            return work
        working.set()
        assert finish.wait(60)
        return work

    monkeypatch.setattr(client.worker, "site_work", held)
    first: dict[str, Message] = {}
    thread = threading.Thread(target=lambda: first.update(reply=client_app(_message(MessageType.TRAIN, 3), context)))
    thread.start()
    try:
        assert working.wait(60)
        second = client_app(_message(MessageType.TRAIN, 3, "run-1.other", 0.5), _again(context))
    finally:
        finish.set()
        thread.join(60)
    assert "sent its update for round 3 of this run already" in _reason(second)
    assert not first["reply"].has_error()
    assert not list((tmp_path / "state").rglob("*other*"))  # the second did no work


def test_a_round_whose_work_fails_is_given_back_and_may_be_asked_again(tmp_path, monkeypatch):
    context = _node(tmp_path)
    site_work = client.worker.site_work

    def broken(job):
        raise OSError("the site's disk is full")

    monkeypatch.setattr(client.worker, "site_work", broken)
    assert client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert client_app(_message(MessageType.EVALUATE, 1), context).has_error()
    monkeypatch.setattr(client.worker, "site_work", site_work)
    assert not client_app(_message(MessageType.TRAIN, 1), _again(context)).has_error()
    assert not client_app(_message(MessageType.EVALUATE, 1), _again(context)).has_error()
    # a masked update whose protocol fails (a collection without its set-up) is given back too
    collect = secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6, 7], ctxts=[b"x", b"y"])
    collect.content["fitins.config"] = ConfigRecord({"server-round": 2})
    masked = client_app(collect, context)
    assert masked.has_error() and "already" not in _reason(masked)
    assert not client_app(_message(MessageType.TRAIN, 2), _again(context)).has_error()


def test_the_record_is_the_nodes_own_file_and_a_link_in_its_place_is_never_written_through(tmp_path):
    context = _node(tmp_path)
    path = record_path(context)
    path.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("someone else's file\n")
    path.symlink_to(elsewhere)
    refused = client_app(_message(MessageType.TRAIN, 1), context)
    assert "this node's record of what it sent cannot be written" in _reason(refused)
    assert elsewhere.read_text() == "someone else's file\n"
    assert not list((tmp_path / "state" / "nodes").rglob("local.pt"))  # refused before any work

    path.unlink()
    path.write_bytes(b'{"time":"t","kind":"update","round":1,"ev')  # a line cut off by a crash takes nothing
    path.chmod(0o644)
    assert not client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text().splitlines()[1])["event"] == "taken"  # on a line of its own
