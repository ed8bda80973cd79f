"""One-file checkpoints: the student's weights, the config it was trained with, its head, the label convention
and the target geometry (the voxel size and orientation it was trained at; see :mod:`mstkd.data.geometry`).

``mstkd predict`` and ``mstkd evaluate`` need nothing else. Writes are atomic (temporary
file, then rename), so a crash never leaves a truncated checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mstkd.atomic import atomic_path
from mstkd.config import load_config
from mstkd.data.geometry import TargetGeometry
from mstkd.data.labels import CLASSES, CONVENTIONS, REGIONS
from mstkd.errors import InputError, first_line
from mstkd.modalities import MODALITIES
from mstkd.model import MSTKDNet
from mstkd.torchfile import archive_problem, check_weights

FORMAT = "mstkd-checkpoint/2"
"""Version 2: the network's head predicts the four exclusive classes (NETC, ED, ET, BG)."""
OLD_REGION_HEAD = "mstkd-checkpoint/1"
"""Version 1 had one sigmoid per region (ET, TC, WT); such a checkpoint cannot be loaded."""


def save_checkpoint(
    path: str | Path,
    student: MSTKDNet | dict,
    cfg: DictConfig,
    *,
    convention: str = "fets",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the student (a module or its state dict), ``cfg`` and ``convention`` to ``path``.

    The target geometry is ``cfg.data.target_spacing`` and ``cfg.data.orientation``: a trainer sets the spacing
    it planned there before it saves (a checkpoint saved with none has no geometry, like an old one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = student.state_dict() if isinstance(student, torch.nn.Module) else student
    payload = {
        "format": FORMAT,
        "student": {k: v.detach().cpu() for k, v in state.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "convention": convention,
        "modalities": list(MODALITIES),
        "regions": list(REGIONS),
        "head": list(CLASSES),
        "geometry": geometry.to_dict() if (geometry := TargetGeometry.from_config(cfg.data)) else None,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[MSTKDNet, DictConfig, dict]:
    """The student network (in eval mode), its config, and the raw payload.

    The file is checked before ``torch.load`` reads it (:func:`mstkd.torchfile.archive_problem`: no compressed
    record, no record sizes beyond the file's), and its weights before a network is built for them
    (:func:`mstkd.torchfile.check_weights`: the names and shapes its config implies, dense, real and finite).

    Raises:
        InputError: missing or unreadable file, or not an mstkd checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    if problem := archive_problem(path):  # before torch.load reads a record at the size it claims
        raise InputError(f"{path}: not a readable checkpoint ({problem})")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if isinstance(payload, dict) and payload.get("format") == OLD_REGION_HEAD:
        raise InputError(
            f"{path}: made by an older version whose head predicted the regions (ET, TC, WT); this version "
            f"predicts the classes ({', '.join(CLASSES)}): train the model again"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("head") != list(CLASSES):
        raise InputError(f"{path}: not an mstkd checkpoint")
    if not isinstance(convention := payload.get("convention"), str) or convention not in CONVENTIONS:
        raise InputError(f"{path}: its label convention is none of {', '.join(CONVENTIONS)}")
    cfg = stored_config(payload.get("config"), path)
    student = payload.get("student")
    with torch.device("meta"):  # the shapes the config implies, before any memory is spent on them
        expected = MSTKDNet(cfg.model).state_dict()
    check_weights(student, expected, f"{path}: its student")  # names, shapes, dense, real and finite
    net = MSTKDNet(cfg.model)
    net.load_state_dict(student)
    net.to(device).eval()
    return net, cfg, payload


def stored_config(raw: object, path: str | Path = "checkpoint") -> DictConfig:
    """A checkpoint's config, checked as a config from the command line is.

    A checkpoint may come from anywhere, so its config is not taken as it is: it stores resolved values only (an
    interpolation such as ``${oc.env:...}`` would be evaluated on the reader's machine), every key must be one this
    version knows, and every value passes :func:`mstkd.schema.check_config`. Keys it lacks (a checkpoint of an
    older version) take this version's defaults for its model preset.

    Raises:
        InputError: a config that is not a mapping, holds an interpolation, or has an unknown key or a bad value.
    """
    if not isinstance(raw, dict):
        raise InputError(f"{path}: its config is not a mapping")
    if where := _interpolation(raw):
        raise InputError(
            f"{path}: its config holds something other than a plain value at {where} (an interpolation "
            "or a tuple); a checkpoint stores plain values"
        )
    model = raw.get("model")
    preset = model.get("preset") if isinstance(model, dict) else None
    if not isinstance(preset, str):
        raise InputError(f"{path}: its config names no model preset")
    try:  # typed, keyed and checked as a command line's config is
        cfg = load_config([f"model={preset}"], values=raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of a shape the checks do not expect
        raise InputError(f"{path}: its config does not read ({type(exc).__name__})") from None
    OmegaConf.set_readonly(cfg, False)  # as before: a caller may adjust it (mstkd evaluate --lesion)
    return cfg


PLAIN = (str, int, float, bool, type(None))


def _interpolation(node: object, where: str = "") -> str:
    """The dotted key of the first value in ``node`` that is not plain data (a mapping, a list, a string without
    ``${``, a number, a bool or None), or ``""``: OmegaConf would resolve ``${...}``, also inside a tuple."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    elif isinstance(node, PLAIN):
        return where if isinstance(node, str) and "${" in node else ""
    else:
        return where or "its top level"
    for key, value in items:
        if found := _interpolation(value, f"{where}.{key}" if where else str(key)):
            return found
    return ""


def checkpoint_geometry(payload: dict) -> TargetGeometry | None:
    """The target geometry a checkpoint stores; None for one made before checkpoints stored it.

    Raises:
        InputError: a stored geometry that is not valid.
    """
    stored = payload.get("geometry")
    if stored is None or stored == {}:
        return None
    if not isinstance(stored, dict):  # a tensor here would make every truth test raise
        raise InputError(f"checkpoint: its stored geometry is not a mapping ({type(stored).__name__})")
    try:
        return TargetGeometry.from_dict(stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"checkpoint: its stored geometry does not read ({first_line(exc)})") from None
