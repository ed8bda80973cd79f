"""Signed replies: the server weighs each site by the case count the consortium vouches for, not by the one it claims.

FedAvg weighs each node's update, and the sites' validation Dice that chooses ``best.pt``, by the case count the node
sends with it. Nothing checks that count but ``max-examples``: one hostile node that claims 10 000 cases among sites of
8, 4, 2 and 1 is 99.8 % of the average. A consortium knows how many cases each hospital brings (it is in their data
agreement, as FeTS's partition files give each institution's); run config ``site-cases`` gives the server that list,
one line per node key, and the server then takes from each reply at most the count listed for the key that signed it.

A node with a SuperNode key (node config ``secagg-key``, which the start scripts always pass) signs each train and
evaluate reply (:data:`SIGNED`): the run, its node id, the stage, the round and the case count it claims, with the
SuperNode key the SuperLink already authenticates it by. With ``site-cases`` the server refuses a reply that carries no
such signature by a listed key, or whose key signed another node's reply of that stage and round, and weighs the
others by ``min(claimed, listed)`` (:func:`server.loop.split_replies`). Under SecAgg+ a node's key is the one that
signed its round keys (``secagg-peers``), and a masked update whose count exceeds its key's listing is lost
(:class:`server.secagg_grid.CheckedGrid`): its weight is inside the masked sum, where it cannot be lowered.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

from messages.signed_keys import peer_key, private_file, public_line, public_of, sign_statement, unsigned
from mstkd.errors import InputError

SIGNED = "mstkd-signed"
"""The record of a train or evaluate reply that holds its node's signature (``signature``) and public key (``key``)."""
DOMAIN = b"mstkd reply, v1\x00"
MAX_CASES = 10**9


def _terms(stage: str, server_round: int, cases: int) -> bytes:
    return f"{stage} round {server_round}: {cases} cases".encode()


def sign_reply(
    key: ec.EllipticCurvePrivateKey, run_id: int, node_id: int, stage: str, server_round: int, cases: int
) -> ConfigRecord:
    """The :data:`SIGNED` record of this node's ``stage`` reply of ``server_round`` that claims ``cases``."""
    signature = sign_statement(key, DOMAIN, run_id, node_id, _terms(stage, server_round, cases))
    return ConfigRecord({"signature": signature, "key": public_line(public_of(key))})


def reply_signer(content: RecordDict, run_id: int, node_id: int, stage: str, server_round: int, cases: int) -> bytes:
    """The key (:func:`messages.signed_keys.public_line`) whose signature of this reply's claim ``content`` carries.

    Raises:
        ValueError: no signature, or one that does not match this run, node, stage, round and count (one line).
    """
    record = content.config_records.get(SIGNED)
    signer = record.get("key") if record is not None else None
    if not isinstance(signer, bytes) or len(signer) > 4096:
        raise ValueError("its reply is not signed")
    signer = public_line(signer)
    signature = {node_id: record.get("signature")}  # type: ignore[union-attr]
    if unsigned([node_id], signature, {node_id: signer}, DOMAIN, run_id, _terms(stage, server_round, cases)):
        raise ValueError("its reply's signature does not match this run, node, round and case count")
    return signer


def read_site_cases(path: str) -> dict[bytes, int]:
    """Run config ``site-cases``: the case count the consortium vouches for, by node key. One node a line: the count,
    then its SuperNode public key as OpenSSH writes it (``120 ecdsa-sha2-nistp384 AAAA... hospital-a``); ``#`` starts
    a comment. The file is the server's, held as :func:`messages.signed_keys.read_peers` holds ``secagg-peers``.

    Raises:
        InputError: unreadable, another user's or writable by others, a line that is not a count and a key, or a key
            listed twice (one line).
    """
    cases: dict[bytes, int] = {}
    for number, line in enumerate(private_file(path, "site-cases").splitlines(), 1):
        fields = line.split(b"#", 1)[0].split(None, 1)
        if not fields:
            continue
        count, key = fields[0], fields[1] if len(fields) > 1 else b""
        where = f"site-cases {path}, line {number}"
        if not (count.isdigit() and len(count) <= 10 and 1 <= int(count) <= MAX_CASES):
            raise InputError(f"{where}: begins with {count[:20]!r}, not a case count in 1..{MAX_CASES}")
        if (listed := peer_key(key.strip())) is None:
            raise InputError(f"{where}: the count is not followed by an ECDSA OpenSSH public key")
        if listed in cases:
            raise InputError(f"{where}: a key listed before")
        cases[listed] = int(count)
    if not cases:
        raise InputError(f"site-cases {path}: lists no node")
    return cases
