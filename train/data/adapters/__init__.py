"""Real-data adapters: turn public fundus releases into the project's dataset folder format.

Each `read_*` returns an `Adapted` (tasks, samples pointing at the original images, skipped rows and
warnings); `finish_dataset` assigns patient-level splits and writes the folder. Entry point:
`python -m train.data.adapt {odir,idrid,folders,csv,unlabeled} --src ... --out ...`.

Nothing is re-exported here: a module imports the one it needs (a re-export made every adapter
import its own package, which imported every adapter back).
"""
