"""Evaluation of a student on held-out cases under every modality subset, as the paper's Tables 1-4.

For each case and each subset, the absent modalities are zero-filled, the whole
(brain-cropped) volume is segmented by sliding-window inference, the region probabilities
are thresholded and nested (ET within TC within WT, as the written label map would be),
and Dice, HD95, sensitivity and specificity are computed per region with
:mod:`mstkd.metrics`. HD95 for a missed or hallucinated region is the diagonal of the
case's original grid. The table has one row per subset in the paper's order plus the
average row, and is written as CSV, JSON and Markdown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mstkd.atomic import write_csv, write_text
from mstkd.data.cache import CachedCase
from mstkd.data.labels import REGIONS
from mstkd.metrics import score_regions, volume_diagonal
from mstkd.modalities import FULL, SUBSETS, Subset, zero_fill
from mstkd.model import MSTKDNet
from mstkd.train import autocast, pick_device

METRICS = ("dice", "hd95", "sensitivity", "specificity")


def nest_regions(regions: np.ndarray) -> np.ndarray:
    """Make ``3 x ...`` ET, TC, WT masks nested: TC |= ET, WT |= TC."""
    et, tc, wt = regions
    tc = tc | et
    return np.stack([et, tc, wt | tc])


@torch.no_grad()
def segment(
    net: MSTKDNet, image: torch.Tensor | np.ndarray, subset: Subset, cfg: DictConfig, device: torch.device | None = None
) -> np.ndarray:
    """``4 x H x W x D`` normalised image -> ``3 x H x W x D`` nested boolean ET, TC, WT.

    Sliding windows of ``eval.roi`` (default: the model's input size) with ``eval.overlap`` and
    Gaussian blending; any volume size works (windows are padded at the border).
    """
    device = device or next(net.parameters()).device
    net.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
    x = zero_fill(x, subset)
    roi = tuple(cfg.eval.roi or cfg.model.input_size)
    with autocast(device, bool(cfg.train.amp)):
        logits = sliding_window_inference(
            x,
            roi,
            int(cfg.eval.sw_batch_size),
            net.segment,
            overlap=float(cfg.eval.overlap),
            mode=str(cfg.eval.blend),
        )
    probs = torch.sigmoid(logits.float())[0].cpu().numpy()
    return nest_regions(probs > float(cfg.eval.threshold))


def parse_subsets(spec) -> tuple[Subset, ...]:
    """``all`` -> the 15 subsets; ``full`` -> all four only; names (a list, or one string split at commas
    and spaces, e.g. ``"flair flair+t1ce"``) -> those subsets, in paper order."""
    if spec in (None, "all"):
        return SUBSETS
    if spec == "full":
        return (FULL,)
    names = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    chosen = {FULL if n == "full" else Subset.parse(n) for n in names}
    return tuple(s for s in SUBSETS if s in chosen)


@dataclass
class EvalResult:
    """Per case and subset scores, and the paper-format summary built from them."""

    rows: list[dict] = field(default_factory=list)  # case, subset, <region>_<metric>
    hd95: str = "max"

    def subsets(self) -> list[str]:
        seen = dict.fromkeys(r["subset"] for r in self.rows)
        return [s.name for s in SUBSETS if s.name in seen]

    def table(self) -> list[dict]:
        """One row per subset (paper order) plus ``Average``: mean over cases of each region metric."""
        out = []
        for name in self.subsets():
            rows = [r for r in self.rows if r["subset"] == name]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("case", "subset")}
            out.append({"subset": name, "display": Subset.parse(name).display_name, "cases": len(rows), **mean})
        if out:
            keys = [k for k in out[0] if k not in ("subset", "display", "cases")]
            out.append(
                {
                    "subset": "average",
                    "display": "Average",
                    "cases": out[0]["cases"],
                    **{k: float(np.mean([r[k] for r in out])) for k in keys},
                }
            )
        return out

    def mean_dice(self) -> float:
        """Dice averaged over regions and subsets (the average row)."""
        avg = self.table()[-1]
        return float(np.mean([avg[f"{r}_dice"] for r in REGIONS]))

    def summary(self) -> dict[str, float]:
        """The average row: ``<region>_<metric>`` and ``mean_dice``."""
        avg = self.table()[-1]
        return {
            **{k: v for k, v in avg.items() if k not in ("subset", "display", "cases")},
            "mean_dice": self.mean_dice(),
        }

    def markdown(self) -> str:
        head = "| Subset | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT |"
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
        for row in self.table():
            name = f"**{row['display']}**" if row["subset"] == "average" else row["display"]
            dice = " | ".join(f"{100 * row[f'{r}_dice']:.1f}" for r in REGIONS)
            hd = " | ".join(f"{row[f'{r}_hd95']:.2f}" for r in REGIONS)
            lines.append(f"| {name} | {dice} | {hd} |")
        n = self.table()[0]["cases"] if self.rows else 0
        lines.append("")
        lines.append(
            f"Dice in %, HD95 in mm ({'max of directed' if self.hd95 == 'max' else 'pooled'} 95th "
            f"percentiles; a region missed or hallucinated scores the volume diagonal), mean over {n} cases."
        )
        return "\n".join(lines)

    def write(self, out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
        """Write ``<stem>.csv`` (the 15+1 table), ``<stem>_cases.csv``, ``<stem>.json`` and ``<stem>.md``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": out_dir / f"{stem}.csv",
            "cases": out_dir / f"{stem}_cases.csv",
            "json": out_dir / f"{stem}.json",
            "md": out_dir / f"{stem}.md",
        }
        table = self.table()
        write_csv(paths["csv"], table, None if table else ["subset"])
        write_csv(paths["cases"], self.rows, None if self.rows else ["subset"])
        write_text(paths["json"], json.dumps({"table": self.table(), "cases": self.rows, "hd95": self.hd95}, indent=1))
        write_text(paths["md"], self.markdown() + "\n")
        return paths


def evaluate_cases(
    net: MSTKDNet,
    entries: Sequence[CachedCase],
    cfg: DictConfig,
    *,
    subsets: Sequence[Subset] = SUBSETS,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """Score ``net`` on every case of ``entries`` under every subset in ``subsets``."""
    device = device or pick_device()
    net.to(device)
    result = EvalResult(hd95=str(cfg.metrics.hd95))
    todo = [(e, s) for e in entries for s in subsets]
    for entry, subset in tqdm(todo, desc=desc, unit="scan", disable=not progress, leave=False):
        ref = entry.regions()
        if ref is None:
            raise ValueError(f"case {entry.case_id} has no label map to evaluate against")
        pred = segment(net, entry.image(), subset, cfg, device)
        spacing = entry.meta["spacing"]
        empty = cfg.metrics.empty_hd95
        empty = volume_diagonal(entry.meta["shape"], spacing) if empty is None else float(empty)
        scores = score_regions(pred, ref, spacing, hd95=str(cfg.metrics.hd95), empty_hd95=empty)
        result.rows.append(
            {
                "case": entry.case_id,
                "subset": subset.name,
                **{f"{r}_{m}": scores[r][m] for r in REGIONS for m in METRICS},
            }
        )
    return result
