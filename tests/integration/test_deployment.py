"""The real thing on one machine: a SuperLink and three SuperNodes on 127.0.0.1 with TLS and node authentication.

Each node points at its own phantom site folder (one of them has no T1ce files at all); the
coordinator registers the three node keys and runs two rounds of the ``tiny`` preset with
``flwr run``. A fourth node with an unregistered key must be refused. Every process started is
stopped by its process group, also when the test fails; ports are free ones, so two runs of the
test can share the machine.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from deploy.credentials import make_ca, make_node_key, make_server
from deploy.processes import flwr_cli, start_local_federation, start_supernode, stop_group
from mstkd.phantoms import write_federation
from simulations.launch import free_port
from tests.helpers import ROOT, by_name

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _credentials_and_cases(tmp_path: Path, sites, *, hosts=(), strangers=()) -> tuple[Path, dict[str, Path]]:
    """The federation's CA and a server certificate for ``hosts``, in tmp_path/creds; a node key for each of
    ``sites`` and ``strangers``; four phantom cases per site in tmp_path/data/<site>, and two held-out cases in
    tmp_path/test. Returns the credentials folder and the private keys by name."""
    creds = tmp_path / "creds"
    make_ca(creds)
    make_server(creds, list(hosts))
    keys = {name: make_node_key(creds, name)[0] for name in (*sites, *strangers)}
    for i, site in enumerate(sites):
        write_federation(tmp_path / "data" / site, cases=4, sites=1, shape=(48, 48, 32), seed=10 + i, progress=False)
    write_federation(tmp_path / "test", cases=2, sites=1, shape=(48, 48, 32), seed=99, progress=False)
    return creds, keys


def _tiny_config(tmp_path: Path, settings: str) -> str:
    """The run config of the tiny preset (two local steps a round, the full-modality subset, tmp_path's held-out
    cases) with ``settings`` added, as ``flwr run --run-config`` takes it."""
    return (
        f"model='tiny' local-steps=2 eval-subsets='full' {settings} "
        f"work-dir='{tmp_path / 'work'}' out-dir='{tmp_path / 'run'}' "
        f"test-data-path='{tmp_path / 'test'}' overrides='train.amp=false'"
    )


def _tiny_run(tmp_path: Path, cli: Path, connection: str, settings: str) -> list[dict]:
    """`flwr run` of :func:`_tiny_config`; asserts that it is the only run and finished completed, and returns its
    round records."""
    run_config = _tiny_config(tmp_path, settings)
    run = flwr_cli(["run", ".", connection, "--stream", "--run-config", run_config], cli, timeout=900, cwd=ROOT)
    runs = json.loads(flwr_cli(["ls", connection, "--format", "json"], cli).stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], run.stdout[-3000:]  # and no other run started
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tls_authenticated_deployment_two_rounds(tmp_path):
    creds, keys = _credentials_and_cases(tmp_path, SITES, strangers=["intruder"])
    for t1ce in (tmp_path / "data" / "hospital-c").glob("*/*_t1ce.nii.gz"):
        t1ce.unlink()  # this hospital has no T1ce at all

    port = free_port()
    nodes = {
        site: (
            keys[site],
            {
                "data-path": str(tmp_path / "data" / site),
                "site-name": site,
                "state-dir": str(tmp_path / "state" / site),
            },
        )
        for site in SITES
    }
    procs = []
    try:
        cli = start_local_federation(
            procs, tmp_path, creds, nodes, port=port, node_ports=[free_port() for _ in SITES], connection="hospitals"
        )
        intruder = start_supernode(
            creds,
            keys["intruder"],
            superlink=f"127.0.0.1:{port}",
            port=free_port(),
            node_config={"data-path": str(tmp_path / "data" / "hospital-a")},
            home=tmp_path / "nodes" / "intruder",
            log=tmp_path / "intruder.log",
        )
        procs.append(intruder)
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()

        # the consortium vouches for two cases of each hospital (one to train on, one to validate), not its four:
        # every node signs its replies, and each weighs 1 in both stages
        listing = tmp_path / "site-cases"
        listing.write_bytes(b"".join(b"2 " + (creds / "nodes" / f"{site}.pub").read_bytes() for site in SITES))
        start = time.perf_counter()
        records = _tiny_run(tmp_path, cli, "hospitals", f"num-server-rounds=2 min-nodes=3 site-cases='{listing}'")
        seconds = time.perf_counter() - start
        assert [r["round"] for r in records] == [0, 1, 2]
        for r in records[1:]:
            assert set(by_name(r)) == set(SITES) and not r["failures"]
            assert {(s["train-examples"], s["evaluate-examples"]) for s in by_name(r).values()} == {(1, 1)}
            assert {(c["stage"], c["claimed"], c["most"]) for c in r["capped"]} == {("train", 3, 1)}
        assert by_name(records[1])["hospital-c"]["modalities"] == "flair+t1+t2"
        print(f"deployed two-round run: {seconds:.1f} s")
        # each node's four messages went to one warm worker, started by the first
        started = re.compile(r"started the node's worker \(pid (\d+)\)")
        workers = [started.findall((tmp_path / f"{site}.log").read_text()) for site in SITES]
        assert [len(w) for w in workers] == [1] * len(SITES), workers
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for [pid] in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for [pid] in workers)  # they ended with their nodes


def _https_status(host: str, port: int, path: str, ca: Path, source: str) -> int:
    """The HTTP status a POST of an empty body to ``path`` gets, sent from the loopback address ``source``."""
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, port, source_address=(source, 0), context=context, timeout=30)
    try:
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.slow
def test_strangers_reach_only_the_fleet_api_through_the_public_address(tmp_path):
    """The SuperLink listens on 127.0.0.1 only; nginx (deploy/proxy.py) is the public address, 127.0.0.2. Through it
    a stranger's `flwr run` and `flwr supernode register` are refused, as is any Control or Runtime API call from
    another loopback address, while the hospitals' nodes train through it. The coordinator works on loopback."""
    from deploy.proxy import ProxyUnavailable, install_nginx, start_proxy

    try:
        install_nginx()
    except ProxyUnavailable as exc:
        pytest.skip(f"no reverse proxy to test: {exc}")
    sites = SITES[:2]
    creds, keys = _credentials_and_cases(tmp_path, sites, hosts=["127.0.0.2"], strangers=["stranger"])
    link, public = free_port(), free_port()
    nodes = {
        site: (keys[site], {"data-path": str(tmp_path / "data" / site), "site-name": site, "state-dir": str(tmp_path)})
        for site in sites
    }
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n\n[superlink.public]\naddress = "127.0.0.2:{public}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n'
    )
    procs = []
    try:
        procs.append(
            start_proxy(
                creds,
                tmp_path / "proxy",
                public=f"127.0.0.2:{public}",
                superlink=f"127.0.0.1:{link}",
                log=tmp_path / "proxy.log",
            )
        )
        cli = start_local_federation(
            procs,
            tmp_path,
            creds,
            nodes,
            port=link,
            node_ports=[free_port() for _ in sites],
            connection="coordinator",
            node_address=f"127.0.0.2:{public}",
        )
        access = tmp_path / "proxy" / "access.log"

        def refused_control_calls() -> int:  # what nginx itself turned away, from its access log
            lines = access.read_text().splitlines() if access.exists() else []
            return sum('"POST /v1/control/' in line and '" 403 ' in line for line in lines)

        register = flwr_cli(["supernode", "register", str(keys["stranger"].with_suffix(".pub")), "public"], stranger)
        assert register.returncode != 0 and "registered" not in register.stdout.lower(), register.stdout
        after_register = refused_control_calls()
        assert after_register >= 1  # refused by the proxy, not by a failed handshake
        submit = flwr_cli(["run", ".", "public"], stranger, timeout=300, cwd=ROOT)
        assert submit.returncode != 0, submit.stdout
        assert refused_control_calls() > after_register
        for path in ("/v1/control/list-runs", "/v1/control/list-nodes", "/v1/runtime/acquire-task", "/docs"):
            assert _https_status("127.0.0.2", public, path, creds / "ca.crt", source="127.0.0.3") == 403, path
        # the Fleet API answers the same stranger (it still needs a registered node key to do anything)
        assert _https_status("127.0.0.2", public, "/v1/fleet/get-run", creds / "ca.crt", source="127.0.0.3") != 403

        # the only run, completed: the stranger's never started
        record = _tiny_run(tmp_path, cli, "coordinator", f"num-server-rounds=1 min-nodes={len(sites)}")[1]
        assert set(by_name(record)) == set(sites) and not record["failures"]
        listed = flwr_cli(["supernode", "list", "coordinator", "--format", "json"], cli).stdout
        assert "stranger" not in listed and listed.count('"node-id"') == len(sites), listed
        assert '"POST /v1/fleet/pull-messages' in access.read_text()  # the nodes went through the proxy
    finally:
        for proc in reversed(procs):
            stop_group(proc)


@pytest.mark.slow
def test_a_node_runs_only_the_app_its_site_approved(tmp_path):
    """hospital-a approved the plan of this run (the app this checkout sends, with this run config) and trains;
    hospital-b approved another version, and hospital-c this app with one setting of the run changed: both refuse
    every message before any of the bundle's code runs; the server records why, and the run goes on without them."""
    from client.disclosures import summary
    from deploy.approval import app_digest
    from deploy.approval import main as approval

    sites = SITES
    creds, keys = _credentials_and_cases(tmp_path, sites)
    lists = {site: tmp_path / f"{site}-approved.txt" for site in sites}
    settings = "num-server-rounds=1 min-nodes=3 min-replies=1"
    for site, rounds in (("hospital-a", 1), ("hospital-c", 2)):
        planned = _tiny_config(tmp_path, settings.replace("num-server-rounds=1", f"num-server-rounds={rounds}"))
        assert approval(["approve", str(ROOT), "--list", str(lists[site]), "--run-config", planned]) == 0
    lists["hospital-b"].write_text(f"{'0' * 64}  # another version\n")
    nodes = {
        site: (keys[site], {"data-path": str(tmp_path / "data" / site), "site-name": site, "state-dir": str(tmp_path)})
        for site in sites
    }
    procs = []
    try:
        port = free_port()
        cli = start_local_federation(
            procs, tmp_path, creds, nodes, port=port, node_ports=[free_port() for _ in sites], approved=lists
        )
        record = _tiny_run(tmp_path, cli, "local", settings)[1]
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    assert set(by_name(record)) == {"hospital-a"}
    # a refused node never names its site: its failures are known by their reasons, one node each
    refusals = ("app not approved at this site (", "app and run config not approved at this site (")
    reasons = sorted((f["stage"], why) for f in record["failures"] for why in refusals if why in f["reason"])
    assert reasons == sorted((stage, why) for why in refusals for stage in ("train", "evaluate")), record["failures"]
    assert len({f["node"] for f in record["failures"]}) == 2
    for site in ("hospital-b", "hospital-c"):
        assert "started the node's worker" not in (tmp_path / f"{site}.log").read_text()  # none of the app ran
        assert not any((tmp_path / "nodes" / site / name).exists() for name in ("apps", "approved"))
    # hospital-a's app was installed apart, under its digest; the others installed nothing
    digest = app_digest(ROOT)
    assert [p.name for p in (tmp_path / "nodes" / "hospital-a" / "approved").iterdir()] == [digest]
    # what hospital-a's app sent is in the node's disclosure log, under the digest its site approved
    (sent,) = summary(tmp_path / "disclosures.jsonl")["runs"].values()
    assert sent["apps"] == [digest] and not sent["unapproved"] and sent["replies"]["train"] == 1, sent
    assert sent["bytes"] > 0, sent


@pytest.mark.slow
def test_deployed_sites_mask_their_updates_only_among_nodes_the_consortium_signed(tmp_path):
    """Three hospitals that require SecAgg+ among three nodes and hold the consortium's node keys (secagg-peers):
    each node's process signs its round keys with its SuperNode key, the signatures cross the SuperLink with the keys,
    each site checks them, and the round aggregates all three."""
    creds, keys = _credentials_and_cases(tmp_path, SITES)
    peers = tmp_path / "consortium.pub"
    peers.write_bytes(b"".join((creds / "nodes" / f"{site}.pub").read_bytes() for site in SITES))
    terms = {"require-secagg": "3", "secagg-peers": str(peers)}
    nodes = {
        site: (
            keys[site],
            {"data-path": str(tmp_path / "data" / site), "site-name": site, "state-dir": str(tmp_path / "state" / site)}
            | terms,
        )
        for site in SITES
    }
    procs = []
    try:
        cli = start_local_federation(
            procs, tmp_path, creds, nodes, port=free_port(), node_ports=[free_port() for _ in SITES], connection="h"
        )
        records = _tiny_run(tmp_path, cli, "h", "num-server-rounds=1 min-nodes=3 secagg=true secagg-max-weight=10.0")
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    assert records[1]["secure_aggregation"] == "SecAgg+" and "skipped" not in records[1], records[1]
    assert len(records[1]["sites"]) == 3 and not records[1]["failures"]
