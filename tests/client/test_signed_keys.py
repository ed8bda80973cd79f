"""Signed SecAgg+ keys (messages.signed_keys): a node signs its round keys with its SuperNode key, and a site with the
consortium's keys (secagg-peers) refuses a key exchange with a substituted key, a made-up node or a stranger."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from client.app import app as client_app
from messages import signed_keys
from mstkd.errors import InputError
from server.app import app as server_app
from server.report import RunFailed
from server.secagg_grid import RELAYED_IN, CheckedGrid
from tests.helpers import by_name, deployed_site, nodes, run_inproc, secagg_stage, supernode_key, tiny_run_config
from tests.helpers import run_records as _records

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, which making a message needs

SETUP = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0, "target_range": 2**22}
SETUP |= {"mod_range": 2**32, "max_weight": 10.0}


def _peers(folder: Path, lines: list[bytes]) -> str:
    path = folder / "peers"
    path.write_bytes(b"# the consortium's nodes\n" + b"".join(line + b" site\n" for line in lines))
    path.chmod(0o644)
    return str(path)


ROUND_TERMS = signed_keys.round_terms(ConfigRecord({Key.STAGE: Stage.SETUP, **SETUP}), "")
"""The round's terms as node 5 reads them from its set-up (the messages here have no group)."""


class _OtherNode:
    """Another consortium node (or one the coordinator made): its SuperNode key, and round keys it signs."""

    def __init__(self, folder: Path, node: int, terms: bytes = ROUND_TERMS, run_id: int = 1, like=None) -> None:
        if like is None:
            path, self.public = supernode_key(folder, f"node-{node}-{os.urandom(4).hex()}")
            self.key = signed_keys.load_signing_key(path)
        else:  # the same consortium node, in another run or round
            self.key, self.public = like.key, like.public
        self.pair = [
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            for _ in range(2)
        ]
        self.signed = signed_keys.sign(self.key, run_id, node, terms, *self.pair)
        self.node = node

    def signs_list(self, keys: dict) -> bytes:
        digest = signed_keys.list_digest(keys)
        return signed_keys.sign_statement(self.key, signed_keys.LIST_DOMAIN, 1, self.node, ROUND_TERMS, digest)


def test_a_site_takes_part_only_in_a_key_exchange_whose_every_key_its_consortium_signed(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    mine, my_public = supernode_key(keys, "site-5")
    others = {node: _OtherNode(keys, node) for node in (6, 7)}
    run_config, node_config = deployed_site(tmp_path, worker="off", **{"require-secagg": 3, "secagg-key": mine})
    node_config["secagg-peers"] = _peers(keys, [my_public, *(o.public for o in others.values())])
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)

    def exchange(drop: str = "", **changes) -> tuple[Message, dict]:
        """Set up a round, then send a key exchange: the honest one, with ``changes`` made to it and ``drop`` out.
        Returns the reply and the keys it listed."""
        reply = client_app(secagg_stage(Stage.SETUP, **SETUP), context).content[RECORD_KEY_CONFIGS]
        own = [reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]]
        signed = reply.get(signed_keys.SIGNED_BY)  # the set-up reply carries this node's signature (if it has a key)
        assert signed is None or signed[1] == my_public
        fields = {"5": own, signed_keys.entry(5): signed}
        for node, other in others.items():
            fields |= {str(node): other.pair, signed_keys.entry(node): other.signed}
        fields = {k: v for k, v in {**fields, **changes}.items() if k != drop and v is not None}
        listed = {int(k): v for k, v in fields.items() if k.isdigit()}
        return client_app(secagg_stage(Stage.SHARE_KEYS, **fields), context), listed

    def refused(reply: Message, why: str) -> None:
        assert reply.has_error(), why
        assert reply.error.reason.startswith("node refused: this site sends its update only under secure"), why
        assert why in reply.error.reason, reply.error.reason

    honest, listed = exchange()
    assert not honest.has_error(), honest.error.reason
    assert honest.content[RECORD_KEY_CONFIGS][Key.DESTINATION_LIST] == [6, 7]  # Flower's client shared its keys
    assert honest.content[RECORD_KEY_CONFIGS][signed_keys.LIST_SIGNED_BY]  # and this node signed the list it got
    coordinators = _OtherNode(keys, 8)  # keys whose secrets the coordinator holds, signed by a key of its own
    stranger = _OtherNode(keys, 6)  # node 6's keys signed, but by a key the consortium never listed
    six = others[6]
    elsewhere = _OtherNode(keys, 6, run_id=2, like=six)  # node 6's keys from another run
    looser = _OtherNode(keys, 6, signed_keys.round_terms(ConfigRecord({**SETUP, "threshold": 3}), ""), like=six)
    earlier = _OtherNode(keys, 6, signed_keys.round_terms(ConfigRecord(SETUP), "1"), like=six)  # another round
    twin = _OtherNode(keys, 8, like=six)  # node 6's key signing for a second node id: one member as two
    flowers_state = RECORD_KEY_STATE
    for drop, changes, why in (
        ("", {"6": [six.pair[0], coordinators.pair[1]]}, "has keys for node 6 that its signature does not match"),
        (signed_keys.entry(6), {}, "carries no signature for node 6's keys"),
        ("", {"6": stranger.pair, signed_keys.entry(6): stranger.signed}, "signed by a key that secagg-peers does not"),
        ("7", {"8": twin.pair, signed_keys.entry(8): twin.signed}, "signed by a key that signed another node's"),
        ("", {"6": elsewhere.pair, signed_keys.entry(6): elsewhere.signed}, "does not match, for this run and round"),
        ("", {"6": looser.pair, signed_keys.entry(6): looser.signed}, "does not match, for this run and round"),
        ("", {"6": earlier.pair, signed_keys.entry(6): earlier.signed}, "does not match, for this run and round"),
    ):
        reply, _ = exchange(drop, **changes)
        refused(reply, why)
        # refused before Flower's client read it: no key shares were made, let alone encrypted for anyone
        assert "ss2_dict:K" not in context.state.config_records[flowers_state] or not list(
            context.state.config_records[flowers_state]["ss2_dict:K"]
        )
    # node 6's genuine keys, relayed under another node id: its signature names node 6
    relabelled = {"8": six.pair, signed_keys.entry(8): six.signed}
    refused(exchange("6", **relabelled)[0], "has keys for node 8 that its signature does not match")

    # masking: only with partners that signed the key list this node was given
    _, listed = exchange()
    collect = {"srcs": [6, 7], "ctxts": [b"x", b"y"]}
    signed = {signed_keys.entry(n, signed_keys.LIST_SIGNED_BY): o.signs_list(listed) for n, o in others.items()}
    through = secagg_stage(Stage.COLLECT_MASKED_VECTORS, **collect, **signed)
    through.content["fitins.config"] = ConfigRecord({"server-round": 1})  # as the server's workflow names it
    through = client_app(through, context)
    assert not through.error.reason.startswith("node refused"), through.error.reason  # Flower's own error: fake ctxts
    _, listed = exchange()
    other_list = {**listed, 9: coordinators.pair}  # node 7 was shown another list (with a node 9)
    signed = {
        signed_keys.entry(6, signed_keys.LIST_SIGNED_BY): others[6].signs_list(listed),
        signed_keys.entry(7, signed_keys.LIST_SIGNED_BY): others[7].signs_list(other_list),
    }
    refused(
        client_app(secagg_stage(Stage.COLLECT_MASKED_VECTORS, **collect, **signed), context),
        "pairs this node with node 7, which did not sign the key list this node was given",
    )

    # a site's own terms that cannot hold, said as such
    context.node_config["secagg-peers"] = _peers(keys, [o.public for o in others.values()])
    refused(exchange()[0], "this site's own secagg-key is not in its secagg-peers")
    context.node_config["secagg-peers"] = _peers(keys, [my_public, *(o.public for o in others.values())])
    context.node_config.pop("secagg-key")
    refused(exchange(**{signed_keys.entry(5): others[6].signed})[0], "secagg-peers needs its own secagg-key")
    context.node_config["secagg-key"] = mine
    context.node_config["require-secagg"] = 0  # a check that would guard nothing is refused, not left unchecked
    assert client_app(secagg_stage(Stage.SETUP, **SETUP), context).error.reason == (
        "node refused: this site's secagg-peers checks SecAgg+ keys only with require-secagg, which is 0"
    )
    context.node_config["require-secagg"] = 3
    context.node_config.pop("secagg-peers")  # a site that does not check still takes the relayed signatures out
    assert not exchange()[0].has_error()

    # a node signs a list of survivors only after its own masked update left it (here Flower's client refuses the
    # made-up key shares, so none did), whatever its terms
    context.node_config["require-secagg"] = 0
    assert not exchange()[0].has_error()
    assert client_app(secagg_stage(Stage.COLLECT_MASKED_VECTORS, **collect), context).has_error()
    reply = client_app(secagg_stage(signed_keys.SURVIVORS, active_nids=[5, 6, 7]), context)
    assert reply.error.reason.endswith("survivors asked for before this node's masked update, or twice")


def test_under_secure_aggregation_every_node_signs_the_server_relays_and_each_site_checks(tmp_path):
    """Three sites that each sign their round keys and require every key signed by the consortium: the server relays
    the signatures, so the round aggregates all three. A server that relays none loses the round, not the run."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(3)]
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

    def skipped_with(name: str, method: str, replacement) -> str:
        """The round's skip reason when the server's ``CheckedGrid.<method>`` is ``replacement``."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CheckedGrid, method, replacement)
            with pytest.raises(RunFailed, match="no round aggregated"):
                run_inproc(server_app, client_app, tiny_run_config(tmp_path / name, **run), sites)
        return _records(tmp_path / name / "run")[1]["skipped"]

    # a server that keeps the signatures to itself
    skipped = skipped_with("unsigned", "_relay_signatures", lambda self, message, stage: None)
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its key exchange: ")
    assert "this round's key exchange carries no signature for node 1's keys" in skipped

    # a coordinator that gives nodes 2 and 3 other fit instructions (here another epoch; one at the schedule's end
    # trains at learning rate 0, leaving their models as sent, so that the sum less them is node 1's update)
    sending = CheckedGrid.send_and_receive

    def other_instructions(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            configs = message.content.config_records.get("secaggplus_configs")
            collect = configs is not None and configs.get("stage") == "collect_masked_vectors"
            if collect and message.metadata.dst_node_id != 1:
                message.content.config_records["fitins.config"]["epoch"] += 1
        return sending(self, messages, timeout=timeout)

    skipped = skipped_with("inconsistent", "send_and_receive", other_instructions)
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its unmasking: ")
    assert "alive, which did not train on the instructions" in skipped  # each node refused to unmask

    # a coordinator that names node 3 dead to nodes 1 and 2 (for shares of its first secret key) but alive to node 3
    # (for a share of its mask seed), and that gives node 2 a list of survivors without node 3 to sign
    def two_faced(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            configs, node = message.content.config_records["secaggplus_configs"], message.metadata.dst_node_id
            stage = configs["stage"]
            if (node == 2 and stage == signed_keys.SURVIVORS) or (node in (1, 2) and stage == "unmask"):
                configs["active_nids"] = [n for n in configs["active_nids"] if n != 3]
                if stage == "unmask":
                    configs["dead_nids"] = [*configs["dead_nids"], 3]
        replies = sending(self, messages, timeout=timeout)
        refusals.extend((r.metadata.src_node_id, r.error.reason) for r in replies if r.has_error())
        return replies

    refusals: list[tuple[int, str]] = []
    skipped = skipped_with("two-faced", "send_and_receive", two_faced)
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its unmasking: ")
    (one, why_one), (two, why_two) = sorted(refusals)  # node 3, asked honestly, answered (alone: too few shares)
    assert (one, two) == (1, 2), refusals
    assert why_one.endswith("this round's unmasking names alive other nodes than the survivors this node signed")
    assert why_two.endswith("only 1 of this round's nodes signed the survivors this node signed, not the threshold 2")

    # a coordinator that asks node 1 to sign a second list of survivors: it signs one list a round (two lists each
    # signed by t of n < 2t nodes share a signer), so the round goes on without node 1's answers
    def twice(self, messages, *, timeout=None):
        messages = list(messages)
        if messages[0].content.config_records["secaggplus_configs"]["stage"] == signed_keys.SURVIVORS:
            first = {"stage": signed_keys.SURVIVORS, "active_nids": [1, 2]}
            asked = Message(RecordDict({"secaggplus_configs": ConfigRecord(first)}), 1, "train", group_id="1")
            assert not sending(self, [asked], timeout=timeout)[0].has_error()
        replies = sending(self, messages, timeout=timeout)
        refusals.extend((r.metadata.src_node_id, r.error.reason) for r in replies if r.has_error())
        return replies

    refusals.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CheckedGrid, "send_and_receive", twice)
        run_inproc(server_app, client_app, tiny_run_config(tmp_path / "twice", **run), sites)
    assert "skipped" not in _records(tmp_path / "twice" / "run")[1]
    (node, why), *later = refusals  # and node 1 refused to unmask after its refusal
    assert node == 1 and why.endswith("survivors asked for before this node's masked update, or twice"), refusals
    assert [node for node, _ in later] == [1], refusals

    # a server that does not relay the nodes' signatures of the survivors
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RELAYED_IN, "unmask", [signed_keys.FIT_SIGNED_BY])
        with pytest.raises(RunFailed, match="no round aggregated"):
            run_inproc(server_app, client_app, tiny_run_config(tmp_path / "unrelayed", **run), sites)
    skipped = _records(tmp_path / "unrelayed" / "run")[1]["skipped"]
    assert "3 x node refused: " in skipped and "only 1 of this round's nodes signed the survivors" in skipped


def test_a_server_with_the_consortiums_keys_leaves_out_a_node_they_do_not_sign_and_the_round_goes_on(tmp_path):
    """Sites 1 and 2 check every round key against the consortium's list; node 3 signs with a key that is not on it.
    Each checking site refuses every key exchange that holds node 3, so its round halts. A server given the list too
    (run config ``secagg-peers``) leaves node 3 out at its set-up, and the others' round aggregates."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(3)]
    peers = _peers(keys, [public for _, public in made[:2]])
    sites = [{**config, "secagg-key": made[i][0]} for i, config in enumerate(nodes())]
    for site in sites[:2]:
        site |= {"require-secagg": 2, "secagg-peers": peers}
    run = {"num-server-rounds": 1, "eval-subsets": "full", "secagg": True, "secagg-max-weight": 10.0}
    with pytest.raises(RunFailed, match="no round aggregated"):
        run_inproc(server_app, client_app, tiny_run_config(tmp_path / "halts", **run), sites)
    skipped = _records(tmp_path / "halts" / "run")[1]["skipped"]
    assert skipped.startswith("secure aggregation failed (RuntimeError: too few nodes left after its key exchange: 2 x")

    run_inproc(server_app, client_app, tiny_run_config(tmp_path / "left-out", **run, **{"secagg-peers": peers}), sites)
    record = _records(tmp_path / "left-out" / "run")[1]
    assert "skipped" not in record and set(by_name(record)) == {"site-1", "site-2"}, record
    with pytest.raises(InputError, match="secagg-peers x: cannot be read"):  # the server's list, read as a site's
        run_inproc(server_app, client_app, tiny_run_config(tmp_path / "no-list", **run, **{"secagg-peers": "x"}), sites)
    plain = tiny_run_config(tmp_path / "plain", **{**run, "secagg": False, "secagg-peers": peers})
    with pytest.raises(InputError, match="secagg-peers checks the nodes' SecAgg.* round keys: it needs secagg=true"):
        run_inproc(server_app, client_app, plain, sites)


@pytest.mark.parametrize("field", [signed_keys.LIST_SIGNED_BY, signed_keys.FIT_SIGNED_BY])
def test_a_server_with_the_consortiums_keys_loses_a_node_whose_later_signature_does_not_match(tmp_path, field):
    """Of four nodes, node 4 signs its round keys, then sends a signature of its key list or of its fit instructions
    that does not match. Every checking site would refuse the next stage for it; a server with the consortium's keys
    checks each signature as the sites will, loses node 4 at that stage (recovering its masks from the others' shares
    once it has masked), and the others' round aggregates."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(4)]
    peers = _peers(keys, [public for _, public in made])
    sites = [{"partition-id": i, "num-partitions": 4, "secagg-key": made[i][0]} for i in range(4)]
    for site in sites[:3]:
        site |= {"require-secagg": 3, "secagg-peers": peers}

    def garbling(msg, context):
        reply = client_app(msg, context)
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
        if context.node_id == 4 and configs is not None and field in configs:
            configs[field] = b"not a signature"
        return reply

    run = {"num-server-rounds": 1, "eval-subsets": "full", "secagg": True, "secagg-max-weight": 10.0}
    run |= {"min-nodes": 4, "phantom-cases": 24, "secagg-peers": peers}
    run_inproc(server_app, garbling, tiny_run_config(tmp_path / "run", **run), sites)
    record = _records(tmp_path / "run" / "run")[1]
    assert "skipped" not in record and set(by_name(record)) == {"site-1", "site-2", "site-3"}, record


def test_a_key_or_peer_list_that_is_not_the_sites_own_is_refused_in_one_line(tmp_path):
    path, public = supernode_key(tmp_path, "site")
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
    with pytest.raises(InputError, match="others may read it; chmod 600 it"):  # a private key, as ssh reads one
        signed_keys.load_signing_key(peers)
    os.chmod(peers, 0o600)
    with pytest.raises(InputError, match="not an unencrypted OpenSSH private key"):
        signed_keys.load_signing_key(peers)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(InputError, match="secagg-peers .*: not a plain file of at most 1 MB"):
            signed_keys.read_peers(str(tmp_path))  # a folder
    assert len(os.listdir("/proc/self/fd")) == before  # no descriptor left open
