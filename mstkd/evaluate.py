"""Evaluation of a student on held-out cases under every modality subset, as the paper's Tables 1-4.

For each case and each subset, the absent modalities are zero-filled, the whole
(brain-cropped) volume is segmented by sliding-window inference, the four class
probabilities (NETC, ED, ET, BG) are decoded into classes (``eval.decode``) and the regions
follow (WT = NETC | ED | ET, TC = NETC | ET, ET), and Dice, HD95, sensitivity and
specificity are computed per region with :mod:`mstkd.metrics`. HD95 for a missed or
hallucinated region is the diagonal of the case's original grid. The table has one row per
subset in the paper's order plus the average row, and is written as CSV, JSON and Markdown.

With ``eval.et_min_mm3`` above 0, every row also holds ET's scores after the RFNet protocol's post-processing
(:mod:`mstkd.postprocess`: a predicted ET under that many mm³ becomes necrosis), ``ET_pp_dice`` and ``ET_pp_hd95``,
and whether it dropped ET (``ET_pp_dropped``), so that the rule is chosen on validation cases. With thresholds in
``et_sweep`` (``mstkd evaluate --et-sweep``), the result also scores the rule at each of them from the same predictions
(:func:`mstkd.postprocess.sweep`) and names the best.

With ``eval.lesion`` set to a mode of :data:`mstkd.lesion.LESION_MODES` (``brats2023``: the BraTS 2023
ranking's rules), every row also holds that mode's lesion-wise scores per region (``<R>_lesion_dice``, ...).

Each row also holds the predicted and reference volume of every region and its share of the
brain, so that a collapsed model (a region predicted over most of the brain) is flagged
(:meth:`EvalResult.collapse`) instead of passing as a merely low Dice.
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
from mstkd.data.labels import REGIONS, regions_from_classes
from mstkd.losses import probabilities
from mstkd.metrics import score_regions, volume_diagonal
from mstkd.modalities import SUBSETS, Subset, zero_fill
from mstkd.modalities import parse_subsets as parse_subsets  # re-exported: callers import it from here
from mstkd.model import MSTKDNet
from mstkd.postprocess import EtCase, describe, mm3, sweep, sweep_markdown, voxel_mm3
from mstkd.train import autocast, pick_device

METRICS = ("dice", "hd95", "sensitivity", "specificity")


def decode(probs: np.ndarray, how: str = "threshold", threshold: float = 0.5) -> np.ndarray:
    """``4 x ...`` class probabilities (NETC, ED, ET, BG) -> ``3 x ...`` nested boolean ET, TC, WT.

    ``threshold``: every tumour class whose probability exceeds ``threshold`` (the official decoding;
    with sigmoid outputs the classes may overlap, and each region is the union of its classes).
    ``argmax``: the likeliest class per voxel (exclusive; background competes).
    """
    if how == "threshold":
        return regions_from_classes(probs[:3] > threshold)
    if how == "argmax":
        best = probs.argmax(0)
        return regions_from_classes(np.stack([best == c for c in range(3)]))
    raise ValueError(f"decode: how must be 'threshold' or 'argmax' (eval.decode='auto' is resolved first), got {how!r}")


MIRROR_AXES = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
"""Test-time augmentation: every combination of mirroring the three spatial axes (nnU-Net's)."""


def segment(
    net: MSTKDNet,
    image: torch.Tensor | np.ndarray,
    subset: Subset,
    cfg: DictConfig,
    device: torch.device | None = None,
    *,
    mirror: bool = False,
) -> np.ndarray:
    """``4 x H x W x D`` normalised image -> ``3 x H x W x D`` nested boolean ET, TC, WT (see :func:`decode`)."""
    return decode_for(cfg, class_probabilities(net, image, subset, cfg, device, mirror=mirror))


def resolve_decode(how: str, activation: str) -> str:
    """``eval.decode`` with ``auto`` resolved by ``loss.activation``: argmax for softmax, else threshold (measured on
    validation cases: argmax suits softmax, and ruins sigmoid outputs); any other value as it is."""
    if how == "auto":
        return "argmax" if activation == "softmax" else "threshold"
    return how


def decode_for(cfg: DictConfig, probs: np.ndarray) -> np.ndarray:
    """:func:`decode` with the config's rule (``eval.decode``, :func:`resolve_decode`)."""
    how = resolve_decode(str(cfg.eval.decode), str(cfg.loss.activation))
    return decode(probs, how, float(cfg.eval.threshold))


@torch.no_grad()
def class_probabilities(
    net: MSTKDNet,
    image: torch.Tensor | np.ndarray,
    subset: Subset,
    cfg: DictConfig,
    device: torch.device | None = None,
    *,
    mirror: bool = False,
) -> np.ndarray:
    """``4 x H x W x D`` normalised image -> ``4 x H x W x D`` float32 class probabilities (NETC, ED, ET, BG).

    Sliding windows of ``eval.roi`` (default: the model's input size) with ``eval.overlap`` and
    Gaussian blending; any volume size works (windows are padded at the border). ``mirror``
    averages the class probabilities of the 8 mirrored copies (:data:`MIRROR_AXES`), 8x the cost.
    """
    device = device or next(net.parameters()).device
    net.eval()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
    x = zero_fill(x, subset)
    roi = tuple(cfg.eval.roi or cfg.model.input_size)
    activation = str(cfg.loss.activation)
    probs = None
    for axes in MIRROR_AXES if mirror else ((),):
        flipped = x.flip(axes) if axes else x
        with autocast(device, bool(cfg.train.amp)):
            logits = sliding_window_inference(
                flipped,
                roi,
                int(cfg.eval.sw_batch_size),
                net.segment,
                overlap=float(cfg.eval.overlap),
                mode=str(cfg.eval.blend),
            )
        p = probabilities(logits.float(), activation)
        p = p.flip(axes) if axes else p
        probs = p if probs is None else probs + p
    return (probs / (len(MIRROR_AXES) if mirror else 1))[0].cpu().numpy()


@dataclass
class EvalResult:
    """Per case and subset scores, and the paper-format summary built from them."""

    rows: list[dict] = field(default_factory=list)  # case, subset, <region>_<metric>, <region>_share|pred|ref
    hd95: str = "max"
    lesion: str = ""  # the lesion-wise mode the rows hold, if any
    et_min_mm3: float = 0.0  # the ET post-processing's threshold the rows hold scores for (0: none)
    et_sweep: tuple[float, ...] = ()  # thresholds the rule is also scored at, from the same predictions
    et_cases: dict[str, list[EtCase]] = field(default_factory=dict)  # per subset, what the sweep needs
    collapse_share: float = 0.5
    collapse_ratio: float = 10.0

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
        """The average row (``<region>_<metric>``, ``<region>_share|pred|ref``), ``mean_dice``, the largest
        share of the brain each region takes under any subset (``<region>_share_max``) and how many regions
        :meth:`collapse` flags (``collapsed``)."""
        table = self.table()
        return {
            **{k: v for k, v in table[-1].items() if k not in ("subset", "display", "cases")},
            "mean_dice": self.mean_dice(),
            **{f"{r}_share_max": max(row[f"{r}_share"] for row in table[:-1]) for r in REGIONS},
            "collapsed": float(len(self.collapse())),
        }

    def collapse(self) -> list[dict]:
        """:func:`find_collapse` on this table's subset rows, with this result's limits."""
        return find_collapse(self.table()[:-1], self.collapse_share, self.collapse_ratio)

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
        lines += [f"\n**Collapse:** {describe_collapse(hit)}." for hit in self.collapse()]
        sweep_lines = sweep_markdown(self.sweep(), n) if self.et_sweep else []
        return "\n".join(lines + self._postprocessed_markdown() + sweep_lines + self._lesion_markdown())

    def sweep(self) -> list[dict[str, float]]:
        """The rule's scores at each threshold of ``et_sweep`` (:func:`mstkd.postprocess.sweep`)."""
        return sweep(self.et_cases, self.et_sweep) if self.et_sweep else []

    def _postprocessed_markdown(self) -> list[str]:
        """ET with and without the post-processing, per subset, when the rows hold it."""
        if not self.rows or "ET_pp_dice" not in self.rows[0]:
            return []
        lines = [
            "",
            "| Subset | Dice ET | Dice ET, post-processed | HD95 ET | HD95 ET, post-processed | ET dropped |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.table():
            name = f"**{row['display']}**" if row["subset"] == "average" else row["display"]
            lines.append(
                f"| {name} | {100 * row['ET_dice']:.1f} | {100 * row['ET_pp_dice']:.1f} | {row['ET_hd95']:.2f} "
                f"| {row['ET_pp_hd95']:.2f} | {100 * row['ET_pp_dropped']:.0f}% |"
            )
        return lines + [
            "",
            f"Post-processed: {describe(self.et_min_mm3)}. Choose it on validation cases (`--split val`); "
            f"`mstkd predict --et-min-mm3 {mm3(self.et_min_mm3)}` applies it.",
        ]

    def _lesion_markdown(self) -> list[str]:
        """Lesion-wise Dice and HD95 per subset, when the rows hold them."""
        if not self.rows or "ET_lesion_dice" not in self.rows[0]:
            return []
        lines = [
            "",
            "| Subset | Lesion Dice ET | Lesion Dice TC | Lesion Dice WT | Lesion HD95 ET | Lesion HD95 TC "
            "| Lesion HD95 WT |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.table():
            name = f"**{row['display']}**" if row["subset"] == "average" else row["display"]
            dice = " | ".join(f"{100 * row[f'{r}_lesion_dice']:.1f}" for r in REGIONS)
            hd = " | ".join(f"{row[f'{r}_lesion_hd95']:.2f}" for r in REGIONS)
            lines.append(f"| {name} | {dice} | {hd} |")
        return lines + ["", f"Lesion-wise scores ({self.lesion}): mean over cases."]

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
        write_csv(paths["cases"], self.rows, None if self.rows else ["subset"], outside=("case",))
        settings = {"hd95": self.hd95, "et_min_mm3": self.et_min_mm3, "lesion": self.lesion, "et_sweep": self.sweep()}
        write_text(paths["json"], json.dumps({"table": self.table(), "cases": self.rows, **settings}, indent=1))
        write_text(paths["md"], self.markdown() + "\n")
        return paths


def last_tables(folder: Path, prefix: str) -> list[Path]:
    """The Markdown, CSV and JSON tables that :meth:`EvalResult.write` left in ``folder`` under the stem
    ``<prefix><n>`` with the largest ``n`` (``round_5``, ``val_epoch20``); none when there is none."""
    stems = [p.stem for p in folder.glob(f"{prefix}*.md") if p.stem.removeprefix(prefix).isdigit()]
    last = max(stems, key=lambda stem: int(stem.removeprefix(prefix)), default=None)
    return [folder / f"{last}{suffix}" for suffix in (".md", ".csv", ".json")] if last else []


def find_collapse(rows: Sequence[dict], share_limit: float = 0.5, ratio_limit: float = 10.0) -> list[dict]:
    """Regions predicted over more than ``share_limit`` of the brain, or at more than ``ratio_limit`` times
    their reference volume, in some of ``rows`` (one per subset, case means, as :meth:`EvalResult.table`):
    per such region, its worst subset as ``{"region", "subset", "share", "ratio"}`` (ratio None when no
    case has the region)."""
    flagged: dict[str, dict] = {}
    for row in rows:
        for r in REGIONS:
            share = row[f"{r}_share"]
            ratio = row[f"{r}_pred"] / row[f"{r}_ref"] if row[f"{r}_ref"] > 0 else None
            if share > share_limit or (ratio is not None and ratio > ratio_limit):
                if r not in flagged or share > flagged[r]["share"]:
                    flagged[r] = {"region": r, "subset": row["subset"], "share": share, "ratio": ratio}
    return [flagged[r] for r in REGIONS if r in flagged]


def describe_collapse(hit: dict) -> str:
    """One phrase for a flagged region of :meth:`EvalResult.collapse`."""
    ratio = f", {hit['ratio']:.1f}x its reference volume" if hit["ratio"] is not None else ""
    subset = Subset.parse(hit["subset"]).display_name
    return f"{hit['region']} predicted in {100 * hit['share']:.0f}% of the brain with {subset}{ratio}"


def evaluate_cases(
    net: MSTKDNet,
    entries: Sequence[CachedCase],
    cfg: DictConfig,
    *,
    subsets: Sequence[Subset] = SUBSETS,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "evaluate",
    et_sweep: Sequence[float] = (),
) -> EvalResult:
    """Score ``net`` on every case of ``entries`` under every subset in ``subsets``, and the small-ET rule at each
    threshold of ``et_sweep`` (checked by the caller)."""
    lesion = str(cfg.eval.get("lesion") or "")
    if lesion:
        from mstkd.lesion import check_mode, stack_scores

        check_mode(lesion)
    device = device or pick_device()
    net.to(device)
    result = EvalResult(
        hd95=str(cfg.metrics.hd95),
        lesion=lesion,
        et_min_mm3=float(cfg.eval.et_min_mm3),
        et_sweep=tuple(float(t) for t in et_sweep),
        collapse_share=float(cfg.eval.collapse_share),
        collapse_ratio=float(cfg.eval.collapse_ratio),
    )
    bar = tqdm(total=len(entries) * len(subsets), desc=desc, unit="scan", disable=not progress, leave=False)
    for entry in entries:  # what does not depend on the subset is read and computed once per case
        ref = entry.regions()
        if ref is None:
            raise ValueError(f"case {entry.case_id} has no label map to evaluate against")
        image = entry.image()
        brain = np.any(np.asarray(image) != 0, axis=0)
        brain_voxels = max(int(brain.sum()), 1)
        ref_voxels = {f"{r}_ref": int(ref[i].sum()) for i, r in enumerate(REGIONS)}
        spacing = entry.meta["spacing"]
        empty = cfg.metrics.empty_hd95
        empty = volume_diagonal(entry.meta["shape"], spacing) if empty is None else float(empty)
        for subset in subsets:
            pred = segment(net, image, subset, cfg, device)
            scores = score_regions(pred, ref, spacing, hd95=str(cfg.metrics.hd95), empty_hd95=empty)
            result.rows.append(
                {
                    "case": entry.case_id,
                    "subset": subset.name,
                    **{f"{r}_{m}": scores[r][m] for r in REGIONS for m in METRICS},
                    **{f"{r}_share": float((pred[i] & brain).sum()) / brain_voxels for i, r in enumerate(REGIONS)},
                    **{f"{r}_pred": int(pred[i].sum()) for i, r in enumerate(REGIONS)},
                    **ref_voxels,
                }
            )
            row = result.rows[-1]
            et = EtCase(row["ET_pred"] * voxel_mm3(spacing), row["ET_ref"] > 0, row["ET_dice"], row["ET_hd95"], empty)
            if result.et_sweep:
                result.et_cases.setdefault(subset.name, []).append(et)
            if result.et_min_mm3 > 0:
                dice, hd95, dropped = et.scores(result.et_min_mm3)
                row.update(ET_pp_dice=dice, ET_pp_hd95=hd95, ET_pp_dropped=float(dropped))
            if lesion:
                scored = stack_scores(lesion, pred, ref, spacing)
                result.rows[-1].update({f"{r}_{m}": v for r in REGIONS for m, v in scored[r].items()})
            bar.update()
    bar.close()
    return result
