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
from mstkd.data.geometry import TargetGeometry
from mstkd.data.labels import CLASSES, REGIONS
from mstkd.errors import InputError
from mstkd.modalities import MODALITIES
from mstkd.model import MSTKDNet

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

    Raises:
        InputError: missing or unreadable file, or not an mstkd checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
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
    cfg = OmegaConf.create(payload["config"])
    net = MSTKDNet(cfg.model)
    net.load_state_dict(payload["student"])
    net.to(device).eval()
    return net, cfg, payload


def checkpoint_geometry(payload: dict) -> TargetGeometry | None:
    """The target geometry a checkpoint stores; None for one made before checkpoints stored it.

    Raises:
        InputError: a stored geometry that is not valid.
    """
    stored = payload.get("geometry")
    if not stored:
        return None
    try:
        return TargetGeometry.from_dict(stored)
    except (KeyError, TypeError) as exc:
        raise InputError(f"checkpoint: its stored geometry does not read ({exc})") from None
