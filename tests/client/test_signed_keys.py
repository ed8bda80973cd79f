"""Signed SecAgg+ keys (messages.signed_keys): a node signs its round keys with its SuperNode key, and a site with the
consortium's keys (secagg-peers) refuses a key exchange with a substituted key, a made-up node or a stranger."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import app as client_app
from messages import signed_keys
from mstkd.errors import InputError
from server.app import app as server_app
from server.report import RunFailed
from server.secagg import CheckedGrid
from tests.helpers import by_name, deployed_site, nodes, run_inproc, tiny_run_config
from tests.helpers import run_records as _records

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs

SETUP = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0, "target_range": 2**22}
SETUP |= {"mod_range": 2**32, "max_weight": 10.0}


def _key_file(folder: Path, name: str) -> tuple[str, bytes]:
    """A SuperNode key pair as `deploy/credentials.py node` writes it: the private key's path, the public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return str(path), key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _peers(folder: Path, lines: list[bytes]) -> str:
    path = folder / "peers"
    path.write_bytes(b"# the consortium's nodes\n" + b"".join(line + b" site\n" for line in lines))
    path.chmod(0o644)
    return str(path)


def _stage(stage: str, **configs) -> Message:
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def _other_node(folder: Path, node: int) -> tuple[list[bytes], list[bytes], bytes]:
    """Another node's round keys as its set-up reply gives them: [pk1, pk2], its signature entry, its public line."""
    path, public = _key_file(folder, f"node-{node}")
    pair = [
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for _ in range(2)
    ]
    return pair, signed_keys.sign(signed_keys.load_signing_key(path), 1, node, *pair), public


def test_a_site_takes_part_only_in_a_key_exchange_whose_every_key_its_consortium_signed(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    mine, my_public = _key_file(keys, "site-5")
    others = {node: _other_node(keys, node) for node in (6, 7)}
    run_config, node_config = deployed_site(tmp_path, worker="off", **{"require-secagg": 3, "secagg-key": mine})
    node_config["secagg-peers"] = _peers(keys, [my_public, *(o[2] for o in others.values())])
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)

    def exchange(drop: str = "", **changes) -> Message:
        """Set up a round, then send a key exchange: the honest one, with ``changes`` made to it and ``drop`` out."""
        reply = client_app(_stage(Stage.SETUP, **SETUP), context).content[RECORD_KEY_CONFIGS]
        own = [reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]]
        assert reply[signed_keys.SIGNED_BY][1] == my_public  # the set-up reply carries this node's signature
        fields = {"5": own, signed_keys.entry(5): reply[signed_keys.SIGNED_BY]}
        for node, (pair, signature, _) in others.items():
            fields |= {str(node): pair, signed_keys.entry(node): signature}
        fields = {k: v for k, v in {**fields, **changes}.items() if k != drop}
        return client_app(_stage(Stage.SHARE_KEYS, **fields), context)

    honest = exchange()
    assert not honest.has_error(), honest.error.reason
    assert honest.content[RECORD_KEY_CONFIGS][Key.DESTINATION_LIST] == [6, 7]  # Flower's client shared its keys
    coordinators_pair, _, _ = _other_node(keys, 8)  # keys whose secrets the coordinator holds
    stranger = _other_node(keys, 6)  # node 6's keys signed, but by a key the consortium never listed
    pair6, signature6, _ = others[6]
    for drop, changes, why in (
        ("", {"6": [pair6[0], coordinators_pair[1]]}, "has keys for node 6 that its signature does not match"),
        (signed_keys.entry(6), {}, "carries no signature for node 6's keys"),
        ("", {"6": stranger[0], signed_keys.entry(6): stranger[1]}, "signed by a key this site's secagg-peers does"),
        ("", {"8": coordinators_pair, signed_keys.entry(8): signature6}, "signed by a key that signed another"),
    ):
        reply = exchange(drop, **changes)
        assert reply.has_error(), why
        assert reply.error.reason.startswith("node refused: this site sends its update only under secure"), why
        assert why in reply.error.reason, reply.error.reason
    context.node_config["require-secagg"] = 0  # a check that would guard nothing is refused, not left unchecked
    refused = client_app(_stage(Stage.SETUP, **SETUP), context)
    assert refused.error.reason == (
        "node refused: this site's secagg-peers checks SecAgg+ keys only with require-secagg, which is 0"
    )
    context.node_config["require-secagg"] = 3
    context.node_config.pop("secagg-peers")  # a site that does not check still takes the relayed signatures out
    assert not exchange().has_error()


def test_under_secure_aggregation_every_node_signs_the_server_relays_and_each_site_checks(tmp_path):
    """Three sites that each sign their round keys and require every key signed by the consortium: the server relays
    the signatures, so the round aggregates all three. A server that relays none loses the round, not the run."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [_key_file(keys, f"site-{i}") for i in range(3)]
    peers = _peers(keys, [public for _, public in made])
    sites = [
        {**config, "require-secagg": 3, "secagg-key": made[i][0], "secagg-peers": peers}
        for i, config in enumerate(nodes())
    ]
    run = {"num-server-rounds": 1, "eval-subsets": "full", "secagg": True, "secagg-max-weight": 10.0}
    run_inproc(server_app, client_app, tiny_run_config(tmp_path / "signed", **run), sites)
    record = _records(tmp_path / "signed" / "run")[1]
    assert "skipped" not in record and not record["failures"], record
    assert set(by_name(record)) == {"site-1", "site-2", "site-3"}

    relayed = CheckedGrid._relay_signatures
    try:  # a server that keeps the signatures to itself
        CheckedGrid._relay_signatures = lambda self, message, stage: None
        with pytest.raises(RunFailed, match="no round aggregated"):
            run_inproc(server_app, client_app, tiny_run_config(tmp_path / "unsigned", **run), sites)
    finally:
        CheckedGrid._relay_signatures = relayed
    skipped = _records(tmp_path / "unsigned" / "run")[1]["skipped"]
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its key exchange: ")
    assert "this round's key exchange carries no signature for node 1's keys" in skipped


def test_a_key_or_peer_list_that_is_not_the_sites_own_is_refused_in_one_line(tmp_path):
    path, public = _key_file(tmp_path, "site")
    assert isinstance(signed_keys.load_signing_key(path), ec.EllipticCurvePrivateKey)
    peers = _peers(tmp_path, [public])
    assert signed_keys.read_peers(peers) == {b" ".join(public.split()[:2])}
    os.chmod(peers, 0o666)
    with pytest.raises(InputError, match="others may write to it"):
        signed_keys.read_peers(peers)
    os.chmod(peers, 0o644)
    (tmp_path / "link").symlink_to(peers)
    with pytest.raises(InputError, match="cannot be read"):
        signed_keys.read_peers(str(tmp_path / "link"))
    (tmp_path / "bad").write_bytes(b"ssh-rsa AAAA not a key\n")
    with pytest.raises(InputError, match="line 1: not an ECDSA OpenSSH public key"):
        signed_keys.read_peers(str(tmp_path / "bad"))
    with pytest.raises(InputError, match="not an unencrypted OpenSSH private key"):
        signed_keys.load_signing_key(peers)
