"""The node's context: what the work (:mod:`client.site`) needs to know of the node it runs on, and the jobs
it does, in a form that crosses a process boundary.

Both the work and its transport to the node's warm worker (:mod:`client.worker`) import this module; neither
imports the other. It imports neither PyTorch nor MONAI, so the ClientApp's per-message process stays light.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from mstkd.runconfig import NodeConfig, RunConfig, default_home

EXPIRY = "the message's expiry"
CAP = "this site's max-work-seconds"
"""The two limits of a node's work for a message (:func:`work_deadline`), as its refusal names them."""
SECAGG_SEED = "secagg-seed"
"""A fit config's key that the node sets itself before it trains under SecAgg+ (:func:`client.secagg.secagg_train`): a
number drawn from the OS that joins the round's training seed (:func:`client.site.local_round`: crops, shuffling,
dropout; not the modality subsets, whose generator lives in the site's state), so that no two of its trainings, in one
run or in two, send the same update, which sums over groups that differ in one node would give away."""


class Job(StrEnum):
    """The work a node does for a message: each is the function of :mod:`client.site` of that name."""

    LOCAL_ROUND = "local_round"
    EVALUATE_SITE = "evaluate_site"
    SITE_GEOMETRY = "site_geometry"
    ARRAY_NAMES = "array_names"

    @classmethod
    def named(cls, name: str) -> Job:
        """The job called ``name``.

        Raises:
            ValueError: no job has that name.
        """
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown job {name!r}") from None


@dataclass
class NodeContext:
    """What the work needs of Flower's ``Context``, in a form that crosses a process boundary.

    ``startup``: age in seconds of the process that received the message, when it arrived (0 after its
    first message, and under Ray); ``sent_at``: ``time.time()`` when that process handed the work on.
    """

    run_id: int
    node_id: int
    node: NodeConfig
    run: RunConfig
    startup: float = 0.0
    sent_at: float = field(default_factory=time.time)
    deadline: float | None = None  # time.time() by which the work must end (:func:`work_deadline`)
    deadline_of: str = EXPIRY  # which limit that is


def node_base(node: NodeConfig, run: RunConfig) -> Path:
    """The folder a node keeps its own files in (its sites' state, what it sent): the node config's ``state-dir``,
    else (in a simulation only) the run config's ``work-dir``, else ``$MSTKD_HOME``. A deployed node never lets a run
    submitter choose where it writes."""
    base = node.state_dir or (run.work_dir if node.simulated else None)
    return Path(base or default_home()).expanduser().resolve()


def file_name(name: str) -> str:
    """A node's own name (its site's) made a plain file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-") or "site"


def node_label(node: NodeConfig) -> str:
    """Which of the sites that may share a base folder this node is, from its node config alone (nothing the server
    sends): a simulated site's partition, a deployed site's name (else its data folder's)."""
    if node.simulated:
        return f"partition-{int(node.partition_id)}"
    return "site-" + file_name(node.site_name or Path(node.data_path).name)


def message_kind(msg: Any) -> str:
    """A message's kind as Flower routes it: ``train.default`` (or ``train.<name>``) reaches the ``train`` function
    and its mods as ``train`` does, so a check that must see every message of a kind compares this."""
    return str(msg.metadata.message_type).partition(".")[0]


def work_deadline(metadata: Any, cap: float = 0.0, now: float | None = None) -> tuple[float | None, str]:
    """When this node's work for a message must end, in ``time.time()`` seconds (None for no limit), and which limit
    that is (:data:`EXPIRY` or :data:`CAP`).

    When the message expires, ``created_at + ttl``, read on this node's clock as Flower reckons its reply's lifetime
    (a reply made later has no lifetime left, and the SuperLink refuses it), and at most ``cap`` seconds from
    ``now`` (node config ``max-work-seconds``; 0: no cap). A message whose times do not read as finite numbers
    leaves only the cap.
    """
    now = time.time() if now is None else now
    deadline, which = (now + cap, CAP) if cap > 0 else (math.inf, EXPIRY)
    try:
        expires = float(metadata.created_at) + float(metadata.ttl)
    except (TypeError, ValueError, OverflowError):
        expires = math.nan
    if math.isfinite(expires) and expires < deadline:
        deadline, which = expires, EXPIRY
    return (deadline, which) if math.isfinite(deadline) else (None, which)


def configure_logging(node: NodeConfig) -> None:
    """Site logs on stderr: INFO in deployment (a node started with a ``data-path``), WARNING in
    simulation, where many sites share one terminal; the node config ``log-level`` overrides both."""
    root = logging.getLogger("mstkd")
    root.setLevel(node.level.upper())
    if not any(getattr(h, "mstkd_site", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.mstkd_site = True  # one handler however many messages this process serves
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def ray_node() -> str | None:
    """The Ray node this process runs on in a simulation (a Ray cluster spreads sites over many); None outside
    Ray. A deployed site reports nothing about its machine: its site name is all the server needs."""
    ray = sys.modules.get("ray")  # imported by the simulation engine's workers, never by this project
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
