"""The benchmark report's plot: the validation Dice of every arm over rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mstkd.atomic import atomic_path, write_csv
from simulations.scenario import ARMS


def validation_curves(results: dict[str, list[dict]], bench: Path) -> Path:
    """``curves.png`` (one panel per arm, mean ± sd over seeds, the full method's mean dashed behind every other
    arm) and ``curves.csv`` (arm, round, mean, sd, seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    means: dict[str, tuple[list[float], np.ndarray, np.ndarray]] = {}
    for name, runs in results.items():
        points: dict[float, list[float]] = {}
        for result in runs:
            for x, y in result["curve"]:
                if y is not None:
                    points.setdefault(float(x), []).append(float(y))
        xs = sorted(points)
        if not xs:
            continue
        mean = np.array([np.mean(points[x]) for x in xs])
        sd = np.array([np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs])
        means[name] = (xs, mean, sd)
        rows += [
            {"arm": name, "round": x, "val_mean_dice": m, "sd": s, "seeds": len(points[x])}
            for x, m, s in zip(xs, mean, sd, strict=True)
        ]
    cols = min(4, max(len(means), 1))
    grid = max(1, -(-len(means) // cols))
    fig, axes = plt.subplots(grid, cols, figsize=(3.2 * cols, 2.6 * grid), sharey=True, squeeze=False)
    for ax, (name, (xs, mean, sd)) in zip(axes.flat, means.items(), strict=False):
        if name != "mstkd" and "mstkd" in means:
            ax.plot(means["mstkd"][0], means["mstkd"][1], "--", color="grey", linewidth=1)
        ax.plot(xs, mean, "-" if ARMS[name].federated else ":", marker=".", color="C0")
        ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2, color="C0")
        ax.set_title(ARMS[name].label, fontsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(means) :]:
        ax.axis("off")
    fig.supxlabel("round (centralised: epochs / local epochs)", fontsize=8)
    fig.supylabel("validation Dice, all four modalities", fontsize=8)
    fig.tight_layout()
    with atomic_path(bench / "curves.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_csv(bench / "curves.csv", rows or [{"arm": "", "round": "", "val_mean_dice": ""}])
    return bench / "curves.png"
