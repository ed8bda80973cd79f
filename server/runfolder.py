"""The run folder: where a run writes, claimed once, and what a resumed run keeps of it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mstkd.data.geometry import TargetGeometry
from mstkd.errors import InputError
from mstkd.runconfig import RunConfig
from mstkd.tracking import MLFLOW_ARTIFACTS, MLFLOW_DB
from server.ledger import PrivacyLedger
from server.state import ServerCheckpoint

RUN_FILES = (
    "metrics.jsonl",
    "REPORT.md",
    "last.pt",
    "best.pt",
    ServerCheckpoint.FILE,
    ServerCheckpoint.OLD_FILE,
    PrivacyLedger.FILE,
)
"""A folder with any of these holds a run; ``overwrite=true`` removes them, with ``eval/``, ``tensorboard/`` and the
local MLflow store."""


def run_folder(run: RunConfig, run_id: int) -> Path:
    """``out-dir``, else ``<work-dir>/runs/run-<run id>``; the folder of the run being resumed, with ``resume-from``."""
    if run.resume_from:
        return Path(run.resume_from).expanduser().resolve()
    return (Path(run.out_dir).expanduser() if run.out_dir else run.home / "runs" / f"run-{run_id}").resolve()


def claim_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier run (one line); with ``overwrite``, clear that run's files first."""
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not overwrite:
        raise InputError(
            f"out-dir {out} already holds a run ({earlier[0]}); choose another out-dir, continue it with "
            f"resume-from='{out}', or replace it with overwrite=true"
        )
    for name in earlier:
        (out / name).unlink()
    for folder in ("eval", "tensorboard", MLFLOW_ARTIFACTS) if earlier else ():
        shutil.rmtree(out / folder, ignore_errors=True)
    if earlier:
        (out / MLFLOW_DB).unlink(missing_ok=True)  # the replaced run's local MLflow store


def original_target(out: Path, data_cfg: Any = None) -> TargetGeometry | None:
    """The target geometry a run being resumed agreed on (its ``config.yaml``), which a resumed run keeps; None
    for a run of an older version, which planned none (the resumed run plans it now). ``data_cfg``: the resumed run
    config's ``data`` section, whose ``target_spacing``, where it sets one, must be that geometry (the nodes take no
    other: ``mstkd.data.sites.with_target``).

    Raises:
        InputError: the file is missing or does not read, or the run config sets another geometry.
    """
    try:
        kept = TargetGeometry.from_config(OmegaConf.load(out / "config.yaml").data)
    except Exception as exc:  # a missing or damaged file: OSError, a YAML error, a missing key, a bad value
        raise InputError(f"resume-from: {out}/config.yaml does not read ({type(exc).__name__})") from None
    given = TargetGeometry.from_config(data_cfg) if data_cfg is not None else None
    if kept is not None and given is not None and given != kept:
        raise InputError(
            f"resume-from: the run trained at {kept.describe()}, and the run config sets {given.describe()} "
            "(data.target_spacing): set the run's, or leave it out"
        )
    return kept
