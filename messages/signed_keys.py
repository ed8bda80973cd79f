"""Signed SecAgg+ rounds: a coordinator can neither put keys of its own in place of a node's, nor make up nodes, nor
give the nodes of one round different set-ups, key lists or fit instructions.

In SecAgg+ each node makes two key pairs per round and the server relays the public halves to the others: the first
for the pairwise masks, the second to encrypt the node's shares of its secrets for each neighbour. Flower 1.42 checks
nothing of what it relays. A coordinator that writes its own messages can therefore

- put its own second key in place of a neighbour's: the node then encrypts that neighbour's shares of its secrets for
  the coordinator, and with ``threshold`` such shares the coordinator rebuilds the node's mask seed and first secret
  key, and so its update;
- add nodes it runs itself: with all but one of a round's nodes its own, the "sum" is the one honest node's update;
- give the nodes different set-ups (thresholds) or different key lists: each node's share of the unmasking is then
  counted against another round than the victim's, and enough shares of its partners' keys are given out to take
  their masks off its update (the bound :mod:`client.terms` checks holds only when every node has the same round).

Bonawitz et al. (2017) close these with signatures. Here each node signs, with its SuperNode key (the ECDSA P-384 key
the SuperLink already authenticates it by; node config ``secagg-key``):

- at the set-up, its two public keys, with the run id, its node id and the round's terms (:func:`round_terms`: the
  round, from the message's group, and every setting of the set-up);
- at the key exchange, the list of keys it was given (:func:`list_digest`);
- with its masked update, the fit instructions it trained on (:func:`fit_digest`): a coordinator that gave the
  others instructions that leave their models as sent (an epoch at the schedule's end trains at learning rate 0)
  would otherwise read one node's update off the honestly unmasked sum (Pasquini et al., 2022).

The server relays each beside what the next stage carries (:mod:`server.secagg_grid`). A site that holds the
consortium's node public keys (``secagg-peers``, one OpenSSH public key a line, as the coordinator registers them) takes
part in a key exchange only if every node's keys in it are signed by a key of that list, each node by its own, for its
own round's terms (:func:`verified_signers`); masks its update only with partners that signed the key list it was given;
and answers an unmasking request only if every node it names alive signed that it trained on the instructions this node
trained on (:func:`unsigned`).

Each node sees only its own unmasking request, in which the server names each of its partners alive (the node hands over
a share of that partner's mask seed) or dead (a share of its first secret key). A coordinator that names nodes alive to
some nodes and dead to others gathers shares of both secrets of each; with a plan over several nodes it unmasked the sum
of just two sites of rounds of 5, 8 and 10. Bonawitz et al.'s consistency round closes this, and Flower's workflow has
no such stage, so the project adds one (:data:`SURVIVORS`, between masking and unmasking): the server sends each node
that sent a masked update the list of those nodes, and each node with a key signs it, once a round
(:func:`nodes_digest`). A checking site answers an unmasking request only if every node it names alive is on the list
this node signed and none it names dead is, and the request carries signatures of that same list from at least the
round's threshold t of its nodes. Two lists each signed by t of the round's n < 2t nodes share 2t - n signers or more,
and each signs one list a round: all the checking sites that answer were given one list, unless 2t - n or more of the
round's nodes sign for the coordinator (with t = 3 of 5, one node), and every site of the round checks.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from mstkd.errors import InputError

SIGNED_BY = "mstkd-signed-by"
"""A set-up reply's field: [signature, the signer's OpenSSH public key]; in a key exchange ``mstkd-signed-by:<node id>``
beside that node's keys. Every field of this scheme begins so (the node takes them out before Flower reads)."""
LIST_SIGNED_BY = "mstkd-signed-by-list"
"""A key-exchange reply's field: the signature of the key list the node was given; in a request for masked vectors
``mstkd-signed-by-list:<node id>`` for each partner."""
FIT_SIGNED_BY = "mstkd-signed-by-fit"
"""A masked-vector reply's field: the signature of the fit instructions the node trained on; in an unmasking request
``mstkd-signed-by-fit:<node id>`` for each node named alive."""
DOMAIN = b"mstkd SecAgg+ round keys, v2\x00"
LIST_DOMAIN = b"mstkd SecAgg+ key list, v2\x00"
SURVIVORS_SIGNED_BY = "mstkd-signed-by-survivors"
"""A reply to :data:`SURVIVORS`: the node's signature of the list it was given; in an unmasking request
``mstkd-signed-by-survivors:<node id>`` for each listed node."""
SURVIVORS = "mstkd-survivors"
"""The stage (``Key.STAGE``) of the project's consistency round, with the nodes that sent masked updates in
``Key.ACTIVE_NODE_ID_LIST``; a node answers it itself, not Flower's client (:mod:`client.secagg`)."""
FIT_DOMAIN = b"mstkd SecAgg+ fit instructions, v2\x00"
SURVIVORS_DOMAIN = b"mstkd SecAgg+ survivors, v2\x00"
MAX_FIELD = 4096
"""The most bytes a signature or a public key may have (a P-384 signature is about 104, an OpenSSH key about 200)."""
MAX_NODE_ID = 2**64 - 1
SETTINGS = (
    Key.SAMPLE_NUMBER,
    Key.SHARE_NUMBER,
    Key.THRESHOLD,
    Key.CLIPPING_RANGE,
    Key.TARGET_RANGE,
    Key.MOD_RANGE,
    Key.MAX_WEIGHT,
)


def entry(node_id: int, field: str = SIGNED_BY) -> str:
    """The field that carries ``node_id``'s signature in a message to another node."""
    return f"{field}:{node_id}"


def round_terms(configs: ConfigRecord, group_id: str) -> bytes:
    """What makes a round one round: its group (the server round) and every setting of its set-up."""
    return repr([str(group_id), *(configs.get(key) for key in SETTINGS)]).encode()


def _signed_bytes(run_id: int, node_id: int, terms: bytes, pk1: bytes, pk2: bytes) -> bytes:
    """What a node signs at a set-up: this scheme, the run, the node, the round's terms and its two public keys."""
    sizes = struct.pack("<QQIII", run_id, node_id, len(terms), len(pk1), len(pk2))
    return DOMAIN + sizes + terms + pk1 + pk2


def exchange_keys(configs: ConfigRecord) -> dict[int, object]:
    """A key exchange's keys by node id (its fields named by a node id); the one reading of them that the node's
    signature of its key list and its site's check both use."""
    return {int(k): v for k, v in configs.items() if k.isdigit()}


def list_digest(keys: dict[int, list[bytes]]) -> bytes:
    """SHA-256 of a key exchange's node ids and keys, in node order."""
    digest = hashlib.sha256()
    for node, (pk1, pk2) in sorted(keys.items()):
        digest.update(struct.pack("<QII", node, len(pk1), len(pk2)) + pk1 + pk2)
    return digest.digest()


def fit_digest(content: RecordDict) -> bytes:
    """SHA-256 of what a request for masked vectors asks a node to train on: every array record and every config
    record but the protocol's own (which differs from node to node)."""
    digest = hashlib.sha256()
    for name in sorted(content.array_records):
        digest.update(b"arrays " + name.encode() + b"\x00")
        for key, array in content.array_records[name].items():
            header = repr((key, array.dtype, tuple(array.shape), array.stype)).encode()
            digest.update(struct.pack("<QQ", len(header), len(array.data)) + header + array.data)
    for name in sorted(k for k in content.config_records if k != RECORD_KEY_CONFIGS):
        text = repr(sorted(content.config_records[name].items())).encode()
        digest.update(b"config " + name.encode() + b"\x00" + struct.pack("<Q", len(text)) + text)
    return digest.digest()


def nodes_digest(nodes: list[int]) -> bytes:
    """SHA-256 of a set of node ids, in order."""
    return hashlib.sha256(b"".join(struct.pack("<Q", node) for node in sorted(nodes))).digest()


def _statement(domain: bytes, run_id: int, node_id: int, terms: bytes, digests: tuple[bytes, ...]) -> bytes:
    """What a node signs after its set-up: ``domain`` (what it is), the run, the node, the round's terms, and the
    digests (each 32 bytes) of what it was given."""
    return domain + struct.pack("<QQI", run_id, node_id, len(terms)) + terms + b"".join(digests)


def private_file(path: str, what: str, *, secret: bool = False) -> bytes:
    """A plain file only this user (or root) owns and may write to (and, for a ``secret``, read), read without
    following a link in its own place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1_000_000:
            raise InputError(f"{what} {path}: not a plain file of at most 1 MB")
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"{what} {path}: another user owns it or others may write to it")
        if secret and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"{what} {path}: others may read it; chmod 600 it")
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            return handle.read()
    finally:
        if fd >= 0:
            os.close(fd)


def load_signing_key(path: str) -> ec.EllipticCurvePrivateKey:
    """This node's SuperNode private key (OpenSSH format, ECDSA), which signs its round keys.

    Raises:
        InputError: unreadable, not this user's, readable by others, or not an unencrypted ECDSA key (one line).
    """
    data = private_file(path, "secagg-key", secret=True)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"secagg-key {path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"secagg-key {path}: not an ECDSA key, as SuperNode keys are")
    return key


def public_line(data: bytes) -> bytes:
    """An OpenSSH public key's type and body, without its comment: how keys are compared."""
    return b" ".join(data.split()[:2])


def peer_key(line: bytes) -> bytes | None:
    """One OpenSSH public key line's :func:`public_line`, or None where it is not an ECDSA public key."""
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, UnsupportedAlgorithm, NotImplementedError):  # the last: a compressed point
        return None
    return public_line(line) if isinstance(key, ec.EllipticCurvePublicKey) else None


def read_peers(path: str) -> frozenset[bytes]:
    """The consortium's node public keys (:func:`public_line`): one OpenSSH public key a line; ``#`` starts a
    comment.

    Raises:
        InputError: unreadable, not this user's or root's, writable by others, or a line that is not an ECDSA key.
    """
    keys = set()
    for number, line in enumerate(private_file(path, "secagg-peers").splitlines(), 1):
        line = line.split(b"#", 1)[0].strip()
        if not line:
            continue
        if (key := peer_key(line)) is None:
            raise InputError(f"secagg-peers {path}, line {number}: not an ECDSA OpenSSH public key")
        keys.add(key)
    if not keys:
        raise InputError(f"secagg-peers {path}: lists no key")
    return frozenset(keys)


def public_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key's public half as an OpenSSH line (its :func:`public_line`: no comment)."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def sign(key: ec.EllipticCurvePrivateKey, run_id: int, node_id: int, terms: bytes, pk1: bytes, pk2: bytes) -> list:
    """A set-up reply's :data:`SIGNED_BY` field: the signature of this node's keys for its round, and its public key."""
    signature = key.sign(_signed_bytes(run_id, node_id, terms, pk1, pk2), ec.ECDSA(hashes.SHA384()))
    return [signature, public_of(key)]


def sign_statement(
    key: ec.EllipticCurvePrivateKey, domain: bytes, run_id: int, node_id: int, terms: bytes, *digests: bytes
) -> bytes:
    """A key-exchange reply's :data:`LIST_SIGNED_BY` field (``domain`` :data:`LIST_DOMAIN`, the key list's digest),
    a masked-vector reply's :data:`FIT_SIGNED_BY` (:data:`FIT_DOMAIN`, the key list's and the fit instructions'),
    or a :data:`SURVIVORS` reply's :data:`SURVIVORS_SIGNED_BY` (:data:`SURVIVORS_DOMAIN`, the key list's and the
    survivors')."""
    return key.sign(_statement(domain, run_id, node_id, terms, digests), ec.ECDSA(hashes.SHA384()))


def short_bytes(value: object) -> bool:
    """Bytes of at most :data:`MAX_FIELD`: the form of a signature or public key a node sends."""
    return isinstance(value, bytes) and len(value) <= MAX_FIELD


def _verifies(signer: bytes, signature: object, data: bytes) -> bool:
    if not short_bytes(signature):
        return False
    try:
        serialization.load_ssh_public_key(signer).verify(signature, data, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, TypeError, AttributeError, UnsupportedAlgorithm, NotImplementedError):
        return False  # the last: a key whose point is compressed, which the library does not read
    return True


def signer_of(node: int, pair: object, value: object, peers: frozenset[bytes], run_id: int, terms: bytes) -> bytes:
    """The key of ``peers`` (:func:`public_line`) that signed ``node``'s round keys ``pair`` ([pk1, pk2]) for this run
    and the round's ``terms``, from its :data:`SIGNED_BY` field ``value``.

    Raises:
        ValueError: why they are not so signed (one line).
    """
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(k, bytes) for k in pair)):
        raise ValueError(f"has keys for node {node} that are not two keys")
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, bytes) for v in value)):
        raise ValueError(f"carries no signature for node {node}'s keys")
    signature, signer = value[0], public_line(value[1])
    if signer not in peers:
        raise ValueError(f"has node {node}'s keys signed by a key that secagg-peers does not list")
    if not _verifies(signer, signature, _signed_bytes(run_id, node, terms, *pair)):
        raise ValueError(f"has keys for node {node} that its signature does not match, for this run and round")
    return signer


def verified_signers(
    keys: dict[int, object], signatures: dict[int, object], peers: frozenset[bytes], run_id: int, terms: bytes
) -> dict[int, bytes]:
    """Each node's signer (:func:`signer_of`) if every node's keys in a key exchange (node id -> [pk1, pk2]) are
    signed by a key of ``peers``, each node by its own, for this run, that node id and this node's round ``terms``.

    Raises:
        ValueError: the first node whose keys are not so signed, and why (one line).
    """
    signers: dict[int, bytes] = {}
    for node, pair in sorted(keys.items()):
        signer = signer_of(node, pair, signatures.get(node), peers, run_id, terms)
        if signer in signers.values():
            raise ValueError(f"has node {node}'s keys signed by a key that signed another node's")
        signers[node] = signer
    return signers


def unsigned(
    nodes: list[int],
    signatures: dict,
    signers: dict[int, bytes],
    domain: bytes,
    run_id: int,
    terms: bytes,
    *digests: bytes,
) -> list[int]:
    """Those of ``nodes`` that did not sign (:func:`sign_statement`) this node's own ``digests`` for this round's
    ``terms``, each with the key that signed its round keys (``signers``), in their order."""
    return [
        node
        for node in nodes
        if node not in signers
        or not _verifies(signers[node], signatures.get(node), _statement(domain, run_id, node, terms, digests))
    ]
