"""What this node has sent, run by run, kept on its own disk: one update and one validation a round of a run.

Trained again for a round from the same state, a node would send the same update under SecAgg+, and the sums of two
groups of nodes that differ in one node would then give that node's update away; in the clear, or validating again,
it would tell a server of other code than the run's how its cases answer each model it sends, and each refusal or
failure it reports is a bit more. So a node answers each round of a run once for its ``update`` and once for its
``validation``, masked or in the clear, whatever state key or model the message names, whether the answer is a reply
or an error once the site's data were read (:func:`take_round`); and no round before 1, which the server never asks
for. The server never asks a node for a round twice, so an honest run loses nothing by it.

The record is one file a run and site, ``<base>/sent/run-<run id>-site-<name>.jsonl`` (in a simulation
``-partition-<id>``) in the node's base folder (:func:`client.context.node_base`: the node config's ``state-dir``;
in a simulation the run config's ``work-dir``; else ``$MSTKD_HOME``), named for the site by its node config
(:func:`client.context.node_label`), not by the node id, which the SuperLink hands out and may change when a node
connects again. The run id is the SuperLink's too: the bound holds per run the coordinator starts, and the same run
config submitted again starts a record of its own (a site sees each run in its disclosure log). A round is taken, a
line of the file, before the site's data are read, under an exclusive lock on the file: of two messages of one round
that run at once (a simulation runs a node's messages on worker threads; a deployed SuperNode that heard nothing
from a message's process for a minute gives up on it and goes on to the next message while that process may still
work), one only gets it. The line, and the entries of the record and its folder, are flushed to disk before any work
(where the file system lets a folder be flushed), so a node started again within a run, even after a power cut,
still refuses the rounds it took.

The files are the node user's own, as the disclosure log (:mod:`client.disclosures`): created 0600 in folders made
0700, never opened through a link in their own place, appended under a lock (:func:`private_file`).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from client.context import NodeContext, node_base, node_label
from mstkd.atomic import fsync_path
from mstkd.errors import RefusedMessage

KINDS = ("update", "validation")


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
            fsync_path(folder.parent)  # its entry on disk: a power cut does not take the folder away
    new = not os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if new:
            fsync_path(path.parent)
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


def record_path(context: NodeContext) -> Path:
    """Where this node records what it sent in this run (see the module doc)."""
    return node_base(context.node, context.run) / "sent" / f"run-{int(context.run_id)}-{node_label(context.node)}.jsonl"


def taken_rounds(fd: int) -> dict[str, set[int]]:
    """The rounds of each kind that the record open at ``fd`` holds. A line that is not one of the record's (a write
    cut off by a crash, which never returned, so no work followed it) takes nothing."""
    taken: dict[str, set[int]] = {kind: set() for kind in KINDS}
    for raw in os.pread(fd, os.fstat(fd).st_size, 0).splitlines():
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(line, dict) and line.get("kind") in KINDS and type(line.get("round")) is int:
            taken[line["kind"]].add(line["round"])
    return taken


def take_round(context: NodeContext, kind: str, server_round: int) -> None:
    """Take ``server_round`` of this run for ``kind`` (``update`` or ``validation``) before the site's data or state
    is read (:func:`client.site.local_round`, :func:`client.site.evaluate_site`, once they have checked the message);
    it stays taken whatever the work's outcome.

    Raises:
        RefusedMessage: a round before 1 (the server trains and validates no round 0, and one would be one update or
            validation more a run); this node took that round of this run already; its record cannot be written.
    """
    if server_round < 1:
        raise RefusedMessage(f"the message's server-round {server_round} is before round 1")
    try:
        path = record_path(context)
        with private_file(path) as fd:
            if server_round in taken_rounds(fd)[kind]:
                raise RefusedMessage(f"this node answered round {server_round} of this run for its {kind} already")
            now = datetime.now(UTC).isoformat(timespec="seconds")
            line = {"time": now, "kind": kind, "round": server_round}
            append_line(fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
            for folder in (path.parent, path.parent.parent):  # whoever made them: their entries before any work
                fsync_path(folder)
    except OSError as exc:
        raise RefusedMessage(f"this node's record of what it sent cannot be written: {exc.strerror or exc}") from None
