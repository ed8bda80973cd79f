"""Flower ServerApp: FedAvg (or another strategy) over the student + discriminator, and global evaluation.

Read the run config, agree the target geometry, build the strategy, run the rounds, write the results. The run
folder (``out-dir``, absolute; default ``<work-dir>/runs/<run id>``) receives: ``config.yaml`` (the resolved
project config), ``run_config.json``, ``metrics.jsonl`` and ``metrics.csv`` (one row per round), ``dice.png``,
``eval/round_<r>.{md,csv,json}`` (the 15-subset table of each evaluated round), ``best.pt`` and ``last.pt``
(checkpoints of the global student that ``mstkd predict`` reads), ``server_state.npz`` (what ``resume-from``
continues from) and ``REPORT.md``. A folder that already holds a run is refused unless it is resumed
(``resume-from``) or replaced (``overwrite=true``).

Every reply is checked before it is aggregated (:mod:`server.replies`); a run in which no round aggregated, or
whose global model never changed, ends as failed, so that neither ``flwr ls`` nor a launcher reports it as a
success. Privacy lives in :mod:`server.privacy`, the round-end evaluation in :mod:`server.evaluation`, the run
folder in :mod:`server.runfolder` and the report in :mod:`server.report`.
"""

from __future__ import annotations

import json
import random
import secrets
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from messages.signed_keys import read_peers
from messages.signed_replies import ASKED, read_site_cases
from mstkd.atomic import write_text
from mstkd.config import save_config
from mstkd.runconfig import DPClipping, DPMode, RunConfig, check_state_key, project_config
from mstkd.tracking import Tracker
from mstkd.train import pick_device, seed_everything
from server.checks import check_run_config
from server.evaluation import RoundEnd, say
from server.ledger import PrivacyLedger, resumed_account
from server.loop import run_rounds
from server.plan import agree_target
from server.privacy import wrap_for_privacy
from server.replies import SiteCases
from server.report import describe_best, finish_run
from server.runfolder import claim_folder, original_target, run_folder
from server.runlog import RunLog
from server.secagg import check_masks, run_secagg
from server.silence import SilentNodes
from server.state import ServerCheckpoint, arrays_to_numpy, global_model, restore_strategy, strategy_state
from server.strategy import make_strategy, strategy_caveat

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    run = RunConfig.parse(context.run_config)
    privacy = check_run_config(run)  # before any node is asked anything
    if run.secagg:
        check_masks()  # what this environment's Flower allows
    peers = read_peers(run.secagg_peers) if run.secagg_peers else frozenset()
    cfg = project_config(run)
    val_fraction = float(cfg.data.split.val_fraction)
    listing = SiteCases(context.run_id, read_site_cases(run.site_cases), val_fraction) if run.site_cases else None
    seed_everything(int(cfg.train.seed))
    out = run_folder(run, context.run_id)
    checkpoint = ServerCheckpoint.load(out) if run.resume_from else None
    account = (
        resumed_account(privacy, out, checkpoint, run.home if privacy else None) if checkpoint is not None else None
    )
    if caveat := strategy_caveat(run, run.min_nodes):
        say(f"WARNING {caveat}")
    # the nodes' state folders: the run's name and a token of its own, so a reused run-name starts clean
    name = run.run_name or f"run-{context.run_id}"
    state_key = checkpoint.state_key if checkpoint else check_state_key(f"{name}.{secrets.token_hex(4)}", "run-name")
    if checkpoint is None:
        claim_folder(out, run.overwrite)
    tracker = Tracker(out, run.trackers)  # refuses now if a package is missing
    with tracker.failed_on_error():  # a run that stops on an error is marked failed where it is tracked
        out.mkdir(parents=True, exist_ok=True)
        target = (original_target(out, cfg.data) if checkpoint is not None else None) or agree_target(
            grid,
            cfg.data,
            min_nodes=run.min_nodes,
            node_wait=run.node_wait,
            timeout=run.round_timeout,
            max_examples=run.max_examples,
            listing=listing,
            say=say,
        )
        cfg = OmegaConf.merge(cfg, {"data": target.to_config()})  # the held-out cases, checkpoints and config.yaml
        stem = "resumed_" if checkpoint is not None else ""  # a resumed run keeps the original files
        save_config(cfg, out / f"{stem}config.yaml")
        write_text(out / f"{stem}run_config.json", json.dumps(run.to_flower(), indent=1, default=str))
        settings = {"run": run.to_flower(), "config": OmegaConf.to_container(cfg, resolve=True)}
        tracker.start(name, settings, resumed=checkpoint is not None)
        say(f"run folder {out}")
        device = pick_device()
        student, disc, initial = global_model(cfg, run, checkpoint, device, say=say)

        runlog = RunLog(out)
        best: dict = {"val_mean_dice": -1.0, "round": None}
        num_sites = max(len(list(grid.get_node_ids())), run.min_nodes)  # a phantom federation has one site per node
        ledger = (
            PrivacyLedger(privacy, num_sites, account, folder=out, key=state_key, home=run.home) if privacy else None
        )
        round_end = RoundEnd.for_run(
            run, cfg, student, disc, device, out, runlog, tracker, best, num_sites, privacy, ledger
        )
        first_round = 1
        if checkpoint is not None:
            runlog.records = dict(checkpoint.records)
            best.clear()
            best.update({"val_mean_dice": -1.0, **checkpoint.best})
            first_round = checkpoint.round + 1
            random.setstate(checkpoint.random_state)
            say(f"resuming {out} after round {checkpoint.round} (best site-validation Dice {describe_best(best)})")
        # every node works at the agreed geometry (it caches its cases there)
        site_config = {"target-spacing": " ".join(repr(v) for v in target.spacing), "orientation": target.orientation}
        site_config |= {ASKED: True} if listing is not None else {}  # the nodes sign their replies (site-cases)
        train_config = {"lr": float(cfg.train.lr), "state-key": state_key, **site_config}
        if privacy:
            train_config["dp-clipping"] = privacy["clipping"]  # client-side DP: whether a node reports norm_bit

        runlog.setup_seconds = time.perf_counter() - started  # what this server did before its first round
        if run.secagg:
            say(f"secure aggregation (SecAgg+) over {run.min_nodes} nodes per round")
            start = time.perf_counter()
            start_arrays = arrays_to_numpy(initial)
            final = run_secagg(grid, context, run, start_arrays, train_config, runlog, round_end, peers, listing)
            moved = any(not np.array_equal(start_arrays[k], np.asarray(v, np.float32)) for k, v in final.items())
            finish_run(out, runlog, cfg, run, time.perf_counter() - start, best, first_round, tracker, changed=moved)
            return

        strategy = make_strategy(run, runlog=runlog, nodes=run.min_nodes, **WAIT_ELSEWHERE)
        if privacy:
            strategy = wrap_for_privacy(strategy, privacy)
            say(f"differential privacy: {privacy}")
            if run.dp_clipping == DPClipping.ADAPTIVE:
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
            num_rounds=run.num_server_rounds,
            runlog=runlog,
            train_config=train_config,
            timeout=run.round_timeout,
            min_nodes=run.min_nodes,
            min_replies=run.min_replies,  # with DP too: a node that does not reply adds a zero update (privacy.py)
            node_wait=run.node_wait,
            max_examples=run.max_examples,
            site_cases=listing,
            required_metrics=("norm_bit",)
            if run.dp == DPMode.CLIENT and run.dp_clipping == DPClipping.ADAPTIVE
            else (),
            evaluate_config=site_config,
            evaluate_fn=round_end,
            after_round=after_round,
            before_round=ledger.stop_reason if ledger is not None else None,
            on_release=ledger.release if ledger is not None else None,
            silence=SilentNodes.for_run(run),
            say=say,
        )
        finish_run(out, runlog, cfg, run, time.perf_counter() - start, best, first_round, tracker)


WAIT_ELSEWHERE = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}
"""The round loop waits for ``min-nodes`` itself (with a limit); Flower's own wait has none."""
