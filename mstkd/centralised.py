"""Centralised MST-KDNet training: every site's training cases pooled on one machine (the non-federated reference).

Writes into the run folder: ``config.yaml`` (resolved), ``log.jsonl`` (one line per epoch:
loss terms, the share of crop voxels the student put in each class, lr, seconds, validation
scores and any collapse flagged on them, when run), ``last.pt`` and ``best.pt`` (one-file
checkpoints of the student; best by mean validation Dice over ``train.eval_subsets``),
``val_epoch<N>.md`` tables, and ``state.pt``: everything needed to continue after the last
finished epoch (teacher, student, discriminator, both optimisers, the best score so far and
every random state: Python, NumPy, torch, the subset draws and the crop/augmentation
transforms), so that :func:`resume_centralised` ends with the weights an uninterrupted run
would have had.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable
from omegaconf import DictConfig, OmegaConf

from mstkd.atomic import atomic_path, check_writable, copy_file, write_text
from mstkd.checkpoint import save_checkpoint, stored_config
from mstkd.config import save_config
from mstkd.data.dataset import Federation, make_loader, prepare_federation
from mstkd.errors import InputError
from mstkd.evaluate import describe_collapse, evaluate_cases, last_tables, parse_subsets
from mstkd.modalities import SUBSETS
from mstkd.model import build_networks
from mstkd.numbers import is_finite, is_whole
from mstkd.torchfile import archive_problem, check_optimizer, check_tensors, check_weights
from mstkd.tracking import Tracker
from mstkd.train import Networks, make_optimizers, pick_device, seed_everything, train_local


def _convention(federation: Federation) -> str:
    names = {e.meta["convention"] for e in federation.entries.values()}
    return names.pop() if len(names) == 1 else "fets"


STATE = "state.pt"
STATE_FORMAT = "mstkd-train-state/1"


def _transforms(loader) -> list[Randomizable]:
    """Every random transform of a training loader, depth first: the dictionary transforms and the array
    transforms inside them (``RandScaleIntensityd.scaler``, ...), each with its own generator."""
    found: list[Randomizable] = []

    def visit(obj, depth: int = 0) -> None:
        if depth > 6 or not hasattr(obj, "__dict__"):
            return
        if isinstance(obj, Randomizable) and all(obj is not f for f in found):
            found.append(obj)
        for value in vars(obj).values():
            for item in value if isinstance(value, list | tuple) else (value,):
                if isinstance(item, Randomizable) or hasattr(item, "transforms") or hasattr(item, "transform"):
                    visit(item, depth + 1)

    visit(loader.dataset)
    return found


def _numpy_state(state: tuple) -> tuple:
    return (state[0], torch.from_numpy(np.asarray(state[1], dtype=np.int64)), *state[2:])


def _numpy_state_back(state: tuple) -> tuple:
    return (state[0], state[1].numpy().astype(np.uint32), *state[2:])


def random_states(loader, rng: np.random.Generator) -> dict:
    """Every random state training draws from, in a form ``torch.load(weights_only=True)`` reads back."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),  # noqa: NPY002 - the global state MONAI and torch seed
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "subsets": rng.bit_generator.state,
        "transforms": [_numpy_state(t.R.get_state()) for t in _transforms(loader)],
    }


def set_random_states(states: dict, loader, rng: np.random.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(_numpy_state_back(states["numpy"]))  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["subsets"]
    for t, state in zip(_transforms(loader), states["transforms"], strict=True):
        t.R.set_state(_numpy_state_back(state))


def train_centralised(
    data_dir: str | Path,
    cfg: DictConfig,
    out_dir: str | Path,
    *,
    partitioning: str | Path | None = None,
    progress: bool = True,
    trackers: str | Iterable[str] = (),
) -> Path:
    """Train on all sites' training cases pooled; validate on their validation cases; return the run folder.

    ``trackers``: ``tensorboard`` and/or ``mlflow`` (:mod:`mstkd.tracking`): each epoch's scalars, and with MLflow
    the config, the best checkpoint and the last validation table.

    Raises:
        InputError: ``out_dir`` cannot be written, or already holds a run (continue it with
            :func:`resume_centralised`).
    """
    out = Path(out_dir).resolve()
    epochs = float(cfg.train.epochs)
    if epochs < 1 or not epochs.is_integer():
        raise InputError(f"train.epochs={epochs:g}: centralised training runs whole epochs (1 or more)")
    check_writable(out, what="--out")
    if (out / STATE).exists() or (out / "log.jsonl").exists():
        raise InputError(f"--out {out} already holds a run: continue it with --resume {out}, or choose another --out")
    tracker = Tracker(out, trackers)  # refuses before any work when a package is missing
    partitioning = Path(partitioning).resolve() if partitioning else None  # state.pt must find it from anywhere
    with tracker.failed_on_error():
        return _run(Path(data_dir).resolve(), cfg, out, partitioning=partitioning, progress=progress, tracker=tracker)


def resume_centralised(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    partitioning: str | Path | None = None,
    progress: bool = True,
    trackers: str | Iterable[str] = (),
) -> Path:
    """Continue the run in ``run_dir`` after its last finished epoch, with its own config, on ``data_dir``.

    A ``state.pt`` may have been copied from elsewhere, so what it holds is checked before any data is read (its
    archive before ``torch.load``, its config, its weights and optimiser moments against the networks that config
    builds, on the ``meta`` device), and the folders it names choose nothing: ``data_dir`` and ``partitioning``
    must be given, and must be the data folder and partition CSV (or none) the run was trained on.

    Raises:
        InputError: ``run_dir`` holds no readable training state, or one that does not fit its config, or
            ``data_dir`` or ``partitioning`` is not the run's.
    """
    out = Path(run_dir).resolve()
    path = out / STATE
    if not path.is_file():
        raise InputError(f"--resume {out}: no {STATE} (not a run folder of mstkd train, or no epoch finished)")
    if problem := archive_problem(path):  # before torch.load reads a record at the size it claims
        raise InputError(f"--resume {path}: not a readable training state ({problem})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise InputError(f"--resume {path}: not a readable training state ({type(exc).__name__})") from None
    cfg = _checked_state(state, path)
    _check_fit(state, cfg, path)
    data = _named_as_stored("--data", data_dir, state["data"], out)
    partitioning = _named_as_stored("--partitioning", partitioning, state["partitioning"], out)
    tracker = Tracker(out, trackers)
    with tracker.failed_on_error():
        return _run(data, cfg, out, partitioning=partitioning, progress=progress, state=state, tracker=tracker)


def _named_as_stored(flag: str, given: str | Path | None, stored: str | None, out: Path) -> Path | None:
    """``given`` (resolved) once it is the path a training state recorded for ``flag``: a state from elsewhere must
    not choose which folders are read, nor where the data's cache is written, unless the user names them too.

    Raises:
        InputError: ``given`` is missing where the run had one, or is another path.
    """
    named = Path(given).resolve() if given else None
    if named == (Path(stored) if stored is not None else None):
        return named
    if stored is None:
        raise InputError(f"--resume {out}: this run was trained without {flag}; give none")
    if named is None:
        raise InputError(f"--resume {out}: this run was trained with {flag} {stored[:200]!r}: give it too")
    raise InputError(f"--resume {out}: {flag} {named} is not the run's ({stored[:200]!r})")


def _check_fit(state: dict, cfg: DictConfig, path: Path) -> None:
    """Refuse a training state whose weights or optimiser moments do not fit the networks ``cfg`` builds (on the
    ``meta`` device: no memory is spent), or that holds a tensor that is not dense, real and finite.

    Raises:
        InputError: one line naming the entry.
    """
    with torch.device("meta"):
        nets = Networks(*build_networks(cfg.model))
    for name in ("teacher", "student", "discriminator"):
        check_weights(state[name], getattr(nets, name).state_dict(), f"--resume {path}: its {name}")
    optimizers = make_optimizers(nets, cfg.train)
    check_optimizer(state["optimizer"], optimizers.main, f"--resume {path}: its optimizer", scheduled=("lr",))
    check_optimizer(state["disc_optimizer"], optimizers.discriminator, f"--resume {path}: its disc_optimizer")
    check_tensors(state["random"], f"--resume {path}: its random states")


def _checked_state(state: object, path: Path) -> DictConfig:
    """The config of a ``state.pt`` (which may have been copied from elsewhere), once its config has passed
    :func:`~mstkd.checkpoint.stored_config` (no ``${oc.env:...}``, only known keys, checked values) and every other
    entry has the type this module writes; read-only.

    Raises:
        InputError: the state is not one of this version, or an entry is missing or of another type.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"--resume {path}: not a training state of this version")
    cfg = stored_config(state.get("config"), f"--resume {path}")
    types = {
        "data": str,
        "partitioning": str | None,
        **dict.fromkeys(("teacher", "student", "discriminator", "optimizer", "disc_optimizer", "random"), dict),
    }
    wrong = [key for key, kind in types.items() if not isinstance(state.get(key), kind)]
    epoch, best = state.get("epoch"), state.get("best")
    if not (is_whole(epoch) and 1 <= epoch <= int(cfg.train.epochs)):
        wrong.append("epoch")
    if not (is_finite(best) and -1 <= best <= 1):
        wrong.append("best")
    if wrong:
        raise InputError(f"--resume {path}: not a training state this version writes ({wrong[0]!r})")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _run(
    data_dir: Path,
    cfg: DictConfig,
    out: Path,
    *,
    partitioning: str | Path | None,
    progress: bool,
    tracker: Tracker,
    state: dict | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.train.seed))
    device = pick_device()
    print(f"device: {device}", file=sys.stderr)

    federation = prepare_federation(data_dir, cfg.data, partitioning=partitioning, progress=progress)
    # the planned geometry becomes part of the config: config.yaml, the state and every checkpoint record it
    cfg = OmegaConf.merge(cfg, {"data": federation.target.to_config()})
    print(f"target geometry: {federation.target.describe()}", file=sys.stderr)
    if state is None:
        save_config(cfg, out / "config.yaml")
    train_cases = [e for s in federation.sites for e in federation.site_cases(s, "train")]
    val_cases = [e for s in federation.sites for e in federation.site_cases(s, "val")]
    loader = make_loader(
        train_cases,
        cfg.data,
        train=True,
        patch=cfg.data.patch_size or cfg.model.input_size,
        batch_size=int(cfg.train.batch_size),
    )
    steps = cfg.train.steps_per_epoch
    steps = int(steps) if steps else len(loader)

    nets = Networks(*build_networks(cfg.model)).to(device)
    optimizers = make_optimizers(nets, cfg.train)
    rng = np.random.default_rng(int(cfg.train.seed))
    subsets = parse_subsets(cfg.train.eval_subsets)
    convention = _convention(federation)
    best, first = -1.0, 0
    log = out / "log.jsonl"
    tracker.start(out.name, {"config": OmegaConf.to_container(cfg, resolve=True)}, resumed=state is not None)
    if state is not None:
        try:  # the weights, moments and random states must fit what the checked config builds
            for name in ("teacher", "student", "discriminator"):  # loads into the parameters in place
                getattr(nets, name).load_state_dict(state[name])
            optimizers.main.load_state_dict(state["optimizer"])
            optimizers.discriminator.load_state_dict(state["disc_optimizer"])
            set_random_states(state["random"], loader, rng)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise InputError(f"--resume {out}: its {STATE} does not fit its config ({type(exc).__name__})") from None
        best, first = float(state["best"]), int(state["epoch"])
        # an epoch logged but killed before its state was saved runs again: keep the log to the saved state
        write_text(log, "".join(_logged_until(log, first)))
        print(f"resuming {out} after epoch {first} of {int(cfg.train.epochs)}", file=sys.stderr)
    for epoch in range(first, int(cfg.train.epochs)):
        start = time.perf_counter()
        metrics = train_local(
            nets,
            optimizers,
            loader,
            cfg,
            steps=steps,
            epoch=float(epoch),
            rng=rng,
            device=device,
            subsets=SUBSETS,
            progress=progress,
            desc=f"epoch {epoch + 1}/{int(cfg.train.epochs)}",
        )
        record = {**metrics, "epoch": epoch + 1}  # metrics["epoch"] is the schedule position
        last_epoch = epoch + 1 == int(cfg.train.epochs)
        if val_cases and ((epoch + 1) % int(cfg.train.eval_every) == 0 or last_epoch):
            result = evaluate_cases(
                nets.student, val_cases, cfg, subsets=subsets, device=device, progress=progress, desc="validate"
            )
            result.write(out, stem=f"val_epoch{epoch + 1}")
            record["val"] = result.summary()
            record["collapse"] = [describe_collapse(hit) for hit in result.collapse()]
            for what in record["collapse"]:
                print(f"WARNING epoch {epoch + 1}: collapse on the validation cases: {what}", file=sys.stderr)
            if result.mean_dice() > best:
                best = result.mean_dice()
                save_checkpoint(
                    out / "best.pt",
                    nets.student,
                    cfg,
                    convention=convention,
                    extra={"epoch": epoch + 1, "val_mean_dice": best},
                )
        save_checkpoint(out / "last.pt", nets.student, cfg, convention=convention, extra={"epoch": epoch + 1})
        record["wall_seconds"] = time.perf_counter() - start
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        _save_state(out, cfg, nets, optimizers, epoch + 1, best, random_states(loader, rng), data_dir, partitioning)
        tracker.log(epoch + 1, {"train": metrics, "val": record.get("val", {})})
        val = f", val mean Dice {record['val']['mean_dice']:.3f}" if "val" in record else ""
        print(f"epoch {epoch + 1}: loss {metrics['loss']:.3f}{val} ({record['wall_seconds']:.0f} s)", file=sys.stderr)
    if not (out / "best.pt").exists():
        copy_file(out / "last.pt", out / "best.pt")
    tracker.finish([out / "best.pt", out / "config.yaml", out / "log.jsonl", *last_tables(out, "val_epoch")])
    return out


def _logged_until(log: Path, epoch: int) -> list[str]:
    """The lines of ``log`` for epochs up to ``epoch``; a line cut short by a kill, or a missing log, is dropped."""
    kept = []
    for line in log.read_text().splitlines(keepends=True) if log.is_file() else []:
        try:
            if json.loads(line)["epoch"] <= epoch:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def _save_state(out, cfg, nets, optimizers, epoch, best, randoms, data_dir, partitioning) -> None:
    """``state.pt``, atomically: what :func:`resume_centralised` needs to continue after ``epoch``."""
    payload = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "best": best,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": str(data_dir),
        "partitioning": str(partitioning) if partitioning else None,
        **{name: getattr(nets, name).state_dict() for name in ("teacher", "student", "discriminator")},
        "optimizer": optimizers.main.state_dict(),
        "disc_optimizer": optimizers.discriminator.state_dict(),
        "random": randoms,
    }
    with atomic_path(out / STATE) as tmp:
        torch.save(payload, tmp)
