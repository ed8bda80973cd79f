"""The per-round record of a federated run: JSON lines, a CSV and a Dice-over-rounds plot.

One record per round (round 0 = the initial global model): wall time of the round, bytes sent
to and received from the nodes, per-site training losses and validation Dice, the
weighted means, and the global Dice/HD95 per region (averaged over the evaluated modality
subsets) when the server evaluated that round. Files are rewritten atomically after every
round, so a crash never leaves a truncated log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mstkd.atomic import atomic_path, write_csv, write_text
from mstkd.data.labels import REGIONS


class RunLog:
    """Collects what happens in each round and writes ``metrics.jsonl``, ``metrics.csv`` and ``dice.png``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.records: dict[int, dict[str, Any]] = {}
        self._started: dict[int, float] = {}

    def record(self, server_round: int) -> dict[str, Any]:
        """The (mutable) record of ``server_round``; the round's clock starts at the first call."""
        if server_round not in self.records:
            self._started[server_round] = time.perf_counter()
            self.records[server_round] = {
                "round": server_round,
                "bytes_sent": 0,
                "bytes_received": 0,
                "sites": {},
                "failures": [],
            }
        return self.records[server_round]

    def site(self, server_round: int, name: str) -> dict[str, Any]:
        return self.record(server_round)["sites"].setdefault(name, {})

    def finish(self, server_round: int) -> None:
        """Close the round: stamp its wall time and rewrite the files."""
        rec = self.record(server_round)
        rec["wall_seconds"] = time.perf_counter() - self._started[server_round]
        self.write()

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows for the CSV: global columns, then ``site:<name>:<metric>`` columns."""
        rows = []
        for r in sorted(self.records):
            rec = self.records[r]
            row = {k: v for k, v in rec.items() if k not in ("sites", "failures", "global")}
            row["failures"] = len(rec["failures"])
            row.update({f"global_{k}": v for k, v in rec.get("global", {}).items()})
            for site, values in sorted(rec["sites"].items()):
                row.update({f"site:{site}:{k}": v for k, v in values.items()})
            rows.append(row)
        return rows

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ordered = [self.records[r] for r in sorted(self.records)]
        write_text(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
        write_csv(self.folder / "metrics.csv", self.rows())
        self.plot()

    def plot(self) -> Path | None:
        """``dice.png``: global Dice per region (and their mean) over rounds."""
        points = [(r, rec["global"]) for r, rec in sorted(self.records.items()) if rec.get("global")]
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [r for r, _ in points]
        for region in REGIONS:
            ax.plot(rounds, [g[f"{region}_dice"] for _, g in points], marker="o", label=region)
        ax.plot(rounds, [g["mean_dice"] for _, g in points], marker="s", color="black", label="mean")
        ax.set_xlabel("round")
        ax.set_ylabel("Dice (mean over evaluated subsets)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Global student on the held-out test set")
        fig.tight_layout()
        path = self.folder / "dice.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return path
