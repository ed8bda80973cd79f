"""A node runs only the app versions its site approved (deploy.approval): the digest, the list, the gate."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy import approval, plans, processes

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "someone"
fab-include = ["/tinyapp/**/*.py"]

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""


def _zip(files: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED, year: int = 2020) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, (year, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buffer.getvalue()


def _app(folder: Path) -> Path:
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text("app = None\n")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


def _list(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_the_digest_is_of_the_files_whatever_the_zip_did():
    files = {"pyproject.toml": b"[project]\n", "app/client.py": b"x = 1\n"}
    digest = approval.files_digest(approval.bundle_files(_zip(files)))
    stored = _zip(dict(reversed(files.items())), method=zipfile.ZIP_STORED, year=2024)
    assert stored != _zip(files)
    assert approval.files_digest(approval.bundle_files(stored)) == digest
    changed = approval.bundle_files(_zip(files | {"app/client.py": b"x = 2\n"}))
    assert approval.files_digest(changed) != digest
    renamed = approval.bundle_files(_zip({"pyproject.toml": b"[project]\n", "app/server.py": b"x = 1\n"}))
    assert approval.files_digest(renamed) != digest


def test_a_checkouts_digest_changes_with_what_the_bundle_sends_and_only_with_that(tmp_path):
    app = _app(tmp_path / "app")
    digest = approval.app_digest(app)
    assert approval.DIGEST.fullmatch(digest)
    (app / "notes.txt").write_text("not in fab-include: never sent")
    assert approval.app_digest(app) == digest
    (app / "tinyapp" / "client.py").write_text("app = None  # a change\n")
    assert approval.app_digest(app) != digest
    with pytest.raises(ValueError, match="no Flower app bundle can be built"):
        approval.app_digest(tmp_path / "empty")


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"../outside.py": b"x"}, "names a file"),
        ({"/etc/cron.d/x": b"x"}, "names a file"),
        ({"a\\..\\b.py": b"x"}, "names a file"),
        ({"a.py\nb.py": b"x"}, "names a file"),  # zip names end at a NUL; a line feed could join two entries
        ({f"f{i}.py": b"" for i in range(12)}, "entries"),
    ],
)
def test_a_bundle_that_climbs_out_or_holds_too_much_is_refused_in_one_line(monkeypatch, entries, reason):
    monkeypatch.setattr(approval, "MAX_FILES", 10)
    with pytest.raises(approval.NotApproved, match=reason) as refused:
        approval.bundle_files(_zip(entries))
    assert "\n" not in str(refused.value)


def test_a_bundle_that_is_no_zip_names_a_file_twice_or_lies_about_a_size_is_refused():
    with pytest.raises(approval.NotApproved, match="not a readable zip"):
        approval.bundle_files(b"PK\x03\x04 not really")
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as archive:
        archive.writestr("a.py", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("a.py", b"2")
    with pytest.raises(approval.NotApproved, match="names a file 'a.py'"):
        approval.bundle_files(twice.getvalue())
    big = _zip({"a.py": b"x" * 1000}, method=zipfile.ZIP_STORED)
    header = big.index(b"PK\x01\x02")  # the central directory's entry: its size field says 2000, the data is 1000
    lying = big[: header + 24] + (2000).to_bytes(4, "little") + big[header + 28 :]
    with pytest.raises(approval.NotApproved, match="'a.py' is not the size its header gives"):
        approval.bundle_files(lying)


def test_only_the_bundle_the_run_names_and_the_list_approves_passes():
    fab = _zip({"pyproject.toml": b"[project]\n"})
    digest = approval.files_digest(approval.bundle_files(fab))
    fab_hash = hashlib.sha256(fab).hexdigest()
    assert approval.check_bundle(fab, fab_hash, {digest}) == digest
    with pytest.raises(approval.NotApproved, match=f"app not approved at this site \\(digest {digest[:16]}\\)"):
        approval.check_bundle(fab, fab_hash, {"0" * 64})
    # Flower loads the app from the folder of the run's hash: another bundle's would run other code
    with pytest.raises(approval.NotApproved, match="hash mismatch"):
        approval.check_bundle(fab, "f" * 64, {digest})


def test_an_approval_list_others_may_write_a_link_or_a_line_that_is_no_digest_is_refused(tmp_path):
    good = _list(tmp_path / "approved.txt", f"# reviewed by the site\n{'a' * 64}  # v0.1.0\n\n{'b' * 64}\n")
    assert approval.read_approved(good) == {"a" * 64, "b" * 64}
    writable = _list(tmp_path / "writable.txt", "a" * 64)
    writable.chmod(0o664)
    link = tmp_path / "link.txt"
    link.symlink_to(good)
    for path, reason in [
        (writable, "others may write to it"),
        (link, "a link is refused"),
        (_list(tmp_path / "upper.txt", "A" * 64), "line 1: not a digest"),
        (_list(tmp_path / "short.txt", f"{'a' * 64}\n{'a' * 63}\n"), "line 2: not a digest"),
        (_list(tmp_path / "empty.txt", "# nothing yet\n"), "approves no app"),
        (tmp_path / "missing.txt", "No such file"),
    ]:
        with pytest.raises(ValueError, match=reason) as refused:
            approval.read_approved(path)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_approve_adds_a_checkouts_digest_once(tmp_path, capsys):
    app = _app(tmp_path / "app")
    approved = tmp_path / "approved.txt"
    assert approval.main(["approve", str(app), "--list", str(approved)]) == 0
    assert approval.main(["approve", str(app), "--list", str(approved)]) == 0
    assert approval.read_approved(approved) == {approval.app_digest(app)}
    assert len(approved.read_text().splitlines()) == 1 and not approved.stat().st_mode & 0o022
    assert "already" in capsys.readouterr().out
    approved.chmod(0o666)
    assert approval.main(["approve", str(app), "--list", str(approved)]) == 2
    assert "others may write to it" in capsys.readouterr().err


def test_a_node_with_an_approval_list_starts_flowers_clientapp_through_the_gate(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(processes.subprocess, "Popen", lambda *a, **k: started.append((a, k)))
    kwargs = {"superlink": "127.0.0.1:1", "port": 1, "node_config": {"site-name": "a"}, "log": tmp_path / "log"}
    empty = _list(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="approves no app"):
        processes.start_supernode(tmp_path, tmp_path / "key", home=tmp_path / "n", approved=empty, **kwargs)
    assert not started
    approved = _list(tmp_path / "approved.txt", "c" * 64)
    processes.start_supernode(tmp_path, tmp_path / "key", home=tmp_path / "node", approved=approved, **kwargs)
    env = started[0][1]["env"]
    monkeypatch.undo()
    gate_folder = Path(env["PATH"].split(os.pathsep)[0])
    assert gate_folder == tmp_path / "node" / "approval-gate" and gate_folder.stat().st_mode & 0o777 == 0o700
    # the gate answers as flwr-clientapp does; with no SuperNode to ask, it fails, but through Flower's own parser
    gate = subprocess.run([gate_folder / approval.GATE, "--help"], capture_output=True, text=True, timeout=120)
    assert gate.returncode == 0 and "--runtime-api-address" in gate.stdout, gate.stderr


def test_start_supernode_sh_puts_the_gate_first_on_the_nodes_path(tmp_path):
    creds, fake = tmp_path / "creds", tmp_path / "bin"
    (creds / "nodes").mkdir(parents=True)
    (creds / "nodes" / "hospital-a").write_text("")
    fake.mkdir()
    record = tmp_path / "path.txt"
    (fake / "flower-supernode").write_text(f'#!/bin/sh\nprintf "%s" "$PATH" > "{record}"\n')
    (fake / "flower-supernode").chmod(0o755)
    python = Path(os.sys.executable).parent
    env = os.environ | {"CREDS": str(creds), "PATH": os.pathsep.join([str(fake), str(python), os.environ["PATH"]])}
    cmd = ["bash", str(ROOT / "deploy" / "start_supernode.sh"), "hospital-a", str(tmp_path), "127.0.0.1:9093"]
    refused = subprocess.run(cmd, env=env | {"APPROVED": str(tmp_path / "none.txt")}, capture_output=True, text=True)
    assert refused.returncode == 2 and "none.txt" in refused.stderr and not record.exists()
    approved = _list(tmp_path / "approved.txt", "d" * 64)
    done = subprocess.run(cmd, env=env | {"APPROVED": str(approved)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first = Path(record.read_text().split(os.pathsep)[0])
    assert first == creds / "supernodes" / "hospital-a" / "approval-gate" and (first / approval.GATE).exists()


def test_a_list_whose_owner_or_folder_lets_others_replace_it_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    listed = _list(shared / "approved.txt", "a" * 64)
    shared.chmod(0o777)  # anyone may rename the list away and put their own in its place
    with pytest.raises(ValueError, match=f"the folder of approval list {shared}: others may write to it"):
        approval.read_approved(listed)
    shared.chmod(0o1777)  # as /tmp: others may add entries, not move this user's
    assert approval.read_approved(listed) == {"a" * 64}
    info = os.stat(listed)
    stranger = os.stat_result((info.st_mode, 0, 0, 1, os.geteuid() + 1, 0, 64, 0, 0, 0))
    with pytest.raises(ValueError, match="owned by another user"):
        approval._check_owner(listed, stranger, "approval list")


def _gate(tmp_path: Path, app: Path, approved: set[str], *, version: str = "1.0.0", run_config=None):
    """A :class:`approval.Gate` over Flower's own installer, pulling the bundle of ``app`` for a run that names
    ``version``, with ``run_config`` in the message's context; returns it and the bundle."""
    from types import SimpleNamespace

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(app)
    listed = _list(tmp_path / "approved.txt", "\n".join(approved) + "\n")
    run = SimpleNamespace(fab_id="someone/tinyapp", fab_version=version)
    bundle = SimpleNamespace(content=fab, hash_str=hashlib.sha256(fab).hexdigest())
    context = SimpleNamespace(run_config=run_config)
    pull = lambda client: ("message", context, run, bundle)  # noqa: E731
    gate = approval.Gate(listed, pull, install_from_fab, tmp_path / "home")
    gate.pull(None)
    return gate, fab


def test_the_gate_installs_an_approved_bundle_apart_and_loads_it_only_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(approval.APP_DIGEST, "inherited")  # recorded, so that the gate's value is undone afterwards
    app = _app(tmp_path / "app")
    digest = approval.app_digest(app)
    # a folder installed before the node had a list, where Flower would look for this app by name and hash
    gate, fab = _gate(tmp_path, app, {digest})
    stale = tmp_path / "home" / "apps" / f"someone.tinyapp.1.0.0.{hashlib.sha256(fab).hexdigest()[:8]}"
    (stale / "tinyapp").mkdir(parents=True)
    (stale / "tinyapp" / "client.py").write_text("import os; os.system('echo pwned')\n")
    installed = gate.install(fab, skip_prompt=True)
    assert installed.parent.parent == tmp_path / "home" / "approved" / digest
    assert (installed / "tinyapp" / "client.py").read_text() == "app = None\n"
    assert os.environ[approval.APP_DIGEST] == digest  # the app names it in the node's disclosure log
    (installed / "tinyapp" / "client.py").write_text("app = 'changed'\n")  # a copy left half-written, or edited
    with pytest.raises(approval.NotApproved, match="installed copy of this app differs"):
        _gate(tmp_path, app, {digest})[0].install(fab, skip_prompt=True)
    gate, fab = _gate(tmp_path, app, {digest}, version="../../elsewhere")
    with pytest.raises(approval.NotApproved, match="names another app folder"):
        gate.install(fab, skip_prompt=True)
    with pytest.raises(approval.NotApproved, match="app not approved at this site"):
        _gate(tmp_path, app, {"e" * 64})[0].install(fab, skip_prompt=True)
    missing = approval.Gate(tmp_path / "none.txt", None, None, tmp_path / "home")
    with pytest.raises(approval.NotApproved, match="list cannot be read"):
        missing.install(fab)


def test_the_gate_folder_refuses_every_other_process_flower_may_start(tmp_path):
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder = approval.write_gate(tmp_path / "gate", _list(tmp_path / "approved.txt", "a" * 64))
    others = set(TASK_TYPE_TO_COMMAND.values()) - {approval.GATE}
    assert "flwr-agentapp" in others
    for name in others:
        done = subprocess.run([folder / name, "--token", "x"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and f"{name} refused" in done.stderr
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "approved.txt")
    with pytest.raises(ValueError, match="a link is refused"):
        approval.write_gate(tmp_path / "gate2", link)


def _planned_app(folder: Path) -> Path:
    """:func:`_app` with settings of the kinds a run config holds."""
    app = _app(folder)
    with (app / "pyproject.toml").open("a") as file:
        file.write('\n[tool.flwr.app.config]\nnum-server-rounds = 3\nlr = 0.001\ndp = "off"\nsecagg = false\n')
    return app


def test_the_run_config_of_a_plan_is_the_one_flowers_node_fuses_for_the_app(tmp_path):
    """What a site approves is what its node's ClientApp reads: Flower's own parse, transport and fuse."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fused_config_from_fab, parse_config_args
    from flwr.common.serde import user_config_from_proto, user_config_to_proto

    fab = build_fab_from_disk(_planned_app(tmp_path / "app"))
    values = ["num-server-rounds=20 dp='client' lr=2e-3"]
    sent = user_config_from_proto(user_config_to_proto(parse_config_args(values)))  # over the wire
    on_node = get_fused_config_from_fab(fab, SimpleNamespace(override_config=sent))
    assert plans.fused_config(fab, values) == on_node
    assert on_node == {"num-server-rounds": 20, "lr": 0.002, "dp": "client", "secagg": False}
    with pytest.raises(ValueError, match="the app has no setting 'bogus'"):
        plans.fused_config(fab, ["bogus=1"])
    with pytest.raises(ValueError, match="--run-config: .*format"):
        plans.fused_config(fab, ["rounds=="])
    with pytest.raises(ValueError, match="num-server-rounds = 9223372036854775808 is beyond a 64-bit integer"):
        plans.fused_config(fab, [f"num-server-rounds={2**63}"])  # flwr run could not send it: no run has this plan


def test_a_plan_approves_its_app_under_its_run_config_alone(tmp_path, monkeypatch, capsys):
    """A site approves an app with one run config; a coordinator that changes any value of it, or its type, is
    refused before the bundle is installed, while a list that approves the app itself takes any run config."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    app = _planned_app(tmp_path / "app")
    listed = tmp_path / "site" / "approved.txt"
    values = "num-server-rounds=20 dp='client'"
    assert approval.main(["approve", str(app), "--list", str(listed), "--run-config", values]) == 0
    shown = capsys.readouterr().err
    assert 'dp = "client"' in shown and "num-server-rounds = 20" in shown and "lr = 0.001" in shown
    assert approval.main(["digest", str(app), "--run-config", values]) == 0
    (plan,) = approval.read_approved(listed)
    assert capsys.readouterr().out.strip() == plan and plan.startswith("plan ")
    assert f"--run-config {values!r}" in listed.read_text()  # which run a line approves, for the site to read later
    assert approval.main(["check", str(listed)]) == 0 and "0 app(s) and 1 plan(s)" in capsys.readouterr().out
    digest = approval.app_digest(app)
    assert plan not in (digest, f"plan {digest}")

    approved = {"num-server-rounds": 20, "lr": 0.001, "dp": "client", "secagg": False}
    gate, fab = _gate(tmp_path, app, {plan}, run_config=approved)
    assert gate.install(fab, skip_prompt=True).parent.parent == tmp_path / "home" / "approved" / digest
    retyped = ({"num-server-rounds": 20.0}, {"num-server-rounds": "20"}, {"secagg": 0}, {"secagg": "False"})
    for changed in ({"dp": "off"}, {"num-server-rounds": 21}, {"x": 1}, *retyped):
        gate, fab = _gate(tmp_path, app, {plan}, run_config=approved | changed)
        with pytest.raises(approval.NotApproved, match=f"app and run config not approved .*digest {digest[:16]}"):
            gate.install(fab, skip_prompt=True)
    for unreadable in (None, {"lr": [1]}, "dp=off"):
        with pytest.raises(approval.NotApproved, match="not approved at this site"):
            _gate(tmp_path, app, {plan}, run_config=unreadable)[0].install(fab, skip_prompt=True)
    # the same plan under another app version is another plan; the app's own digest approves any run config
    with pytest.raises(approval.NotApproved, match="app and run config not approved"):
        approval.check_bundle(fab, hashlib.sha256(fab).hexdigest(), {plans.plan_line("e" * 64, approved)}, approved)
    assert approval.check_bundle(fab, hashlib.sha256(fab).hexdigest(), {digest}, approved | {"dp": "off"}) == digest


def test_a_plan_line_is_read_as_the_node_will_and_nothing_like_one_passes(tmp_path):
    good = _list(tmp_path / "approved.txt", f"plan  {'a' * 64}  # with 20 rounds\n{'b' * 64}\n")
    assert approval.read_approved(good) == {f"plan {'a' * 64}", "b" * 64}
    digest = "a" * 64
    # a line break only ends a line: a comment holding another kind (U+2028, a form feed) approves nothing more
    retired = _list(tmp_path / "retired.txt", f"{'b' * 64}  # replaces:\u2028{digest}\x0c{digest}\n")
    assert approval.read_approved(retired) == {"b" * 64}
    for n, line in enumerate(["plan", f"plan {digest[1:]}", f"app {digest}", f"plan plan {digest}", f"PLAN {digest}"]):
        with pytest.raises(ValueError, match="line 1: not a digest .* or a plan"):
            approval.read_approved(_list(tmp_path / f"bad{n}.txt", line + "\n"))


def test_a_site_approves_no_plan_its_app_would_refuse_to_start(tmp_path, capsys):
    """This checkout's own rules (server.checks) judge a plan of it: secure aggregation with differential privacy, a
    key of the wrong type or a strategy setting that cannot work is refused in one line, and nothing is listed."""
    listed = tmp_path / "approved.txt"
    for values, reason in (
        ("secagg=true dp='client'", "secagg=true cannot be combined with resume-from or dp"),
        ("strategy='bulyan' min-nodes=3", "bulyan with malicious-nodes=1 needs at least 7 nodes"),
        ("local-epochs=-1.0", "local-epochs"),
    ):
        assert approval.main(["approve", str(ROOT), "--list", str(listed), "--run-config", values]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: this plan's run config would not start: ") and reason in error, error
    assert not listed.exists()
    assert approval.main(["digest", str(ROOT), "--run-config", "secagg=true min-nodes=3"]) == 0
    assert "checked against the app's start-up rules" in capsys.readouterr().err
    # another app's rules are its own: this checkout's are not applied to it
    assert plans.check_startable(tmp_path, {"secagg": True, "dp": "client"}).startswith("not checked: ")
