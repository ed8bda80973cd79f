"""``REPORT.md`` of a federated run: the rounds, the faults, privacy, collapse warnings and the 15-subset table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mstkd.atomic import copy_file, write_text
from mstkd.data.labels import REGIONS
from mstkd.evaluate import last_tables
from mstkd.runconfig import RunConfig
from mstkd.tracking import Tracker
from server.evaluation import say
from server.phases import phases_line, phases_markdown, time_phases, write_phases
from server.runlog import RunLog


def describe_best(best: dict) -> str:
    if best.get("round") is None:
        return "the final model (no site had validation cases to choose by)"
    return f"round {best['round']} (site-validation mean Dice {best['val_mean_dice']:.3f})"


@dataclass(frozen=True)
class Verdict:
    """Whether a run learned anything, in one line."""

    learned: bool
    text: str


def moved_threshold(transport: str) -> float:
    """The relative step below which a round changed nothing but rounding: the transport dtype's machine epsilon
    (nodes that send back the model they were given move it by its rounding to that dtype), at least 1e-6."""
    return max(1e-6, float(np.finfo(np.dtype(transport)).eps))


def outcome(runlog: RunLog, first_round: int, *, transport: str = "float32", changed: bool | None = None) -> Verdict:
    """How many of this run's rounds aggregated, and whether the global model changed at all: beyond rounding to
    the transport dtype in some round (the round loop records ``step_relative``), or as ``changed`` says where the
    loop records no steps (secure aggregation)."""
    rounds = [r for r in sorted(runlog.records) if r >= max(first_round, 1)]
    aggregated = [r for r in rounds if "skipped" not in runlog.records[r]]
    if changed is None:
        threshold = moved_threshold(transport)
        changed = any(runlog.records[r].get("step_relative", 0.0) > threshold for r in aggregated)
    refused = sum(f.get("kind") == "refused" for r in rounds for f in runlog.records[r]["failures"])
    text = f"{len(aggregated)} of {len(rounds)} rounds aggregated"
    if refused:
        text += f", {refused} replies refused"
    if not aggregated:
        text = f"no round aggregated ({text})"
    elif not changed:
        text = f"the global model never changed ({text})"
    return Verdict(bool(aggregated) and changed, text)


MARKDOWN = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>!|~"})
AUTOLINK = re.compile(r"://|(?i:www)\.|@")
"""What GitHub's Markdown turns into a link even as plain text: a scheme's ``://``, ``www.`` and an e-mail's ``@``
(every ``@``: an escape inside the address, as in ``evil\\_x.org``, may not stop the link)."""


def plain(text: object) -> str:
    """``text`` (which may come from a node) shown as itself in Markdown: no link, image, HTML or table cell. A bare
    address is defanged (``https[:]//``, ``www[.]``, ``a[@]b.org``), which GitHub would otherwise link."""
    escaped = str(text).translate(MARKDOWN)
    return AUTOLINK.sub(lambda m: {"://": "\\[:\\]//", "@": "\\[@\\]"}.get(m[0], m[0][:-1] + "\\[.\\]"), escaped)


def code(text: object) -> str:
    """``text`` (which may come from elsewhere) as inline code, outside a table: Markdown renders nothing inside
    it, and a backtick or a line break, which would end it, becomes a quote or a space."""
    return "`" + " ".join(str(text).replace("`", "'").splitlines()) + "`"


def _faults(record: dict) -> str:
    """What went wrong in a round, for the report: failed or silent nodes, updates scaled down, counts cut to what
    ``site-cases`` lists, nodes that sat the round out, a skipped round."""
    parts = [  # a resumed run's records come from a file: every part is shown as text
        f"node {plain(f.get('node'))} ({plain(f.get('stage'))}): {plain(str(f.get('reason'))[:120])}"
        for f in record.get("failures", [])
    ]
    parts += [
        f"node {plain(b.get('node'))}'s update (norm {b['norm']:.3g}) scaled down to update-bound's {b['limit']:.3g}"
        for b in record.get("bounded", [])
    ]
    parts += [  # under SecAgg+ a node's name is its own word: the protocol hides which node sent what
        f"a node calling itself {plain(c.get('site'))} claimed an update of norm {c['claimed']:.3g}, counted as "
        f"update-bound's {c['limit']:.3g} (SecAgg+)"
        for c in record.get("claims-bounded", [])
    ]
    if (average := record.get("secagg-update", {})).get("scaled"):
        parts.append(
            f"the unmasked average's update (norm {average['norm']:.3g}) scaled down to update-bound's "
            f"{average['bound']:.3g} (SecAgg+)"
        )
    parts += [
        f"node {plain(c.get('node'))} ({plain(c.get('stage'))}) claimed {c['claimed']} cases, weighed as the "
        f"{c['most']} site-cases gives"
        for c in record.get("capped", [])
    ]
    if record.get("rested"):
        parts.append(f"nodes {', '.join(plain(n) for n in record['rested'])} sat out (silent before)")
    if record.get("skipped"):
        parts.append(f"**round skipped**: {plain(record['skipped'])}")
    return "; ".join(parts)


def write_report(
    out: Path,
    runlog: RunLog,
    cfg,
    run: RunConfig,
    seconds: float,
    best: dict,
    verdict: Verdict | None = None,
    phases: dict | None = None,
    resumed_after: int | None = None,
) -> Path:
    """``REPORT.md``: the outcome, the Dice curve, the last round's 15-subset table, communication and timing.

    The table is pasted from ``eval/round_<n>.md`` only where this server wrote it (a round after
    ``resumed_after``); a resumed run's folder may come from elsewhere, so an older table is named, not pasted."""
    rows = runlog.rows()
    evaluated = [r for r in sorted(runlog.records) if runlog.records[r].get("global")]
    lines = [f"# Federated MST-KDNet run ({cfg.model.preset}, {run.strategy})", ""]
    if verdict is not None:
        lines += [f"**{'Outcome' if verdict.learned else 'FAILED'}: {verdict.text}.**", ""]
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
        f"Total {seconds:.0f} s. `best.pt`: {describe_best(best)}, chosen on the sites' validation cases; "
        "`last.pt` holds the final global student. The global Dice and HD95 above are on the held-out "
        "test cases, scored for reporting only.",
        "",
    ]
    if runlog.stopped:
        lines += [f"**The run ended early**: {runlog.stopped}.", ""]
    spent = [(r, runlog.records[r]["privacy"]) for r in sorted(runlog.records) if "privacy" in runlog.records[r]]
    if spent:
        p = spent[-1][1]
        adaptive = p.get("clipping") == "adaptive"
        clipping = (
            f"adaptive clipping from {p['clipping_norm']:g} towards the {p['target_quantile']:g} quantile of the "
            f"update norms (norm per round below)"
            if adaptive
            else f"clipping at {p['clipping_norm']:g} (noise stdev {p['noise_stdev']:.3g} per weight)"
        )
        lines += [
            "## Differential privacy",
            "",
            f"{p['mode']}-side {clipping}, noise multiplier {p['noise_multiplier']:g}, {p['sampled_nodes']} sites "
            "per round. Client-level epsilon from Flower's RDP accountant, one release per aggregated round, no "
            "amplification by sampling. It covers the released models, not the sites' metrics in this report and "
            "`metrics.csv` (losses, validation Dice, case counts, update norms), nor which sites replied.",
            "",
            "| round | epsilon | delta |" + (" next clipping norm |" if adaptive else ""),
            "|---:|---:|---:|" + ("---:|" if adaptive else ""),
        ]
        for r, q in spent:
            eps = f"{q['epsilon']:.3f}" if q.get("epsilon") is not None else "unbounded (no noise)"
            norm = f" {q['clipping_norm_next']:.4g} |" if adaptive and "clipping_norm_next" in q else ""
            lines.append(f"| {r} | {eps} | {q.get('delta', p['delta']):g} |{norm}")
        lines.append("")
    flagged = [(r, c) for r in sorted(runlog.records) for c in runlog.records[r].get("collapse", [])]
    if flagged:
        lines += ["## Collapse warnings", ""]
        lines += [f"- round {r}, {plain(c['where'])}: {plain(c['what'])}" for r, c in flagged]
        lines.append("")
    if evaluated:
        last = evaluated[-1]
        if resumed_after is None or last > resumed_after:
            table = (out / "eval" / f"round_{last}.md").read_text()
        else:
            table = f"Scored before this run resumed after round {resumed_after}: `eval/round_{last}.md`."
        lines += [f"## 15-subset table, round {last}", "", table, ""]
    lines += phases_markdown(phases) if phases else []
    lines += [
        "![global Dice over rounds](dice.png)",
        "",
        "Files: `metrics.csv`/`metrics.jsonl` (per round, per site), `eval/round_<r>.*`, `config.yaml`.",
    ]
    return write_text(out / "REPORT.md", "\n".join(lines) + "\n")


class RunFailed(RuntimeError):
    """The run ended without learning anything: no round aggregated, or the global model never changed."""


def finish_run(
    out: Path,
    runlog: RunLog,
    cfg,
    run: RunConfig,
    seconds: float,
    best: dict,
    first_round: int,
    tracker: Tracker,
    changed: bool | None = None,
) -> None:
    """Close the run: ``best.pt`` when nothing could be chosen, ``REPORT.md``, the tracked run's artefacts, the
    last line; raise :class:`RunFailed` when nothing was learned (after writing everything)."""
    if best.get("round") is None and (out / "last.pt").is_file():
        say("no site reported a validation Dice (no validation cases): best.pt is the final model")
        copy_file(out / "last.pt", out / "best.pt")
    verdict = outcome(runlog, first_round, transport=str(run.transport), changed=changed)
    phases = time_phases(runlog.records, runlog.setup_seconds, runlog.setup_seconds + seconds)
    write_phases(out, phases)
    resumed_after = first_round - 1 if first_round > 1 else None
    report = write_report(out, runlog, cfg, run, seconds, best, verdict, phases, resumed_after)
    final = last_tables(out / "eval", "round_")
    tracker.finish(
        [out / "best.pt", report, out / "metrics.csv", out / "config.yaml", *final], failed=not verdict.learned
    )
    if not verdict.learned:
        say(f"FAILED: {verdict.text}; report {report}")
        raise RunFailed(f"{verdict.text}; see {report}")
    done = f"stopped early ({runlog.stopped})" if runlog.stopped else "finished"
    say(phases_line(phases))
    say(f"{done} in {seconds:.0f} s: {verdict.text}; best.pt: {describe_best(best)}; report {report}")
