"""The data wing: everything that makes or checks a dataset folder, torch-free (numpy, Pillow, PyYAML).

    manifest.py   the folder format (dataset.yaml + labels.csv), reading and writing it
    splits.py     patient-level train/val/test splits and label fractions
    validate.py   `python -m train.data.validate DATA`: every problem with its row
    adapters/     public releases (ODIR, IDRiD, CSV, class folders) -> the folder format
    adapt.py      `python -m train.data.adapt {odir,idrid,folders,csv,unlabeled} --src ... --out ...`
    synth/        the procedural synthetic fundus generator
    make_data.py  `python -m train.data.make_data --config configs/data.yaml --out data/synthetic`

It imports deploy/ and train.config (the YAML loader) only: never torch, timm or the training code
(tests/test_imports.py checks). The torch Dataset over a folder lives with training (train/datasets.py).
"""
