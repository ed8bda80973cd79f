"""A case and its segmentation as a picture (``mstkd overlay``): the first look a reader of a prediction wants, as
nnU-Net's ``plot_overlay`` gives it.

For each label map (the case's reference, a prediction, or both) one row of three slices, axial, coronal and
sagittal, through the centre of the tumour, over one of the case's scans:

- the slices are shown in the radiological convention (the patient's right on the left of the picture, anterior
  up in the axial view, superior up in the others), whatever the file's voxel order, and at the voxels' true aspect
  (a 1 x 1 x 5 mm scan is not squashed);
- the centre is that of the tumour core (necrosis and enhancing tumour) of all maps shown, else of the whole tumour,
  else of the volume; with ``slices`` given, at those voxel indices (of the file's own axes) instead;
- colours: necrosis red, edema green, enhancing tumour yellow, in every label convention (FeTS's 4 and BraTS
  2023's 3 are both enhancing; BraTS 2024's resection cavity is not drawn);
- with both maps, the title gives the prediction's Dice against the reference per region (ET, TC, WT).

The files are read with the project's checks (:mod:`mstkd.data.nifti`): a prediction on another grid than its
case is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mstkd.atomic import write_bytes
from mstkd.data.geometry import spacing_of
from mstkd.data.labels import LabelConvention, check_labels
from mstkd.data.layouts import CaseFiles
from mstkd.data.nifti import Volume, check_grid, read_labels, read_volume
from mstkd.errors import InputError
from mstkd.metrics import score_labels

COLOURS = {"necrosis": (0.9, 0.1, 0.1), "edema": (0.1, 0.8, 0.2), "enhancing": (1.0, 0.9, 0.0)}
"""Each tumour class's colour (RGB in 0..1)."""
ALPHA = 0.55
"""How much of a labelled voxel's colour is the label's (the rest is the scan's grey)."""
VIEW_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
"""Each view's RAS+ axes: (the picture's rows, its columns)."""
VIEWS = tuple(VIEW_AXES)
MAX_ROW_INCHES = 8.0
"""The tallest a row of views may be: a volume far longer on one axis than on the others (16 x 16 x 3000 voxels is a
valid file) is drawn smaller, not as a picture 100,000 pixels tall."""


@dataclass(frozen=True)
class Oriented:
    """A volume turned to RAS+ voxel order (``H x W x D``: right, anterior, superior), its voxel size in mm, and the
    map from the file's voxel axes to these (``axes[i]``: which file axis became axis i, ``flipped[i]``: reversed)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    axes: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]

    @classmethod
    def of(cls, volume: Volume, like: Volume | None = None) -> Oriented:
        """``volume`` in RAS+ order; with ``like`` (the scan a label map lies on), turned as ``like`` is, so that a
        map whose affine differs from the scan's by a rounding turns with it, even on an oblique grid."""
        ornt = nib.orientations.io_orientation((like or volume).affine)  # file axis i -> RAS axis ornt[i, 0]
        data = nib.orientations.apply_orientation(volume.data, ornt)
        zooms = spacing_of(volume.affine)
        axes, flipped, spacing = [0, 0, 0], [False] * 3, [1.0, 1.0, 1.0]
        for file_axis, (ras_axis, sign) in enumerate(ornt):
            axes[int(ras_axis)], flipped[int(ras_axis)] = file_axis, sign < 0
            spacing[int(ras_axis)] = float(zooms[file_axis])
        return cls(np.ascontiguousarray(data), tuple(spacing), tuple(axes), tuple(flipped))  # type: ignore[arg-type]

    def index(self, file_index: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
        """The RAS voxel index of the file's voxel ``file_index`` (of a volume of ``shape``)."""
        out = []
        for ras_axis in range(3):
            axis = self.axes[ras_axis]
            i = int(file_index[axis])
            out.append(shape[axis] - 1 - i if self.flipped[ras_axis] else i)
        return tuple(out)  # type: ignore[return-value]


def tumour_centre(maps: Sequence[np.ndarray], convention: LabelConvention) -> tuple[int, int, int] | None:
    """The voxel at the centre of the tumour core of all ``maps`` (``H x W x D`` label maps), else of their whole
    tumour; None where no map holds tumour."""
    for labels in (convention.region_labels["TC"], convention.region_labels["WT"]):
        voxels = [np.argwhere(np.isin(m, labels)) for m in maps]
        voxels = [v for v in voxels if len(v)]
        if voxels:
            return tuple(int(round(c)) for c in np.concatenate(voxels).mean(axis=0))  # type: ignore[return-value]
    return None


def _slices(volume: np.ndarray, at: Sequence[int]) -> dict[str, np.ndarray]:
    """The three views of an RAS+ ``volume`` through voxel ``at``, each as rows x columns of the picture, row 0 at
    the top: superior (or, axial, anterior) up; the patient's right on the left (high x first), and anterior on the
    left of the sagittal view (high y first)."""
    views = {}
    for view, (rows, columns) in VIEW_AXES.items():
        through = 3 - rows - columns  # the axis the view cuts across; the plane keeps (columns, rows), in order
        views[view] = np.take(volume, at[through], axis=through).T[::-1, ::-1]
    return views


def _aspect(view: str, spacing: Sequence[float]) -> float:
    """Height over width of one voxel of ``view``'s picture (rows, columns in mm)."""
    rows, columns = VIEW_AXES[view]
    return spacing[rows] / spacing[columns]


def _blend(grey: np.ndarray, labels: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """``grey`` (in 0..1) as RGB with each tumour class of ``labels`` coloured over it."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for name, colour in COLOURS.items():
        mask = labels == getattr(convention, name)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * np.asarray(colour)
    return rgb


def _window(image: np.ndarray) -> np.ndarray:
    """The scan scaled to 0..1 between its 0.5th and 99.5th percentiles inside the brain (voxels above 0)."""
    inside = image[image > 0]
    if not inside.size:
        return np.zeros_like(image)
    low, high = (float(v) for v in np.percentile(inside, (0.5, 99.5)))
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def overlay(
    case: CaseFiles,
    out_png: Path,
    *,
    pred: Path | None = None,
    modality: str = "flair",
    slices: Sequence[int] | None = None,
) -> dict[str, dict[str, float]] | None:
    """Write ``out_png``: the case's ``modality`` with its reference (where it has one) and ``pred`` over it (module
    doc). Returns the prediction's scores against the reference (:func:`mstkd.metrics.score_labels`), or None.

    Raises:
        InputError: no such modality in the case, neither a reference nor a prediction, a map on another grid than
            the scan, label values the case's convention does not allow, or ``slices`` outside the volume.
    """
    if modality not in case.images:
        raise InputError(f"{case.folder}: no {modality} scan (it has {', '.join(case.images)})")
    scan_path = case.images[modality]
    scan = read_volume(scan_path)
    named = [("reference", case.seg), ("prediction", pred)]
    maps: dict[str, Volume] = {}
    for name, path in named:
        if path is None:
            continue
        volume = read_labels(path)
        check_grid(path, volume.data.shape, volume.affine, scan_path, scan.data.shape, scan.affine)
        check_labels(volume.data, case.convention, path)
        maps[name] = volume
    if not maps:
        raise InputError(f"{case.folder}: no label map to show (the case has no reference; give --pred)")
    image = Oriented.of(scan)
    oriented = {name: Oriented.of(volume, like=scan).data for name, volume in maps.items()}
    if slices is not None:
        if len(slices) != 3 or any(not 0 <= int(i) < n for i, n in zip(slices, scan.data.shape, strict=True)):
            raise InputError(
                f"--slices {' '.join(map(str, slices))}: give three voxel indices within {scan.data.shape}"
            )
        centre = image.index(slices, scan.data.shape)
    else:
        centre = tumour_centre(list(oriented.values()), case.convention) or tuple(n // 2 for n in image.data.shape)
    scores = None
    if len(maps) == 2:
        scores = score_labels(
            maps["prediction"].data, maps["reference"].data, case.convention, scan.spacing, hd95="max"
        )
    write_bytes(out_png, _picture(case, modality, image, oriented, centre, scores))
    return scores


def _picture(case: CaseFiles, modality: str, image: Oriented, maps: dict, centre, scores) -> bytes:
    """The PNG's bytes: one row per label map, one column per view."""
    import io

    from matplotlib.figure import Figure

    grey = _slices(_window(image.data), centre)
    span = [n * mm for n, mm in zip(image.data.shape, image.spacing, strict=True)]  # the volume's extent per axis
    widths = [span[columns] for _, columns in VIEW_AXES.values()]  # mm
    heights = [span[rows] for rows, _ in VIEW_AXES.values()]
    width = 9.6  # inches, shared by the views in proportion to their width in mm: every view at one scale
    row = min(width * max(heights) / sum(widths), MAX_ROW_INCHES)
    height = len(maps) * row * 1.04 + 0.45
    fig = Figure(figsize=(width + 0.3, height), facecolor="black")
    grid = fig.add_gridspec(
        len(maps),
        3,
        width_ratios=widths,
        wspace=0.01,
        hspace=0.04,
        left=0.03,
        right=1.0,
        bottom=0.0,
        top=1 - 0.45 / height,
    )
    for r, (name, labels) in enumerate(maps.items()):
        coloured = _slices(labels, centre)
        for c, view in enumerate(VIEWS):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(
                _blend(grey[view], coloured[view], case.convention),
                aspect=_aspect(view, image.spacing),
                interpolation="nearest",
            )
            ax.set_axis_off()
            if c == 0:
                ax.text(-0.02, 0.5, name, rotation=90, color="white", ha="right", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(view, color="white", fontsize=10)
    title = f"{case.case_id}  {modality}  (R on the left)"
    if scores is not None:
        title += "  Dice " + "  ".join(f"{region} {100 * s['dice']:.1f}" for region, s in scores.items())
    fig.suptitle(title, color="white", fontsize=11)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90, facecolor="black")
    return out.getvalue()


def overlay_command(args) -> int:
    """``mstkd overlay``: one case folder (``--pred`` a file, ``--out`` a PNG) or a data folder of them (``--pred``
    a folder of ``<CaseID>.nii.gz``, ``--out`` a folder of ``<CaseID>.png``); the exit status (1 when a case of a
    data folder failed or has no prediction there: that case is named and skipped)."""
    import sys

    from tqdm.auto import tqdm

    from mstkd.atomic import check_writable
    from mstkd.data.layouts import detect_case
    from mstkd.data.nifti import is_nifti

    source, pred = Path(args.case), Path(args.pred) if args.pred else None
    if source.is_dir() and any(is_nifti(f) for f in source.iterdir()):  # a case folder: its own refusal, if any
        case = detect_case(source)
        out = Path(args.out or f"{case.case_id}.png")
        if out.is_dir():
            raise InputError(f"--out {out}: a folder; give the PNG's path")
        scores = overlay(case, out, pred=pred, modality=args.modality, slices=args.slices)
        dice = "" if scores is None else ", ".join(f"{r} {100 * s['dice']:.1f}" for r, s in scores.items())
        print(f"wrote {out}" + (f" (Dice {dice})" if dice else ""), file=sys.stderr)
        return 0
    folders = []
    if source.is_dir():
        folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{source}: neither a case folder nor a folder of case folders")
    if pred is not None and not pred.is_dir():
        raise InputError(f"--pred {pred}: not a folder (for a data folder, give the folder of <CaseID>.nii.gz)")
    out_dir, failed = Path(args.out or "overlays"), {}
    check_writable(out_dir, what="--out")
    for folder in tqdm(folders, desc="overlay", unit="case", disable=args.quiet):
        try:
            case = detect_case(folder)
            found = pred / f"{case.case_id}.nii.gz" if pred is not None else None
            if found is not None and not found.is_file():
                raise InputError(f"no prediction {found.name} in {pred}")
            overlay(case, out_dir / f"{case.case_id}.png", pred=found, modality=args.modality, slices=args.slices)
        except (InputError, OSError, MemoryError) as exc:  # that case only
            failed[folder.name] = str(exc).splitlines()[0]
            tqdm.write(f"skipped {folder.name}: {failed[folder.name]}", file=sys.stderr)
    print(f"wrote {len(folders) - len(failed)} pictures to {out_dir}", file=sys.stderr)
    return 1 if failed else 0
