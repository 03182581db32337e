"""Generate the embedded synthetic dataset (`make data`).

    python -m train.data.make_data [--config configs/data.yaml] [--out data/synthetic] [key=value ...]

e.g. `python -m train.data.make_data patients=50 unlabeled_patients=0 difficulty=0.7`. Prints images/s, the
class balance per split and the vocabulary size; writes contact_sheet.png next to the manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from deploy.errors import cli
from train.config import ConfigError, load_config
from train.data.synth.catalog import COARSE_CLASSES
from train.data.synth.config import SynthConfig
from train.data.synth.contact_sheet import contact_sheet
from train.data.synth.generate import Result, generate


def summary(res: Result) -> str:
    """Human-readable report of a generation run."""
    n = len(res.rows)
    lines = [f"wrote {n} images to {res.root} in {res.seconds:.1f} s: {res.images_per_second:.1f} images/s with "
             f"{res.workers} workers; {res.images_per_cpu_second:.1f} images/s per core "
             f"({res.cpu_seconds:.1f} CPU s)"]
    for split in ("train", "val", "test", "unlabeled"):
        rows = [r for r in res.rows if r.split == split]
        if not rows:
            continue
        coarse = Counter(r.labels["coarse"] for r in rows if r.labels["coarse"])
        fine = Counter(r.labels["fine"] for r in rows if r.labels["fine"])
        balance = ", ".join(f"{c} {coarse[c]}" for c in COARSE_CLASSES) if coarse else "no labels"
        fine_txt = f"; {len(fine)} fine classes (min {min(fine.values())} images)" if fine else ""
        lines.append(f"  {split:9s} {len(rows):5d} images, {len({r.patient_id for r in rows})} patients: "
                     f"{balance}{fine_txt}")
    if res.vocabulary is not None:
        lines.append(f"vocabulary: {len(res.vocabulary)} tokens (incl. 4 special), max_len {res.vocabulary.max_len}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data.make_data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/data.yaml", help="SynthConfig YAML (default: %(default)s)")
    parser.add_argument("--out", default="data/synthetic", help="dataset folder (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(SynthConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        print(f"\r  rendered {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        res = generate(cfg, args.out, progress=progress)
    except OSError as exc:
        print(f"error: cannot write the dataset to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(summary(res))
    if cfg.contact_sheet_samples:
        sheet = contact_sheet(res.root, res.rows, list(COARSE_CLASSES), res.root / "contact_sheet.png",
                              per_class=cfg.contact_sheet_samples)
        print(f"contact sheet: {sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main))
