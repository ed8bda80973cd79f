"""Signed SecAgg+ keys: a coordinator can neither put keys of its own in place of a node's nor make up nodes.

In SecAgg+ each node makes two key pairs per round and the server relays the public halves to the others: the first
for the pairwise masks, the second to encrypt the node's shares of its secrets for each neighbour. Flower 1.42 checks
nothing of what it relays. A coordinator that writes its own messages can therefore

- put its own second key in place of a neighbour's: the node then encrypts that neighbour's shares of its secrets for
  the coordinator, and with ``threshold`` such shares the coordinator rebuilds the node's mask seed and first secret
  key, and so its update;
- add nodes it runs itself: with all but one of a round's nodes its own, the "sum" is the one honest node's update.

Bonawitz et al. (2017) close both with signed keys. Here each node signs (run id, its node id, its two public keys)
with its SuperNode key, the ECDSA P-384 key the SuperLink already authenticates it by (node config ``secagg-key``),
and the server relays each signature with the keys (:mod:`server.secagg`). A site that holds the consortium's node
public keys (``secagg-peers``, one OpenSSH public key a line, as the coordinator registers them) takes part in a key
exchange only if every node's keys in it are signed by a key of that list, each by its own (:func:`unsigned`).
"""

from __future__ import annotations

import os
import stat
import struct

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mstkd.errors import InputError

SIGNED_BY = "mstkd-signed-by"
"""A set-up reply's field: [signature, the signer's OpenSSH public key]; in a key exchange ``mstkd-signed-by:<node id>``
beside that node's keys."""
DOMAIN = b"mstkd SecAgg+ round keys, v1\x00"
MAX_FIELD = 4096
"""The most bytes a signature or a public key may have (a P-384 signature is about 104, an OpenSSH key about 200)."""


def entry(node_id: int) -> str:
    """The key-exchange field that carries ``node_id``'s signature."""
    return f"{SIGNED_BY}:{node_id}"


def signed_bytes(run_id: int, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a node signs: this scheme, the run, the node, and its two public keys, each length first."""
    return DOMAIN + struct.pack("<QQII", run_id, node_id, len(pk1), len(pk2)) + pk1 + pk2


def _private_file(path: str, what: str) -> bytes:
    """A file only this user (or root) owns and may write to, read without following a link in its own place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1_000_000:
            raise InputError(f"{what} {path}: not a plain file of at most 1 MB")
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"{what} {path}: another user owns it or others may write to it")
        return handle.read()


def load_signing_key(path: str) -> ec.EllipticCurvePrivateKey:
    """This node's SuperNode private key (OpenSSH format, ECDSA), which signs its round keys.

    Raises:
        InputError: unreadable, not this user's, or not an unencrypted ECDSA key (one line).
    """
    data = _private_file(path, "secagg-key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputError(f"secagg-key {path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"secagg-key {path}: not an ECDSA key, as SuperNode keys are")
    return key


def _public_line(data: bytes) -> bytes:
    """An OpenSSH public key's type and body, without its comment: how keys are compared."""
    return b" ".join(data.split()[:2])


def read_peers(path: str) -> frozenset[bytes]:
    """The consortium's node public keys: one OpenSSH public key a line; ``#`` starts a comment.

    Raises:
        InputError: unreadable, not this user's or root's, writable by others, or a line that is not an ECDSA key.
    """
    keys = set()
    for number, line in enumerate(_private_file(path, "secagg-peers").splitlines(), 1):
        line = line.split(b"#", 1)[0].strip()
        if not line:
            continue
        try:
            key = serialization.load_ssh_public_key(line)
        except (ValueError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InputError(f"secagg-peers {path}, line {number}: not an ECDSA OpenSSH public key")
        keys.add(_public_line(line))
    if not keys:
        raise InputError(f"secagg-peers {path}: lists no key")
    return frozenset(keys)


def sign(key: ec.EllipticCurvePrivateKey, run_id: int, node_id: int, pk1: bytes, pk2: bytes) -> list[bytes]:
    """A set-up reply's :data:`SIGNED_BY` field: the signature of :func:`signed_bytes`, and the signer's public key."""
    signature = key.sign(signed_bytes(run_id, node_id, pk1, pk2), ec.ECDSA(hashes.SHA384()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [signature, public]


def unsigned(keys: dict[int, object], signatures: dict[int, object], peers: frozenset[bytes], run_id: int) -> str:
    """Why a key exchange's ``keys`` (node id -> [pk1, pk2]) are not each signed by a key of ``peers``, each node by a
    key of its own (``signatures``: node id -> the relayed :data:`SIGNED_BY` value); empty when they are."""
    signers = set()
    for node, pair in sorted(keys.items()):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(k, bytes) for k in pair)):
            return f"has keys for node {node} that are not two keys"
        pk1, pk2 = pair
        value = signatures.get(node)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, bytes) for v in value)):
            return f"carries no signature for node {node}'s keys"
        signature, signer = value
        if len(signature) > MAX_FIELD or _public_line(signer) not in peers:
            return f"has node {node}'s keys signed by a key this site's secagg-peers does not list"
        if _public_line(signer) in signers:
            return f"has node {node}'s keys signed by a key that signed another node's"
        signers.add(_public_line(signer))
        try:
            public = serialization.load_ssh_public_key(_public_line(signer))
            public.verify(signature, signed_bytes(run_id, node, pk1, pk2), ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError, TypeError, AttributeError, UnsupportedAlgorithm):
            return f"has keys for node {node} that its signature does not match"
    return ""
