"""Folder prediction against one call per case, and what mirrored test-time augmentation buys.

Usage: ``python benchmarks/bench_predict.py --checkpoint RUN/best.pt --data PHANTOMS [--cases 6]``.

1. Times ``mstkd predict --case`` once per case (a fresh process each, as a script looping over
   cases would run it) against one ``mstkd predict --input-dir`` over the same cases, and prints
   the ratio.
2. Predicts the same cases with and without ``--tta`` and scores both against the reference
   label maps (``mstkd score --pred-dir``), printing the Dice per region, the gain and the time
   ratio. The cases should be ones the checkpoint never trained on (its test split).
3. Times folder prediction with reading and writing overlapped with inference (the default) against
   the same folder predicted one step after another (``overlap=False``), in this process, and prints
   the speed-up. For BraTS-sized cases: ``mstkd phantoms DATA --cases 6 --shape 240 240 155``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mstkd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mstkd.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def dice(pred_dir: Path, ref_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "mstkd.cli", "score", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mean = json.loads(out)["summary"][0]
    return {r: mean[f"{r}_dice"] for r in ("ET", "TC", "WT")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a folder of case folders with label maps")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--split", help="the checkpoint run's split.csv: take its test cases (default: any)")
    args = parser.parse_args()

    from mstkd.data.layouts import find_case_folders

    folders = find_case_folders(args.data)
    if args.split:
        rows = Path(args.split).read_text().splitlines()[1:]
        test = {r.split(",")[1] for r in rows if r.split(",")[-1].strip() == "test"}
        folders = {c: f for c, f in folders.items() if c in test}
    chosen = sorted(folders.items())[: args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = tmp / "cases"
        cases.mkdir()
        for case_id, folder in chosen:  # copies: the case search does not follow symbolic links
            shutil.copytree(folder, cases / case_id)
        single = sum(
            mstkd("predict", "--checkpoint", args.checkpoint, "--case", str(f), "--out", str(tmp / f"{c}.nii.gz"))
            for c, f in chosen
        )
        in_folder = ["predict", "--checkpoint", args.checkpoint, "--input-dir", str(cases), "--quiet"]
        folder = mstkd(*in_folder, "--output-dir", str(tmp / "plain"))
        tta = mstkd(*in_folder, "--output-dir", str(tmp / "tta"), "--tta")
        plain_dice, tta_dice = dice(tmp / "plain", cases), dice(tmp / "tta", cases)
        overlapped, sequential = overlap_times(args.checkpoint, cases, tmp)
    n = len(chosen)
    print(
        f"{n} cases: {n} single-case calls {single:.1f} s, one folder call {folder:.1f} s: "
        f"{single / folder:.2f}x faster"
    )
    print(f"--tta: {tta:.1f} s, {tta / folder:.1f}x the time of plain folder prediction")
    print("Dice   " + "  ".join(f"{r:>6}" for r in plain_dice))
    print("plain  " + "  ".join(f"{v:6.4f}" for v in plain_dice.values()))
    print("tta    " + "  ".join(f"{v:6.4f}" for v in tta_dice.values()))
    print("gain   " + "  ".join(f"{tta_dice[r] - plain_dice[r]:+6.4f}" for r in plain_dice))
    print(
        f"folder mode, reading and writing overlapped with inference: {overlapped:.1f} s; one step after another: "
        f"{sequential:.1f} s; speed-up {sequential / overlapped:.2f}x"
    )


def overlap_times(checkpoint: str, cases: Path, tmp: Path) -> tuple[float, float]:
    """Seconds of an overlapped and of a sequential folder run over ``cases`` (one warm-up run first)."""
    from mstkd.folder import predict_folder

    predict_folder(checkpoint, cases, tmp / "warm-up", progress=False)  # imports, page faults, thread pools
    times = {}
    for overlap in (True, False):
        start = time.perf_counter()
        predict_folder(checkpoint, cases, tmp / f"overlap-{overlap}", progress=False, overlap=overlap)
        times[overlap] = time.perf_counter() - start
    return times[True], times[False]


if __name__ == "__main__":
    main()
