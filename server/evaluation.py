"""What the server does with the global model after every round: the run's own ``evaluate_fn``.

:class:`RoundEnd` writes ``last.pt``, records the privacy spent, keeps ``best.pt`` (the best
aggregated site-validation Dice: the held-out test cases are scored for reporting only, never for
choosing), flags collapsed regions, scores the model on the held-out cases under the chosen
modality subsets when due, and closes the round's record in the run log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig

from messages.arrays import decode_array
from mstkd.checkpoint import save_checkpoint
from mstkd.data.labels import REGIONS
from mstkd.data.sites import held_out_cases
from mstkd.evaluate import describe_collapse, evaluate_cases, parse_subsets
from mstkd.modalities import Subset
from mstkd.model import MSTKDNet, StyleDiscriminator
from mstkd.model.federated import load_federated_arrays
from mstkd.runconfig import RunConfig
from mstkd.tracking import Tracker
from server.ledger import PrivacyLedger
from server.runlog import RunLog


def say(text: str) -> None:
    """Progress lines for whoever follows the run (flwr run --stream shows the ServerApp's output)."""
    print(f"[mstkd] {text}", file=sys.stderr, flush=True)


def flag_collapse(rec: dict, server_round: int, where: str, what: str) -> None:
    """Record a collapsed region in the round's record and say it in one warning line."""
    rec.setdefault("collapse", []).append({"where": where, "what": what})
    say(f"WARNING round {server_round}: collapse in the {where}: {what}")


def model_norm(arrays: ArrayRecord) -> float:
    """The L2 norm of all federated weights: a model that an attack blew up shows here first."""
    return float(np.sqrt(sum(np.sum(decode_array(v, "f").astype(np.float64) ** 2) for v in arrays.values())))


@dataclass
class RoundEnd:
    """``evaluate_fn(server_round, arrays)`` of :func:`server.loop.run_rounds` (see the module doc)."""

    student: MSTKDNet
    disc: StyleDiscriminator
    cfg: DictConfig
    out: Path
    runlog: RunLog
    tracker: Tracker
    cases: list
    subsets: list[Subset]
    rounds: int
    eval_every: int
    eval_initial: bool
    device: Any
    best: dict
    convention: str = "fets"
    privacy: dict | None = None
    ledger: PrivacyLedger | None = None
    clipping_norm: Callable[[], float] | None = None  # the adaptive clipping norm now, when there is one

    @classmethod
    def for_run(
        cls,
        run: RunConfig,
        cfg: DictConfig,
        student: MSTKDNet,
        disc: StyleDiscriminator,
        device: Any,
        out: Path,
        runlog: RunLog,
        tracker: Tracker,
        best: dict,
        num_sites: int,
        privacy: dict,
        ledger: PrivacyLedger | None,
    ) -> RoundEnd:
        """The round end of a run: its held-out cases (:func:`~mstkd.data.sites.held_out_cases`), subsets and
        schedule from the run config; says what will be scored."""
        cases = held_out_cases(run, cfg, num_sites)
        subsets = parse_subsets(run.eval_subsets)
        if cases:
            what = f"{len(cases)} held-out cases x {len(subsets)} modality subsets"
            last = run.eval_every >= run.num_server_rounds
            when = "after the last round" if last else f"every {run.eval_every} rounds and after the last"
            initial = ", and of the initial model" if run.eval_initial else ""
            say(f"global evaluation: {what} {when}{initial}")
        else:
            say(
                "no held-out test case: the global model is not scored (give the federation more cases, "
                "e.g. a larger phantom-cases, or a test-data-path); best.pt is still chosen on site validation"
            )
        return cls(
            student=student,
            disc=disc,
            cfg=cfg,
            out=out,
            runlog=runlog,
            tracker=tracker,
            cases=cases,
            subsets=subsets,
            rounds=run.num_server_rounds,
            eval_every=run.eval_every,
            eval_initial=run.eval_initial,
            device=device,
            best=best,
            convention=cases[0].meta["convention"] if cases else "fets",
            privacy=privacy or None,
            ledger=ledger,
        )

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        load_federated_arrays(self.student, self.disc, {k: decode_array(v, "f") for k, v in arrays.items()})
        writing = time.perf_counter()
        save_checkpoint(
            self.out / "last.pt", self.student, self.cfg, convention=self.convention, extra={"round": server_round}
        )
        rec = self.runlog.record(server_round)
        rec["model_norm"] = model_norm(arrays)
        self._privacy(server_round, rec)
        val = rec.get("val", {}).get("val-mean-dice") if not rec.get("skipped") else None
        if val is not None and float(val) > self.best["val_mean_dice"]:  # model selection on the sites' validation
            self.best.update(val_mean_dice=float(val), round=server_round)
            extra = {"round": server_round, "val_mean_dice": float(val)}
            save_checkpoint(self.out / "best.pt", self.student, self.cfg, convention=self.convention, extra=extra)
        rec["write_seconds"] = rec.get("write_seconds", 0.0) + time.perf_counter() - writing
        for values in sorted(rec["sites"].values(), key=lambda v: str(v.get("name"))):
            if values.get("val-collapsed"):
                where = f"{values.get('name')} validation"
                flag_collapse(rec, server_round, where, str(values.get("val-collapse", "a region")))
        metrics = None
        last = server_round == self.rounds
        due = last or (server_round % self.eval_every == 0 and (server_round or self.eval_initial))
        if self.cases and due:
            metrics = self._evaluate(server_round, rec)
        self.student.to("cpu")
        self.runlog.finish(server_round)
        self.tracker.log(server_round, {k: v for k, v in self.runlog.row(server_round).items() if k != "round"})
        say(self.runlog.progress(server_round, self.rounds))
        return metrics

    def _privacy(self, server_round: int, rec: dict) -> None:
        if self.ledger is None or self.privacy is None or server_round == 0 or "privacy" in rec:
            return
        rec["privacy"] = dict(self.privacy)
        if self.clipping_norm is not None:
            norm = self.clipping_norm()  # the norm the next round clips at
            rec["privacy"].update(clipping_norm_next=norm)
        released = server_round in self.ledger.spent  # counted as it left the server
        # a skipped round released nothing: it carries what was spent so far (with a release counted before a restart)
        spent = self.ledger.spent.pop(server_round) if released else self.ledger.so_far()
        rec["privacy"].update(spent)
        if released and spent["epsilon"] is not None:
            say(f"round {server_round}: privacy spent epsilon {spent['epsilon']:.3f} at delta {spent['delta']:g}")

    def _evaluate(self, server_round: int, rec: dict) -> MetricRecord:
        start = time.perf_counter()
        result = evaluate_cases(
            self.student, self.cases, self.cfg, subsets=self.subsets, device=self.device, progress=False
        )
        result.write(self.out / "eval", stem=f"round_{server_round}")
        summary = result.summary()
        rec["global"] = summary
        rec["eval_seconds"] = time.perf_counter() - start
        dice = ", ".join(f"{r} {summary[f'{r}_dice']:.3f}" for r in REGIONS)
        say(f"round {server_round}: global Dice {dice} (mean {summary['mean_dice']:.3f}; held-out test)")
        for hit in result.collapse() if server_round > 0 else ():  # the untrained model is not a collapse
            flag_collapse(rec, server_round, "global evaluation", describe_collapse(hit))
        return MetricRecord({k: float(v) for k, v in summary.items()})
