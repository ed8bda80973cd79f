"""Time :func:`mstkd.metrics.score_labels` (ET, TC, WT) on one BraTS-sized case.

The reference is a 240 x 240 x 155 ``fets`` label map with a lobulated tumour (edema around
a core of necrosis and enhancing rim, plus a small satellite lesion); the prediction is the
reference shifted by a voxel or two, with its boundary roughened and the satellite missed,
so every region has real surface errors. A second prediction adds two false-positive blobs
in far corners of the volume (the worst case for cropping). Prints the region sizes, the
scores, and the best and median wall time of several runs for each. The target is at most 0.3 s per case on 2 CPU cores.

Then a folder of such cases (``--folder-cases``, each drawn with its own seed, written as NIfTI) is scored as
``mstkd score --pred-dir --ref-dir`` does, in one process and with ``--jobs 2``, and the speed-up is printed.

Usage: ``python benchmarks/bench_metrics.py [--runs 5] [--hd95 max|pooled] [--folder-cases 12]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from mstkd.data.labels import get_convention, regions_from_labels
from mstkd.metrics import format_scores, score_labels

SHAPE = (240, 240, 155)


def _lobulated_ball(shape, center, radius, rng, roughness=0.25):
    """Ball of ``radius`` voxels whose radius varies smoothly with direction (a lumpy tumour)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    offsets = [g - c for g, c in zip(grid, center, strict=True)]
    dist = np.sqrt(sum(o.astype(np.float32) ** 2 for o in offsets))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=6)
    noise /= np.abs(noise).max()
    return dist < radius * (1 + roughness * noise)


def make_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (prediction, reference) pair of ``fets`` label maps (uint8, 0/1/2/4)."""
    rng = np.random.default_rng(seed)
    center = (110, 130, 80)
    box = tuple(slice(c - 40, c + 40) for c in center)
    local = tuple(80 for _ in center)
    mid = (40, 40, 40)

    wt = _lobulated_ball(local, mid, 24, rng)
    tc = _lobulated_ball(local, mid, 14, rng) & wt
    necrosis = _lobulated_ball(local, mid, 8, rng) & tc
    ref_local = np.zeros(local, dtype=np.uint8)
    ref_local[wt] = 2
    ref_local[tc] = 4
    ref_local[necrosis] = 1
    # A small satellite (enhancing core in edema) away from the main mass, which the prediction misses.
    sat = _lobulated_ball(local, (70, 12, 62), 4, rng, roughness=0.1)
    ref_local[sat] = 2
    ref_local[_lobulated_ball(local, (70, 12, 62), 2, rng, roughness=0.0)] = 4

    pred_local = np.roll(ref_local, shift=(2, 0, 1), axis=(0, 1, 2))
    pred_local[sat] = 0
    # Roughen the boundary: flip labels on a thin random shell of the whole tumour.
    tumour = pred_local > 0
    shell = tumour ^ ndimage.binary_erosion(tumour)
    flip = shell & (rng.random(local) < 0.3)
    pred_local[flip] = 0

    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    ref[box] = ref_local
    pred[box] = pred_local
    return pred, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hd95", choices=("max", "pooled"), default="max")
    parser.add_argument("--folder-cases", type=int, default=12, help="cases of the folder timing (0: skip it)")
    args = parser.parse_args()

    convention = get_convention("fets")
    pred, ref = make_case()
    sizes = regions_from_labels(ref, convention).sum(axis=(1, 2, 3))
    print(f"grid {SHAPE}, reference voxels ET/TC/WT = {' / '.join(str(int(n)) for n in sizes)}")

    # The same prediction plus two false-positive blobs in far corners: the bounding box of
    # prediction and reference then spans nearly the whole volume.
    far = pred.copy()
    far[5:12, 5:12, 140:150] = convention.enhancing
    far[230:236, 225:235, 3:8] = convention.edema
    for name, candidate in (("typical", pred), ("far false positives", far)):
        score_labels(candidate, ref, convention, hd95=args.hd95)  # warm-up (imports, page faults)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            scores = score_labels(candidate, ref, convention, hd95=args.hd95)
            times.append(time.perf_counter() - start)
        print(f"\n{name}:")
        print(format_scores(scores, hd95=args.hd95))
        print(
            f"score_labels, 3 regions: best {min(times):.3f} s, median {statistics.median(times):.3f} s "
            f"({args.runs} runs)"
        )
    if args.folder_cases:
        folder_speedup(args.folder_cases, args.hd95)


def folder_speedup(cases: int, hd95: str) -> None:
    """Score a folder of ``cases`` pairs with one process, then with two; print both times and the ratio."""
    import tempfile
    from pathlib import Path

    import nibabel as nib

    from mstkd.scoring import score_folders

    with tempfile.TemporaryDirectory() as tmp:
        preds, refs = Path(tmp, "pred"), Path(tmp, "ref")
        preds.mkdir()
        refs.mkdir()
        for i in range(cases):
            pred, ref = make_case(seed=i)
            for folder, labels in ((preds, pred), (refs, ref)):
                nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"FeTS2022_{i:05d}.nii.gz")
        times = {}
        for jobs in (1, 2):
            start = time.perf_counter()
            result = score_folders(preds, refs, hd95=hd95, progress=False, jobs=jobs)
            times[jobs] = time.perf_counter() - start
            assert len(result.rows) == cases
        print(
            f"\nfolder of {cases} cases ({SHAPE}, read from .nii.gz): one process {times[1]:.2f} s, "
            f"--jobs 2 {times[2]:.2f} s, speed-up {times[1] / times[2]:.2f}x"
        )


if __name__ == "__main__":
    main()
