"""Flower ServerApp: FedAvg (or another strategy) over the student + discriminator, and global evaluation.

The run folder (``out-dir``, absolute; default ``<work-dir>/runs/<run id>``) receives:
``config.yaml`` (the resolved project config), ``run_config.json``, ``metrics.jsonl`` and
``metrics.csv`` (one row per round), ``dice.png``, ``eval/round_<r>.{md,csv,json}`` (the
15-subset table of each evaluated round), ``best.pt`` and ``last.pt`` (checkpoints of the
global student that ``mstkd predict`` reads), ``server_state.npz`` (what ``resume-from``
continues from) and ``REPORT.md``. A folder that already holds a run is refused unless it is
resumed (``resume-from``) or replaced (``overwrite=true``).

Every reply is checked before it is aggregated (:mod:`server.replies`); a run in which no round
aggregated, or whose global model never changed, ends as failed, so that neither ``flwr ls`` nor
a launcher reports it as a success.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from mstkd.atomic import copy_file, write_text
from mstkd.config import save_config
from mstkd.data.dataset import prepare_federation
from mstkd.data.geometry import TargetGeometry
from mstkd.errors import InputError
from mstkd.evaluate import parse_subsets
from mstkd.federated import (
    TRANSPORT_DTYPES,
    check_state_key,
    config_from_run,
    data_source,
    default_home,
    federated_arrays,
    load_federated_arrays,
)
from mstkd.model import MSTKDNet, build_discriminator, count_parameters
from mstkd.runconfig import check_run_config
from mstkd.tracking import Tracker
from mstkd.train import pick_device, seed_everything
from server.evaluation import RoundEnd, say
from server.loop import run_rounds
from server.plan import agree_target
from server.privacy import PrivacyLedger, privacy_settings, wrap_for_privacy
from server.report import describe_best, outcome, write_report
from server.runlog import RunLog
from server.secagg import run_secagg
from server.state import (
    ServerCheckpoint,
    arrays_to_numpy,
    numpy_to_arrays,
    restore_strategy,
    strategy_state,
)
from server.strategy import make_strategy, strategy_options

app = ServerApp()

RUN_FILES = ("metrics.jsonl", "REPORT.md", "last.pt", "best.pt", ServerCheckpoint.FILE, ServerCheckpoint.OLD_FILE)
"""A folder with any of these holds a run; ``overwrite=true`` removes them, with ``eval/`` and ``tensorboard/``."""


class RunFailed(RuntimeError):
    """The run ended without learning anything: no round aggregated, or the global model never changed."""


def run_folder(run: dict, run_id: int) -> Path:
    out = str(run.get("out-dir", "") or "")
    home = Path(str(run.get("work-dir", "") or default_home())).expanduser()
    return (Path(out).expanduser() if out else home / "runs" / f"run-{run_id}").resolve()


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
    for folder in ("eval", "tensorboard") if earlier else ():
        shutil.rmtree(out / folder, ignore_errors=True)


def original_target(out: Path) -> TargetGeometry | None:
    """The target geometry a run being resumed agreed on (its ``config.yaml``), which a resumed run keeps; None
    for a run of an older version, which planned none (the resumed run plans it now).

    Raises:
        InputError: the file is missing or does not read.
    """
    try:
        return TargetGeometry.from_config(OmegaConf.load(out / "config.yaml").data)
    except Exception as exc:  # a missing or damaged file: OSError, a YAML error, a missing key, a bad value
        raise InputError(f"resume-from: {out}/config.yaml does not read ({type(exc).__name__})") from None


def test_cases(run: dict, cfg, num_sites: int, limit: int):
    """The held-out cases for global evaluation: ``test-data-path`` (every case), or the run's dataset's test split."""
    test_path = str(run.get("test-data-path", "") or "")
    if test_path:
        fed = prepare_federation(Path(test_path).expanduser(), cfg.data, progress=False, skip_bad=True)
        cases = [e for s in fed.sites for e in fed.site_cases(s, "train") + fed.site_cases(s, "val")] + fed.test_cases()
    else:
        folder, csv = data_source(run, num_sites)
        fed = prepare_federation(folder, cfg.data, partitioning=csv, sites=[], test=True, progress=False, skip_bad=True)
        cases = fed.test_cases()
    return cases[:limit] if limit > 0 else cases


def build_strategy(run: dict, runlog: RunLog, privacy: dict, nodes: int):
    """The run config's strategy (with the project's mixin), wrapped for differential privacy when asked."""
    name = str(run.get("strategy", "fedavg"))
    strategy = make_strategy(
        name,
        runlog=runlog,
        transport=str(run.get("transport", "float16")),
        local_epochs=float(run.get("local-epochs", 1)),
        fraction_train=float(run.get("fraction-train", 1.0)),
        fraction_evaluate=float(run.get("fraction-evaluate", 1.0)),
        # the round loop waits for min-nodes itself (with a limit); Flower's own wait has none
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        **strategy_options(name, run, nodes),
    )
    return wrap_for_privacy(strategy, privacy) if privacy else strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = check_run_config(context.run_config)
    cfg = config_from_run(run)
    seed_everything(int(cfg.train.seed))
    resume = str(run.get("resume-from", "") or "")
    checkpoint = ServerCheckpoint.load(Path(resume).expanduser()) if resume else None
    out = Path(resume).expanduser().resolve() if resume else run_folder(run, context.run_id)
    rounds = int(run.get("num-server-rounds", 1))
    min_nodes = int(run.get("min-nodes", 2))
    privacy = privacy_settings(run, min_nodes)
    strategy_options(str(run.get("strategy", "fedavg")), run, min_nodes)  # refuses impossible settings now
    # the nodes' state folders: the run's name and a token of its own, so a reused run-name starts clean
    name = str(run.get("run-name", "") or f"run-{context.run_id}")
    state_key = checkpoint.state_key if checkpoint else check_state_key(f"{name}.{secrets.token_hex(4)}", "run-name")
    if checkpoint is None:
        claim_folder(out, bool(run.get("overwrite", False)))
    tracker = Tracker(out, bool(run.get("tensorboard", False)))  # refuses now if the package is missing
    out.mkdir(parents=True, exist_ok=True)
    target = (original_target(out) if checkpoint is not None else None) or agree_target(
        grid,
        cfg.data,
        min_nodes=min_nodes,
        node_wait=float(run.get("node-wait", 600)),
        timeout=float(run.get("round-timeout", 3600)),
        max_examples=int(run.get("max-examples", 10_000)),
        say=say,
    )
    cfg = OmegaConf.merge(cfg, {"data": target.to_config()})  # the held-out cases, checkpoints and config.yaml
    stem = "resumed_" if checkpoint is not None else ""  # a resumed run keeps the original files
    save_config(cfg, out / f"{stem}config.yaml")
    write_text(out / f"{stem}run_config.json", json.dumps(run, indent=1, default=str))
    device = pick_device()

    student = MSTKDNet(cfg.model)
    disc = build_discriminator(cfg.model)
    transport = str(run.get("transport", "float16"))
    if checkpoint is not None:
        initial = numpy_to_arrays(checkpoint.arrays)
        try:
            load_federated_arrays(student, disc, checkpoint.arrays)
        except (RuntimeError, ValueError) as exc:  # e.g. a run of the earlier region head (3 outputs)
            raise InputError(f"resume-from: {resume} holds a model this version cannot load ({exc})") from None
    else:
        initial = ArrayRecord({k: Array(v) for k, v in federated_arrays(student, disc, "float32").items()})
    floats = sum(v.numel() for m in (student, disc) for v in m.state_dict().values() if v.is_floating_point())
    wire_mb = floats * np.dtype(TRANSPORT_DTYPES[transport]).itemsize / 1e6
    say(f"run folder {out}")
    say(
        f"model {cfg.model.preset}: {count_parameters(student) / 1e6:.2f} M student parameters, "
        f"{len(initial)} federated arrays, {wire_mb:.1f} MB per message ({transport}); server device {device}"
    )

    num_sites = max(len(list(grid.get_node_ids())), min_nodes)  # a phantom federation has one site per node
    cases = test_cases(run, cfg, num_sites, int(run.get("eval-cases", 0)))
    subsets = parse_subsets(str(run.get("eval-subsets", "all")))
    eval_every = max(int(run.get("eval-every", 1)), 1)
    if cases:
        what = f"{len(cases)} held-out cases x {len(subsets)} modality subsets"
        say(f"global evaluation: {what} every {eval_every} rounds")
    else:
        say(
            "no held-out test case: the global model is not scored (give the federation more cases, "
            "e.g. a larger phantom-cases, or a test-data-path); best.pt is still chosen on site validation"
        )

    runlog = RunLog(out)
    best: dict = {"val_mean_dice": -1.0, "round": None}
    first_round = 1
    if checkpoint is not None:
        runlog.records = dict(checkpoint.records)
        best, first_round = dict(checkpoint.best), checkpoint.round + 1
        best.setdefault("val_mean_dice", -1.0)
        random.setstate(checkpoint.random_state)
        say(f"resuming {out} after round {checkpoint.round} (best site-validation Dice {describe_best(best)})")
    ledger = (
        PrivacyLedger(privacy, num_sites, checkpoint.privacy if checkpoint is not None else None) if privacy else None
    )
    # every node works at the agreed geometry (it caches its cases there)
    site_config = {"target-spacing": " ".join(repr(v) for v in target.spacing), "orientation": target.orientation}
    train_config = {"lr": float(cfg.train.lr), "state-key": state_key, **site_config}
    if privacy:
        train_config["dp-clipping"] = privacy["clipping"]  # which clipping mod a node runs (client-side DP)
    timeout = float(run.get("round-timeout", 3600))
    round_end = RoundEnd(
        student=student,
        disc=disc,
        cfg=cfg,
        out=out,
        runlog=runlog,
        tracker=tracker,
        cases=cases,
        subsets=subsets,
        rounds=rounds,
        eval_every=eval_every,
        eval_initial=bool(run.get("eval-initial", True)),
        device=device,
        best=best,
        convention=cases[0].meta["convention"] if cases else "fets",
        privacy=privacy or None,
        ledger=ledger,
    )

    if bool(run.get("secagg", False)):
        if checkpoint is not None or privacy:
            raise InputError("secagg=true cannot be combined with resume-from or dp")
        say(f"secure aggregation (SecAgg+) over {min_nodes} nodes per round")
        start = time.perf_counter()
        final = run_secagg(
            grid,
            context,
            initial=arrays_to_numpy(initial),
            rounds=rounds,
            min_nodes=min_nodes,
            timeout=timeout,
            local_epochs=float(run.get("local-epochs", 1)),
            max_weight=float(run.get("secagg-max-weight", 100.0)),
            train_config=train_config,
            runlog=runlog,
            evaluate_fn=round_end,
        )
        start_arrays = arrays_to_numpy(initial)
        moved = any(not np.array_equal(start_arrays[k], np.asarray(v, np.float32)) for k, v in final.items())
        finish(out, runlog, cfg, run, time.perf_counter() - start, best, first_round, changed=moved)
        return

    strategy = build_strategy(run, runlog, privacy, min_nodes)
    if privacy:
        say(f"differential privacy: {privacy}")
        if privacy["clipping"] == "adaptive":
            round_end.clipping_norm = lambda: float(strategy.clipping_norm)
    if checkpoint is not None:
        restore_strategy(strategy, checkpoint.strategy)

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        ServerCheckpoint(
            round=server_round,
            arrays=arrays_to_numpy(arrays),
            strategy=strategy_state(strategy),
            records=runlog.records,
            best=best,
            state_key=state_key,
            random_state=random.getstate(),
            privacy=ledger.state() if ledger is not None else {},
        ).save(out)

    start = time.perf_counter()
    run_rounds(
        strategy,
        grid,
        arrays=initial,
        first_round=first_round,
        num_rounds=rounds,
        runlog=runlog,
        train_config=train_config,
        timeout=timeout,
        min_nodes=min_nodes,
        # with DP every sampled node must reply: the noise is calibrated to that many
        min_replies=min_nodes if privacy else max(int(run.get("min-replies", 1)), 1),
        node_wait=float(run.get("node-wait", 600)),
        max_examples=int(run.get("max-examples", 10_000)),
        required_metrics=("norm_bit",) if privacy.get("mode") == "client" and privacy["clipping"] == "adaptive" else (),
        evaluate_config=site_config,
        evaluate_fn=round_end,
        after_round=after_round,
        before_round=ledger.stop_reason if ledger is not None else None,
        say=say,
    )
    finish(out, runlog, cfg, run, time.perf_counter() - start, best, first_round)


def finish(
    out: Path,
    runlog: RunLog,
    cfg,
    run: dict,
    seconds: float,
    best: dict,
    first_round: int,
    changed: bool | None = None,
) -> None:
    """Close the run: ``best.pt`` when nothing could be chosen, ``REPORT.md``, the last line; raise
    :class:`RunFailed` when nothing was learned (after writing everything)."""
    if best.get("round") is None and (out / "last.pt").is_file():
        say("no site reported a validation Dice (no validation cases): best.pt is the final model")
        copy_file(out / "last.pt", out / "best.pt")
    verdict = outcome(runlog, first_round, transport=str(run.get("transport", "float16")), changed=changed)
    report = write_report(out, runlog, cfg, run, seconds, best, verdict)
    if not verdict.learned:
        say(f"FAILED: {verdict.text}; report {report}")
        raise RunFailed(f"{verdict.text}; see {report}")
    done = f"stopped early ({runlog.stopped})" if runlog.stopped else "finished"
    say(f"{done} in {seconds:.0f} s: {verdict.text}; best.pt: {describe_best(best)}; report {report}")
