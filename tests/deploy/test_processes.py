"""Starting and stopping the deployment's processes (deploy.processes, deploy/start_supernode.sh): node configs
that cannot smuggle keys into Flower's --node-config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from deploy import approval, processes

ROOT = Path(__file__).resolve().parents[2]
SMUGGLING = ['hospital-b" extra="1', "a\\", 'x" site-name="hospital-b', "a\nb"]


@pytest.mark.parametrize("value", SMUGGLING)
def test_a_node_config_value_with_a_quote_or_backslash_is_refused_before_anything_starts(tmp_path, monkeypatch, value):
    started = []
    monkeypatch.setattr(processes.subprocess, "Popen", lambda *a, **k: started.append(a))
    config = {"data-path": str(tmp_path), "site-name": value, "state-dir": str(tmp_path)}
    with pytest.raises(ValueError, match="node-config site-name") as refused:
        processes.start_supernode(
            tmp_path,
            tmp_path / "key",
            superlink="127.0.0.1:1",
            port=1,
            node_config=config,
            home=tmp_path / "h",
            log=tmp_path / "l",
        )
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="node-config"):
        processes.start_local_federation(
            [], tmp_path, tmp_path, {"a": (tmp_path / "k", config)}, port=1, node_ports=[2]
        )
    assert started == []
    good = {"data-path": str(tmp_path / "my data=x y"), "site-name": "hospital-a", "modalities": "flair,t1"}
    assert parse_config_args([processes.node_config_arg(good)]) == good


def _supernode_sh(tmp_path: Path, site: str, data: Path, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """deploy/start_supernode.sh, run in ``tmp_path`` with ``extra`` in its environment, with a stand-in
    flower-supernode that records its arguments."""
    creds, fake = tmp_path / "creds", tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    record = tmp_path / "flower-supernode.args"
    recorder = f'#!/bin/sh\nprintf "%s\\n" "$@" "app=${{{approval.APP_DIGEST}:-}}" > "{record}"\n'
    (fake / "flower-supernode").write_text(recorder)
    (fake / "flower-supernode").chmod(0o755)
    env = os.environ | {"CREDS": str(creds), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    env.pop("STATE", None)
    cmd = ["bash", str(ROOT / "deploy" / "start_supernode.sh"), site, str(data), "127.0.0.1:9093"]
    done = subprocess.run(cmd, env=env | extra, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return done, record


@pytest.mark.parametrize(
    ("site", "data"),
    [
        ('hospital-a" extra="1', "data"),
        ("hospital-a", 'data" extra="1'),
        ("hospital-a", "data\\"),
        ("../escaped", "data"),
    ],
)
def test_start_supernode_sh_refuses_what_would_add_node_config_keys_or_leave_the_keys_folder(tmp_path, site, data):
    creds = tmp_path / "creds"
    (creds / "nodes").mkdir(parents=True)
    (creds / "nodes" / site).parent.mkdir(parents=True, exist_ok=True)
    (creds / "nodes" / site).write_text("")  # a key is there, so only the new checks stand in the way
    (tmp_path / data).mkdir()
    done, record = _supernode_sh(tmp_path, site, tmp_path / data)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and not record.exists()
    assert not (creds / "supernodes").exists()  # nothing made, nothing started


def test_start_supernode_sh_passes_a_good_site_through_as_flower_reads_it(tmp_path):
    (tmp_path / "creds" / "nodes").mkdir(parents=True)
    (tmp_path / "creds" / "nodes" / "hospital-a").write_text("")
    (tmp_path / "my data").mkdir()
    done, record = _supernode_sh(tmp_path, "hospital-a", tmp_path / "my data")
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    config = parse_config_args([args[args.index("--node-config") + 1]])
    state = str(tmp_path / "creds" / "supernodes" / "hospital-a")
    key = str(tmp_path / "creds" / "nodes" / "hospital-a")
    assert config == {"data-path": str(tmp_path / "my data"), "site-name": "hospital-a", "state-dir": state} | {
        "secagg-key": key  # its SuperNode key also signs its SecAgg+ round keys
    }
    # a STATE of the site's own, given relative to where the script runs: the ClientApp runs elsewhere
    done, record = _supernode_sh(tmp_path, "hospital-a", tmp_path / "my data", STATE="node state")
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    assert parse_config_args([args[args.index("--node-config") + 1]])["state-dir"] == str(tmp_path / "node state")


def test_a_new_superlink_or_supernode_state_folder_is_its_users_only(tmp_path, monkeypatch):
    """The SuperLink's database holds every message, each node's update among them; a node's holds its state."""
    monkeypatch.setattr(processes.subprocess, "Popen", lambda *a, **k: None)
    processes.start_superlink(tmp_path, port=1, state=tmp_path / "link", log=tmp_path / "link.log")
    node = {"superlink": "127.0.0.1:1", "port": 1, "node_config": {"site-name": "a"}, "log": tmp_path / "node.log"}
    processes.start_supernode(tmp_path, tmp_path / "key", home=tmp_path / "node", **node)
    assert [(tmp_path / f).stat().st_mode & 0o777 for f in ("link", "node")] == [0o700, 0o700]
    monkeypatch.undo()
    (tmp_path / "creds" / "nodes").mkdir(parents=True)
    (tmp_path / "creds" / "nodes" / "hospital-a").write_text("")
    done, _ = _supernode_sh(tmp_path, "hospital-a", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "creds" / "supernodes" / "hospital-a").stat().st_mode & 0o777 == 0o700
    fake = tmp_path / "bin"
    (fake / "flower-superlink").write_text("#!/bin/sh\n")
    (fake / "flower-superlink").chmod(0o755)
    for f in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / "creds" / f).write_text("")
    env = os.environ | {"CREDS": str(tmp_path / "creds"), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    env.pop("STATE", None)
    script = str(ROOT / "deploy" / "start_superlink.sh")
    link = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert link.returncode == 0, link.stderr
    assert (tmp_path / "creds" / "superlink").stat().st_mode & 0o777 == 0o700


def test_start_supernode_sh_passes_the_sites_terms_or_refuses_them(tmp_path, monkeypatch):
    (tmp_path / "creds" / "nodes").mkdir(parents=True)
    (tmp_path / "creds" / "nodes" / "hospital-a").write_text("")
    monkeypatch.setenv("REQUIRE_SECAGG", "3")
    monkeypatch.setenv("MAX_WORK_SECONDS", "7200")
    monkeypatch.setenv("DISCLOSURE_LOG", "logs/sent.jsonl")
    monkeypatch.setenv("SECAGG_PEERS", "consortium.pub")
    monkeypatch.setenv(approval.APP_DIGEST, "a" * 64)  # left in the operator's shell: no node may inherit it
    done, record = _supernode_sh(tmp_path, "hospital-a", tmp_path)
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    config = parse_config_args([args[args.index("--node-config") + 1]])
    assert config["require-secagg"] == "3" and config["max-work-seconds"] == "7200"
    assert config["disclosure-log"] == f"{tmp_path}/logs/sent.jsonl"  # made absolute: the app runs elsewhere
    assert config["secagg-peers"] == f"{tmp_path}/consortium.pub"
    assert config["secagg-key"] == str(tmp_path / "creds" / "nodes" / "hospital-a")  # its key signs its round keys
    assert args[-1] == "app="
    assert approval.APP_DIGEST not in processes._env(tmp_path)
    for name, value in (
        ("REQUIRE_SECAGG", "3 nodes"),
        ("MAX_WORK_SECONDS", "2h"),
        ("DISCLOSURE_LOG", 'a"b'),
        ("REQUIRE_SECAGG", "0"),  # with SECAGG_PEERS set: a check that would guard nothing
        ("SECAGG_PEERS", "x\\y"),
    ):
        record.unlink(missing_ok=True)
        monkeypatch.setenv(name, value)
        done, record = _supernode_sh(tmp_path, "hospital-a", tmp_path)
        assert done.returncode == 2 and (name in done.stderr or value in done.stderr) and not record.exists()
        monkeypatch.delenv(name)
