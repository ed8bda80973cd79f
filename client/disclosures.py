"""What left this node: one line per reply in the node's own disclosure log, and a summary of it.

A hospital that joins a federation answers to its data protection officer for what its node sends. The ClientApp's
outermost mod, :func:`disclosed`, writes one JSON line for every reply the app hands Flower to send, error replies
included, before Flower sends it: when, to which run and message, which app (the approved bundle's digest, where
the node runs the approval gate of ``deploy/approval.py``), and what the reply carries. Finite numbers and short
texts are written as sent; arrays as their count, bytes and SHA-256; byte strings, long texts and lists as their
size and SHA-256; so the log shows what was handed over without holding a second copy of the model. A reply that
cannot be logged does not leave: the node answers ``node refused: its disclosure log cannot be written`` instead
(the reason goes to the node's own log), and a line whose write failed part-way is taken back.

Not in the log: Flower's own replies, made before the app runs or around it (a message type the app has no function
for, an app that does not load, a bundle the approval gate refuses), the error reply of a node whose node config
does not parse, and the refusal sent in place of a reply that could not be logged; none carries anything of the
site's. The log is written by the app the run brought, so it means
what it says where the node runs only approved apps (``APPROVED``); :func:`main` says which replies name no app.

Node config ``disclosure-log``: the log's path; empty (the default) is ``<state-dir>/disclosures.jsonl`` on a
deployed node (``$MSTKD_HOME`` without a ``state-dir``) and no log in a simulation; ``off`` (any case) writes none.
The log must be a plain file of the node's user with one name; it is created 0600 (one that others may read is made so),
in a folder made 0700 if new, never opened through a link in its own place, and appended under a lock, so the
processes of several runs can share it.

``python -m client.disclosures LOG [--run ID] [--json]`` sums it up per run: the nodes, messages answered, errors
and their reasons, bytes sent (arrays, and byte strings in configs), and the names of every metric and config value
that left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from client.sent import append_line, private_file
from mstkd.runconfig import NodeConfig, default_home

APP_DIGEST = "MSTKD_APPROVED_APP"
"""Environment variable in which the approval gate tells the ClientApp the digest of the bundle it let run."""
OFF = "off"
SHORT_TEXT = 200
"""Texts up to this many characters are logged as sent; longer ones as their size and SHA-256."""
REFUSED = "node refused: its disclosure log cannot be written"

log = logging.getLogger("mstkd.client")


def log_path(node: NodeConfig) -> Path | None:
    """Where this node logs what it sends (see the module doc), or None for no log."""
    if node.disclosure_log.lower() == OFF or (not node.disclosure_log and node.simulated):
        return None
    if node.disclosure_log:
        return Path(node.disclosure_log).expanduser()
    return Path(node.state_dir or default_home()).expanduser() / "disclosures.jsonl"


def disclosed(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod, the outermost: log the reply (:func:`entry`) before it leaves, or replace it by an error that
    says the log cannot be written. A node config that does not parse is left to the inner mods to report."""
    reply = call_next(msg, context)
    try:
        path = log_path(NodeConfig.parse(context.node_config))
    except Exception:
        return reply
    if path is None:
        return reply
    try:
        append(path, entry(msg, reply, context))
    except Exception as exc:  # a full disk, a link in the log's place, a folder of another user
        log.error("this node's reply was not sent, because its disclosure log %s cannot be written: %s", path, exc)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=REFUSED), reply_to=msg)
    return reply


def entry(msg: Message, reply: Message, context: Context) -> dict[str, Any]:
    """The log's line for ``reply``, this node's answer to ``msg``."""
    line: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": int(context.run_id),
        "node": int(context.node_id),
        "type": str(msg.metadata.message_type),
        "message": msg.metadata.message_id,
        "group": msg.metadata.group_id,
        "app": os.environ.get(APP_DIGEST) or None,
    }
    if reply.has_error():
        line["error"] = {"code": int(reply.error.code), "reason": str(reply.error.reason)}
        return line
    content = reply.content
    line["arrays"] = {name: _arrays(record) for name, record in content.array_records.items()}
    line["metrics"] = {
        name: {k: _value(v) for k, v in record.items()} for name, record in content.metric_records.items()
    }
    line["configs"] = {
        name: {k: _value(v) for k, v in record.items()} for name, record in content.config_records.items()
    }
    return line


def _arrays(record) -> dict[str, Any]:
    """An array record as its number of arrays, bytes and SHA-256 over each array's name, dtype, shape and bytes."""
    digest, size = hashlib.sha256(), 0
    for name, array in record.items():
        digest.update(f"{name}\0{array.dtype}\0{list(array.shape)}\0".encode())
        digest.update(array.data)
        size += len(array.data)
    return {"count": len(record), "bytes": size, "sha256": digest.hexdigest()}


def _value(value: Any) -> Any:
    """A metric or config value as logged: finite numbers and short texts as they are, a number JSON cannot hold as
    ``{"float": "nan"}``, the rest as size and SHA-256 (a list: over each item's type, length and bytes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}  # "nan", "inf", "-inf": JSON has no such number, and a text may say "nan"
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= SHORT_TEXT):
        return value
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, str):
        return {"chars": len(value), "sha256": hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()}
    digest, count, size = hashlib.sha256(), 0, 0
    for item in value:  # item by item: a masked SecAgg+ vector is the whole update, hashed without a copy
        data = item if isinstance(item, bytes) else repr(item).encode("utf-8", "surrogatepass")
        digest.update(f"{type(item).__name__}:{len(data)}:".encode())
        digest.update(data)
        count += 1
        size += len(item) if isinstance(item, bytes) else 0
    return {"items": count, "bytes": size, "sha256": digest.hexdigest()}


def append(path: Path, line: dict[str, Any]) -> None:
    """Append ``line`` as one JSON line, under an exclusive lock, and fsync it (:func:`client.sent.private_file`:
    new folders 0700, the file 0600 and never opened through a link); after a line cut off by a crash, the new one
    starts on a line of its own, and a line whose write failed part-way is taken back.

    Raises:
        OSError: the log cannot be written (including a link in its place).
    """
    data = (json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n").encode()
    with private_file(path) as fd:
        append_line(fd, data)


# ----------------------------------------------------------------------------- reading it


def read_log(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(line number, entry)`` for every line of the log; ``None`` for a line that is not an entry as
    :func:`entry` writes one (a write cut off by a crash, an edit, a file from elsewhere).

    Raises:
        OSError: the log cannot be read, or is not a plain file (a FIFO would wait for ever).
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a plain file")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                value = None
            yield number, value if _is_entry(value) else None


def _is_entry(value: Any) -> bool:
    """A log line's shape, as :func:`entry` writes it: what the summary reads is of the right type."""
    if not (isinstance(value, dict) and type(value.get("run")) is int and isinstance(value.get("time"), str)):
        return False
    if not isinstance(value.get("type"), str) or not isinstance(value.get("app"), str | None):
        return False
    if "error" in value:
        return isinstance(value["error"], dict) and isinstance(value["error"].get("reason"), str)
    records = [value.get(kind) for kind in ("arrays", "metrics", "configs")]
    if not all(isinstance(r, dict) and all(isinstance(v, dict) for v in r.values()) for r in records):
        return False
    return all(type(a.get("bytes")) is int and a["bytes"] >= 0 for a in value["arrays"].values())


def summary(path: Path, run: int | None = None) -> dict[str, Any]:
    """Per run: the nodes, the first and last time, replies by message type, errors by reason, the bytes sent (arrays,
    and byte strings in configs, such as SecAgg+'s masked update), the names of the metrics and config values sent
    (``record.name``), the app digests and the replies logged with none; and the numbers of the lines that are not
    entries.

    Raises:
        OSError: the log cannot be read, or is not a plain file.
    """
    runs: dict[int, dict[str, Any]] = {}
    unreadable = []
    for number, line in read_log(path):
        if line is None:
            unreadable.append(number)
            continue
        if run is not None and line["run"] != run:
            continue
        seen = runs.setdefault(line["run"], {"times": [], "replies": {}, "errors": {}, "bytes": 0, "unapproved": 0})
        seen["times"].append(line["time"])
        if type(line.get("node")) is int:
            seen.setdefault("nodes", set()).add(line["node"])
        kind = line["type"].partition(".")[0]
        seen["replies"][kind] = seen["replies"].get(kind, 0) + 1
        if line["app"]:
            seen.setdefault("apps", set()).add(line["app"])
        else:
            seen["unapproved"] += 1
        if "error" in line:
            reason = line["error"]["reason"]
            seen["errors"][reason] = seen["errors"].get(reason, 0) + 1
            continue
        seen["bytes"] += sum(a["bytes"] for a in line["arrays"].values()) + _config_bytes(line["configs"])
        for kind in ("metrics", "configs"):
            seen.setdefault(kind, set()).update(f"{r}.{name}" for r, values in line[kind].items() for name in values)
    for seen in runs.values():
        times = seen.pop("times")
        seen["first"], seen["last"] = min(times), max(times)  # ISO times in UTC: their order is the text's
        for key in ("metrics", "configs", "apps", "nodes"):
            seen[key] = sorted(seen.get(key, ()))
    return {"runs": runs, "unreadable": unreadable}


def _config_bytes(configs: dict[str, dict[str, Any]]) -> int:
    """The bytes a reply's config records carried as byte strings (SecAgg+'s keys, shares and masked update)."""
    sizes = [v.get("bytes") for record in configs.values() for v in record.values() if isinstance(v, dict)]
    return sum(n for n in sizes if type(n) is int and n >= 0)


def _text(result: dict[str, Any]) -> str:
    out = []
    for run, seen in sorted(result["runs"].items()):
        replies = ", ".join(f"{n} {kind}" for kind, n in sorted(seen["replies"].items()))
        who = f" (node {', '.join(map(str, seen['nodes']))})" if seen["nodes"] else ""
        megabytes = seen["bytes"] / 1e6
        out.append(f"run {run}{who}: {seen['first']} to {seen['last']}: {replies}; {megabytes:.2f} MB sent")
        out += [f"  app {digest}" for digest in seen["apps"]]
        if seen["unapproved"]:
            out.append(
                f"  app: none named for {seen['unapproved']} replies (a node without an approval list runs, and logs "
                "with, the code the run brought)"
            )
        out += [f"  {n} x error: {reason}" for reason, n in sorted(seen["errors"].items())]
        out.append(f"  metrics: {', '.join(seen['metrics']) or '-'}")
        out.append(f"  configs: {', '.join(seen['configs']) or '-'}")
    if not result["runs"]:
        out.append("no replies logged")
    if result["unreadable"]:
        lines = ", ".join(map(str, result["unreadable"][:10]))
        out.append(f"{len(result['unreadable'])} line(s) are not entries (cut off or edited): line {lines}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.disclosures", description=__doc__.splitlines()[0])
    parser.add_argument(
        "log",
        type=Path,
        help="the node's disclosure log: <state>/disclosures.jsonl (deploy/start_supernode.sh: "
        "deploy/generated/supernodes/<site>/), or the node config's disclosure-log",
    )
    parser.add_argument("--run", type=int, help="only this run id")
    parser.add_argument("--json", action="store_true", help="the summary as JSON")
    args = parser.parse_args(argv)
    try:
        result = summary(args.log, args.run)
    except OSError as exc:
        print(f"error: cannot read {args.log}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else _text(result))
    return 1 if result["unreadable"] else 0


if __name__ == "__main__":
    sys.exit(main())
