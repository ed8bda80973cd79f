"""Where a federated run's time went, phase by phase, from its round records (``REPORT.md``, ``phases.json``).

- **set-up**: the server app before its first round: agreeing the target geometry with the nodes (which read, or
  generate, and cache their cases for it), building the model;
- **site training** and **site validation**: the nodes' own clocks (``train-time-train``, ``val-time-evaluate``),
  summed over sites and rounds;
- **node overhead**: the rest of the nodes' clocks: process start-up, config, data, building the networks,
  loading and saving their state, the reply;
- **global evaluation**: the server scoring the global model on the held-out cases;
- **checkpoints**: the server writing ``last.pt`` and ``best.pt``;
- **other**: the rounds' wall time not accounted for above: transfer, aggregation, scheduling.

In a simulation on one machine the sites take turns, so their sums add up to wall time; on a deployment they
overlap, the sums exceed the rounds' wall time and "other" is not given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mstkd.atomic import write_text

PHASES = (
    "set-up",
    "site training",
    "site validation",
    "node overhead",
    "global evaluation",
    "checkpoints",
    "other",
)
FILE = "phases.json"


def time_phases(records: dict[int, dict[str, Any]], setup_seconds: float, total_seconds: float) -> dict[str, Any]:
    """``{"seconds": {phase: s or None}, "total": s}`` from the run's round records (:class:`server.runlog.RunLog`)."""
    sites = [s for r in records.values() for s in r.get("sites", {}).values()]

    def node(*keys: str) -> float:
        return float(sum(float(s.get(k, 0.0)) for s in sites for k in keys))

    clocks = {k for s in sites for k in s if k.startswith(("train-time-", "val-time-"))}
    own = {
        "site training": node("train-time-train"),
        "site validation": node("val-time-evaluate"),
        "node overhead": node(*(clocks - {"train-time-train", "val-time-evaluate"})),
        "global evaluation": float(sum(r.get("eval_seconds", 0.0) for r in records.values())),
        "checkpoints": float(sum(r.get("write_seconds", 0.0) for r in records.values())),
    }
    rounds = float(sum(r.get("wall_seconds", 0.0) for r in records.values()))
    other = rounds - sum(own.values())
    seconds = {"set-up": float(setup_seconds), **own, "other": other if other >= 0 else None}
    return {"seconds": seconds, "rounds": rounds, "total": float(total_seconds)}


def write_phases(out: Path, phases: dict[str, Any]) -> Path:
    return write_text(out / FILE, json.dumps(phases, indent=1) + "\n")


def phases_markdown(phases: dict[str, Any]) -> list[str]:
    """The report's section: one row per phase with its share of the server app's wall time."""
    total = phases["total"] or 1.0
    lines = ["## Where the time went", "", "| phase | seconds | share |", "|---|---:|---:|"]
    for name in PHASES:
        value = phases["seconds"].get(name)
        cells = "– | –" if value is None else f"{value:.1f} | {100 * value / total:.0f} %"
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        f"Of {total:.0f} s in the server app ({phases['rounds']:.0f} s in rounds). Site times are summed over sites "
        "and rounds: in a simulation on one machine the sites take turns; where they run side by side the sums "
        "exceed the rounds' time and 'other' is not given. Source: `phases.json`.",
        "",
    ]
    return lines


def phases_line(phases: dict[str, Any]) -> str:
    """One line for the end of a run: ``time: set-up 12 s, site training 250 s, ...``."""
    parts = [f"{name} {value:.0f} s" for name, value in phases["seconds"].items() if value is not None]
    return "time: " + ", ".join(parts)
