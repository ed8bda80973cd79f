"""Phantom federations on disk: cases split over sites, NIfTI files, a partition CSV and the generator's record.

Case number ``n`` (counted from ``first_case``, 1 by default, site by site) is made by
:func:`~mstkd.phantoms.case.make_case` from a generator seeded ``[seed, n]`` with the style of its site ``p``,
``site_style(p, seed)``; nothing else draws, so the same arguments write the same voxel data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np

from mstkd.atomic import file_lock
from mstkd.data.labels import get_convention
from mstkd.data.layouts import Layout, file_endings
from mstkd.data.nifti import write_volume
from mstkd.errors import InputError
from mstkd.phantoms.case import make_case
from mstkd.phantoms.recipe import (
    _ID_FORMAT,
    AXIS_SCALE,
    BIAS_SIGMA_MM,
    BOUNDARY_NOISE_AMPLITUDE_MM,
    BOUNDARY_NOISE_SIGMA_MM,
    CORE_RADIUS_MM,
    EDEMA,
    EDEMA_THICKNESS_MM,
    ENHANCING,
    INTENSITY_SCALE,
    MAX_CASES,
    NECROSIS,
    RIM_THICKNESS_MM,
    TISSUE_INTENSITY,
    TUMOUR_INTENSITY,
    _check_shape,
    _spacing,
    phantom_affine,
    site_style,
)


def _site_counts(cases: int, weights: Sequence[float]) -> list[int]:
    """Split ``cases`` over sites in proportion to ``weights``, at least one case each (largest remainder)."""
    w = np.asarray(weights, dtype=float)
    quota = cases * w / w.sum()
    counts = np.maximum(np.floor(quota).astype(int), 1)
    while counts.sum() < cases:
        counts[int(np.argmax(quota - counts))] += 1
    while counts.sum() > cases:
        spare = np.where(counts > 1, quota - counts, np.inf)
        counts[int(np.argmin(spare))] -= 1
    return [int(c) for c in counts]


def _case_header(affine: np.ndarray) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return header


def write_federation(
    out: Path,
    *,
    cases: int,
    sites: int,
    shape: Sequence[int] = (96, 96, 64),
    layout: str = "fets",
    seed: int = 0,
    site_sizes: Sequence[float] | None = None,
    first_case: int = 1,
    progress: bool = True,
) -> Path:
    """Write a federation of phantom cases, a partition CSV and the generator parameters.

    Layout ``fets``: ``out/FeTS2022_9XXXX/FeTS2022_9XXXX_{flair,t1,t1ce,t2,seg}.nii.gz``,
    labels 0/1/2/4. Layout ``brats2023``: ``out/BraTS-GLI-9XXXX-000/BraTS-GLI-9XXXX-000-
    {t2f,t1n,t1c,t2w,seg}.nii.gz``, labels 0/1/2/3. IDs count up from 90001, site by site.
    Images are float32, labels uint8. ``out/partitioning.csv`` has the FeTS header
    ``Partition_ID,Subject_ID`` (partitions 1..sites, CRLF line ends as in the FeTS CSVs);
    ``out/phantoms.json`` records the seed, layout, shape, site styles and per-case draws.

    Args:
        out: the federation folder; must not exist or be empty. The federation is built in
            a temporary sibling folder and renamed into place only when complete.
        cases: number of cases in all (``sites`` to 9999).
        sites: number of sites; site ``p`` draws its cases from ``site_style(p, seed)``.
        shape: grid ``(H, W, D)`` of every volume.
        layout: ``fets`` or ``brats2023``.
        seed: non-negative; the same seed writes the same voxel data.
        site_sizes: relative site sizes (one positive number per site); default equal.
        first_case: the number of the first case. A second federation with the same seed, sites and sizes that
            starts after the first one's last case draws new cases from the same site styles: a held-out test
            set of the same sites, with IDs of its own.
        progress: show a progress bar over cases on stderr.

    Returns:
        The path of ``partitioning.csv``.
    """
    from tqdm import tqdm

    out = Path(out)
    shape = _check_shape(shape)
    if layout not in set(Layout):
        raise InputError(f"unknown phantom layout {layout!r}; expected one of {', '.join(Layout)}")
    if sites < 1:
        raise InputError(f"need at least one site, got {sites}")
    if cases < sites:
        raise InputError(f"need at least one case per site: {cases} cases for {sites} sites")
    if first_case < 1 or first_case - 1 + cases > MAX_CASES:
        raise InputError(
            f"phantom case numbers must lie in 1..{MAX_CASES} (IDs 90001-99999), got {first_case}.."
            f"{first_case - 1 + cases}"
        )
    if seed < 0:
        raise InputError(f"seed must be non-negative, got {seed}")
    weights = [1.0] * sites if site_sizes is None else [float(s) for s in site_sizes]
    if len(weights) != sites or not all(math.isfinite(s) and s > 0 for s in weights):
        raise InputError(f"site_sizes needs {sites} positive numbers, got {list(site_sizes or [])}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: already exists and is not an empty folder")

    counts = _site_counts(cases, weights)
    styles = {p: site_style(p, seed) for p in range(1, sites + 1)}
    convention = get_convention(layout)
    to_file_label = np.zeros(4, dtype=np.uint8)
    to_file_label[[NECROSIS, EDEMA, ENHANCING]] = [convention.necrosis, convention.edema, convention.enhancing]
    suffixes = file_endings(layout)
    header = _case_header(phantom_affine(shape))

    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp) so the finished folder gets the usual umask permissions.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        rows: list[tuple[int, str]] = []
        records = []
        bar = tqdm(total=cases, desc="phantoms", unit="case", file=sys.stderr, disable=not progress)
        with bar:
            number = first_case - 1
            for partition, count in enumerate(counts, start=1):
                for _ in range(count):
                    number += 1
                    case_id = _ID_FORMAT[layout].format(number)
                    case = make_case(np.random.default_rng([seed, number]), shape, styles[partition])
                    volumes = {**case.images, "seg": to_file_label[case.labels]}
                    for key, data in volumes.items():
                        write_volume(tmp / case_id / f"{case_id}{suffixes[key]}.nii.gz", data, case.affine, header)
                    rows.append((partition, case_id))
                    records.append({"subject_id": case_id, "partition": partition, **case.info})
                    bar.update()
        with open(tmp / "partitioning.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\r\n")
            writer.writerow(["Partition_ID", "Subject_ID"])
            writer.writerows(rows)
        meta = {
            "generator": "mstkd.phantoms",
            "anatomy": "ICBM 2009a MNI152 brain mask, GM and WM maps bundled with nilearn "
            "(Fonov et al. 2009/2011; Collins et al. 1999)",
            "seed": seed,
            "layout": layout,
            "labels": {"necrosis": convention.necrosis, "edema": convention.edema, "enhancing": convention.enhancing},
            "shape": list(shape),
            "spacing_mm": [round(float(s), 6) for s in _spacing(shape)],
            "affine": phantom_affine(shape).tolist(),
            "cases": cases,
            "first_case": first_case,
            "sites": sites,
            "site_sizes": counts,
            "recipe": {
                "tissue_intensity_csf_gm_wm": TISSUE_INTENSITY,
                "tumour_intensity_necrosis_enhancing_edema": TUMOUR_INTENSITY,
                "core_radius_mm": CORE_RADIUS_MM,
                "rim_thickness_mm": RIM_THICKNESS_MM,
                "edema_thickness_mm": EDEMA_THICKNESS_MM,
                "axis_scale": AXIS_SCALE,
                "boundary_noise_sigma_mm": BOUNDARY_NOISE_SIGMA_MM,
                "boundary_noise_amplitude_mm": BOUNDARY_NOISE_AMPLITUDE_MM,
                "bias_sigma_mm": BIAS_SIGMA_MM,
                "intensity_scale": INTENSITY_SCALE,
            },
            "site_styles": {str(p): asdict(s) for p, s in styles.items()},
            "case_parameters": records,
        }
        (tmp / "phantoms.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "partitioning.csv"


def ensure_phantoms(
    root: Path,
    *,
    cases: int,
    sites: int,
    shape: tuple[int, int, int],
    seed: int,
    layout: str = "fets",
    site_sizes: list[float] | None = None,
    first_case: int = 1,
    progress: bool = False,
) -> Path:
    """The phantom federation for these parameters under ``root``, generated once (safe across processes)."""
    params: list = [cases, sites, list(shape), seed, layout]
    if site_sizes is not None:  # equal sites keep the key they always had
        params.append([float(s) for s in site_sizes])
    if first_case != 1:  # so do federations that start at case 1
        params.append(first_case)
    key = hashlib.sha1(json.dumps(params).encode()).hexdigest()[:10]
    name = f"phantoms-{sites}sites-{cases}cases" + (f"-from{first_case}" if first_case != 1 else "")
    folder = root / f"{name}-{key}"
    with file_lock(root / f".{folder.name}.lock"):
        if not (folder / "partitioning.csv").is_file():
            write_federation(
                folder,
                cases=cases,
                sites=sites,
                shape=shape,
                seed=seed,
                layout=layout,
                site_sizes=site_sizes,
                first_case=first_case,
                progress=progress,
            )
    return folder
