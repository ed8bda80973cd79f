"""Flower ServerApp: FedAvg (or another strategy) over the student + discriminator, and global evaluation.

The run folder (``out-dir``, absolute; default ``<work-dir>/runs/<run id>``) receives:
``config.yaml`` (the resolved project config), ``run_config.json``, ``metrics.jsonl`` and
``metrics.csv`` (one row per round), ``dice.png``, ``eval/round_<r>.{md,csv,json}`` (the
15-subset table of each evaluated round), ``best.pt`` and ``last.pt`` (checkpoints of the
global student that ``mstkd predict`` reads) and ``REPORT.md``.

``best.pt`` is the global student with the best aggregated site-validation Dice: the held-out
test cases are scored for reporting only, never for choosing a model. A region that a model
predicts over most of the brain (a collapse; ``eval.collapse_share``, ``eval.collapse_ratio``)
is flagged in the run log, in ``REPORT.md`` and with a warning line, whether a site's
validation or the global evaluation saw it.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from mstkd.atomic import copy_file, write_text
from mstkd.checkpoint import save_checkpoint
from mstkd.config import save_config
from mstkd.data.dataset import prepare_federation
from mstkd.data.labels import REGIONS
from mstkd.errors import InputError
from mstkd.evaluate import describe_collapse, evaluate_cases, parse_subsets
from mstkd.federated import (
    TRANSPORT_DTYPES,
    config_from_run,
    data_source,
    default_home,
    federated_arrays,
    load_federated_arrays,
)
from mstkd.model import MSTKDNet, build_discriminator, count_parameters
from mstkd.tracking import Tracker
from mstkd.train import pick_device, seed_everything
from server.loop import (
    ServerCheckpoint,
    arrays_to_numpy,
    numpy_to_arrays,
    restore_strategy,
    run_rounds,
    strategy_state,
)
from server.runlog import RunLog
from server.secagg import run_secagg
from server.strategy import make_strategy

log = logging.getLogger("mstkd.server")
app = ServerApp()


def _say(text: str) -> None:
    """Progress lines for whoever follows the run (flwr run --stream shows the ServerApp's output)."""
    print(f"[mstkd] {text}", file=sys.stderr, flush=True)


def run_folder(run: dict, run_id: int) -> Path:
    out = str(run.get("out-dir", "") or "")
    home = Path(str(run.get("work-dir", "") or default_home())).expanduser()
    return (Path(out).expanduser() if out else home / "runs" / f"run-{run_id}").resolve()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = dict(context.run_config)
    cfg = config_from_run(run)
    seed_everything(int(cfg.train.seed))
    resume = str(run.get("resume-from", "") or "")
    checkpoint = ServerCheckpoint.load(Path(resume).expanduser()) if resume else None
    out = Path(resume).expanduser().resolve() if resume else run_folder(run, context.run_id)
    tracker = Tracker(out, bool(run.get("tensorboard", False)))  # refuses now if the package is missing
    out.mkdir(parents=True, exist_ok=True)
    stem = "resumed_" if checkpoint is not None else ""  # a resumed run keeps the original files
    save_config(cfg, out / f"{stem}config.yaml")
    write_text(out / f"{stem}run_config.json", json.dumps(run, indent=1, default=str))
    device = pick_device()
    rounds = int(run.get("num-server-rounds", 1))
    min_nodes = int(run.get("min-nodes", 2))

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
    if transport not in TRANSPORT_DTYPES:
        raise InputError(f"transport must be one of {', '.join(TRANSPORT_DTYPES)}, got {transport!r}")
    floats = sum(v.numel() for m in (student, disc) for v in m.state_dict().values() if v.is_floating_point())
    wire_mb = floats * np.dtype(TRANSPORT_DTYPES[transport]).itemsize / 1e6
    _say(f"run folder {out}")
    _say(
        f"model {cfg.model.preset}: {count_parameters(student) / 1e6:.2f} M student parameters, "
        f"{len(initial)} federated arrays, {wire_mb:.1f} MB per message ({transport}); server device {device}"
    )

    num_sites = max(len(list(grid.get_node_ids())), min_nodes)  # a phantom federation has one site per node
    cases = test_cases(run, cfg, num_sites, int(run.get("eval-cases", 0)))
    subsets = parse_subsets(str(run.get("eval-subsets", "all")))
    eval_every = max(int(run.get("eval-every", 1)), 1)
    eval_initial = bool(run.get("eval-initial", True))
    if cases:
        what = f"{len(cases)} held-out cases x {len(subsets)} modality subsets"
        _say(f"global evaluation: {what} every {eval_every} rounds")
    else:
        _say(
            "no held-out test case: the global model is not scored (give the federation more cases, "
            "e.g. a larger phantom-cases, or a test-data-path); best.pt is still chosen on site validation"
        )

    runlog = RunLog(out)
    best: dict = {"val_mean_dice": -1.0, "round": None}
    state_key = str(run.get("run-name", "") or f"run-{context.run_id}")
    first_round = 1
    if checkpoint is not None:
        runlog.records = {int(r): rec for r, rec in checkpoint.records.items()}
        best, state_key, first_round = dict(checkpoint.best), checkpoint.state_key, checkpoint.round + 1
        best.setdefault("val_mean_dice", -1.0)
        random.setstate(checkpoint.random_state)
        _say(f"resuming {out} after round {checkpoint.round} (best site-validation Dice {_best(best)})")
    convention = cases[0].meta["convention"] if cases else "fets"
    privacy = privacy_settings(run, min_nodes)
    ledger = (
        PrivacyLedger(privacy, num_sites, checkpoint.privacy if checkpoint is not None else None) if privacy else None
    )
    train_config = {"lr": float(cfg.train.lr), "state-key": state_key}
    timeout = float(run.get("round-timeout", 3600))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        load_federated_arrays(student, disc, {k: v.numpy() for k, v in arrays.items()})
        save_checkpoint(out / "last.pt", student, cfg, convention=convention, extra={"round": server_round})
        rec = runlog.record(server_round)
        if ledger is not None and server_round > 0 and "privacy" not in rec:
            rec["privacy"] = dict(privacy)
            if "skipped" not in rec:  # a skipped round released nothing new
                rec["privacy"].update(ledger.release())
                spent = rec["privacy"]
                if spent["epsilon"] is not None:
                    eps, delta = spent["epsilon"], spent["delta"]
                    _say(f"round {server_round}: privacy spent epsilon {eps:.3f} at delta {delta:g}")
        val = rec.get("val", {}).get("val-mean-dice") if not rec.get("skipped") else None
        if val is not None and float(val) > best["val_mean_dice"]:  # model selection on the sites' validation
            best.update(val_mean_dice=float(val), round=server_round)
            save_checkpoint(
                out / "best.pt",
                student,
                cfg,
                convention=convention,
                extra={"round": server_round, "val_mean_dice": float(val)},
            )
        for site, values in sorted(rec["sites"].items()):
            if values.get("val-collapsed"):
                flag_collapse(rec, server_round, f"{site} validation", values.get("val-collapse", "a region"))
        metrics = None
        due = server_round == rounds or (server_round % eval_every == 0 and (server_round or eval_initial))
        if cases and due:
            start = time.perf_counter()
            result = evaluate_cases(student, cases, cfg, subsets=subsets, device=device, progress=False)
            result.write(out / "eval", stem=f"round_{server_round}")
            summary = result.summary()
            rec["global"] = summary
            rec["eval_seconds"] = time.perf_counter() - start
            metrics = MetricRecord({k: float(v) for k, v in summary.items()})
            dice = ", ".join(f"{r} {summary[f'{r}_dice']:.3f}" for r in REGIONS)
            _say(f"round {server_round}: global Dice {dice} (mean {summary['mean_dice']:.3f}; held-out test)")
            for hit in result.collapse() if server_round > 0 else ():  # the untrained model is not a collapse
                flag_collapse(rec, server_round, "global evaluation", describe_collapse(hit))
        student.to("cpu")
        runlog.finish(server_round)
        tracker.log(server_round, {k: v for k, v in runlog.row(server_round).items() if k != "round"})
        _say(runlog.progress(server_round, rounds))
        return metrics

    if bool(run.get("secagg", False)):
        if checkpoint is not None or privacy:
            raise InputError("secagg=true cannot be combined with resume-from or dp")
        _say(f"secure aggregation (SecAgg+) over {min_nodes} nodes per round")
        start = time.perf_counter()
        run_secagg(
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
            evaluate_fn=evaluate_fn,
        )
        keep_last_if_no_validation(out, best)
        tracker.close()
        report = write_report(out, runlog, cfg, run, time.perf_counter() - start, best)
        _say(f"finished {rounds} rounds with SecAgg+; best.pt: {_best(best)}; report {report}")
        return

    strategy = build_strategy(run, runlog, privacy)
    if privacy:
        _say(f"differential privacy: {privacy}")
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
        evaluate_fn=evaluate_fn,
        after_round=after_round,
        before_round=ledger.stop_reason if ledger is not None else None,
        say=_say,
    )
    total = time.perf_counter() - start
    keep_last_if_no_validation(out, best)
    tracker.close()
    report = write_report(out, runlog, cfg, run, total, best)
    done = f"stopped early ({runlog.stopped})" if runlog.stopped else f"finished {rounds} rounds"
    _say(f"{done} in {total:.0f} s; best.pt: {_best(best)}; report {report}")


def _best(best: dict) -> str:
    if best.get("round") is None:
        return "the final model (no site had validation cases to choose by)"
    return f"round {best['round']} (site-validation mean Dice {best['val_mean_dice']:.3f})"


def keep_last_if_no_validation(out: Path, best: dict) -> None:
    """Without any site-validation score there is nothing to choose by: ``best.pt`` is the final model."""
    if best.get("round") is None and (out / "last.pt").is_file():
        _say("no site reported a validation Dice (no validation cases): best.pt is the final model")
        copy_file(out / "last.pt", out / "best.pt")


def flag_collapse(rec: dict, server_round: int, where: str, what: str) -> None:
    """Record a collapsed region in the round's record and say it in one warning line."""
    rec.setdefault("collapse", []).append({"where": where, "what": what})
    _say(f"WARNING round {server_round}: collapse in the {where}: {what}")


def build_strategy(run: dict, runlog: RunLog, privacy: dict):
    """The run config's strategy (with the project's mixin), wrapped for differential privacy when asked."""
    kwargs: dict = {
        "fraction_train": float(run.get("fraction-train", 1.0)),
        "fraction_evaluate": float(run.get("fraction-evaluate", 1.0)),
        # the round loop waits for min-nodes itself (with a limit); Flower's own wait has none
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    name = str(run.get("strategy", "fedavg")).lower()
    if name == "fedprox":
        kwargs["proximal_mu"] = float(run.get("proximal-mu", 0.01))
    elif name == "fedavgm":
        kwargs.update(
            server_learning_rate=float(run.get("server-lr", 1.0)),
            server_momentum=float(run.get("server-momentum", 0.9)),
        )
    elif name in ("fedadam", "fedyogi"):
        kwargs.update(eta=float(run.get("server-lr", 1e-2)))
    strategy = make_strategy(
        name,
        runlog=runlog,
        transport=str(run.get("transport", "float16")),
        local_epochs=float(run.get("local-epochs", 1)),
        **kwargs,
    )
    if not privacy:
        return strategy
    strategy.uniform_weights = True  # the noise is calibrated to one site's share being 1 / sites
    wrapper = DP_WRAPPERS[privacy["mode"]]
    return wrapper(
        strategy,
        noise_multiplier=privacy["noise_multiplier"],
        clipping_norm=privacy["clipping_norm"],
        num_sampled_clients=privacy["sampled_nodes"],
    )


class _UnpredictableNoise:
    """Gaussian noise from a generator seeded by the operating system's entropy.

    Flower's wrappers draw the noise from NumPy's global generator, which the server seeds with the
    run's (published) seed: anyone could recompute and subtract it, and a resumed run would repeat it.
    """

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        stdev = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        rng = np.random.default_rng(secrets.randbits(128))
        return ArrayRecord(
            {
                k: Array((v.numpy() + rng.normal(0.0, stdev, v.numpy().shape)).astype(v.numpy().dtype))
                for k, v in aggregated_arrays.items()
            }
        )


class ServerSideDP(_UnpredictableNoise, DifferentialPrivacyServerSideFixedClipping):
    """The server clips each site's update, then adds noise to their average."""


class ClientSideDP(_UnpredictableNoise, DifferentialPrivacyClientSideFixedClipping):
    """The sites clip their own updates (``fixedclipping_mod``); the server adds noise to the average."""


DP_WRAPPERS = {"server": ServerSideDP, "client": ClientSideDP}


def privacy_settings(run: dict, min_nodes: int) -> dict:
    """``dp`` = off | server | client, with ``dp-clip`` and ``dp-noise``: what the run log records."""
    mode = str(run.get("dp", "off")).lower()
    if mode == "off":
        return {}
    if mode not in DP_WRAPPERS:
        raise InputError(f"dp must be off, server or client, got {mode!r}")
    clip, noise = float(run.get("dp-clip", 1.0)), float(run.get("dp-noise", 0.1))
    if clip <= 0 or noise < 0:
        raise InputError(f"dp-clip must be positive and dp-noise non-negative, got {clip} and {noise}")
    max_epsilon = float(run.get("dp-max-epsilon", 0.0))
    if max_epsilon > 0 and noise == 0:
        raise InputError("dp-max-epsilon needs dp-noise > 0: without noise there is no finite epsilon to bound")
    return {
        "mode": mode,
        "clipping": "fixed",
        "clipping_norm": clip,
        "noise_multiplier": noise,
        "sampled_nodes": min_nodes,
        "noise_stdev": noise * clip / min_nodes,
        "delta": float(run.get("dp-delta", 1e-5)),
        "max_epsilon": max_epsilon or None,
    }


class PrivacyLedger:
    """Client-level (epsilon, delta) of the released global models, from Flower's RDP accountant.

    Each round that aggregates releases one Gaussian mechanism over the sampled sites (noise
    multiplier ``dp-noise`` on updates clipped to ``dp-clip``). No amplification by sampling is
    claimed: every sampled site must reply, and the count is the conservative one.
    """

    def __init__(self, privacy: dict, population: int, state: dict | None = None) -> None:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        self.noise = float(privacy["noise_multiplier"])
        self.accountant = None
        if self.noise > 0:
            config = PrivacyConfig(
                target_delta=float(privacy["delta"]),
                population_size=max(population, int(privacy["sampled_nodes"])),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=privacy["max_epsilon"],
            )
            self.accountant = RdpAccountant(config)
            self.event = GaussianPrivacyEvent(
                noise_multiplier=self.noise,
                sample_size=int(privacy["sampled_nodes"]),
                population_size=config.population_size,
            )
            if state:
                self.accountant.load_state_dict(state)

    def stop_reason(self) -> str | None:
        """Why the next round must not run (its release would exceed ``dp-max-epsilon``), or None."""
        if self.accountant is None or self.accountant.config.max_epsilon is None:
            return None
        if self.accountant.would_exceed(self.event):
            spent = self.accountant.get_privacy_spent()
            return (
                f"the next round would exceed dp-max-epsilon {self.accountant.config.max_epsilon:g} "
                f"(spent: epsilon {spent.epsilon:.3f} at delta {spent.delta:g})"
            )
        return None

    def release(self) -> dict:
        """Count one released global model; the spent budget so far, for the round's record."""
        if self.accountant is None:
            return {"epsilon": None, "epsilon_note": "no noise: no finite epsilon"}
        self.accountant.compose(self.event)
        spent = self.accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}

    def state(self) -> dict:
        return self.accountant.state_dict() if self.accountant is not None else {}


def _faults(record: dict) -> str:
    """What went wrong in a round, for the report: failed or silent nodes, and a skipped round."""
    parts = [f"node {f['node']} ({f['stage']}): {f['reason'][:80]}" for f in record.get("failures", [])]
    if record.get("skipped"):
        parts.append(f"**round skipped**: {record['skipped']}")
    return "; ".join(parts).replace("|", "/")


def write_report(out: Path, runlog: RunLog, cfg, run: dict, seconds: float, best: dict) -> Path:
    """``REPORT.md``: the Dice curve, the last round's 15-subset table, communication and timing."""
    rows = runlog.rows()
    evaluated = [r for r in sorted(runlog.records) if runlog.records[r].get("global")]
    lines = [f"# Federated MST-KDNet run ({cfg.model.preset}, {run.get('strategy', 'fedavg')})", ""]
    lines += [
        "| round | global mean Dice | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT | "
        "sent MB | received MB | wall s | failed nodes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        g = runlog.records[row["round"]].get("global")
        dice = " | ".join(f"{g[f'{r}_dice']:.3f}" for r in REGIONS) if g else " | ".join("" for _ in REGIONS)
        hd = " | ".join(f"{g[f'{r}_hd95']:.1f}" for r in REGIONS) if g else " | ".join("" for _ in REGIONS)
        mean = f"{g['mean_dice']:.3f}" if g else ""
        lines.append(
            f"| {row['round']} | {mean} | {dice} | {hd} | {row['bytes_sent'] / 1e6:.1f} | "
            f"{row['bytes_received'] / 1e6:.1f} | {row.get('wall_seconds', 0):.1f} | "
            f"{_faults(runlog.records[row['round']])} |"
        )
    lines += [
        "",
        f"Total {seconds:.0f} s. `best.pt`: {_best(best)}, chosen on the sites' validation cases; "
        "`last.pt` holds the final global student. The global Dice and HD95 above are on the held-out "
        "test cases, scored for reporting only.",
        "",
    ]
    if runlog.stopped:
        lines += [f"**The run ended early**: {runlog.stopped}.", ""]
    spent = [(r, runlog.records[r]["privacy"]) for r in sorted(runlog.records) if "privacy" in runlog.records[r]]
    if spent:
        p = spent[-1][1]
        lines += [
            "## Differential privacy",
            "",
            f"{p['mode']}-side clipping at {p['clipping_norm']:g}, noise multiplier {p['noise_multiplier']:g} "
            f"(noise stdev {p['noise_stdev']:.3g} per weight), {p['sampled_nodes']} sites per round. Client-level "
            "epsilon from Flower's RDP accountant, one release per aggregated round, no amplification by sampling.",
            "",
            "| round | epsilon | delta |",
            "|---:|---:|---:|",
        ]
        for r, q in spent:
            eps = f"{q['epsilon']:.3f}" if q.get("epsilon") is not None else "unbounded (no noise)"
            lines.append(f"| {r} | {eps} | {q.get('delta', p['delta']):g} |")
        lines.append("")
    flagged = [(r, c) for r in sorted(runlog.records) for c in runlog.records[r].get("collapse", [])]
    if flagged:
        lines += ["## Collapse warnings", ""]
        lines += [f"- round {r}, {c['where']}: {c['what']}" for r, c in flagged]
        lines.append("")
    if evaluated:
        last = evaluated[-1]
        table = (out / "eval" / f"round_{last}.md").read_text()
        lines += [f"## 15-subset table, round {last}", "", table, ""]
    lines += [
        "![global Dice over rounds](dice.png)",
        "",
        "Files: `metrics.csv`/`metrics.jsonl` (per round, per site), `eval/round_<r>.*`, `config.yaml`.",
    ]
    return write_text(out / "REPORT.md", "\n".join(lines) + "\n")
