"""Predict diagnoses for fundus images with an ONNX model or a TensorRT engine (torch-free).

    python -m deploy.predict runs/default/onnx/student.onnx photo1.jpg photo2.png
    python -m deploy.predict student.onnx photos/ --json
    python -m deploy.predict student.trt.engine photos/*.jpg --backend tensorrt --batch-size 4
    python -m deploy.predict student.onnx 'photos/*.jpg' --out predictions.csv
    python -m deploy.predict student.onnx --manifest data/synthetic/manifest.csv --limit 8
    python -m deploy.predict student.onnx --watch /data/incoming --log /data/predictions.jsonl

Folders given as IMAGE are expanded to the images directly inside them; quoted globs are expanded
here. --manifest takes the images of one split (test by default) from a dataset's manifest.csv,
prints each true label next to the prediction and the accuracy per task at the end. A line is flagged
"HEADS DISAGREE" when the coarse head contradicts the fine head's top-1 (see deploy/labelled.py).
--out FILE.json / FILE.csv writes every prediction (atomically). Exit code: 0 when every image was
predicted, 1 when any image failed (the others are still printed), 2 for a bad model or usage.
Watch mode (see deploy/watch.py) runs until Ctrl-C, or one pass with --once.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import signal
import sys
from pathlib import Path

from deploy.contract import Contract
from deploy.errors import UserError, cli
from deploy.fileio import atomic_write_text
from deploy.labelled import (
    LabelledImage,
    accuracy,
    accuracy_line,
    derive_hierarchy,
    disagreements,
    read_manifest,
    spread,
    verdict,
)
from deploy.predictor import ClassResult, Prediction, Predictor
from deploy.runtime import BACKENDS
from deploy.watch import IMAGE_SUFFIXES, LOG_FORMATS, Watcher, is_candidate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file: X.onnx or X.engine, with its X.json sidecar next to it")
    p.add_argument("images", nargs="*", help="image files, folders or globs ('photos/*.jpg')")
    p.add_argument("--manifest", type=Path, metavar="CSV",
                   help="predict a split of a dataset manifest and compare with its labels (accuracy per task)")
    p.add_argument("--split", default="test", help="manifest split to use: train|val|test|unlabeled|all (default test)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="at most N manifest images, taken in turn from each true class of the first task")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write all predictions to FILE (.json or .csv)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="default: by the model's suffix")
    p.add_argument("--providers", nargs="+", metavar="P",
                   help="onnxruntime execution providers, best first (default: CUDA if available, then CPU)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    watch = p.add_argument_group("watch-folder mode")
    watch.add_argument("--watch", type=Path, metavar="DIR", help="predict new images dropped into DIR")
    watch.add_argument("--log", type=Path, metavar="FILE", help="append one record per image (.jsonl or .csv)")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    watch.add_argument("--settle", type=float, default=2.0,
                       help="seconds a file's size and mtime must be unchanged before it is read (default 2)")
    watch.add_argument("--once", action="store_true", help="process what is there now, then exit")
    return p


OUT_FORMATS = (".json", ".csv")


def refuse_url(item: str) -> None:
    """A URL is not a file: say so in one line (Path() would turn https:// into https:/...)."""
    if "://" in item:
        raise UserError(f"{item}: a URL; predict reads local files only. Download it first (e.g. curl -O "
                        f"'{item}') and pass the file")


def _glob(item: str) -> list[Path]:
    """Matches of a glob pattern the shell did not expand (quoted, or on Windows), sorted."""
    return sorted(Path(p) for p in glob.glob(item) if is_candidate(Path(p).name) or Path(p).is_dir())


def expand_images(items: list[str]) -> list[Path]:
    """Files as given; folders replaced by their image files (sorted, not recursive); globs expanded.

    Raises UserError when nothing is left to predict (an empty folder must not look like success)."""
    paths: list[Path] = []
    empty: list[str] = []
    for item in items:
        refuse_url(item)
        path = Path(item)
        if not path.exists() and glob.has_magic(item):
            matches = _glob(item)
            paths.extend(p for p in matches if p.is_file())
            if not matches:
                empty.append(item)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_candidate(p.name))
            paths.extend(found)
            if not found:
                empty.append(item)
        else:
            paths.append(path)  # a missing file is reported per image by the predictor
    if not paths:
        raise UserError(f"no image files in {', '.join(empty)} (looked for {', '.join(IMAGE_SUFFIXES)}, "
                        "not in subfolders); give image files or the folder that holds them")
    for item in empty:
        print(f"warning: {item}: no image files match", file=sys.stderr)
    return paths


def _answer(task, result) -> str:
    if isinstance(result, ClassResult):
        if task.num_classes > 5:
            return f"{task.name} top-5: " + ", ".join(f"{c} {p:.2f}" for c, p in result.top5)
        return f"{task.name}: {result.label} ({result.probability:.2f})"
    return f'{task.name}: "{result.text}"'


def _truth(task, result, truth: str) -> str:
    """' [true: glaucoma, ok]' (nothing when the image has no label for the task)."""
    if not truth:
        return ""
    shown = f'"{truth}"' if task.kind == "text" else truth
    check = verdict(task, result, truth)
    return f" [true: {shown}{', ' + check if check else ''}]"


def format_line(prediction: Prediction, contract: Contract, truth: dict[str, str] | None = None,
                disagree: list[str] | None = None) -> str:
    """One human-readable line: file, each task's answer (top-5 for many-class tasks) with the true
    label when known, a HEADS DISAGREE flag, time."""
    if not prediction.ok:
        return f"ERROR {prediction.error}"  # the message already names the file
    parts = [prediction.path]
    for task in contract.tasks:
        result = prediction.tasks[task.name]
        parts.append(_answer(task, result) + _truth(task, result, (truth or {}).get(task.name, "")))
    if disagree:
        parts.append("HEADS DISAGREE: " + "; ".join(disagree))
    parts.append(f"{sum(prediction.timing_ms.values()):.1f} ms")
    return " | ".join(parts)


def _usage_problem(args: argparse.Namespace) -> str | None:
    sources = [name for name, given in (("images", args.images), ("--manifest", args.manifest),
                                        ("--watch", args.watch)) if given]
    if not sources:
        return "give image files/folders, --manifest CSV, or --watch DIR --log FILE"
    if len(sources) > 1:
        return f"give one of images, --manifest or --watch, not {' and '.join(sources)}"
    if args.watch is not None and (args.log is None or args.log.suffix.lower() not in LOG_FORMATS):
        return "--watch needs --log FILE ending in .jsonl or .csv"
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        return "--batch-size and --threads must be >= 1"
    if args.limit is not None and args.limit < 1:
        return "--limit must be >= 1"
    if args.out is not None and args.out.suffix.lower() not in OUT_FORMATS:
        return f"--out {args.out}: the file must end in {' or '.join(OUT_FORMATS)}"
    return None


def _watch(predictor: Predictor, args: argparse.Namespace) -> int:
    def show(prediction: Prediction) -> None:
        line = json.dumps(prediction.to_dict()) if args.json else format_line(prediction, predictor.contract)
        print(line, flush=True)

    watcher = Watcher(predictor, args.watch, args.log, settle=args.settle, interval=args.interval,
                      batch_size=args.batch_size, on_prediction=show)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())  # systemd stop: finish the batch, then exit
    if watcher.log.cut_bytes:
        print(f"warning: {args.log}: removed an incomplete last record ({watcher.log.cut_bytes} bytes, cut by a "
              "crash); its image is predicted again", file=sys.stderr)
    if watcher.log.skipped_lines:
        print(f"warning: {watcher.log.skipped_lines} unreadable line(s) in {args.log} were ignored", file=sys.stderr)
    print(f"watching {args.watch} ({len(watcher.done)} image(s) already in {args.log}); Ctrl-C stops",
          file=sys.stderr)
    total = watcher.run(once=args.once)
    if total.waiting:
        print(f"{total.waiting} file(s) still being written; they are picked up by the next run", file=sys.stderr)
    print(f"logged {total.processed} image(s), {total.failed} failed", file=sys.stderr)
    return 1 if args.once and total.failed else 0


def _never_fail_on_names() -> None:
    """File names need not be valid UTF-8, nor fit the terminal's encoding: print them escaped, never crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _inputs(args: argparse.Namespace, contract: Contract) -> tuple[list[LabelledImage], dict]:
    """The images to predict (with their true labels when they come from a manifest) and the
    fine -> coarse hierarchy: the contract's, else derived from every labelled row of the manifest."""
    given = contract.extra.get("hierarchy")
    hierarchy = given if isinstance(given, dict) else {}
    if args.manifest is None:
        return [LabelledImage(p) for p in expand_images(args.images)], hierarchy
    refuse_url(str(args.manifest))
    rows = read_manifest(args.manifest, contract.tasks, split=None)
    images = [r for r in rows if args.split == "all" or r.split == args.split]
    if not images:
        raise UserError(f"{args.manifest}: no rows in split {args.split!r}; splits present: "
                        f"{sorted({r.split for r in rows})} (or --split all)")
    first = next((t.name for t in contract.tasks if t.kind == "classification"), None)
    return spread(images, first, args.limit), hierarchy or derive_hierarchy(contract.tasks, [r.labels for r in rows])


def _records(predictions: list[Prediction], images: list[LabelledImage], hierarchy: dict) -> list[dict]:
    """Per image: the prediction, its true labels (manifest only) and the heads' disagreements."""
    return [{"prediction": p, "truth": i.labels, "disagree": disagreements(p.tasks, hierarchy) if p.ok else []}
            for p, i in zip(predictions, images)]


def _json_doc(records: list[dict], head: dict) -> str:
    """Model facts, accuracy (manifest only) and every prediction with its truth and disagreements."""
    return json.dumps({**head, "predictions": [{**r["prediction"].to_dict(), "truth": r["truth"] or None,
                                                "disagreements": r["disagree"]} for r in records]}, indent=1)


def _write_out(path: Path, records: list[dict], contract: Contract, head: dict) -> None:
    """All predictions as JSON (with the accuracy) or CSV (one row per image), written atomically."""
    if path.suffix.lower() == ".json":
        atomic_write_text(path, _json_doc(records, head))
        return
    rows = []
    for r in records:
        truth = {f"{t.name}_true": r["truth"].get(t.name, "") for t in contract.tasks}
        rows.append({**r["prediction"].flat_dict(contract), **truth, "disagreements": "; ".join(r["disagree"])})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _report(predictor: Predictor, args: argparse.Namespace, records: list[dict]) -> None:
    contract = predictor.contract
    scored = [(r["prediction"].tasks, r["truth"]) for r in records if r["prediction"].ok and r["truth"]]
    report = accuracy(contract, scored) if scored else {}
    head = {**predictor.describe(), **({"accuracy": report} if report else {})}
    if args.json:
        print(_json_doc(records, head))
    else:
        for r in records:
            p = r["prediction"]
            print(format_line(p, contract, r["truth"], r["disagree"]), file=sys.stdout if p.ok else sys.stderr)
    if report:
        split = "all" if args.split == "all" else f"{args.split}-split"
        print(f"accuracy on {len(scored)} {split} image(s) of {args.manifest}: {accuracy_line(report)}",
              file=sys.stderr if args.json else sys.stdout)
    flagged = sum(bool(r["disagree"]) for r in records)
    if flagged and not args.json:
        print(f"{flagged} image(s) where the heads disagree: check them by hand", flush=True)
    if args.out is not None:
        _write_out(args.out, records, contract, head)
        print(f"wrote {len(records)} prediction(s) to {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        parser.print_usage(sys.stderr)
        raise UserError(problem)
    refuse_url(args.model)
    _never_fail_on_names()
    with Predictor(args.model, backend=args.backend, providers=args.providers, threads=args.threads) as predictor:
        if args.watch is not None:
            return _watch(predictor, args)
        images, hierarchy = _inputs(args, predictor.contract)
        predictions = predictor.predict([i.path for i in images], batch_size=args.batch_size)
        _report(predictor, args, _records(predictions, images, hierarchy))
    return 0 if all(p.ok for p in predictions) else 1


if __name__ == "__main__":
    raise SystemExit(cli(main))
