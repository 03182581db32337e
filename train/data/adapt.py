"""Turn a public fundus release (or your own images) into a dataset folder.

    python -m train.data.adapt odir --src ~/odir5k --out data/odir [--resize 512]
    python -m train.data.adapt idrid --src "~/IDRiD/B. Disease Grading" --out data/idrid --resize 768
    python -m train.data.adapt folders --src ~/my_classes --out data/mine
    python -m train.data.adapt csv --src ~/aptos/train.csv --images ~/aptos/train_images \\
        --path-column id_code --label-columns diagnosis --out data/aptos
    python -m train.data.adapt unlabeled --src ~/odir5k/ODIR-5K_Testing_Images --out data/odir

The manifest points at the original images by absolute path unless --resize N writes JPEG copies
(longer side N) into <out>/images/. Splits are by patient, stratified by the first classification
task and fixed by --seed. Skipped rows (missing images, unusable labels) are printed and saved in
<out>/adapt_report.txt. Check the result with `python -m train.data.validate <out>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.errors import cli
from train.data.adapters import common, generic, idrid, odir
from train.data.manifest import MANIFEST_FILE, DatasetError, load_spec


def _parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--src", type=Path, required=True, help="release folder or label file")
    shared.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    shared.add_argument("--name", help="dataset name (default: the adapter's)")
    shared.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    shared.add_argument("--val-frac", type=float, default=0.15, help="share of patients for val (0.15)")
    shared.add_argument("--test-frac", type=float, default=0.15, help="share of patients for test (0.15)")
    shared.add_argument("--resize", type=int, help="write JPEG copies with this longer side into <out>/images")
    shared.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes for --resize")
    shared.add_argument("--min-freq", type=int, default=1, help="vocabulary: minimum word count (1)")
    shared.add_argument("--max-len", type=int, default=24, help="vocabulary: at most this many tokens incl. <eos>; fewer when the longest training sentence is shorter (24)")
    shared.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")

    parser = argparse.ArgumentParser(prog="python -m train.data.adapt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="adapter", required=True)
    p = sub.add_parser("odir", parents=[shared], help="ODIR-5K (Kaggle full_df.csv or challenge xlsx)")
    p.add_argument("--labels", type=Path, help="full_df.csv or the annotations xlsx (default: found in --src)")
    p.add_argument("--images", type=Path, help="image folder (default: preprocessed_images/ or "
                                               "ODIR-5K_Training_Images/ near the labels)")
    p.add_argument("--min-fine-count", type=int, default=10, help="rarer keyword sets become 'other' (10)")
    p = sub.add_parser("idrid", parents=[shared], help="IDRiD disease grading")
    for opt in ("--train-labels", "--test-labels", "--train-images", "--test-images"):
        p.add_argument(opt, type=Path, help="default: found in --src by its release name")
    sub.add_parser("folders", parents=[shared], help="one subfolder of --src per class")
    p = sub.add_parser("csv", parents=[shared], help="a CSV with a path column and label columns")
    p.add_argument("--images", type=Path, help="folder the paths are relative to (default: the CSV's)")
    p.add_argument("--path-column", required=True)
    p.add_argument("--label-columns", required=True, help="comma-separated; one classification task each")
    p.add_argument("--patient-column")
    p.add_argument("--eye-column", help="values left/right (also l/r, os/od)")
    p.add_argument("--text-column", help="diagnosis text (a text task)")
    p.add_argument("--ordinal-columns", default="", help="comma-separated label columns that are grades in "
                   "order (e.g. a DR grade 0-4): scored with quadratic kappa; classes sorted numerically")
    p.add_argument("--patient-pattern", help="regex whose first group in the path column is the patient id, "
                   "e.g. '^(\\d+)_' for EyePACS 10_left/10_right")
    p.add_argument("--joint", default="", help="comma-separated label columns scored together (joint accuracy)")
    sub.add_parser("unlabeled", parents=[shared], help="append images below --src as split 'unlabeled'")
    return parser


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _read(args: argparse.Namespace) -> common.Adapted:
    name = args.name or args.adapter
    if args.adapter == "odir":
        labels = args.labels or odir.find_labels(args.src)
        images = args.images or odir.find_images(labels, args.src)
        return odir.read_odir(labels, images, args.min_fine_count, name=name)
    if args.adapter == "idrid":
        found = idrid.discover(args.src) if args.src.is_dir() else {}
        paths = {k: getattr(args, k) or found.get(k) for k in ("train_labels", "test_labels", "train_images",
                                                                 "test_images")}
        if paths["train_labels"] is None or paths["train_images"] is None:
            raise DatasetError(f"{args.src}: IDRiD training labels or images not found; pass --train-labels "
                               "and --train-images")
        return idrid.read_idrid(paths["train_labels"], paths["train_images"], paths["test_labels"],
                                paths["test_images"], val_frac=args.val_frac, name=name)
    if args.adapter == "folders":
        return generic.read_folders(args.src, name=name)
    if args.adapter == "csv":
        return generic.read_csv(args.src, args.path_column, _names(args.label_columns),
                                images=args.images, patient_column=args.patient_column,
                                eye_column=args.eye_column, text_column=args.text_column, name=name,
                                ordinal_columns=_names(args.ordinal_columns), joint_columns=_names(args.joint),
                                patient_pattern=args.patient_pattern)
    return generic.read_unlabeled(args.src, name=name)


def run(args: argparse.Namespace) -> str:
    """Read, write the dataset folder and its report; returns the printable summary."""
    if args.resize is not None and args.resize < 16:
        raise DatasetError(f"--resize must be at least 16 pixels, got {args.resize}")
    if args.adapter != "unlabeled" and (args.out / MANIFEST_FILE).exists() and not args.force:
        raise DatasetError(f"{args.out}: already holds a dataset; pass --force to overwrite it")
    adapted = _read(args)
    if args.adapter == "unlabeled":
        rows = generic.append_unlabeled(adapted, args.out, args.resize, args.workers)
    else:
        fractions = None if args.adapter == "idrid" else {
            "train": 1.0 - args.val_frac - args.test_frac, "val": args.val_frac, "test": args.test_frac}
        rows = common.finish_dataset(adapted, args.out, seed=args.seed, resize=args.resize, workers=args.workers,
                                     fractions=fractions, min_freq=args.min_freq, max_len=args.max_len)
    common.write_report(adapted, args.out)
    for line in adapted.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    for line in adapted.warnings:
        print(f"warning: {line}", file=sys.stderr)
    text = common.summary(rows, load_spec(args.out), args.out)
    if adapted.skipped:
        text += f"\n{len(adapted.skipped)} rows skipped (listed above and in {args.out / common.REPORT_FILE})"
    return text + f"\nnext: python -m train.data.validate {args.out}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))
