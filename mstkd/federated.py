"""What a federated engine needs from the method, without importing one.

- :func:`config_from_run` turns a flat run config (Flower's ``[tool.flwr.app.config]``) into the
  project's OmegaConf config.
- :func:`federated_arrays` / :func:`load_federated_arrays` pack and unpack the weights that travel:
  the student (``student.*``) and the style discriminator (``disc.*``), float tensors only. The
  teacher and every optimiser state stay on the site.
- :func:`site_data` finds a node's own cases: a phantom federation or a partitioned dataset in
  simulation (``partition-id``), or the node's own folder in deployment (``data-path``).
- :class:`SiteState` keeps a site's teacher, optimisers, subset generator and counters on disk
  between rounds (atomic writes), so a restarted node resumes where it stopped; it reads only
  tensors and plain data back (``weights_only``) and never writes or restores non-finite weights.
- :func:`check_state_key` keeps the folder a message names inside the node's own state folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mstkd.atomic import atomic_path, write_text
from mstkd.config import load_config
from mstkd.data.dataset import (
    Federation,
    case_spacings,
    prepare_federation,
    resolve_partitions,
    site_split,
    split_of,
)
from mstkd.data.geometry import DEFAULT_ORIENTATION, TargetGeometry, plan_spacing
from mstkd.data.layouts import detect_case, find_case_folders
from mstkd.data.partitions import Partitions
from mstkd.errors import InputError, NonFiniteState, RefusedMessage
from mstkd.modalities import FULL, MODALITIES, Subset, subsets_within
from mstkd.runconfig import check_run_config
from mstkd.train import Networks, Optimizers

log = logging.getLogger("mstkd.federated")

STUDENT, DISC = "student.", "disc."
TRANSPORT_DTYPES = {"float16": np.float16, "float32": np.float32}
STATE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A state key or site name is one plain folder name: no separators, no ``..``, nothing absolute."""


def check_state_key(key: str, what: str = "state key") -> str:
    """``key`` if it is one plain folder name (:data:`STATE_KEY`), so that joining it to a base folder stays there.

    Raises:
        RefusedMessage: a path separator, ``..``, a leading dot or dash, another character, or more than 128 of them.
    """
    if not STATE_KEY.fullmatch(key) or ".." in key:
        shown = key if len(key) <= 60 and key.isprintable() else f"{key[:60]!r}..."
        raise RefusedMessage(f"{what} {shown!r} is not a plain folder name (letters, digits, . _ -; no '..')")
    return key


def _all_finite(value: Any) -> bool:
    """Whether every floating tensor in a (nested) state dict is finite."""
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    return True


def default_home() -> Path:
    """Where phantoms, caches, node state and runs go unless a path is given: ``$MSTKD_HOME`` or ``~/.mstkd``."""
    return Path(os.environ.get("MSTKD_HOME", Path.home() / ".mstkd")).expanduser().resolve()


def config_from_run(run: Mapping[str, Any]) -> DictConfig:
    """The project config for a flat run config.

    Keys read: ``model`` (preset), ``lr``, ``local-epochs``, ``num-server-rounds``, ``seed`` and
    ``overrides`` (a string of dot-list overrides, e.g. ``"loss.gsm=false train.amp=false"``); every key
    is checked first (:func:`mstkd.runconfig.check_run_config`).
    The lr schedule spans the whole federation: ``train.epochs = rounds x local-epochs``.
    """
    run = check_run_config(run)
    rounds = int(run.get("num-server-rounds", 1))
    local = float(run.get("local-epochs", 1))
    try:
        extra = shlex.split(str(run.get("overrides", "")))
    except ValueError as exc:  # an unclosed quote
        raise InputError(f"run config overrides: {exc}") from None
    overrides = [
        f"model={run.get('model', 'lite')}",
        f"train.epochs={max(rounds * local, 1.0)}",
        *([f"train.lr={float(run['lr'])}"] if "lr" in run else []),
        *([f"train.seed={int(run['seed'])}"] if "seed" in run else []),
        *extra,
    ]
    # what OmegaConf will read, quotes and escapes removed: ${oc.env:...} would read the environment of whoever
    # loads it (a node's secrets), however it was spelt in the run config
    if any("${" in item for item in overrides):
        raise InputError("run config overrides: ${...} interpolation is not allowed in a run config")
    return load_config(overrides)


def federated_arrays(student: nn.Module, discriminator: nn.Module, dtype: str = "float32") -> dict[str, np.ndarray]:
    """``student.*`` and ``disc.*`` float tensors as numpy arrays in ``dtype`` (ordered by name)."""
    if dtype not in TRANSPORT_DTYPES:
        raise InputError(f"transport must be one of {', '.join(TRANSPORT_DTYPES)}, got {dtype!r}")
    out = {}
    for prefix, module in ((STUDENT, student), (DISC, discriminator)):
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                out[prefix + key] = value.detach().cpu().numpy().astype(TRANSPORT_DTYPES[dtype])
    return dict(sorted(out.items()))


def load_federated_arrays(student: nn.Module, discriminator: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``student.*`` and ``disc.*`` arrays (any float dtype) into the two modules; refuse anything else."""
    parts: dict[str, dict[str, torch.Tensor]] = {STUDENT: {}, DISC: {}}
    for key, value in arrays.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected array {key!r}: only student.* and disc.* are federated")
        value = np.asarray(value, dtype=np.float32)
        parts[prefix][key[len(prefix) :]] = torch.from_numpy(value if value.flags.writeable else value.copy())
    for prefix, module in ((STUDENT, student), (DISC, discriminator)):
        state = module.state_dict()
        missing = [k for k, v in state.items() if v.is_floating_point() and k not in parts[prefix]]
        if missing:
            raise ValueError(f"federated arrays lack {prefix}{missing[0]}")
        for key, value in parts[prefix].items():
            state[key].copy_(value.to(state[key].dtype))


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_phantoms(
    root: Path,
    *,
    cases: int,
    sites: int,
    shape: tuple[int, int, int],
    seed: int,
    layout: str = "fets",
    site_sizes: list[float] | None = None,
    progress: bool = False,
) -> Path:
    """The phantom federation for these parameters under ``root``, generated once (safe across processes)."""
    from mstkd.phantoms import write_federation

    params: list = [cases, sites, list(shape), seed, layout]
    if site_sizes is not None:  # equal sites keep the key they always had
        params.append([float(s) for s in site_sizes])
    key = hashlib.sha1(json.dumps(params).encode()).hexdigest()[:10]
    folder = root / f"phantoms-{sites}sites-{cases}cases-{key}"
    with _file_lock(root / f".{folder.name}.lock"):
        if not (folder / "partitioning.csv").is_file():
            write_federation(
                folder,
                cases=cases,
                sites=sites,
                shape=shape,
                seed=seed,
                layout=layout,
                site_sizes=site_sizes,
                progress=progress,
            )
    return folder


def data_source(run: Mapping[str, Any], num_sites: int) -> tuple[Path, Path | None]:
    """``(data folder, partition CSV)`` for a simulation: the run's ``data-path`` or a phantom federation."""
    data_path = str(run.get("data-path", "") or "")
    if data_path:
        csv = str(run.get("partitioning", "") or "") or None
        return Path(data_path).expanduser(), Path(csv).expanduser() if csv else None
    home = Path(str(run.get("work-dir", "") or default_home())).expanduser()
    shape = tuple(int(v) for v in str(run.get("phantom-shape", "96 96 64")).split())
    folder = ensure_phantoms(
        home / "phantoms",
        cases=int(run.get("phantom-cases", 24)),
        sites=num_sites,
        shape=shape,
        seed=int(run.get("phantom-seed", 0)),
    )  # type: ignore[arg-type]
    return folder, folder / "partitioning.csv"


@dataclass
class SiteData:
    """A node's view of the data: its site key and name, the modalities it has, and its cases."""

    federation: Federation
    site: str
    name: str
    available: Subset

    @property
    def train(self):
        return self.federation.site_cases(self.site, "train")

    @property
    def val(self):
        return self.federation.site_cases(self.site, "val")

    @property
    def subsets(self) -> tuple[Subset, ...]:
        """The modality subsets this site's student can be trained on."""
        return subsets_within(self.available)


def parse_dropped(spec: str) -> dict[str, Subset]:
    """``"2:t1ce; 3:t1ce,t2"`` -> site id -> the modalities that site keeps (the simulated missing modalities)."""
    kept = {}
    for item in filter(None, (part.strip() for part in spec.replace(";", " ").split())):
        site, sep, names = item.partition(":")
        if not sep:
            raise InputError(f"drop-modalities: {item!r} is not of the form SITE:MODALITY[,MODALITY]")
        dropped = Subset.parse(names)
        keep = [m for m in MODALITIES if m not in dropped.modalities]
        if not keep:
            raise InputError(f"drop-modalities: site {site} would keep no modality")
        kept[site.strip()] = Subset.of(keep)
    return kept


def _modalities_on_disk(folder: Path) -> Subset:
    """The modalities the site has: those on disk in at least half of its cases. A case that lacks one of
    them is a broken case (left out with a warning); a modality most cases lack is one the site lacks."""
    counts = dict.fromkeys(MODALITIES, 0)
    cases = find_case_folders(folder).values()
    for case in cases:
        try:
            available = detect_case(case).available
        except InputError:
            continue  # unreadable layout: the case is reported when it is loaded
        for m in available:
            counts[m] += 1
    kept = [m for m in MODALITIES if counts[m] and 2 * counts[m] >= len(cases)]
    if not kept:
        raise InputError(f"{folder}: no modality is present in at least half of the cases")
    return Subset.of(kept)


def _with_modalities(cfg: DictConfig, available: Subset) -> DictConfig:
    return OmegaConf.merge(cfg, {"data": {"modalities": list(available.modalities)}})


def _simulated_site(
    run: Mapping[str, Any], node: Mapping[str, Any]
) -> tuple[Path, Path | None, str, dict[str, Path], Partitions]:
    """A simulated node's dataset folder, partition CSV and site name, with the dataset's case folders and
    partitions (as :func:`~mstkd.data.dataset.resolve_partitions` read them)."""
    if "partition-id" not in node:
        raise InputError("node config needs data-path (deployment) or partition-id (simulation)")
    index, count = int(node["partition-id"]), int(node["num-partitions"])
    folder, csv = data_source(run, count)
    folders, partitions = resolve_partitions(folder, csv)
    sites = list(partitions.sites)
    if len(sites) != count:
        raise InputError(
            f"{csv or folder}: {len(sites)} sites but {count} simulated nodes; "
            f'use --federation-config "num-supernodes={len(sites)}"'
        )
    return folder, csv, sites[index], folders, partitions


def site_spacing(run: Mapping[str, Any], node: Mapping[str, Any], orientation: str) -> tuple[list[float], int]:
    """This node's median voxel size in ``orientation`` and how many cases it is the median of, from the image
    headers alone: what a site tells the federation when it plans its target geometry (no voxel is read).

    Raises:
        InputError: no readable case.
    """
    if node.get("data-path"):  # a deployed site's cases are all train or val (its test cases live with the server)
        folders = list(find_case_folders(Path(str(node["data-path"])).expanduser()).values())
    else:
        _, _, site, all_folders, partitions = _simulated_site(run, node)
        split = split_of(partitions, config_from_run(run).data)
        folders = [all_folders[c] for c in site_split(split, site)]
    spacings = case_spacings(folders, orientation)
    return list(plan_spacing(spacings)), len(spacings)


def with_target(cfg: DictConfig, config: Mapping[str, Any]) -> DictConfig:
    """``cfg`` with the target geometry a message's ``config`` names (``target-spacing``: three numbers in one
    string, ``orientation``), which the federation agreed on before its first round.

    Raises:
        RefusedMessage: a target that is not three voxel sizes in range, or not an orientation.
    """
    if "target-spacing" not in config:
        if cfg.data.target_spacing is None:
            log.warning("the message names no target geometry (a server of an older version?): this site plans its own")
        return cfg
    try:
        target = TargetGeometry(
            tuple(str(config["target-spacing"]).split()),  # type: ignore[arg-type]
            str(config.get("orientation", DEFAULT_ORIENTATION)),
        )
    except InputError as exc:
        raise RefusedMessage(f"the message's target geometry is not valid ({exc})") from None
    return OmegaConf.merge(cfg, {"data": target.to_config()})


def site_data(run: Mapping[str, Any], node: Mapping[str, Any], cfg: DictConfig) -> SiteData:
    """The cases of this node, and the modalities it has.

    Deployment: ``node["data-path"]`` is the site's own folder; all its cases are the site's
    (split into train/val; the global test set lives with the server). The site's modalities
    are ``node["modalities"]`` (e.g. ``"flair,t1,t2"``) or, when not given, those present in
    every case. Simulation: ``node["partition-id"]`` picks the i-th site (in partition order)
    of the run's dataset, which must have exactly ``node["num-partitions"]`` sites; the run
    config ``drop-modalities`` (``"2:t1ce"``) makes chosen sites lack modalities.

    Rule for a site that lacks modalities: its cases are read without them (zero channels, even
    where a file exists), its student draws only subsets of what the site has, and its teacher
    sees everything the site has; distillation runs on every case, between that teacher and
    that student.
    """
    if node.get("data-path"):
        folder = Path(str(node["data-path"])).expanduser()
        declared = str(node.get("modalities", "") or "")
        available = Subset.parse(declared) if declared else _modalities_on_disk(folder)
        site_cfg = _with_modalities(cfg, available)
        no_test = OmegaConf.merge(site_cfg.data, {"split": {"test_fraction": 0.0}})
        fed = prepare_federation(
            folder, no_test, cache_dir=node.get("cache-dir") or None, test=False, progress=False, skip_bad=True
        )
        if len(fed.sites) != 1:
            raise InputError(
                f"{folder}: a node's data folder holds one site, but its partition CSV names {len(fed.sites)}"
            )
        return SiteData(fed, fed.sites[0], str(node.get("site-name") or folder.name), available)
    folder, csv, site, _, _ = _simulated_site(run, node)
    available = parse_dropped(str(run.get("drop-modalities", "") or "")).get(site, FULL)
    site_cfg = _with_modalities(cfg, available)
    fed = prepare_federation(
        folder, site_cfg.data, partitioning=csv, sites=[site], test=False, progress=False, skip_bad=True
    )
    return SiteData(fed, site, f"site-{site}", available)


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
                return dict(side["info"])
        except (OSError, ValueError, KeyError):
            pass
        return dict(self._read(path)["info"])

    @staticmethod
    def _read(path: Path) -> dict:
        """A state file's contents: tensors and plain data only (a file holding anything else is refused).

        Raises:
            InputError: the file does not read as node state.
        """
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt or foreign file
            raise InputError(f"{path}: not readable as node state ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or not {"teacher", "optimizer", "disc_optimizer", "rng", "info"} <= set(
            payload
        ):
            raise InputError(f"{path}: not node state of this project")
        return payload

    def exists(self) -> bool:
        return self.path.is_file() or self.previous.is_file()

    def save(self, nets: Networks, optimizers: Optimizers, rng: np.random.Generator, info: dict) -> None:
        """Write the state after round ``info["round"]``; the state it replaces becomes the previous one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        with _file_lock(self.path.with_name(".local.lock")):
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
                if not _all_finite(payload):
                    raise NonFiniteState(f"{path}: the stored teacher or optimiser state is not finite")
            except (InputError, NonFiniteState) as exc:  # the older state, if any, is still good
                log.warning("%s; trying the state before it", exc)
                refused.append(exc)
                continue
            nets.teacher.load_state_dict(payload["teacher"])
            optimizers.main.load_state_dict(payload["optimizer"])
            optimizers.discriminator.load_state_dict(payload["disc_optimizer"])
            rng.bit_generator.state = payload["rng"]
            return dict(payload["info"])
        if refused:  # state there, none of it usable: starting afresh would half-use this run's rounds
            folder = self.path.parent
            raise InputError(f"no usable node state in {folder} ({refused[-1]}); remove that folder to start over")
        return None
