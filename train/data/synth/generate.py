"""Generate the synthetic dataset folder: patients -> eyes -> images (in parallel) -> manifest.

Output (the format of train.data.manifest): images/<patient>_<eye>.jpg, dataset.yaml, vocab.json,
synth_config.yaml and, written last, manifest.csv. Any old manifest is removed before the first image
is written, so an interrupted run never leaves a manifest pointing at missing or mismatched images.
Images are always re-rendered and rewritten (same config -> same bytes, so a rerun is harmless);
images of the folder that the new plan does not contain are deleted.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.contract import TaskSpec
from deploy.vocab import Vocabulary
from train.config import save_config
from train.data.manifest import MANIFEST_FILE, DatasetSpec, Row, build_vocabulary, save_spec, write_manifest
from train.data.splits import assign_splits
from train.data.synth.catalog import (
    COARSE_CLASSES,
    FINE_NAMES,
    FINE_TO_COARSE,
    fellow_eye,
    main_eye_classes,
    sample_main_eye,
)
from train.data.synth.config import SynthConfig
from train.data.synth.paint import noise_bank
from train.data.synth.render import LABELLED, UNLABELLED, EyeJob, RenderSettings, render_jpeg

IMAGE_DIR = "images"
CONFIG_FILE = "synth_config.yaml"
TASK_NAMES = ("coarse", "fine", "diagnosis")


@dataclass
class Result:
    """What a generation run produced."""

    root: Path
    rows: list[Row]
    seconds: float  # wall clock of the rendering
    cpu_seconds: float  # CPU time of the rendering, all processes (unaffected by other load)
    workers: int
    vocabulary: Vocabulary | None

    @property
    def images_per_second(self) -> float:
        return len(self.rows) / max(self.seconds, 1e-9)

    @property
    def images_per_cpu_second(self) -> float:
        """Throughput of one core, from CPU time."""
        return len(self.rows) / max(self.cpu_seconds, 1e-9)


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def dataset_spec(cfg: SynthConfig) -> DatasetSpec:
    """dataset.yaml of the synthetic set: coarse/fine classification, diagnosis text, fine->coarse map."""
    return DatasetSpec(
        name=cfg.name,
        description="Procedural fundus photographs (train.data.synth), deterministic from synth_config.yaml.",
        tasks=[TaskSpec("coarse", "classification", COARSE_CLASSES, "T1: coarse disease",
                        normal="normal"),  # any-disease-vs-normal numbers in summary.md
               TaskSpec("fine", "classification", FINE_NAMES, "T2: fine sub-category (scored top-5)"),
               TaskSpec("diagnosis", "text", (), "T3: diagnosis sentence (scored BLEU)")],
        extra={"fine_to_coarse": dict(FINE_TO_COARSE), "generator": "train.data.synth"})


def plan_jobs(cfg: SynthConfig) -> list[EyeJob]:
    """Every eye to render: labelled patients first (exact class quotas), then unlabelled ones."""
    jobs: list[EyeJob] = []
    rng = np.random.default_rng([cfg.seed, LABELLED, 0xC1A55])
    mains = main_eye_classes(cfg.patients, cfg.prevalence, rng)
    width = len(str(max(cfg.patients, cfg.unlabeled_patients, 1)))
    for stream, count, prefix in ((LABELLED, cfg.patients, "P"), (UNLABELLED, cfg.unlabeled_patients, "U")):
        for i in range(count):
            prng = np.random.default_rng([cfg.seed, stream, i, 0])  # not the traits' stream (render.py)
            main = mains[i] if stream == LABELLED else sample_main_eye(cfg.prevalence, prng)
            fellow = fellow_eye(main, prng)
            main_is_right = prng.random() < 0.5
            fines = {"right": main if main_is_right else fellow, "left": fellow if main_is_right else main}
            pid = f"{prefix}{i:0{width}d}"
            jobs += [EyeJob(stream, i, pid, eye, fines[eye]) for eye in ("right", "left")]
    return jobs


_SETTINGS: RenderSettings | None = None
_IMAGES: Path | None = None


def _init_worker(settings: RenderSettings, images: Path) -> None:
    global _SETTINGS, _IMAGES
    _SETTINGS, _IMAGES = settings, images
    noise_bank(settings.size, settings.seed)  # inherited from the parent under fork; built under spawn


def _render_and_write(job: EyeJob) -> str:
    """Worker: render one eye, write its JPEG (temp file + rename), return the diagnosis sentence."""
    assert _SETTINGS is not None and _IMAGES is not None, "worker not initialised"
    data, text = render_jpeg(job, _SETTINGS)
    path = _IMAGES / job.filename
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return text


def _render_all(jobs: list[EyeJob], settings: RenderSettings, images: Path, workers: int,
                progress: Callable[[int, int], None] | None) -> list[str]:
    texts: list[str] = []
    if workers == 1:
        _init_worker(settings, images)
        for job in jobs:
            texts.append(_render_and_write(job))
            if progress:
                progress(len(texts), len(jobs))
        return texts
    noise_bank(settings.size, settings.seed)  # once, before forking, so workers share it
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(settings, images)) as pool:
        for text in pool.map(_render_and_write, jobs, chunksize=chunk):
            texts.append(text)
            if progress and (len(texts) % 250 == 0 or len(texts) == len(jobs)):
                progress(len(texts), len(jobs))
    return texts


def generate(cfg: SynthConfig, out: str | Path, progress: Callable[[int, int], None] | None = None) -> Result:
    """Render the dataset described by `cfg` into folder `out` (created if needed)."""
    root = Path(out)
    images = root / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest may outlive the images it names
    workers = cfg.workers or os.cpu_count() or 1
    jobs = plan_jobs(cfg)
    settings = RenderSettings(cfg.size, cfg.seed, cfg.difficulty, cfg.jpeg_quality)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    texts = _render_all(jobs, settings, images, min(workers, max(1, len(jobs))), progress)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    keep = {job.filename for job in jobs}
    for stale in images.glob("*.jpg"):
        if stale.name not in keep:
            stale.unlink()
    rows = []
    for job, text in zip(jobs, texts):
        labelled = job.stream == LABELLED
        labels = {"coarse": FINE_TO_COARSE[job.fine], "fine": job.fine, "diagnosis": text} if labelled \
            else dict.fromkeys(TASK_NAMES, "")
        rows.append(Row(f"{IMAGE_DIR}/{job.filename}", job.patient_id, job.eye, "" if labelled else "unlabeled",
                        labels))
    rows = assign_splits(rows, stratify_task="coarse", fractions=cfg.split_fractions, seed=cfg.seed)
    spec = dataset_spec(cfg)
    vocab = build_vocabulary(spec, rows, min_freq=cfg.vocab_min_freq, max_len=cfg.vocab_max_len)
    if vocab is not None:
        vocab.save(root / spec.vocabulary)
    save_spec(spec, root)
    save_config(cfg, root / CONFIG_FILE)
    os.sync()  # image data on disk before the manifest that names them
    write_manifest(root / spec.manifest, rows, list(TASK_NAMES))
    return Result(root, rows, seconds, cpu, workers, vocab)
