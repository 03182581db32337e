"""Predict diagnoses for fundus images with an ONNX model or a TensorRT engine (torch-free).

    python -m deploy.predict runs/default/onnx/student.onnx photo1.jpg photo2.png
    python -m deploy.predict student.onnx photos/ --json
    python -m deploy.predict student.trt.engine photos/*.jpg --backend tensorrt --batch-size 4
    python -m deploy.predict student.onnx --watch /data/incoming --log /data/predictions.jsonl

Folders given as IMAGE are expanded to the images directly inside them. Exit code: 0 when every image
was predicted, 1 when any image failed (the others are still printed), 2 for a bad model or usage.
Watch mode (see deploy/watch.py) runs until Ctrl-C, or one pass with --once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from deploy.contract import Contract
from deploy.errors import UserError, cli
from deploy.predictor import ClassResult, Prediction, Predictor
from deploy.runtime import BACKENDS
from deploy.watch import IMAGE_SUFFIXES, LOG_FORMATS, Watcher, is_candidate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file: X.onnx or X.engine, with its X.json sidecar next to it")
    p.add_argument("images", nargs="*", help="image files or folders")
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


def expand_images(items: list[str]) -> list[Path]:
    """Files as given; folders replaced by their image files (sorted, not recursive).

    Raises UserError when nothing is left to predict (an empty folder must not look like success)."""
    paths: list[Path] = []
    empty: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
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
        print(f"warning: {item}: no image files in this folder", file=sys.stderr)
    return paths


def format_line(prediction: Prediction, contract: Contract) -> str:
    """One human-readable line: file, each task's answer (top-5 for many-class tasks), time."""
    if not prediction.ok:
        return f"ERROR {prediction.error}"  # the message already names the file
    parts = [prediction.path]
    for task in contract.tasks:
        result = prediction.tasks[task.name]
        if isinstance(result, ClassResult):
            if task.num_classes > 5:
                parts.append(f"{task.name} top-5: " + ", ".join(f"{c} {p:.2f}" for c, p in result.top5))
            else:
                parts.append(f"{task.name}: {result.label} ({result.probability:.2f})")
        else:
            parts.append(f'{task.name}: "{result.text}"')
    parts.append(f"{sum(prediction.timing_ms.values()):.1f} ms")
    return " | ".join(parts)


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.watch is None and not args.images:
        return "give image files/folders, or --watch DIR --log FILE"
    if args.watch is not None and args.images:
        return "give either images or --watch, not both"
    if args.watch is not None and (args.log is None or args.log.suffix.lower() not in LOG_FORMATS):
        return "--watch needs --log FILE ending in .jsonl or .csv"
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        return "--batch-size and --threads must be >= 1"
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        parser.print_usage(sys.stderr)
        raise UserError(problem)
    _never_fail_on_names()
    with Predictor(args.model, backend=args.backend, providers=args.providers, threads=args.threads) as predictor:
        if args.watch is not None:
            return _watch(predictor, args)
        predictions = predictor.predict(expand_images(args.images), batch_size=args.batch_size)
        if args.json:
            print(json.dumps({**predictor.describe(), "predictions": [p.to_dict() for p in predictions]}, indent=1))
        else:
            for prediction in predictions:
                print(format_line(prediction, predictor.contract), file=sys.stdout if prediction.ok else sys.stderr)
    return 0 if all(p.ok for p in predictions) else 1


if __name__ == "__main__":
    raise SystemExit(cli(main))
