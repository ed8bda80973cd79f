"""Segment one case folder and write the label map in the case's own grid, header and label convention.

The case is read with whatever modalities are on disk (or a named subset of them), normalised
as the checkpoint's training data were, cropped to the brain, segmented by sliding windows,
and pasted back into the full grid. Labels follow the case's layout: FeTS/BraTS <= 2021
cases get 1/2/4, BraTS 2023+ cases get 1/2/3.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mstkd.checkpoint import load_checkpoint
from mstkd.data.cache import BRAIN_MARGIN
from mstkd.data.cases import bounding_box, brain_mask, load_case, normalize
from mstkd.data.labels import labels_from_regions
from mstkd.data.layouts import detect_case
from mstkd.data.nifti import write_volume
from mstkd.errors import InputError
from mstkd.evaluate import segment
from mstkd.modalities import Subset
from mstkd.train import pick_device


def predict_case(
    checkpoint: str | Path,
    case_dir: str | Path,
    out: str | Path,
    *,
    modalities: str | None = None,
    device: str | None = None,
) -> dict:
    """Write the segmentation of ``case_dir`` to ``out`` (``.nii.gz``); return a short summary.

    Raises:
        InputError: bad checkpoint, bad case files, or ``modalities`` naming one not on disk.
    """
    dev = pick_device(device)
    net, cfg, payload = load_checkpoint(checkpoint, dev)
    files = detect_case(case_dir)
    subset = Subset.parse(modalities) if modalities else Subset.of(files.available)
    missing = [m for m in subset.modalities if m not in files.images]
    if missing:
        raise InputError(f"{files.folder}: --modalities names {', '.join(missing)}, which the case does not have")
    start = time.perf_counter()
    case = load_case(files, required=subset.modalities, with_seg=False)
    image = case.image * np.asarray(subset.mask, dtype=np.float32)[:, None, None, None]
    mask = brain_mask(image)
    if not mask.any():
        raise InputError(f"{files.folder}: every voxel of the chosen modalities is zero")
    crop = tuple(slice(a, b) for a, b in bounding_box(mask, margin=BRAIN_MARGIN))
    normalised = normalize(image, str(cfg.data.normalization), mask)[(slice(None), *crop)]
    regions = np.zeros((3, *image.shape[1:]), dtype=bool)
    regions[(slice(None), *crop)] = segment(net, normalised, subset, cfg, dev)
    labels = labels_from_regions(regions, files.convention)
    write_volume(out, labels, case.affine, case.header)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {
        "case": files.case_id,
        "modalities": subset.name,
        "convention": files.convention.name,
        "seconds": time.perf_counter() - start,
        "out": str(out),
        "labels": sorted(int(v) for v in np.unique(labels)),
        "cuda_peak_bytes": peak,
        "trained_convention": payload["convention"],
    }
