"""Signed replies: the server weighs each site by the cases the consortium vouches for, not by the count it claims.

FedAvg weighs each node's update, and the sites' validation Dice that chooses ``best.pt``, by the case count the node
sends with it. Nothing checks that count but ``max-examples``: one hostile node that claims 10 000 cases among sites of
8, 4, 2 and 1 is 99.8 % of the average. A consortium knows how many cases each hospital brings (it is in their data
agreement, as FeTS's partition files give each institution's); run config ``site-cases`` gives the server that list,
one line per node key, and the server then takes from each reply at most what the listed cases give for that stage:
the validation cases the run's split keeps of them (``data.split.val_fraction``, :func:`validation_count`) in an
evaluate reply, the rest in a train reply.

Where the run lists them, the server asks for signatures (:data:`ASKED`, in the train and evaluate instructions and
the voxel-size query before round 1), and a node with a SuperNode key (node config ``secagg-key``, which the start
scripts always pass) signs its reply (:data:`SIGNED`): the run, its node id, the stage, the round and the case count it
claims, with the SuperNode key the SuperLink already authenticates it by. The server refuses a reply that carries no
such signature by a listed key, or whose key signed another node's reply of that round and stage, and cuts each other
reply's count to its key's (:func:`server.loop.split_replies`); a voxel-size report so refused has no vote on the
target geometry (:func:`server.plan.agree_target`). Flower does not tell the ServerApp which key authenticated which
node, so the server checks that a listed key signed, for this node id, not that it is the key this node connected
with: a party that holds several listed keys can move their listings among its nodes, never beyond their sum.

Under SecAgg+ a node's key is the one that signed its round keys (``secagg-peers``), and a masked update whose clear
count exceeds its key's is lost (:class:`server.secagg_grid.CheckedGrid`): its weight is inside the masked sum, where
it cannot be cut. That bounds the count each node sends in the clear, not the weight factor inside its masked vectors:
nodes that collude can trade weight between them there, since the server checks only their sum.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Container, Iterable

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

from messages.signed_keys import (
    peer_key,
    private_file,
    public_line,
    public_of,
    short_bytes,
    sign_statement,
    unsigned,
)
from mstkd.data.partitions import validation_count
from mstkd.errors import InputError

SIGNED = "mstkd-signed"
"""The record of a train, evaluate or voxel-size reply that holds its node's signature (``signature``) and public key
(``key``)."""
ASKED = "signed-replies"
"""The instruction (``True``) under which a node signs its train, evaluate and voxel-size replies."""
DOMAIN = b"mstkd reply, v1\x00"
FIELDS = ("key", "signature")
MAX_CASES = 10**9
KEY_TYPE = re.compile(rb"ecdsa-sha2-nistp\d+|ssh-(ed25519|rsa|dss)|sk-\S+@openssh\.com")
"""OpenSSH's public key types: one among a line's comment words is a second key, from a line that ended too early
(a node's name such as ``ssh-gateway`` is not one)."""


def _terms(stage: str, server_round: int, cases: int) -> bytes:
    return f"{stage} round {server_round}: {cases} cases".encode()


def sign_reply(
    key: ec.EllipticCurvePrivateKey, run_id: int, node_id: int, stage: str, server_round: int, cases: int
) -> ConfigRecord:
    """The :data:`SIGNED` record of this node's ``stage`` reply of ``server_round`` that claims ``cases``."""
    signature = sign_statement(key, DOMAIN, run_id, node_id, _terms(stage, server_round, cases))
    return ConfigRecord({"key": public_line(public_of(key)), "signature": signature})


def record_problem(record: object) -> str | None:
    """Why a reply's :data:`SIGNED` record is not of the form a node writes (its two fields, each at most
    :data:`~messages.signed_keys.MAX_FIELD` bytes), or None."""
    if not isinstance(record, ConfigRecord) or sorted(record.keys()) != list(FIELDS):
        return f"its {SIGNED!r} record is not a key and a signature"
    if not all(short_bytes(record[f]) for f in FIELDS):
        return f"its {SIGNED!r} record holds something other than a key and a signature"
    return None


def reply_signer(
    content: RecordDict, listed: Container[bytes], run_id: int, node_id: int, stage: str, server_round: int, cases: int
) -> bytes:
    """The key of ``listed`` (:func:`messages.signed_keys.public_line`) that signed this reply's claim of ``cases``.

    Raises:
        ValueError: not signed, by a key ``listed`` does not hold, or not for this run, node, stage, round and count
            (one line).
    """
    record = content.config_records.get(SIGNED)
    if record is None:
        raise ValueError("its reply is not signed")
    if problem := record_problem(record):
        raise ValueError(problem)
    signer = public_line(record["key"])  # type: ignore[arg-type]
    if signer not in listed:  # before the key is read: a key from outside the list costs nothing
        raise ValueError("its reply is signed by a key not on the list")
    signature = {node_id: record["signature"]}
    if unsigned([node_id], signature, {node_id: signer}, DOMAIN, run_id, _terms(stage, server_round, cases)):
        raise ValueError("its reply's signature does not match this run, node, round and case count")
    return signer


def shared_keys(signers: Iterable[bytes]) -> set[bytes]:
    """The keys among ``signers`` (one per reply, b"" for none) that signed for more than one node: which node holds
    such a key cannot be told, so none of their replies counts."""
    return {key for key, n in Counter(signers).items() if key and n > 1}


def most_cases(listed: int, stage: str, val_fraction: float) -> int:
    """The most cases a node with at most ``listed`` cases claims in a ``stage`` reply: the validation cases the run's
    split keeps of them (:func:`mstkd.data.partitions.validation_count`), or the rest for training, at least one (a
    site of one case trains on it; with ``val_fraction`` 0.75 or more, a site of two keeps both for validation)."""
    validation = validation_count(listed, val_fraction)
    return validation if stage == "evaluate" else max(listed - validation, 1)


def read_site_cases(path: str) -> dict[bytes, int]:
    """Run config ``site-cases``: the cases each node brings, by node key. One node a line: the count, then its
    SuperNode public key as OpenSSH writes it (``120 ecdsa-sha2-nistp384 AAAA... hospital-a``); ``#`` starts a
    comment. The file is the server's, held as :func:`messages.signed_keys.read_peers` holds ``secagg-peers``.

    Raises:
        InputError: unreadable, another user's or writable by others, a line that is not a count and a key (or holds
            a second key), or a key listed twice (one line).
    """
    cases: dict[bytes, int] = {}
    text = private_file(path, "site-cases").removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split(b"#", 1)[0].split()
        if not fields:
            continue
        where = f"site-cases {path}, line {number}"
        count = fields[0]
        if not (count.isdigit() and len(count) <= 10 and 1 <= int(count) <= MAX_CASES):
            raise InputError(f"{where}: begins with {count[:20]!r}, not a case count in 1..{MAX_CASES}")
        if (listed := peer_key(b" ".join(fields[1:3]))) is None:
            raise InputError(f"{where}: the count is not followed by an ECDSA OpenSSH public key")
        if any(KEY_TYPE.fullmatch(field) for field in fields[3:]):
            raise InputError(f"{where}: holds a second key (does the line before it end where it should?)")
        if listed in cases:
            raise InputError(f"{where}: a key listed before")
        cases[listed] = int(count)
    if not cases:
        raise InputError(f"site-cases {path}: lists no node")
    return cases
