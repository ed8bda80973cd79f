"""What a node sent, kept on its own disk (client.sent): a node started again within a run, one the SuperLink gives
another node id, or two messages of a round handled at once, still answer each round once for their update and once
for their validation, and a round whose work failed stays answered; the record is the node user's own file, never
written through a link."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Stage

import client.sent
import client.site
from client.app import app as client_app
from client.context import NodeContext
from client.sent import record_path, take_round
from mstkd.errors import RefusedMessage
from mstkd.runconfig import NodeConfig, RunConfig
from tests.helpers import deployed_site, secagg_stage, tiny_arrays

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs


def _node(tmp_path: Path) -> Context:
    run_config, node_config = deployed_site(tmp_path, worker="off")
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def _again(context: Context, run_id: int | None = None, node_id: int | None = None) -> Context:
    """The same site with the run state of a fresh process (a SuperNode started again, or another message's process,
    which Flower hands the run state as it was before this one's), in this run or ``run_id``, as node ``node_id``."""
    run, node = run_id or context.run_id, node_id or context.node_id
    return Context(run, node, dict(context.node_config), RecordDict(), dict(context.run_config))


def _work(context: Context) -> NodeContext:
    """What the site's work knows of a message's context (client.context.NodeContext)."""
    node, run = NodeConfig.parse(context.node_config), RunConfig.parse(context.run_config)
    return NodeContext(run_id=context.run_id, node_id=context.node_id, node=node, run=run)


def _record(context: Context) -> Path:
    return record_path(_work(context))


def _message(kind: str, server_round: int, state_key: str = "run-1.test", scale: float = 1.0) -> Message:
    arrays = ArrayRecord({k: Array(v * scale) for k, v in tiny_arrays().items()})
    config = ConfigRecord({"server-round": server_round, "lr": 1e-3, "state-key": state_key})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type=kind)


def _reason(reply: Message) -> str:
    return reply.error.reason if reply.has_error() else ""


def test_a_node_started_again_within_a_run_answers_no_round_twice_whatever_its_node_id(tmp_path):
    context = _node(tmp_path)
    assert not client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert not client_app(_message(MessageType.EVALUATE, 1), context).has_error()
    # the SuperLink hands out node ids, and may give a node that connects again another one
    for restarted in (_again(context), _again(context, node_id=9)):
        train = client_app(_message(MessageType.TRAIN, 1, "run-1.other", 0.5), restarted)
        assert "answered round 1 of this run for its update already" in _reason(train)
        validate = client_app(_message(MessageType.EVALUATE, 1, scale=0.5), restarted)
        assert "answered round 1 of this run for its validation already" in _reason(validate)
    assert not client_app(_message(MessageType.TRAIN, 2), _again(context)).has_error()  # the run goes on
    assert not client_app(_message(MessageType.TRAIN, 1, "run-2.test"), _again(context, run_id=2)).has_error()
    other_site = _again(context)  # another site whose node keeps its files in the same folder
    other_site.node_config["site-name"] = "h2"
    assert not client_app(_message(MessageType.TRAIN, 1, "run-1.h2"), other_site).has_error()
    lines = [json.loads(line) for line in _record(context).read_text().splitlines()]
    assert [(line["kind"], line["round"]) for line in lines] == [("update", 1), ("validation", 1), ("update", 2)]
    folders = [_record(context).parent, tmp_path / "state"]
    assert all(folder.stat().st_mode & 0o777 == 0o700 for folder in folders)
    assert _record(context).stat().st_mode & 0o777 == 0o600


def test_of_two_takers_of_a_round_at_once_one_only_gets_it(tmp_path, monkeypatch):
    """The second reads the record only once the first has written it: the first is held between its read and its
    write; without the lock the second would read the record without the first's line, and both would train."""
    context = _node(tmp_path)
    read_once = client.sent.taken_rounds
    reading, go_on = threading.Event(), threading.Event()

    def held(fd):
        taken = read_once(fd)
        if not reading.is_set():
            reading.set()
            assert go_on.wait(60)
        return taken

    monkeypatch.setattr(client.sent, "taken_rounds", held)
    outcome: dict[str, object] = {}

    def take(who: str, ctx: Context) -> None:
        try:
            take_round(_work(ctx), "update", 3)
            outcome[who] = "taken"
        except RefusedMessage as exc:
            outcome[who] = str(exc)

    first = threading.Thread(target=take, args=("first", context))
    first.start()
    assert reading.wait(60)
    second = threading.Thread(target=take, args=("second", _again(context)))
    second.start()
    second.join(1.0)  # unlocked, the second takes the round in this time
    go_on.set()
    first.join(60)
    second.join(60)
    assert outcome == {"first": "taken", "second": "this node answered round 3 of this run for its update already"}


def test_a_message_of_a_round_whose_work_is_under_way_is_refused(tmp_path, monkeypatch):
    """A record kept in Flower's run state let both messages train: each message's process gets that state as it was."""
    context = _node(tmp_path)
    working, finish = threading.Event(), threading.Event()
    read_data = client.site.site_data

    def held(*args):  # the first training waits as it reads the site's data, until the second has been answered
        if not working.is_set():
            working.set()
            assert finish.wait(60)
        return read_data(*args)

    monkeypatch.setattr(client.site, "site_data", held)
    first: dict[str, Message] = {}
    thread = threading.Thread(target=lambda: first.update(reply=client_app(_message(MessageType.TRAIN, 3), context)))
    thread.start()
    try:
        assert working.wait(60)
        second = client_app(_message(MessageType.TRAIN, 3, "run-1.other", 0.5), _again(context))
    finally:
        finish.set()
        thread.join(60)
    assert "answered round 3 of this run for its update already" in _reason(second)
    assert not first["reply"].has_error()
    assert not list((tmp_path / "state").rglob("*other*"))  # the second did no work


def test_a_round_whose_work_failed_stays_answered(tmp_path, monkeypatch):
    """An error is an answer too: a server that could ask again after each failure that followed the site's data would
    learn a bit a try."""
    context = _node(tmp_path)
    read_data = client.site.site_data

    def broken(*args):
        raise OSError("the site's disk is full")

    monkeypatch.setattr(client.site, "site_data", broken)
    assert client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert client_app(_message(MessageType.EVALUATE, 1), context).has_error()
    monkeypatch.setattr(client.site, "site_data", read_data)
    train, validate = _message(MessageType.TRAIN, 1), _message(MessageType.EVALUATE, 1)
    assert "answered round 1 of this run for its update already" in _reason(client_app(train, context))
    assert "answered round 1 of this run for its validation already" in _reason(client_app(validate, context))
    # a message refused before the site's data are read takes nothing: a masked update whose protocol fails before
    # training (a collection without its set-up), a round past the run's last
    collect = secagg_stage(Stage.COLLECT_MASKED_VECTORS, srcs=[6, 7], ctxts=[b"x", b"y"])
    collect.content["fitins.config"] = ConfigRecord({"server-round": 2})
    assert client_app(collect, context).has_error()
    late = _message(MessageType.TRAIN, 2)
    late.content["config"]["server-round"] = 10**6
    assert "server-round is not a finite number" in _reason(client_app(late, context))
    assert not client_app(_message(MessageType.TRAIN, 2), context).has_error()
    assert [(line["kind"], line["round"]) for line in map(json.loads, _record(context).read_text().splitlines())] == [
        ("update", 1),
        ("validation", 1),
        ("update", 2),
    ]


def test_the_record_is_the_nodes_own_file_and_a_link_in_its_place_is_never_written_through(tmp_path):
    context = _node(tmp_path)
    path = _record(context)
    path.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("someone else's file\n")
    for link in (path.symlink_to, path.hardlink_to):
        link(elsewhere)
        refused = client_app(_message(MessageType.TRAIN, 1), context)
        assert "this node's record of what it sent cannot be written" in _reason(refused)
        assert elsewhere.read_text() == "someone else's file\n"
        path.unlink()
    assert not list((tmp_path / "state" / "nodes").rglob("local.pt"))  # refused before any work

    path.write_bytes(b'{"time":"t","kind":"update","rou')  # a line cut off by a crash takes nothing
    path.chmod(0o644)
    assert not client_app(_message(MessageType.TRAIN, 1), context).has_error()
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text().splitlines()[1])["round"] == 1  # on a line of its own
