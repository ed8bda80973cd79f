"""The ``mstkd`` command: thin verbs over the library.

Every verb turns :class:`~mstkd.errors.InputError` into one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mstkd.errors import InputError

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


def _cmd_score(args: argparse.Namespace) -> int:
    from mstkd.metrics import format_scores, score_files

    scores = score_files(args.pred, args.ref, labels=args.labels, hd95=args.hd95)
    print(json.dumps(scores) if args.json else format_scores(scores, hd95=args.hd95))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from mstkd.config import load_config, save_config
    from mstkd.data.dataset import prepare_federation

    cfg = load_config(args.overrides)
    federation = prepare_federation(
        Path(args.data), cfg.data, partitioning=args.partitioning, cache_dir=args.cache, progress=not args.quiet
    )
    save_config(cfg, federation.cache_dir / "config.yaml")
    print(federation.summary())
    print(f"cache: {federation.cache_dir}\nsplit: {federation.split_csv}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mstkd.centralised import train_centralised
    from mstkd.config import load_config

    cfg = load_config(args.overrides)
    out = train_centralised(
        args.data, cfg, args.out or cfg.train.out_dir, partitioning=args.partitioning, progress=not args.quiet
    )
    print(f"run folder: {out} (best.pt, last.pt, log.jsonl, config.yaml)", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mstkd.checkpoint import load_checkpoint
    from mstkd.config import save_config
    from mstkd.data.dataset import prepare_federation
    from mstkd.evaluate import evaluate_cases, parse_subsets
    from mstkd.train import pick_device

    device = pick_device()
    net, cfg, _ = load_checkpoint(args.checkpoint, device)
    federation = prepare_federation(args.data, cfg.data, partitioning=args.partitioning, progress=not args.quiet)
    cases = (
        federation.test_cases()
        if args.split == "test"
        else [e for s in federation.sites for e in federation.site_cases(s, args.split)]
    )
    if not cases:
        raise InputError(f"{args.data}: the {args.split} split holds no case (see {federation.split_csv})")
    result = evaluate_cases(
        net, cases, cfg, subsets=parse_subsets(args.subsets), device=device, progress=not args.quiet
    )
    paths = result.write(args.out)
    save_config(cfg, Path(args.out) / "config.yaml")
    print(result.markdown())
    print(f"tables: {paths['md']}, {paths['csv']}, {paths['json']}", file=sys.stderr)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from mstkd.infer import predict_case

    summary = predict_case(args.checkpoint, args.case, args.out, modalities=args.modalities)
    print(
        f"wrote {summary['out']} ({summary['modalities']}, {summary['convention']} labels "
        f"{summary['labels']}, {summary['seconds']:.1f} s)",
        file=sys.stderr,
    )
    return 0


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
    p.add_argument("--layout", choices=("fets", "brats2023"), default="fets", help="file naming and label convention")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("score", help="Dice, HD95, sensitivity, specificity of a prediction against a reference")
    p.add_argument("--pred", required=True, help="predicted label map (NIfTI)")
    p.add_argument("--ref", required=True, help="reference label map (NIfTI)")
    p.add_argument(
        "--labels",
        choices=("fets", "brats2023"),
        default="fets",
        help="label convention of both files: fets = 1/2/4 (default), brats2023 = 1/2/3 (+4 resection cavity)",
    )
    p.add_argument(
        "--hd95",
        choices=("max", "pooled"),
        default="max",
        help="max of the two directed 95th percentiles (MONAI, default) or the pooled percentile (medpy)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
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
    p.add_argument("--data", required=True, help="data folder (as for preprocess)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="segment one case folder into a label map in the case's geometry")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--case", required=True, help="case folder (FeTS or BraTS 2023 naming; missing modalities ok)")
    p.add_argument("--out", required=True, help="output label map, e.g. SEG.nii.gz")
    p.add_argument("--modalities", help="use only these, e.g. flair,t1ce (default: all present)")
    p.set_defaults(func=_cmd_predict)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
