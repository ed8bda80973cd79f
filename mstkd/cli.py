"""The ``mstkd`` command: thin verbs over the library.

Every verb turns :class:`~mstkd.errors.InputError` into one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mstkd.atomic import check_writable
from mstkd.data.layouts import Layout
from mstkd.errors import InputError
from mstkd.postprocess import SWEEP_MM3, mm3

Command = Callable[[argparse.Namespace], int]


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from mstkd.phantoms import write_federation

    csv = write_federation(
        Path(args.out),
        cases=args.cases,
        sites=args.sites,
        shape=tuple(args.shape),
        layout=args.layout,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.cases} phantom cases over {args.sites} sites to {args.out} (partitions: {csv})", file=sys.stderr
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mstkd.data.convert import convert_command

    return convert_command(args)


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from mstkd.ensemble import ensemble_command

    return ensemble_command(args)


def _cmd_score(args: argparse.Namespace) -> int:
    from mstkd.scoring import score_command

    return score_command(args)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from mstkd.config import load_config, save_config
    from mstkd.data.cache import CONFIG_YAML
    from mstkd.data.dataset import prepare_federation

    cfg = load_config(args.overrides)
    federation = prepare_federation(
        Path(args.data), cfg.data, partitioning=args.partitioning, cache_dir=args.cache, progress=not args.quiet
    )
    save_config(cfg, federation.cache_dir / CONFIG_YAML)
    print(federation.summary())
    print(f"cache: {federation.cache_dir}\nsplit: {federation.split_csv}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mstkd.centralised import resume_centralised, train_centralised
    from mstkd.config import load_config

    if args.resume:
        if args.out or args.overrides:
            raise InputError("--resume continues a run in its folder with its own config: give no --out or overrides")
        out = resume_centralised(
            args.resume, args.data, partitioning=args.partitioning, progress=not args.quiet, trackers=_trackers(args)
        )
    else:
        if not args.data:
            raise InputError("give --data (or --resume RUN_DIR to continue a run)")
        cfg = load_config(args.overrides)
        out = train_centralised(
            args.data,
            cfg,
            args.out or cfg.train.out_dir,
            partitioning=args.partitioning,
            progress=not args.quiet,
            trackers=_trackers(args),
        )
    print(f"run folder: {out} (best.pt, last.pt, log.jsonl, config.yaml, state.pt)", file=sys.stderr)
    return 0


def _trackers(args: argparse.Namespace) -> tuple[str, str]:
    """What :class:`mstkd.tracking.Tracker` is given: ``--tensorboard`` and ``--tracker`` (comma-separated)."""
    return ("tensorboard" if args.tensorboard else "", args.tracker)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mstkd.checkpoint import checkpoint_geometry, load_checkpoint
    from mstkd.config import save_config
    from mstkd.data.dataset import prepare_federation
    from mstkd.evaluate import evaluate_cases, parse_subsets
    from mstkd.postprocess import check_threshold
    from mstkd.train import pick_device

    check_writable(args.out, "--out")  # before the evaluation, not after it
    sweep = () if args.et_sweep is None else [check_threshold(t, "--et-sweep") for t in args.et_sweep or SWEEP_MM3]
    if sweep and args.split == "test":
        print(
            "--et-sweep on the test cases: choose the threshold with --split val, never on the test cases",
            file=sys.stderr,
        )
    device = pick_device()
    net, cfg, payload = load_checkpoint(args.checkpoint, device)
    if args.lesion:
        cfg.eval.lesion = args.lesion
    if args.et_min_mm3 is not None:
        cfg.eval.et_min_mm3 = check_threshold(args.et_min_mm3)
    if checkpoint_geometry(payload) is None:
        print(
            f"{args.checkpoint}: stores no training voxel size (made by an older version); the cases are evaluated "
            "at their median voxel size",
            file=sys.stderr,
        )
    federation = prepare_federation(args.data, cfg.data, partitioning=args.partitioning, progress=not args.quiet)
    cases = (
        federation.test_cases()
        if args.split == "test"
        else [e for s in federation.sites for e in federation.site_cases(s, args.split)]
    )
    if not cases:
        raise InputError(f"{args.data}: the {args.split} split holds no case (see {federation.split_csv})")
    subsets = parse_subsets(args.subsets)
    result = evaluate_cases(net, cases, cfg, subsets=subsets, device=device, progress=not args.quiet, et_sweep=sweep)
    paths = result.write(args.out)
    save_config(cfg, Path(args.out) / "config.yaml")
    print(result.markdown())
    print(f"tables: {paths['md']}, {paths['csv']}, {paths['json']}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mstkd.export import export_bundle

    out = export_bundle(args.checkpoint, args.out)
    print(f"MONAI bundle: {out} (run it: see {out / 'docs' / 'README.md'})", file=sys.stderr)
    return 0


def _cmd_overlay(args: argparse.Namespace) -> int:
    from mstkd.overlay import overlay_command

    return overlay_command(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from mstkd.folder import predict_command

    return predict_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mstkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantoms", help="write synthetic BraTS-like cases and a partition CSV")
    p.add_argument("out", help="output folder (one sub-folder per case, plus partitioning.csv)")
    p.add_argument("--cases", type=int, default=12, help="number of cases in all (default 12)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (partitions) (default 3)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(96, 96, 64),
        metavar=("X", "Y", "Z"),
        help="grid size in voxels (default 96 96 64; 240 240 155 for the BraTS grid)",
    )
    p.add_argument(
        "--layout", choices=[str(v) for v in Layout], default=str(Layout.FETS), help="file naming and label convention"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("score", help="Dice, HD95, sensitivity, specificity of predictions against references")
    p.add_argument("--pred", help="one predicted label map (NIfTI)")
    p.add_argument("--ref", help="its reference label map (NIfTI)")
    p.add_argument("--pred-dir", help="a folder of predictions named <CaseID>.nii.gz")
    p.add_argument("--ref-dir", help="references: <CaseID>.nii.gz files, or case folders holding a label map")
    p.add_argument(
        "--csv",
        help="with --pred-dir: write the per-case table here, and its mean, sd and median beside it "
        "(summary.csv, summary.json)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="with --pred-dir: score this many cases at once, one process each"
    )
    p.add_argument(
        "--labels",
        choices=("auto", "fets", "brats2023"),
        default="auto",
        help="label convention: fets = 1/2/4, brats2023 = 1/2/3 (+4 resection cavity); auto (default): the "
        "reference's case-folder naming, else brats2023 when the reference holds a label 3, else fets",
    )
    p.add_argument(
        "--hd95",
        choices=("max", "pooled"),
        default="max",
        help="max of the two directed 95th percentiles (MONAI, default) or the pooled percentile (medpy)",
    )
    p.add_argument(
        "--lesion",
        nargs="?",
        const="panoptica",
        default="",
        choices=("panoptica", "brats2023"),
        metavar="MODE",
        help="also BraTS lesion-wise scores per region (TP/FP/FN lesions, lesion-wise Dice and HD95; missed and "
        "spurious lesions count as Dice 0, HD95 374). MODE brats2023: the BraTS 2023 ranking's rules (lesions merged "
        "and matched by a 3-voxel dilation, lesions of at most 50 mm³ left out); panoptica (the default of a bare "
        "--lesion): one-to-one matching through panoptica, with NSD: pip install '.[lesion]' && "
        "pip install --no-deps panoptica==2.1.7",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "preprocess", help="validate, normalise and cache a dataset; write its site/train/val/test split"
    )
    p.add_argument("data", help="folder of case folders (FeTS/BraTS 2018-21 or BraTS 2023+ naming)")
    p.add_argument(
        "--partitioning",
        help="partition CSV (Partition_ID,Subject_ID); default DATA/partitioning.csv, or one site holding every case",
    )
    p.add_argument("--cache", help="cache folder (default DATA/.mstkd-cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.normalization=minmax")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("train", help="centralised teacher-student training (the non-federated reference)")
    p.add_argument("--data", help="data folder (as for preprocess); with --resume, the one the run was trained on")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run after its last finished epoch, on its --data (and --partitioning, if it had one)",
    )
    p.add_argument("--tensorboard", action="store_true", help="also write per-epoch scalars for TensorBoard")
    p.add_argument(
        "--tracker",
        default="",
        help="tensorboard, mlflow or both (comma-separated): mlflow logs params, per-epoch metrics and the best "
        "checkpoint to $MLFLOW_TRACKING_URI, else to OUT/mlflow.db (pip install '.[mlflow]')",
    )
    p.add_argument("--partitioning", help="partition CSV (sites are pooled; their val cases validate)")
    p.add_argument("--out", help="run folder (default train.out_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model=lite train.epochs=20 loss.gsm=false")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="the 15-subset Dice/HD95 table of a checkpoint on held-out cases")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="data folder; split as at training time (same config and CSV)")
    p.add_argument("--partitioning", help="partition CSV used at training time")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which cases (default test)")
    p.add_argument(
        "--subsets", default="all", help="all (default), full, or subsets separated by commas, e.g. flair,flair+t1ce"
    )
    p.add_argument("--out", required=True, help="folder for eval.md, eval.csv, eval.json, eval_cases.csv")
    p.add_argument(
        "--et-min-mm3",
        type=float,
        help="also score ET with a predicted ET under this volume made necrosis (default: the checkpoint's "
        "eval.et_min_mm3, 500; 0: not scored)",
    )
    p.add_argument(
        "--et-sweep",
        nargs="*",
        type=float,
        metavar="V",
        help=f"also score that rule at each volume V (mm³; none given: {' '.join(map(mm3, SWEEP_MM3))}) from the "
        "same predictions, and name the best; use with --split val",
    )
    p.add_argument(
        "--lesion",
        default="",
        choices=("brats2023", "panoptica"),
        help="also lesion-wise columns per case and subset: brats2023 (the BraTS 2023 ranking's rules) or panoptica",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("convert", help="an MSD task or nnU-Net raw dataset as FeTS-named case folders")
    p.add_argument("src", help="the folder holding dataset.json, imagesTr/, labelsTr/ (and imagesTs/)")
    p.add_argument("out", help="where the case folders go (a data folder for every other command)")
    p.add_argument("--test", action="store_true", help="imagesTs/ (no labels) instead of imagesTr/ with labelsTr/")
    p.add_argument("--follow-links", action="store_true", help="read files the dataset links from outside its folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("overlay", help="a case's scan with its reference and prediction over it, as a PNG")
    p.add_argument("case", help="a case folder, or a data folder of them (then one PNG per case)")
    p.add_argument("--pred", help="the case's prediction; for a data folder, a folder of <CaseID>.nii.gz")
    p.add_argument("--out", help="the PNG (default <CaseID>.png); for a data folder, a folder (default overlays)")
    p.add_argument("--modality", default="flair", choices=("flair", "t1", "t1ce", "t2"), help="the scan shown")
    p.add_argument("--slices", type=int, nargs=3, metavar=("I", "J", "K"), help="voxel indices (default: tumour)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_overlay)

    p = sub.add_parser("export", help="a checkpoint as a MONAI bundle that runs with MONAI and PyTorch alone")
    p.add_argument("checkpoint", help="an mstkd checkpoint (best.pt)")
    p.add_argument("out", help="a new folder for the bundle")
    p.add_argument("--format", choices=("monai-bundle",), default="monai-bundle", help="monai-bundle (the default)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("ensemble", help="average several models' predictions of one folder (--save-probabilities)")
    p.add_argument("--input-dirs", nargs="+", required=True, help="folders that mstkd predict --input-dir wrote")
    p.add_argument("--output-dir", required=True, help="where <CaseID>.nii.gz files go")
    p.add_argument(
        "--labels",
        choices=("auto", "fets", "brats2023"),
        default="auto",
        help="auto (what the inputs' predict.json name), or fets or brats2023 for folders of an older version",
    )
    p.add_argument("--et-min-mm3", type=float, default=0.0, help="the small-ET rule, as for predict (default 0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("predict", help="segment case folders into label maps in each case's own geometry")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--case", help="one case folder (FeTS or BraTS 2023 naming; missing modalities ok)")
    p.add_argument("--out", help="with --case: the label map to write, e.g. SEG.nii.gz")
    p.add_argument("--input-dir", help="a folder of case folders: each is segmented, the model loaded once")
    p.add_argument("--output-dir", help="with --input-dir: where <CaseID>.nii.gz files go")
    p.add_argument("--modalities", help="use only these, e.g. flair,t1ce (default: all present)")
    p.add_argument("--device", help="cpu, cuda, cuda:<n> or mps (default: CUDA when present)")
    p.add_argument("--tta", action="store_true", help="average 8 mirrored passes (8x the time)")
    p.add_argument(
        "--et-min-mm3",
        type=float,
        default=0.0,
        help="a predicted enhancing tumour under this volume becomes necrosis (the RFNet protocol: 500); "
        "choose it on validation cases with mstkd evaluate --split val (default 0: off)",
    )
    p.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="with --input-dir: keep cases whose label map is already there and valid, predict the rest",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="with --input-dir: also write each case's class probabilities (<CaseID>.npz, float16, its own grid)",
    )
    p.add_argument("--num-parts", type=int, default=1, help="with --input-dir: split the cases into this many parts")
    p.add_argument("--part-id", type=int, default=0, help="with --num-parts: the part this call predicts (from 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command, as the user gave it
    try:
        return args.func(args)
    except (InputError, PermissionError, NotADirectoryError, IsADirectoryError) as exc:
        # a path the user gave that cannot be used is their input, not a bug
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that is full, a name too long: this machine's, not a bug
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
