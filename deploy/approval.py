"""Apps a hospital has approved: a node runs only the app versions its site reviewed.

Every SuperNode runs the code the coordinator submits. Flower 1.42's app signing (``--trusted-entities``)
accepts only apps whose licence Flower's hub verifies, so it cannot pin an app of the consortium's own; this
module does that job at the node, as OpenFL's collaborators check the plan they signed.

A SuperNode starts each message's ClientApp process as ``flwr-clientapp``, found on its ``PATH``. A node
started with an approval list (``APPROVED=FILE deploy/start_supernode.sh ...``) finds this module's gate there
first. The gate runs Flower's own ClientApp process, and before the app bundle (FAB) that came with the
message is installed or any of its code imported, it checks the bundle's digest against the list. A bundle
not on the list ends the message with ``app not approved at this site (digest ...)``, which the server
records as that node's failure for the round; the node and the other sites go on.

The digest is of the bundle's files, not of its bytes: SHA-256 over each file's name and SHA-256, in name
order, so the same files give the same digest whatever the zip compression did. The coordinator sends the
bundle ``flwr run APP_DIR`` builds from its checkout (the files ``fab-include`` names); a hospital gets the
digest of the same bundle from its own reviewed checkout of the agreed commit:

    python deploy/approval.py digest .                              # prints the digest
    python deploy/approval.py approve . --list ~/mstkd/approved.txt  # adds it to the site's list

The list holds one digest per line; ``#`` starts a comment. A line ``plan <digest>`` approves an app only with one
run config (:mod:`deploy.plans`). Like ``authorized_keys``, a list that others may write to is refused: whoever
could add a line could run code on the node.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import re
import shlex
import stat
import sys
import zipfile
import zlib
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from deploy.plans import PLAN, check_startable, described, fused_config, note_changes, plan_line, show

MAX_FILES = 10_000
MAX_BYTES = 256 * 1024 * 1024  # unpacked; Flower refuses a bundle over 10 MB packed
DIGEST = re.compile(r"[0-9a-f]{64}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
GATE = "flwr-clientapp"  # the name Flower's task launcher starts a ClientApp process by (flwr 1.42)
APP_DIGEST = "MSTKD_APPROVED_APP"  # client/disclosures.py's: the digest the gate let run, for the node's log
# what reading a zip may raise (RuntimeError: an entry flagged encrypted)
UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error)


class NotApproved(Exception):
    """A message's app is not one this site approved, or its bundle cannot be read. The text travels to the
    server as the node's failure reason: it names no path of the node."""


def bundle_files(fab: bytes) -> dict[str, bytes]:
    """The files of an app bundle (a zip), by name, read within limits before anything is unpacked.

    Raises:
        NotApproved: not a zip, more than :data:`MAX_FILES` entries or :data:`MAX_BYTES` unpacked, a name
            that is absolute, climbs out (``..``), holds a control character or appears twice, or an entry larger
            than its header says.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        entries = archive.infolist()
        if len(entries) > MAX_FILES:
            raise NotApproved(f"the app bundle holds {len(entries)} entries (at most {MAX_FILES})")
        if sum(e.file_size for e in entries) > MAX_BYTES:
            raise NotApproved(f"the app bundle unpacks to more than {MAX_BYTES // 2**20} MB")
        files: dict[str, bytes] = {}
        for entry in entries:
            name = entry.filename
            parts = name.split("/")
            # a control character in a name could make two bundles' lists of names and hashes read alike
            if name.startswith("/") or "\\" in name or ".." in parts or name in files or CONTROL.search(name):
                raise NotApproved(f"the app bundle names a file {name[:80]!r}")
            if entry.is_dir():
                continue
            with archive.open(entry) as member:
                data = member.read(entry.file_size + 1)
            if len(data) != entry.file_size:
                raise NotApproved(f"the app bundle's {name[:80]!r} is not the size its header gives")
            files[name] = data
        return files
    except (*UNREADABLE, NotImplementedError) as exc:
        raise NotApproved(f"the app bundle is not a readable zip ({type(exc).__name__})") from None


def files_digest(files: dict[str, bytes]) -> str:
    """SHA-256 over ``name NUL sha256(content) LF`` of every file, in name order (hex)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def app_bundle(app_dir: Path) -> bytes:
    """The bundle ``flwr run app_dir`` sends, built with Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(app_dir)
    except Exception as exc:  # Flower's builder raises what it meets: no pyproject.toml, a tree too deep, ...
        raise ValueError(f"{app_dir}: no Flower app bundle can be built from it ({exc})") from None


def app_digest(app_dir: Path) -> str:
    """The digest of the bundle ``flwr run app_dir`` sends."""
    return files_digest(bundle_files(app_bundle(app_dir)))


def approval_entry(app_dir: Path, run_config: list[str] | None) -> str:
    """The list entry that approves ``app_dir``'s bundle: its digest, or with ``run_config`` (the ``--run-config``
    values of ``flwr run``) the plan of the two, whose run config is printed on standard error for review."""
    fab = app_bundle(app_dir)
    digest = files_digest(bundle_files(fab))
    if run_config is None:
        return digest
    config = fused_config(fab, run_config)
    checked = check_startable(app_dir, config)
    print(f"# the run config of this plan ({len(config)} values, {checked})\n{show(config)}", end="", file=sys.stderr)
    return plan_line(digest, config)


def read_approved(path: Path, *, empty: bool = False) -> set[str]:
    """The digests a site's list approves (``empty``: a list that approves none is no error), each app's as it
    is and each plan's as its line (``plan <digest>``). The list is read as ``sshd`` reads ``authorized_keys``:
    whoever could replace it could run code on the node.

    Raises:
        ValueError: one line: no such file, a link, a file owned by another user or that others may write to,
            a folder above it that others may write to (without the sticky bit), a line that is not a digest
            or a plan's, or a list that approves nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        why = "a link is refused" if exc.errno == errno.ELOOP else exc.strerror
        raise ValueError(f"approval list {path}: {why}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"approval list {path}: not a plain file")
        _check_owner(path, info, "approval list")
        for folder in Path(os.path.realpath(path)).parents:
            _check_owner(folder, folder.stat(), "the folder of approval list", sticky_ok=True)
        if info.st_size > 1_000_000:
            raise ValueError(f"approval list {path}: {info.st_size} bytes is not a list of digests")
        text = file.read(1_000_001).decode("utf-8", "replace")
    approved = set()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: a U+2028 in a comment ends no line
        value = " ".join(line.split("#", 1)[0].split())
        if not value:
            continue
        kind, _, digest = value.rpartition(" ")
        if kind not in ("", PLAN) or not DIGEST.fullmatch(digest):
            raise ValueError(f"approval list {path}, line {number}: not a digest (64 lower-case hex digits) or a plan")
        approved.add(value)
    if not approved and not empty:
        raise ValueError(f"approval list {path}: approves no app")
    return approved


def _check_owner(path: Path, info: os.stat_result, what: str, *, sticky_ok: bool = False) -> None:
    """Refuse ``path`` unless root or this user owns it and no one else may write to it (a folder with the
    sticky bit, such as /tmp, lets others add entries but not rename or remove this user's)."""
    if info.st_uid not in (0, os.geteuid()):
        raise ValueError(f"{what} {path}: owned by another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (sticky_ok and info.st_mode & stat.S_ISVTX):
        raise ValueError(f"{what} {path}: others may write to it; chmod go-w {shlex.quote(str(path))}")


def check_bundle(fab: bytes, fab_hash: str, approved: set[str], run_config: Any = None) -> str:
    """The bundle's digest, when ``approved`` holds it, or the plan of it with ``run_config`` (the run config the
    node's ClientApp will read), and the bundle is the one the run names (Flower installs a bundle under the
    SHA-256 of its bytes and loads the app by the run's ``fab_hash``).

    Raises:
        NotApproved: the reason, naming the digest (and the plan's, where the list approves plans).
    """
    return _approved_files(fab, fab_hash, approved, run_config)[0]


def _approved_files(fab: bytes, fab_hash: str, approved: set[str], run_config: Any) -> tuple[str, dict[str, bytes]]:
    """:func:`check_bundle`'s digest with the bundle's files, read once for both the digest and the install check."""
    if hashlib.sha256(fab).hexdigest() != fab_hash:
        raise NotApproved("the app bundle is not the one its run names (hash mismatch)")
    files = bundle_files(fab)
    digest = files_digest(files)
    if digest in approved:
        return digest, files
    if not any(entry.startswith(PLAN) for entry in approved):
        raise NotApproved(f"app not approved at this site (digest {digest[:16]})")
    try:
        plan = plan_line(digest, dict(run_config or {}))
    except (TypeError, ValueError):  # not a mapping of run-config values: no plan holds it
        plan = f"{PLAN} unreadable"
    if plan not in approved:
        raise NotApproved(f"app and run config not approved at this site (digest {digest[:16]}, {plan[:21]})")
    return digest, files


def check_installed(folder: Path, files: dict[str, bytes]) -> None:
    """Refuse an installed app folder that does not hold the bundle's files as they are (Flower installs a
    bundle's files, less ``.info/``, and reuses a folder that exists: one left by a crash half-way, or made by
    hand, would run other code).

    Raises:
        NotApproved: the folder differs (the node's log names it).
    """
    for name, data in files.items():
        if name.startswith(".info/"):
            continue
        target = folder / name
        if (
            target.is_symlink()
            or not target.is_file()
            or hashlib.sha256(target.read_bytes()).digest() != (hashlib.sha256(data).digest())
        ):
            print(f"error: {folder} does not hold the approved bundle's {name}; remove the folder", file=sys.stderr)
            raise NotApproved("the installed copy of this app differs from its bundle (see the node's log)")


class Gate:
    """The two steps of Flower's ClientApp process that the gate wraps: pulling a message (the run and the bundle's
    hash are noted) and installing its bundle (checked first: :meth:`install`). ``home``: the node's Flower home."""

    def __init__(self, approved_list: Path, pull: Callable, install: Callable, home: Path) -> None:
        try:
            self.approved, self.problem = read_approved(approved_list), None
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)  # the node's log; the server is told no path
            self.approved, self.problem = set(), "this site's approval list cannot be read (see the node's log)"
        self._pull, self._install, self.home = pull, install, home
        self.run, self.fab_hash, self.run_config = None, "", None

    def pull(self, client):
        message, context, run, fab = self._pull(client)
        # the run config the ClientApp will be given with this message: a plan approves the app with it alone
        self.run, self.fab_hash, self.run_config = run, fab.hash_str, getattr(context, "run_config", None)
        return message, context, run, fab

    def install(self, fab: bytes, *args, **kwargs) -> Path:
        """Install an approved bundle where only approved bundles are (``<home>/approved/<digest>``: an app
        installed before the list, or not approved, never lies there), and only where its run will load it from.
        Raised after the message is pulled, so that Flower replies with the reason instead of leaving the server
        to wait out its timeout.

        Raises:
            NotApproved: a list that cannot be read, a bundle (or its plan) not approved or not its run's, a run
                that names another folder (its id or version), or an installed folder that differs from the bundle.
        """
        from flwr.common.config import get_project_dir

        if self.problem:
            raise NotApproved(self.problem)
        digest, files = _approved_files(fab, self.fab_hash, self.approved, self.run_config)
        apps = self.home / "approved" / digest
        apps.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(apps)  # where Flower installs the app and loads it from
        installed = Path(self._install(fab, *args, **kwargs))
        try:
            named = get_project_dir(self.run.fab_id, self.run.fab_version, self.fab_hash)
        except (AttributeError, ValueError):
            named = None
        if named is None or os.path.realpath(named) != os.path.realpath(installed):
            raise NotApproved("the run names another app folder than its bundle's (its id or version)")
        check_installed(installed, files)
        os.environ[APP_DIGEST] = digest  # the ClientApp names it in the node's disclosure log
        return installed


def run_gate(approved_list: Path, flwr_args: list[str]) -> None:
    """Flower's ClientApp process (``flwr-clientapp flwr_args``) through :class:`Gate`. A list that cannot be read
    refuses every message, with the reason."""
    from flwr.common.config import get_flwr_home
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    if not all(hasattr(runtime, name) for name in ("pull_task_input", "install_from_fab")):
        # another Flower: its ClientApp process no longer has the steps checked here; run no code unchecked
        sys.exit("error: this Flower's ClientApp process has no install step the approval check knows; refused")
    os.environ.pop(APP_DIGEST, None)  # named only once this process's bundle is approved
    gate = Gate(approved_list, runtime.pull_task_input, runtime.install_from_fab, get_flwr_home())
    runtime.pull_task_input, runtime.install_from_fab = gate.pull, gate.install
    # the app's own packages, not the node checkout's, must be the ones it imports (Flower puts the installed
    # app first on sys.path, and reuses a module already imported)
    for name in [m for m in sys.modules if m.split(".")[0] in ("mstkd", "deploy")]:
        del sys.modules[name]
    script_folder = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != script_folder]
    sys.argv = [GATE, *flwr_args]
    flwr_clientapp()


def write_gate(folder: Path, approved_list: Path) -> Path:
    """A folder to put first on a SuperNode's ``PATH``: ``flwr-clientapp``, the gate over ``approved_list``, and
    every other process Flower's task launcher may start by name (``flwr-agentapp``, ...), each refusing to run;
    only the node's user may change it. Checks the list first.

    Raises:
        ValueError: the list cannot be read (:func:`read_approved`), or ``folder`` is a link.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    from mstkd.atomic import write_bytes

    read_approved(approved_list)  # as given: a link is refused before anything resolves it
    approved_list = Path(os.path.abspath(approved_list))
    if folder.is_symlink():
        raise ValueError(f"{folder}: a link; give a folder of the node's own")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    command = [sys.executable, str(Path(__file__).resolve()), "gate", "--list", str(approved_list), "--"]
    scripts = {GATE: "exec " + " ".join(shlex.quote(c) for c in command) + ' "$@"'}
    for other in set(TASK_TYPE_TO_COMMAND.values()) - {GATE}:
        refusal = f"error: this node runs only the ClientApps of approved apps (deploy/approval.py): {other} refused"
        scripts[other] = f"echo {shlex.quote(refusal)} >&2\nexit 1"
    for name, body in scripts.items():
        write_bytes(folder / name, f"#!/bin/sh\n{body}\n".encode())
        (folder / name).chmod(0o700)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/approval.py", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    digest = verbs.add_parser("digest", help="the digest of the app bundle that flwr run APP_DIR sends, or its plan")
    digest.add_argument("app_dir", nargs="?", default=".", type=Path)
    approve = verbs.add_parser("approve", help="add APP_DIR's digest, or its plan, to a site's approval list")
    approve.add_argument("app_dir", nargs="?", default=".", type=Path)
    approve.add_argument("--list", required=True, type=Path, dest="approved")
    for verb in (digest, approve):
        verb.add_argument(
            "--run-config",
            action="append",
            metavar="VALUES",
            help="the plan of the app with this run config (as flwr run's --run-config), not the app with any",
        )
    check = verbs.add_parser("check", help="check a site's approval list")
    check.add_argument("approved", type=Path)
    install = verbs.add_parser("install-gate", help="write the gate for a SuperNode's PATH into FOLDER")
    install.add_argument("folder", type=Path)
    install.add_argument("--list", required=True, type=Path, dest="approved")
    gate = verbs.add_parser("gate", help="Flower's ClientApp process behind the check (started by the SuperNode)")
    gate.add_argument("--list", required=True, type=Path, dest="approved")
    gate.add_argument("flwr_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.verb == "gate":
            rest = args.flwr_args
            run_gate(args.approved, rest[1:] if rest[:1] == ["--"] else rest)
        elif args.verb == "digest":
            value = approval_entry(args.app_dir, args.run_config)
            note_changes(args.app_dir)
            print(value)
        elif args.verb == "check":
            entries = read_approved(args.approved)
            plans = sum(entry.startswith(PLAN) for entry in entries)
            print(f"{args.approved}: {len(entries) - plans} app(s) and {plans} plan(s) approved")
        elif args.verb == "install-gate":
            print(write_gate(args.folder, args.approved))
        else:
            value = approval_entry(args.app_dir, args.run_config)
            exists = args.approved.exists() or args.approved.is_symlink()
            if value in (read_approved(args.approved, empty=True) if exists else set()):
                print(f"{value} is on {args.approved} already")
                return 0
            from mstkd.atomic import write_bytes

            text = args.approved.read_text() if exists else ""
            # a new list's folder is made for the node's user alone to change (a 0775 one would be refused)
            args.approved.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            plan = f", {described(args.run_config)}" if args.run_config is not None else ""
            line = f"{value}  # {note_changes(args.app_dir)}{plan}, approved {date.today().isoformat()}\n"
            write_bytes(args.approved, (text + ("" if text.endswith("\n") or not text else "\n") + line).encode())
            read_approved(args.approved)  # as the node will read it
            print(f"{value} added to {args.approved}")
    except (ValueError, NotApproved) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a list's folder that cannot be written, a file where a folder should be
        print(f"error: {exc.filename or args.approved}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # run as a file (the gate is): its reasons then name deploy.approval.NotApproved
    from deploy.approval import main as approval_main

    sys.exit(approval_main())
