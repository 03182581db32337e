"""`make check`: the experiment config checked against the dataset, and the dataset validated, before
anything trains.

    python -m train.check --config configs/default.yaml data.root=data/idrid

The config check runs first and needs no torch, so a wrong task name fails in well under a second;
then the dataset is validated and split exactly as the training stages will load it.
"""

from __future__ import annotations

import argparse

from train.data.manifest import load_spec
from train.experiment import add_config_args, config_overrides, load_experiment
from train.preflight import check_experiment
from train.stage_times import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.check", description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config, config_overrides(args))
    check_experiment(cfg, load_spec(cfg.data.root), f"config (data.root={cfg.data.root})")
    from train.stage import load_splits  # the dataset validation and splits (loads torch)

    splits = load_splits(cfg)
    print(f"[check] {args.config} fits dataset {splits.data.spec.name!r} ({cfg.data.root}): "
          f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test / "
          f"{len(splits.unlabeled)} unlabelled images; tasks {splits.data.spec.task_names}; "
          f"run folder {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "check"))
