"""What this node has sent, run by run, kept on its own disk: one update and one validation a round of a run.

Trained again for a round from the same state, a node would send the same update under SecAgg+, and the sums of two
groups of nodes that differ in one node would then give that node's update away; in the clear, or validating again,
it would tell a server of other code than the run's how its cases answer each model it sends. So a node takes up each
round of a run once for its ``update`` and once for its ``validation``, masked or in the clear, whatever state key or
model the message names (:func:`round_taken`); and no round before 1, which the server never asks for.

The record is one file a run and node, ``<base>/sent/run-<run id>-node-<node id>.jsonl`` in the node's base folder
(:func:`client.context.node_base`: the node config's ``state-dir``; in a simulation the run config's ``work-dir``;
else ``$MSTKD_HOME``), with a line for each round the node takes up and one for each it gives back. A round is taken
up under an exclusive lock on the file, before any work, so of two messages of a run that the node handles at once
(a SuperNode starts a process for each) one only gets it; the file outlives the SuperNode, so a node started again
within a run still refuses the rounds it took. A round is given back when its work fails before a reply is made, and
may then be asked for again. A process that dies while it holds a round leaves the round taken: the run goes on at
its next round without this node, rather than risk a second update.

The files are the node user's own, as the disclosure log (:mod:`client.disclosures`): created 0600 in folders made
0700, never opened through a link, appended under a lock (:func:`private_file`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import Context

from client.context import node_base
from mstkd.errors import RefusedMessage
from mstkd.runconfig import NodeConfig, RunConfig

KINDS = ("update", "validation")
TAKEN, GIVEN_BACK = "taken", "given back"

log = logging.getLogger("mstkd.client")


@contextmanager
def private_file(path: Path) -> Iterator[int]:
    """``path`` opened for reading and appending, under an exclusive lock until the block ends. Each new folder on
    the way is made 0700; the file is created 0600, never opened through a link, and one that others may read is
    made 0600.

    Raises:
        OSError: it cannot be opened; it is not a plain file of this user's with one name (a link in its place, a
            hard link, another user's file).
    """
    for folder in reversed([path.parent, *path.parent.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)  # each new folder private, not only the last
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path.name} is not a plain file")
        if info.st_uid != os.geteuid():
            raise OSError(f"{path.name} belongs to another user")
        if info.st_nlink != 1:
            raise OSError(f"{path.name} has another name (a hard link)")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def append_line(fd: int, data: bytes) -> None:
    """Append ``data`` (one line, ending in a line break) to the locked file ``fd`` and flush it to disk; after a
    line cut off by a crash, it starts on a line of its own. A failed write is taken back.

    Raises:
        OSError: the write failed.
    """
    end = os.fstat(fd).st_size
    if end and os.pread(fd, 1, end - 1) != b"\n":  # a line cut off by a crash stays the only one lost
        data = b"\n" + data
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, end)
        raise


def record_path(context: Context) -> Path:
    """Where this node records what it sent in this run (see the module doc): simulated nodes share a base folder."""
    node, run = NodeConfig.parse(context.node_config), RunConfig.parse(context.run_config)
    return node_base(node, run) / "sent" / f"run-{int(context.run_id)}-node-{int(context.node_id)}.jsonl"


def taken_rounds(fd: int) -> dict[str, set[int]]:
    """The rounds of each kind that the record open at ``fd`` holds taken. A line that is not one of the record's (a
    write cut off by a crash, which was never acknowledged) takes nothing."""
    taken: dict[str, set[int]] = {kind: set() for kind in KINDS}
    size = os.fstat(fd).st_size
    for raw in os.pread(fd, size, 0).splitlines():
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if not isinstance(line, dict) or line.get("kind") not in KINDS or type(line.get("round")) is not int:
            continue
        if line.get("event") == TAKEN:
            taken[line["kind"]].add(line["round"])
        elif line.get("event") == GIVEN_BACK:
            taken[line["kind"]].discard(line["round"])
    return taken


def _write(fd: int, kind: str, server_round: int, event: str) -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    line = {"time": now, "kind": kind, "round": server_round, "event": event}
    append_line(fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())


def take_round(context: Context, kind: str, server_round: int | None) -> Callable[[], None]:
    """Take up ``server_round`` of this run for ``kind`` (``update`` or ``validation``), before any work; return what
    gives it back (call it when the work fails, so no reply is made). None: a round the site's work refuses, taken
    nowhere.

    Raises:
        RefusedMessage: a round before 1 (the server trains and validates no round 0, and one would be one update or
            validation more a run); this node took that round of this run already; its record cannot be written.
    """
    if server_round is None:
        return lambda: None
    if server_round < 1:
        raise RefusedMessage(f"the message's server-round {server_round} is before round 1")
    path = record_path(context)
    try:
        with private_file(path) as fd:
            if server_round in taken_rounds(fd)[kind]:
                raise RefusedMessage(f"this node sent its {kind} for round {server_round} of this run already")
            _write(fd, kind, server_round, TAKEN)
    except OSError as exc:
        raise RefusedMessage(f"this node's record of what it sent cannot be written: {exc.strerror or exc}") from None
    given_back = False

    def give_back() -> None:
        nonlocal given_back
        try:
            if not given_back:
                with private_file(path) as fd:
                    _write(fd, kind, server_round, GIVEN_BACK)
                given_back = True
        except OSError as exc:  # the round stays taken: one update fewer, never one more
            log.error("round %d stays taken in %s, which cannot be written: %s", server_round, path, exc)

    return give_back


@contextmanager
def round_taken(context: Context, kind: str, server_round: int | None) -> Iterator[None]:
    """:func:`take_round` around the work inside the block, which gives the round back if the block raises.

    Raises:
        RefusedMessage: as :func:`take_round`.
    """
    give_back = take_round(context, kind, server_round)
    try:
        yield
    except BaseException:
        give_back()
        raise
