"""A site's local state between rounds: teacher, optimisers, subset generator and counters, on disk.

Written atomically, so a restarted node resumes where it stopped; it reads only tensors and plain data back
(``weights_only``) and never writes or restores non-finite weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstkd.atomic import atomic_path, file_lock, write_text
from mstkd.errors import InputError, NonFiniteState
from mstkd.numbers import is_whole
from mstkd.torchfile import archive_problem, check_tensors
from mstkd.train import Networks, Optimizers

log = logging.getLogger("mstkd.client")


def _all_finite(value: Any) -> bool:
    """Whether every floating tensor in a (nested) state dict is finite."""
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    return True


STATE_PRECISIONS = ("full", "half")


def _halve_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict with its floating tensors in float16 (10 mantissa bits: a weight keeps about
    3.3 significant digits, 8 times finer than bfloat16, so a late round's small update is not rounded away);
    the dict's ``_metadata`` is kept for ``load_state_dict``."""
    out = type(state)((k, v.half() if v.is_floating_point() else v) for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out


def _halve_moments(state: dict) -> dict:
    """An optimiser's state dict with its per-parameter tensors (Adam's moments) in bfloat16, whose range
    holds a squared-gradient average of 1e-12 that float16 would flush to 0; scalars such as the step
    counter stay as they are."""
    per_param = {
        p: {
            k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and v.ndim > 0 else v for k, v in st.items()
        }
        for p, st in state["state"].items()
    }
    return {**state, "state": per_param}


def _counters(info: object, path: Path) -> dict:
    """A state's counters as a node writes them: a mapping whose ``round`` is a whole number.

    Raises:
        InputError: anything else (a state file copied in from elsewhere, or damaged)."""
    if not isinstance(info, dict) or not is_whole(info.get("round", 0)):
        raise InputError(f"{path}: its counters are not what a node writes")
    return dict(info)


class SiteState:
    """A site's local state on disk: teacher, optimisers, subset generator and counters.

    ``local.pt`` holds the state after the newest round the site trained, ``local.prev.pt`` the one
    before. A node asked to train round ``r`` starts from the newest state of a round before ``r``,
    so a server that crashed in the middle of round ``r`` and resumes from round ``r - 1`` finds the
    state that round ``r`` started from. Each state file has a small sidecar (``.json``) with its
    counters and the size and time of the file it describes, so choosing a file never reads one
    (gigabytes at ``paper`` size); a sidecar that does not match its file is ignored.

    ``precision="half"`` halves the file: the teacher is stored in float16 and the optimisers' moments
    in bfloat16, and both are widened to float32 when the state is loaded. Training runs in float32
    either way; what ``half`` changes is that each round starts from the stored teacher and moments
    rounded to those types (the Adam step counters are never rounded).
    """

    def __init__(self, folder: str | Path, precision: str = "full") -> None:
        if precision not in STATE_PRECISIONS:
            raise InputError(f"node state precision must be one of {', '.join(STATE_PRECISIONS)}, got {precision!r}")
        self.path = Path(folder) / "local.pt"
        self.previous = Path(folder) / "local.prev.pt"
        self.half = precision == "half"

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_suffix(".json")

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        info = path.stat()
        return [info.st_size, info.st_mtime_ns]

    def info(self, path: Path) -> dict | None:
        """The counters saved in ``path`` (None when there is no such file): from its sidecar when that
        matches the file, else by reading the file."""
        if not path.is_file():
            return None
        try:
            side = json.loads(self._sidecar(path).read_text())
            if side["stamp"] == self._stamp(path):
                return _counters(side["info"], path)
        except (OSError, ValueError, KeyError, TypeError):  # no sidecar, or not one a node writes: read the file
            pass
        return _counters(self._read(path)["info"], path)

    @staticmethod
    def _read(path: Path) -> dict:
        """A state file's contents: tensors and plain data only (a file holding anything else is refused), read only
        once its zip archive is one that torch.save writes (no compressed record, no sizes beyond the file's), and
        checked tensor by tensor (:func:`mstkd.torchfile.check_tensors`).

        Raises:
            InputError: the file does not read as node state.
        """
        if problem := archive_problem(path):  # before torch.load reads a record at the size it claims
            raise InputError(f"{path}: not readable as node state ({problem})")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt or foreign file
            raise InputError(f"{path}: not readable as node state ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or not {"teacher", "optimizer", "disc_optimizer", "rng", "info"} <= set(
            payload
        ):
            raise InputError(f"{path}: not node state of this project")
        # every tensor dense, holding its values, real and finite, walked without recursion: a list that holds itself
        # or one number expanded to 10^13 ended the node's round with an error its fallback did not catch
        check_tensors(payload, f"{path}: its state")
        return payload

    def exists(self) -> bool:
        return self.path.is_file() or self.previous.is_file()

    def save(self, nets: Networks, optimizers: Optimizers, rng: np.random.Generator, info: dict) -> None:
        """Write the state after round ``info["round"]``; the state it replaces becomes the previous one."""
        # the site's own folder private: a teacher trained on the site's cases is as private as they are
        self.path.parent.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        payload = {
            "teacher": nets.teacher.state_dict(),
            "optimizer": optimizers.main.state_dict(),
            "disc_optimizer": optimizers.discriminator.state_dict(),
            "rng": rng.bit_generator.state,
            "info": info,
        }
        if self.half:
            payload["teacher"] = _halve_weights(payload["teacher"])
            payload["optimizer"] = _halve_moments(payload["optimizer"])
            payload["disc_optimizer"] = _halve_moments(payload["disc_optimizer"])
        if not _all_finite(payload):  # after halving: a weight beyond float16's range would be inf
            raise NonFiniteState("the site's teacher or optimiser state is not finite: not saved")
        with file_lock(self.path.with_name(".local.lock")):
            newest = self.info(self.path)
            if newest is not None:
                if int(newest.get("round", 0)) >= int(info.get("round", 0)) > 0:
                    return  # a late reply to an older round: the newer state stays
                os.replace(self.path, self.previous)  # a rename keeps the file's size and time
                if self._sidecar(self.path).is_file():
                    os.replace(self._sidecar(self.path), self._sidecar(self.previous))
            with atomic_path(self.path) as tmp:
                torch.save(payload, tmp)
            side = {"stamp": self._stamp(self.path), "info": info}
            write_text(self._sidecar(self.path), json.dumps(side, default=float))

    def load(
        self, nets: Networks, optimizers: Optimizers, rng: np.random.Generator, *, before_round: int | None = None
    ) -> dict | None:
        """Restore the newest state saved before round ``before_round`` (any, when None) into the teacher of
        ``nets``, ``optimizers`` and ``rng``; return its counters, or None when there is none."""
        refused = []
        for path in (self.path, self.previous):
            try:
                info = self.info(path)
                if info is None or (before_round is not None and int(info.get("round", 0)) >= before_round):
                    continue
                payload = self._read(path)
                counters = _counters(payload["info"], path)  # the file's own, whatever its sidecar says
            except InputError as exc:  # the older state, if any, is still good (_read refuses a non-finite one)
                log.warning("%s; trying the state before it", exc)
                refused.append(exc)
                continue
            try:  # shapes and states that do not fit this run's networks: the older state, if any
                nets.teacher.load_state_dict(payload["teacher"])
                optimizers.main.load_state_dict(payload["optimizer"])
                optimizers.discriminator.load_state_dict(payload["disc_optimizer"])
                rng.bit_generator.state = payload["rng"]
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                refused.append(InputError(f"{path}: does not fit this run's networks ({type(exc).__name__})"))
                log.warning("%s; trying the state before it", refused[-1])
                continue
            return counters
        if refused:  # state there, none of it usable: starting afresh would half-use this run's rounds
            folder = self.path.parent
            raise InputError(f"no usable node state in {folder} ({refused[-1]}); remove that folder to start over")
        return None
