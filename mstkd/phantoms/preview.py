"""A quick look at one phantom case: one axial slice through the tumour as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mstkd.data.labels import get_convention
from mstkd.data.layouts import Layout, file_endings
from mstkd.data.nifti import read_volume
from mstkd.errors import InputError


def _case_files(case_dir: Path) -> tuple[dict[str, Path], str]:
    for layout in Layout:
        suffixes = file_endings(layout)
        found = {}
        for key, suffix in suffixes.items():
            hits = sorted(case_dir.glob(f"*{suffix}.nii.gz")) or sorted(case_dir.glob(f"*{suffix}.nii"))
            if hits:
                found[key] = hits[0]
        if len(found) == len(suffixes):
            return found, layout
    raise InputError(f"{case_dir}: no complete phantom case (four contrasts and seg in FeTS or BraTS 2023 naming)")


def preview(case_dir: Path, out_png: Path) -> Path:
    """Save one axial slice through the tumour centre: T1, T1ce, T2, FLAIR and the labels over FLAIR.

    Colours: red necrosis, green edema, yellow enhancing. The slice is shown as on the
    BraTS grid (anterior up, patient's left on the right). Returns ``out_png``.
    """
    from matplotlib.figure import Figure

    case_dir, out_png = Path(case_dir), Path(out_png)
    files, layout = _case_files(case_dir)
    convention = get_convention(layout)
    seg = read_volume(files["seg"], dtype=np.uint8).data
    core = np.argwhere(np.isin(seg, [convention.necrosis, convention.enhancing]))
    tumour = core if len(core) else np.argwhere(seg > 0)
    z = int(round(tumour[:, 2].mean())) if len(tumour) else seg.shape[2] // 2

    fig = Figure(figsize=(15, 3.3), facecolor="black")
    panels = [("T1", "t1"), ("T1ce", "t1ce"), ("T2", "t2"), ("FLAIR", "flair"), ("labels", None)]
    flair_slice = None
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_axis_off()
        ax.set_title(title, color="white")
        if key is not None:
            vol = read_volume(files[key]).data
            inside = vol[vol > 0]
            top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
            sl = vol[:, :, z].T
            ax.imshow(sl, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            if key == "flair":
                flair_slice = sl / top
        else:
            base = np.clip(flair_slice if flair_slice is not None else np.zeros(seg.shape[:2]).T, 0, 1)
            rgb = np.repeat(base[..., None] * 0.6, 3, axis=2)
            sl = seg[:, :, z].T
            colours = {convention.necrosis: (1, 0, 0), convention.edema: (0, 0.8, 0), convention.enhancing: (1, 1, 0)}
            for value, colour in colours.items():
                rgb[sl == value] = colour
            ax.imshow(rgb, interpolation="nearest")
    fig.suptitle(f"{case_dir.name}  axial slice {z}", color="white")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.02)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, facecolor="black")
    return out_png
