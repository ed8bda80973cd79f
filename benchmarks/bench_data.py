"""Data-stage speed on one full-size 240 x 240 x 155 case: NIfTI load vs cached load, and metric time.

Usage: ``python benchmarks/bench_data.py [--repeats 5]``. Prints seconds and ratios
measured in this one run (machines are noisy; compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mstkd.data.cache import CaseCache
from mstkd.data.cases import load_case
from mstkd.data.layouts import detect_case
from mstkd.metrics import score_regions
from mstkd.phantoms import write_federation


def best_of(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_federation(data, cases=1, sites=1, shape=(240, 240, 155), seed=0, progress=False)
        folder = next(p for p in data.iterdir() if p.is_dir())
        files = detect_case(folder)
        cache = CaseCache(Path(tmp) / "cache")
        start = time.perf_counter()
        entry = cache.get(files)
        build = time.perf_counter() - start

        def nifti() -> None:
            load_case(detect_case(folder))

        def cached() -> None:
            hit = cache.get(detect_case(folder))
            np.asarray(hit.image(), dtype=np.float32)
            hit.regions()

        t_nifti, m_nifti = best_of(nifti, args.repeats)
        t_cache, m_cache = best_of(cached, args.repeats)

        ref = entry.regions()
        rng = np.random.default_rng(0)
        pred = np.roll(ref, shift=(2, -1, 1), axis=(1, 2, 3))
        pred[2] |= rng.random(pred.shape[1:]) > 0.99995  # a few spurious voxels
        full_ref = np.zeros((3, 240, 240, 155), dtype=bool)
        full_pred = np.zeros_like(full_ref)
        box = tuple(slice(a, b) for a, b in entry.meta["crop_box"])
        full_ref[(slice(None), *box)] = ref
        full_pred[(slice(None), *box)] = pred
        t_metric, m_metric = best_of(lambda: score_regions(full_pred, full_ref, (1.0, 1.0, 1.0)), args.repeats)

    print(f"case: 240x240x155, 4 modalities + seg (phantom); best / median of {args.repeats}")
    print(f"cache build (first read)     {build:8.3f} s")
    print(f"NIfTI load (decompress)      {t_nifti:8.3f} s  / {m_nifti:.3f} s")
    print(f"cached load (.npy)           {t_cache:8.3f} s  / {m_cache:.3f} s")
    print(f"ratio NIfTI / cached         {t_nifti / t_cache:8.1f} x")
    print(f"metrics, ET+TC+WT            {t_metric:8.3f} s  / {m_metric:.3f} s  (budget 0.3 s)")


if __name__ == "__main__":
    main()
