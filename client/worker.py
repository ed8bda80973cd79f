"""A deployed node's warm worker: one long-lived process per SuperNode that does the node's work.

Flower 1.42 starts a fresh ``flwr-clientapp`` process on a SuperNode for every message. Were that
process to train, every message would pay the interpreter start, the PyTorch and MONAI imports
(seconds) and PyTorch's first-use set-up before any work. So on a deployed node the ClientApp
stays light: it hands each message's work (a :class:`client.context.Job` of :mod:`client.site`) to this
worker and returns its answer, and the worker imports everything once and serves every later message warm.

- **Start.** The first message on a node starts the worker (``python -m client.worker``, from the
  same app code and interpreter); later messages find it through a Unix socket. A file lock makes
  sure concurrent messages start one worker, not two.
- **Privacy.** The socket and its key lie in a folder only the node's user can open (mode 0700,
  ``$XDG_RUNTIME_DIR/mstkd`` or ``<tmp>/mstkd-<uid>``); the connection is authenticated with that
  key (:mod:`multiprocessing.connection`), so no other user can hand the worker work.
- **End.** The worker ends with its SuperNode (it watches Flower's task launcher, the parent of the
  per-message process, and is in the SuperNode's process group), after ``worker-idle`` seconds
  without a message (node config; default 1800), or on SIGTERM or SIGINT. It outlives a SuperNode
  that died without stopping its group by a few seconds at most.
- **Failures.** An exception in the work travels back and is raised in the ClientApp (with the
  worker's traceback in a note): the project's own types as themselves, rebuilt by name
  (:data:`mstkd.errors.KNOWN`; never an unpickled exception object), any other as a ``RuntimeError`` that names
  it. The ClientApp logs it and tells the server only its public reason
  (:func:`mstkd.errors.public_reason`), which the worker works out; a worker that dies
  mid-message is reported as such, and the next message starts a new one. A message that
  reaches a worker as it stops for being idle goes to a new worker instead.
- **One message at a time.** As Flower's SuperNode sends them. A message whose process Flower
  ends (a stopped run) is still finished by the worker and its node state saved, as for a node
  whose reply came too late.

The node config ``worker`` chooses: ``auto`` (default: a worker wherever Flower starts a process
per message, i.e. inside ``flwr-clientapp``, unless Flower installs the app's dependencies for
each message), ``on`` or ``off`` (the work runs in the per-message process, Flower's own way).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from client.context import Job, NodeContext
from mstkd.atomic import write_bytes
from mstkd.errors import KNOWN, public_reason
from mstkd.runconfig import NodeConfig, WorkerMode

log = logging.getLogger("mstkd.client")

START_PATIENCE = 300.0  # seconds a message waits for a new worker to listen (it imports PyTorch first)
APP_DIR = Path(__file__).resolve().parents[1]  # the app's code: the repository, or Flower's unpacked FAB


class WorkerError(RuntimeError):
    """The worker failed outside the work itself: it did not start, or it died during a message."""


def wanted(node: NodeConfig) -> bool:
    """Whether this process hands its work to the node's worker (see the module doc).

    ``auto`` stays in process where Flower installs the app's dependencies for each message
    (``--allow-runtime-dependency-installation``): they live only as long as that process."""
    per_message = Path(sys.argv[0]).name == "flwr-clientapp"
    return node.worker == WorkerMode.ON or (
        node.worker == WorkerMode.AUTO and per_message and "--allow-runtime-dependency-installation" not in sys.argv
    )


def site_work(job: str) -> Callable[..., Any]:
    """The function of :mod:`client.site` that does ``job`` (importing it imports PyTorch and MONAI).

    Raises:
        ValueError: ``job`` is not a :class:`~client.context.Job`.
    """
    job = Job.named(job)
    import client.site as site

    work = {
        Job.LOCAL_ROUND: site.local_round,
        Job.EVALUATE_SITE: site.evaluate_site,
        Job.SITE_GEOMETRY: site.site_geometry,
        Job.ARRAY_NAMES: site.array_names,
    }
    return work[job]


# --------------------------------------------------------------------------- the ClientApp's side


def call(node: NodeContext, job: Job, *args: Any) -> Any:
    """Run ``client.site.<job>(node, *args)`` in the node's worker (started if need be) and return its result.

    A worker that ends before it takes the job (it was stopping when the message came) is replaced,
    and the job goes to the new one.

    Raises:
        WorkerError: the worker could not be started, or ended before it answered.
        Exception: whatever the work raised, re-raised here (its worker-side traceback in a note).
    """
    job = Job.named(job)
    for attempt in range(2):
        with _connection(node) as conn:
            try:
                conn.send((job, (node, *args)))
                conn.recv()  # ("started", pid): from here on the job is the worker's
            except (EOFError, OSError) as exc:
                if attempt == 0:
                    continue
                raise WorkerError(f"the node's worker ended before it took {job}; see the node log") from exc
            try:
                status, value = conn.recv()
            except (EOFError, OSError) as exc:
                raise WorkerError(f"the node's worker ended during {job}; see the node log for why") from exc
        if status == "ok":
            return value
        raise _exception(*value)
    raise AssertionError("unreachable")


def stop(node: NodeContext) -> bool:
    """Ask the node's worker to end now; False if none is running."""
    sock = _socket(node)
    conn = _connect(sock, sock.with_suffix(".key"))
    if conn is None:
        return False
    with conn:
        conn.send(("stop", ()))
        try:
            conn.recv()
        except (EOFError, ConnectionError):
            pass
    return True


def _exception(name: str, text: str, public: str, trace: str) -> BaseException:
    """The work's exception: one of the project's own types rebuilt by name, else a RuntimeError naming it;
    either way with the worker's traceback in a note and the public reason the worker worked out."""
    exc: BaseException = KNOWN[name](text) if name in KNOWN else RuntimeError(f"{name}: {text}")
    if name not in KNOWN:
        exc.public = public  # type: ignore[attr-defined]
    exc.add_note(trace)
    return exc


def _socket(node: NodeContext) -> Path:
    """The socket of the node's worker; its key and the starters' lock lie beside it (``.key``, ``.lock``).

    One worker per SuperNode, app version and interpreter: the name tells them apart."""
    ident = [str(APP_DIR), sys.executable, node.node_id, {k: str(v) for k, v in node.node.to_flower().items()}]
    folder = runtime_dir()
    sock = folder / f"{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]}.sock"
    if len(os.fsencode(sock)) > 100:  # the limit of a Unix socket's path is about 108 bytes
        raise WorkerError(f"{folder}: too long a path for the worker's socket; set XDG_RUNTIME_DIR to a short one")
    return sock


def runtime_dir() -> Path:
    """A folder only this user can open, for the workers' sockets and keys (made on first use).

    Raises:
        WorkerError: the folder exists but belongs to someone else or others can open it.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        folder = Path(base) / "mstkd"
    else:  # no session runtime folder (a service account, or after the last logout)
        folder = Path(tempfile.gettempdir()) / f"mstkd-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
        raise WorkerError(f"{folder} must be a folder of this user with mode 0700; remove it and retry")
    return folder


@contextmanager
def _connection(node: NodeContext) -> Iterator[Connection]:
    sock = _socket(node)
    key = sock.with_suffix(".key")
    conn = _connect(sock, key)
    if conn is None:
        with open(sock.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one new worker, however many messages arrive at once
            conn = _connect(sock, key) or _start(node, sock, key)
    try:
        yield conn
    finally:
        conn.close()


def _connect(sock: Path, key: Path) -> Connection | None:
    """A connection to a listening worker, or None: no worker, a dead one's socket, or one that is stopping."""
    try:
        return Client(str(sock), "AF_UNIX", authkey=key.read_bytes())
    except (OSError, EOFError, AuthenticationError):
        return None


def _start(node: NodeContext, sock: Path, key: Path) -> Connection:
    """Start the node's worker and connect to it once it listens."""
    write_bytes(key, secrets.token_bytes(32), private=True)
    idle = node.node.worker_idle
    cmd = [sys.executable, "-P", "-m", "client.worker", str(sock), str(key), "--watch", str(os.getppid())]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")]))}
    # same process group as the SuperNode (stopping the node stops it); output goes to the node's log
    proc = subprocess.Popen([*cmd, "--idle", str(idle)], env=env, stdin=subprocess.DEVNULL)
    log.info("started the node's worker (pid %d); it serves this node's messages from now on", proc.pid)
    deadline = time.monotonic() + START_PATIENCE
    while (conn := _connect(sock, key)) is None:
        if proc.poll() is not None:
            raise WorkerError(f"the node's worker exited with status {proc.returncode}; see the node log")
        if time.monotonic() > deadline:
            proc.kill()
            raise WorkerError(f"the node's worker did not listen within {START_PATIENCE:g} s")
        time.sleep(0.05)
    proc.returncode = 0  # it outlives this process on purpose: no "still running" warning at exit
    return conn


# --------------------------------------------------------------------------- the worker's side


class _Worker:
    def __init__(self, sock: Path, key: Path, watch: int | None, idle: float) -> None:
        self.sock, self.key, self.watch, self.idle = sock, key, watch, idle
        self.guard = threading.Lock()  # between taking a message and stopping when idle
        self.busy = False
        self.last = time.monotonic()
        self.inode: int | None = None

    def listen(self) -> Listener:
        """Listen once ready: a message that connects is served at once."""
        self.sock.unlink(missing_ok=True)  # a dead worker's socket; this worker's starter holds the lock
        listener = Listener(str(self.sock), "AF_UNIX", authkey=self.key.read_bytes())
        self.inode = self.sock.stat().st_ino
        return listener

    def unlink(self) -> None:
        """Remove this worker's socket and key: only its own (a successor may have bound the same path since),
        and under the starters' lock, so that no message writes a successor's key meanwhile. Where a starter
        holds the lock, it replaces both itself. The empty lock file stays."""
        with open(self.sock.with_suffix(".lock"), "a") as lock:
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
            try:
                if self.inode is not None and self.sock.stat().st_ino == self.inode:
                    self.sock.unlink()
                    self.key.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def stop(self, *_: Any) -> None:
        self.unlink()
        os._exit(0)  # from the watch thread or a signal handler, whatever the main thread is doing

    def watch_loop(self) -> None:
        while True:
            time.sleep(1.0)
            if self.watch is not None and not _alive(self.watch):
                self.stop()  # the SuperNode is gone: an answer would have nowhere to go
            with self.guard:
                if not self.busy and time.monotonic() - self.last > self.idle:
                    log.info("node worker idle for %g s: stopping", self.idle)
                    self.stop()

    def serve(self) -> None:
        import client.site  # PyTorch, MONAI and the project: once, before listening

        listener = self.listen()
        threading.Thread(target=self.watch_loop, daemon=True).start()
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a client without the key, or one that hung up
                continue
            with self.guard:
                self.busy = True
            try:
                with conn:
                    self.handle(conn)
            except (OSError, EOFError):
                pass  # the message's process went away; the next message brings a new one
            finally:
                with self.guard:
                    self.busy = False
                    self.last = time.monotonic()
                client.site.release_memory()

    def handle(self, conn: Connection) -> None:
        job, args = conn.recv()
        if job == "stop":
            self.unlink()
            conn.send(("ok", None))
            os._exit(0)
        conn.send(("started", os.getpid()))
        try:
            reply = ("ok", site_work(job)(*args))
        except Exception as exc:
            trace = f"in the node's worker (pid {os.getpid()}):\n{traceback.format_exc().rstrip()}"
            reply = ("error", (type(exc).__name__, str(exc), public_reason(exc), trace))
        conn.send(reply)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A deployed node's warm worker (started by the ClientApp).")
    parser.add_argument("socket", type=Path)
    parser.add_argument("key", type=Path)
    parser.add_argument("--watch", type=int, help="stop when this process (Flower's task launcher) ends")
    idle = NodeConfig().worker_idle
    parser.add_argument("--idle", type=float, default=idle, help="stop after this many seconds idle")
    args = parser.parse_args(argv)
    worker = _Worker(args.socket, args.key, args.watch if args.watch and args.watch > 1 else None, args.idle)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)  # Ctrl-C in the SuperNode's terminal reaches its whole group
    worker.serve()


if __name__ == "__main__":
    main()
