"""Run config site-cases (messages.signed_replies): each node signs its replies with its SuperNode key, and the server
weighs each by at most the case count the consortium lists for that key, so a node that claims every case of the
federation weighs what it brings."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from messages.signed_keys import load_signing_key
from messages.signed_replies import SIGNED, most_cases, read_site_cases, reply_signer, sign_reply
from mstkd.data.partitions import make_split, single_site
from mstkd.errors import InputError
from server.app import app as server_app
from server.replies import RefusedReply, ReplyRules, SiteCases, check_reply
from tests.helpers import by_name, nodes, run_inproc, supernode_key, tiny_run_config
from tests.helpers import run_records as _records

pytestmark = pytest.mark.usefixtures("task_identity")

RUN = {"num-server-rounds": 1, "eval-subsets": "full"}
CLAIM = 10_000  # every case max-examples allows: 99.8 % of the weight beside sites of a few cases


def _listing(folder: Path, counts: dict[bytes, int]) -> str:
    path = folder / "site-cases"
    path.write_bytes(b"# cases, node key\n" + b"".join(b"%d %s hospital\n" % (n, k) for k, n in counts.items()))
    path.chmod(0o644)
    return str(path)


def _claiming(node: int, key: str | None, *, resign: bool = True, signed: list | None = None):
    """The project's ClientApp, except that node ``node`` claims :data:`CLAIM` cases in each train and evaluate reply,
    signing the claim with ``key`` (its own, or another's) unless ``resign`` is false. ``signed`` collects, for every
    other reply, whether its node signed it."""

    def app(msg: Message, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type not in ("train", "evaluate") or not reply.has_content():
            return reply  # the voxel-size report before round 1 weighs nothing
        if context.node_id != node:
            if signed is not None:
                signed.append(SIGNED in reply.content.config_records)
            return reply
        reply.content["metrics"]["num-examples"] = CLAIM
        if resign and key is not None:
            kind, server_round = msg.metadata.message_type, int(msg.content["config"]["server-round"])
            record = sign_reply(load_signing_key(key), context.run_id, node, kind, server_round, CLAIM)
            reply.content[SIGNED] = record
        return reply

    return app


def _round_1(run: Path) -> dict:
    return next(r for r in _records(run) if r["round"] == 1)


def _counts(run: Path) -> dict[str, tuple[int, int]]:
    """Each site's train and validation case counts as the server weighed them in round 1."""
    sites = by_name(_round_1(run))
    return {name: (int(s["train-examples"]), int(s["evaluate-examples"])) for name, s in sites.items()}


def test_a_node_that_claims_every_case_weighs_what_the_consortium_lists_for_its_key(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(3)]
    sites = [{**config, "secagg-key": made[i][0]} for i, config in enumerate(nodes())]
    signed: list[bool] = []
    hostile = _claiming(3, made[2][0], signed=signed)

    run_inproc(server_app, hostile, tiny_run_config(tmp_path / "open", **RUN), sites)
    honest = _counts(tmp_path / "open" / "run")
    assert honest["site-3"] == (CLAIM, CLAIM)  # without a listing the claim is taken: nearly the whole average
    assert signed == [False] * 4  # nor does a node sign unasked (its key may not be this app's to use)
    signed.clear()
    listed = {made[0][1]: 100, made[1][1]: 100, made[2][1]: 5}  # 5 cases: 4 to train on, 1 to validate
    run = tiny_run_config(tmp_path / "listed", **RUN, **{"site-cases": _listing(keys, listed)})
    run_inproc(server_app, hostile, run, sites)
    assert signed == [True] * 4
    record = _round_1(tmp_path / "listed" / "run")
    counts = _counts(tmp_path / "listed" / "run")
    assert counts["site-3"] == (4, 1)
    assert counts["site-1"] == honest["site-1"] and counts["site-2"] == honest["site-2"]  # below their listing
    assert record["capped"] == [
        {"stage": "train", "node": 3, "claimed": CLAIM, "most": 4},
        {"stage": "evaluate", "node": 3, "claimed": CLAIM, "most": 1},
    ]
    assert not record["failures"]
    report = (tmp_path / "listed" / "run" / "REPORT.md").read_text()
    assert f"node 3 (evaluate) claimed {CLAIM} cases, weighed as the 1 site-cases gives" in report


@pytest.mark.parametrize("case", ["no key", "unlisted key", "another node's key", "claim not signed"])
def test_with_site_cases_a_reply_not_signed_by_its_own_listed_key_costs_its_node_the_round(tmp_path, case, caplog):
    """Also before round 1: such a node's voxel-size report gets no vote on the target geometry."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(4)]  # the fourth is a key the consortium never listed
    key_of_3 = {"no key": None, "unlisted key": made[3][0], "another node's key": made[0][0]}.get(case, made[2][0])
    sites = [{**config, "secagg-key": made[i][0]} for i, config in enumerate(nodes())]
    if key_of_3 is None:
        del sites[2]["secagg-key"]
    else:
        sites[2]["secagg-key"] = key_of_3
    listing = _listing(keys, {public: 100 for _, public in made[:3]})
    app = _claiming(3, key_of_3, resign=False) if case == "claim not signed" else client_app
    run_inproc(server_app, app, tiny_run_config(tmp_path / "run", **RUN, **{"site-cases": listing}), sites)
    record = _round_1(tmp_path / "run" / "run")
    reasons = {(f["node"], f["stage"]): f["reason"] for f in record["failures"]}
    expected = {
        "no key": "its reply is not signed (site-cases)",
        "unlisted key": "its reply is signed by a key not on the list (site-cases)",
        "another node's key": "its reply is signed by a key that signed another node's too (site-cases)",
        "claim not signed": "its reply's signature does not match this run, node, round and case count (site-cases)",
    }[case]
    refused = (1, 3) if case == "another node's key" else (3,)  # which node holds the key is unknown: neither counts
    assert reasons == {(node, stage): f"refused: {expected}" for node in refused for stage in ("train", "evaluate")}
    assert "skipped" not in record and set(by_name(record)) == {f"site-{n}" for n in (1, 2) if n not in refused}
    assert "capped" not in record
    planned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("planning the target geometry")]
    if case == "claim not signed":  # its report before round 1 was its own, signed
        assert not planned
    elif case == "another node's key":
        assert planned == [
            f"planning the target geometry: node {n} left out: its key signed another node's report" for n in (1, 3)
        ]
    else:
        assert planned == [f"planning the target geometry: node 3 left out: {expected}"]


def test_under_secure_aggregation_a_count_above_its_keys_listing_loses_the_node(tmp_path):
    """Under SecAgg+ a node's weight lies inside the masked sum, where the server cannot lower it: a masked update
    whose clear count is above what site-cases lists for the key that signed its round keys is lost, and the others'
    round aggregates."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = [supernode_key(keys, f"site-{i}") for i in range(3)]
    peers = keys / "peers"
    peers.write_bytes(b"".join(public + b"\n" for _, public in made))
    sites = [{**config, "secagg-key": made[i][0]} for i, config in enumerate(nodes())]
    listing = _listing(keys, {made[0][1]: 100, made[1][1]: 100, made[2][1]: 1})
    run = {**RUN, "secagg": True, "secagg-max-weight": 10.0, "site-cases": listing}
    with pytest.raises(InputError, match="site-cases under SecAgg.* knows a node's key from its signed round keys"):
        run_inproc(server_app, client_app, tiny_run_config(tmp_path / "no-peers", **run), sites)
    run_inproc(server_app, client_app, tiny_run_config(tmp_path / "run", **run, **{"secagg-peers": str(peers)}), sites)
    record = _round_1(tmp_path / "run" / "run")
    assert "skipped" not in record and set(by_name(record)) == {"site-1", "site-2"}, record

    # a key of secagg-peers that site-cases does not list: its node is left out at its set-up, before it trains
    run["site-cases"] = _listing(keys, {made[0][1]: 100, made[1][1]: 100})
    config = tiny_run_config(tmp_path / "unlisted", **run, **{"secagg-peers": str(peers)})
    grid = run_inproc(server_app, client_app, config, sites)
    record = _round_1(tmp_path / "unlisted" / "run")
    assert "skipped" not in record and set(by_name(record)) == {"site-1", "site-2"}, record
    secagg = [m for m in grid.sent if "secaggplus_configs" in m.content.config_records]  # not the voxel-size query
    stages = {(m.metadata.dst_node_id, m.content.config_records["secaggplus_configs"]["stage"]) for m in secagg}
    assert (3, "setup") in stages and (3, "collect_masked_vectors") not in stages


def test_with_site_cases_and_no_signed_voxel_size_report_the_run_stops_naming_the_keys(tmp_path):
    """Nodes started without their key (or not listed): a target set by hand would only move the refusals to round
    1, so the run stops before it, saying where to look."""
    keys = tmp_path / "keys"
    keys.mkdir()
    listing = _listing(keys, {supernode_key(keys, "site")[1]: 5})
    with pytest.raises(InputError, match=r"signed by a key of site-cases \(3 asked\): are the nodes started with"):
        run_inproc(server_app, client_app, tiny_run_config(tmp_path, **RUN, **{"site-cases": listing}), nodes())


def test_a_site_cases_file_is_the_servers_and_lists_each_key_once_with_a_count(tmp_path):
    (_, public), (_, other) = supernode_key(tmp_path, "a"), supernode_key(tmp_path, "b")
    good = tmp_path / "good"
    good.write_bytes(
        b"\xef\xbb\xbf# the consortium\n\n 120\t" + public + b" ssh-gateway # its FeTS cases\n7 " + other + b"\n"
    )
    good.chmod(0o644)
    assert read_site_cases(str(good)) == {b" ".join(public.split()[:2]): 120, b" ".join(other.split()[:2]): 7}
    for text, problem in [
        (b"0 " + public, "line 1: begins with b'0', not a case count in 1..1000000000"),
        (b"-3 " + public, "not a case count"),
        (b"\xc2\xb2 " + public, "not a case count"),  # a Unicode digit
        (b"99999999999999999999 " + public, "not a case count"),
        (b"12", "line 1: the count is not followed by an ECDSA OpenSSH public key"),
        (b"12 ssh-rsa AAAA hospital", "not followed by an ECDSA OpenSSH public key"),
        (b"1 " + public + b"\n2 " + public, "line 2: a key listed before"),
        (b"1 " + public + b" hospital-a2 " + other, "line 1: holds a second key"),  # a line that ended too early
        (b"# nothing\n", "lists no node"),
    ]:
        bad = tmp_path / "bad"
        bad.write_bytes(text)
        bad.chmod(0o644)
        with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            read_site_cases(str(bad))
    os.chmod(good, 0o666)
    with pytest.raises(InputError, match="others may write to it"):
        read_site_cases(str(good))
    with pytest.raises(InputError, match="site-cases nowhere: cannot be read"):
        read_site_cases("nowhere")


def test_a_reply_signature_holds_for_one_run_node_stage_round_and_count_only(tmp_path):
    """A node's signature cannot be replayed in another run, by another node, for the other stage, in another round
    or for another count; a key from outside the list, or one the library cannot read, is refused before it is
    read; a record not of the form a node writes is refused in any run."""
    path, public = supernode_key(tmp_path, "a")
    listed = {b" ".join(public.split()[:2])}
    content = RecordDict({SIGNED: sign_reply(load_signing_key(path), 1, 7, "train", 3, 120)})
    assert reply_signer(content, listed, 1, 7, "train", 3, 120) in listed
    for other in [(2, 7, "train", 3, 120), (1, 8, "train", 3, 120), (1, 7, "evaluate", 3, 120)]:
        with pytest.raises(ValueError, match="does not match this run, node, round and case count"):
            reply_signer(content, listed, *other)
    for other in [(1, 7, "train", 4, 120), (1, 7, "train", 3, 121)]:
        with pytest.raises(ValueError, match="does not match"):
            reply_signer(content, listed, *other)
    with pytest.raises(ValueError, match="a key not on the list"):
        reply_signer(content, set(), 1, 7, "train", 3, 120)
    # an ECDSA key whose point is compressed: the library raises NotImplementedError reading it
    kind, blob = public.split()[:2]
    raw = base64.b64decode(blob)
    fields, at = [], 0
    while at < len(raw):
        (size,) = struct.unpack(">I", raw[at : at + 4])
        fields.append(raw[at + 4 : at + 4 + size])
        at += 4 + size
    point = b"\x02" + fields[2][1:49]
    compressed = kind + b" " + base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in (*fields[:2], point)))
    content[SIGNED]["key"] = compressed
    for listing in (set(), {compressed}):  # a server whose own list holds it verifies it, and refuses it
        with pytest.raises(ValueError):
            reply_signer(content, listing, 1, 7, "train", 3, 120)
    listing = SiteCases(1, {compressed: 5}, 0.2)
    with pytest.raises(RefusedReply, match="site-cases"):
        listing.vouched(content, 7, "train", 3, 120)
    file = tmp_path / "compressed"
    file.write_bytes(b"5 " + compressed + b"\n")
    file.chmod(0o644)
    with pytest.raises(InputError, match="line 1: the count is not followed by an ECDSA OpenSSH public key"):
        read_site_cases(str(file))
    # the record itself, in a run without site-cases too
    rules = ReplyRules({}, 10_000)
    metrics = MetricRecord({"num-examples": 3, "val-mean-dice": 0.5})
    for record in [ArrayRecord({"x": Array(np.zeros(10**6, np.float32))}), ConfigRecord({"key": b"k"})]:
        with pytest.raises(RefusedReply, match="'mstkd-signed' record is not a key and a signature"):
            check_reply(RecordDict({"metrics": metrics, SIGNED: record}), "evaluate", rules)
    huge = ConfigRecord({"key": b"k", "signature": b"s" * 10**6})
    with pytest.raises(RefusedReply, match="holds something other than a key and a signature"):
        check_reply(RecordDict({"metrics": metrics, SIGNED: huge}), "evaluate", rules)


def test_an_honest_site_of_at_most_its_listed_cases_is_never_cut():
    """Whatever the split settings, a site's own split (make_split, test cases held out or not) of n <= listed cases
    trains and validates on no more than what most_cases gives the listing; with no test cases and n = listed, on
    exactly that."""
    for val_fraction in (0.0, 0.1, 0.2, 0.5, 0.75, 0.9):
        for test_fraction in (0.0, 0.05):
            for listed in range(1, 31):
                most = {stage: most_cases(listed, stage, val_fraction) for stage in ("train", "evaluate")}
                for n in range(1, listed + 1):
                    split = make_split(
                        single_site(f"c{i}" for i in range(n)), val_fraction=val_fraction, test_fraction=test_fraction
                    )
                    (train,), (val,) = split.train.values(), split.val.values()
                    assert len(train) <= most["train"] and len(val) <= most["evaluate"], (val_fraction, listed, n)
                    if n == listed and test_fraction == 0 and len(train):
                        assert (len(train), len(val)) == (most["train"], most["evaluate"])
