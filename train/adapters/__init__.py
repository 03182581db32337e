"""Real-data adapters: turn public fundus releases into the project's dataset folder format.

Each `read_*` returns an `Adapted` (tasks, samples pointing at the original images, skipped rows and
warnings); `finish_dataset` assigns patient-level splits and writes the folder. Entry point:
`python -m train.adapt {odir,idrid,folders,csv,unlabeled} --src ... --out ...`.
"""

from train.adapters.common import Adapted, Sample, finish_dataset, summary, write_report
from train.adapters.generic import append_unlabeled, read_csv, read_folders, read_unlabeled
from train.adapters.idrid import read_idrid
from train.adapters.odir import read_odir

__all__ = ["Adapted", "Sample", "append_unlabeled", "finish_dataset", "read_csv", "read_folders", "read_idrid",
           "read_odir", "read_unlabeled", "summary", "write_report"]
