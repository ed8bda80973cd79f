"""Shared test helpers: tiny hand-made cases in either on-disk layout (no phantom generator needed), and the
ServerApp and ClientApps run in one process, without Ray or a SuperLink, recording every message."""

from __future__ import annotations

import copy
import csv
import gzip
import itertools
import json
import threading
import tomllib
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from mstkd.data.layouts import case_path
from mstkd.modalities import MODALITIES

# --------------------------------------------------------------------------- hand-made cases

SHAPE = (20, 18, 14)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 17], [0, 0, 1.0, 0], [0, 0, 0, 1]])
# Distinct mean intensity per modality, so tests can tell the channels apart.
MODALITY_LEVEL = {"flair": 100.0, "t1": 200.0, "t1ce": 300.0, "t2": 400.0}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def patch_header(path: Path, **fields) -> Path:
    """Overwrite fields of a ``.nii.gz`` file's header in its raw bytes (``dim``, ``datatype``, ``pixdim``,
    ``scl_inter``, ...), as a broken or hostile file would have them: nibabel would clean them on save."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = np.frombuffer(bytes(raw[:348]), dtype=nib.Nifti1Header.template_dtype).copy()
    for name, value in fields.items():
        header[name] = value
    raw[:348] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw), 1))
    return path


def make_labels(shape=SHAPE, enhancing: int = 4, offset: int = 0) -> np.ndarray:
    """A box tumour: edema shell (2), enhancing layer (ET label), necrotic centre (1)."""
    seg = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    c[0] += offset
    seg[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 4 : c[2] + 4] = 2
    seg[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = enhancing
    seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1] = 1
    return seg


def write_case(
    root: Path,
    case_id: str,
    layout: str = "fets",
    *,
    shape=SHAPE,
    seed: int = 0,
    ext: str = ".nii.gz",
    modalities=MODALITIES,
    seg: bool = True,
    affine: np.ndarray = AFFINE,
) -> Path:
    """Write one small case; brain = an ellipsoid, intensities = level + noise inside it."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    brain = (((grid - centre[:, None, None, None]) / (centre[:, None, None, None] + 0.5)) ** 2).sum(0) <= 1.0
    for m in modalities:
        data = np.where(brain, MODALITY_LEVEL[m] + rng.normal(0, 10, shape), 0).astype(np.float32)
        write_nifti(case_path(folder, case_id, layout, m).with_suffix("").with_suffix(ext), data, affine)
    if seg:
        labels = make_labels(shape, enhancing=4 if layout == "fets" else 3, offset=seed % 3)
        write_nifti(case_path(folder, case_id, layout, "seg").with_suffix("").with_suffix(ext), labels, affine)
    return folder


def write_partitions(path: Path, sites: dict[str, list[str]], crlf: bool = True) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(["Partition_ID", "Subject_ID"])
        for site, cases in sites.items():
            writer.writerows([site, c] for c in cases)
    return path


# --------------------------------------------------------------------------- in-process federations

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


NODES = 3


def tiny_run_config(tmp: Path, **extra) -> dict:
    """The run config of a tiny federation of ``NODES`` phantom sites (two rounds of two steps), in ``tmp``."""
    cfg = pyproject_run_config()
    cfg.update(
        {
            "model": "tiny",
            "num-server-rounds": 2,
            "local-steps": 2,
            "phantom-cases": 18,
            "phantom-shape": "48 48 32",
            "eval-subsets": "full,flair",
            "eval-every": 1,
            "min-nodes": NODES,
            "work-dir": str(tmp / "work"),
            "out-dir": str(tmp / "run"),
            "overrides": "train.amp=false",
        }
    )
    cfg.update(extra)
    return cfg


def nodes() -> list[dict]:
    """The node configs of the ``NODES`` simulated sites."""
    return [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)]


def deployed_site(tmp: Path, **node_config) -> tuple[dict, dict]:
    """The run config (``tiny``, two local steps) and node config of one deployed site ``h1`` whose data
    folder holds four phantom cases; ``node_config`` adds to the node config."""
    from mstkd.phantoms import write_federation

    data = write_federation(tmp / "site", cases=4, sites=1, shape=(48, 48, 32), seed=3, progress=False).parent
    run_config = pyproject_run_config() | {
        "model": "tiny",
        "local-steps": 2,
        "work-dir": str(tmp / "work"),
        "overrides": "train.amp=false",
    }
    return run_config, {"data-path": str(data), "site-name": "h1", "state-dir": str(tmp / "state"), **node_config}


def by_name(record: dict) -> dict[str, dict]:
    """A round record's per-node entries (keyed by node id) by the name each node gave, which must be unique."""
    sites = {values["name"]: values for values in record["sites"].values()}
    assert len(sites) == len(record["sites"]), record["sites"]
    return sites


def tiny_arrays(dtype: str = "float16") -> dict:
    """A fresh ``tiny`` student's and discriminator's federated arrays: what a server sends a node."""
    from mstkd.model import MSTKDNet, build_discriminator
    from mstkd.model.federated import federated_arrays
    from mstkd.runconfig import RunConfig, project_config

    cfg = project_config(RunConfig(model="tiny"))
    return federated_arrays(MSTKDNet(cfg.model), build_discriminator(cfg.model), dtype)


RUN_IDS = itertools.count(1001)
"""The run ids the in-process grids give their runs, one each."""


class InProcGrid(Grid):
    """A Grid whose nodes are ClientApp calls with one persistent Context per node.

    ``sent`` and ``replies`` keep every message in both directions; ``wire`` snapshots, at the moment
    of transfer, each message's array names and dtypes (the server may convert replies afterwards).
    """

    def __init__(self, client_app, run_config: dict, node_configs: list[dict], run_id: int | None = None) -> None:
        self.client_app = client_app
        # each run its own id, as Flower gives one: a node records what it sent per run id (client.sent), and
        # several runs of a test share the nodes' folders
        self.run_id = next(RUN_IDS) if run_id is None else run_id
        self.contexts = {
            i + 1: Context(run_id=self.run_id, node_id=i + 1, node_config=nc, state=RecordDict(), run_config=run_config)
            for i, nc in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.wire: list[dict] = []
        self.offline: set[int] = set()  # nodes get_node_ids does not list (disconnected)
        self._run = SimpleNamespace(run_id=self.run_id)  # what Flower's legacy workflow reads (grid.run.run_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Call the nodes one after another (deterministic); each call gets up to ``timeout`` seconds, and a node
        that has not answered by then sends nothing, as on a real grid."""
        out = []
        for message in messages:
            self.sent.append(message)
            self._snapshot("to-node", message)
            result: dict[str, Message] = {}

            # a node gets its own copy, as after (de)serialisation: messages may share content objects
            delivered = copy.deepcopy(message)

            def call(message=delivered, result=result) -> None:
                try:
                    result["reply"] = self.client_app(message, self.contexts[message.metadata.dst_node_id])
                except Exception as exc:  # a failing node becomes an error reply, as in a real deployment
                    result["reply"] = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)

            worker = threading.Thread(target=call, daemon=True)
            worker.start()
            worker.join(timeout)
            if "reply" not in result:
                continue
            reply = result["reply"]
            self.replies.append(reply)
            self._snapshot("to-server", reply)
            out.append(reply)
        return out

    def _snapshot(self, direction: str, message: Message) -> None:
        arrays = (
            {}
            if message.has_error()
            else {k: a.numpy().dtype for r in message.content.array_records.values() for k, a in r.items()}
        )
        self.wire.append(
            {
                "direction": direction,
                "type": message.metadata.message_type,
                "arrays": arrays,
                "error": message.has_error(),
            }
        )


def secagg_stage(stage: str, node: int = 5, **configs) -> Message:
    """A SecAgg+ stage's train message to ``node``, as the server's workflow writes one (no group)."""
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def run_inproc(server_app, client_app, run_config: dict, node_configs: list[dict]) -> InProcGrid:
    """Run a whole federation in this process; return the grid with its message record."""
    grid = InProcGrid(client_app, run_config, node_configs)
    server_app(grid, server_context(grid, run_config))
    return grid


def server_context(grid: InProcGrid, run_config: dict) -> Context:
    """The ServerApp's context for a run on ``grid``: the same run id as its nodes'."""
    return Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


FAULT_REASONS = {
    "nan": "2 non-finite values in",
    "shape": "has shape",
    "dtype": "has dtype int32, not a float",
    "missing": "1 federated arrays missing",
    "extra": "1 arrays that were not sent (first: 'teacher.x')",
    "examples-0": "num-examples 0 is not a whole number from 1 to 10000",
    "examples-negative": "num-examples -5 is not a whole number from 1 to 10000",
    "examples-nan": "metric num-examples is not finite",
    "examples-huge": "num-examples 1000000000000 is not a whole number from 1 to 10000",
    "truncated": "bytes of values where float16",
    "oversized": "bytes of values where float16",
    "huge-header": "has shape (10000000000000,)",
}
"""What the server says when it refuses a reply carrying each fault of :mod:`simulations.adversary`."""


def run_records(run: Path) -> list[dict]:
    """A run folder's ``metrics.jsonl``, one record per round."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def server_round(message) -> int:
    """The server round a train or evaluate message belongs to."""
    return int(message.content["config"]["server-round"])


def tiny_checkpoint(folder: Path) -> Path:
    """An untrained tiny student, saved as a trainer saves it: with the 1 mm target of the cases it predicts."""
    import torch

    from mstkd.checkpoint import save_checkpoint
    from mstkd.config import load_config
    from mstkd.model import build_networks

    cfg = load_config(["model=tiny", "train.amp=false", "data.target_spacing=[1,1,1]"])
    torch.manual_seed(0)
    return save_checkpoint(folder / "student.pt", build_networks(cfg.model)[1], cfg)


def supernode_key(folder: Path, name: str) -> tuple[str, bytes]:
    """A SuperNode key pair as `deploy/credentials.py node` writes it: the private key's path, the public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return str(path), key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
