"""PyTorch view of a dataset folder: rows -> (image tensor, per-task targets).

Pixels go through `deploy.preprocess` (the code the device runs) plus, in training only, a small
photometric/geometric jitter applied to the already-resized image. Targets: class index per
classification task (-1 = no label), padded token ids for the text task (all <pad> = no label).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2 as T

from deploy.contract import TaskSpec
from deploy.preprocess import PreprocessSpec, load_image, normalize, resize_image
from deploy.vocab import PAD_ID, Vocabulary
from train.data.manifest import Dataset, DatasetError, Row
from train.experiment import AugmentConfig


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images as every model here takes it: on `device`, in channels-last layout.

    Why: oneDNN's CPU convolutions run channels-last kernels; measured on this project's 2-core CPU with
    Lite1 at 96 px and one thread, a training step took 0.35 s instead of 0.56 s and inference halved.
    A convolution given a channels-last input returns channels-last output, so the model needs no change
    and its checkpoints and exports stay as they were."""
    return images.to(device, memory_format=torch.channels_last, non_blocking=True)


def class_index(tasks: list[TaskSpec]) -> dict[str, dict[str, int]]:
    return {t.name: {c: i for i, c in enumerate(t.classes)} for t in tasks if t.kind == "classification"}


def encode_targets(rows: list[Row], tasks: list[TaskSpec], vocab: Vocabulary | None) -> dict[str, np.ndarray]:
    """Targets of `rows` as arrays: int64 class ids (-1 missing) or [N, max_len] token ids (PAD = missing).

    Raises DatasetError naming the manifest line of a label that is not in the task's class list.
    """
    index = class_index(tasks)
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        if task.kind == "classification":
            ids = np.full(len(rows), -1, dtype=np.int64)
            for i, r in enumerate(rows):
                value = r.labels.get(task.name, "") if r.split != "unlabeled" else ""
                if value:
                    if value not in index[task.name]:
                        raise DatasetError(f"manifest line {r.line} ({r.path}): {task.name}={value!r} is not one "
                                           f"of the classes in dataset.yaml; fix the label or add the class")
                    ids[i] = index[task.name][value]
            out[task.name] = ids
        else:
            assert vocab is not None, "a text task needs the vocabulary"
            tokens = np.full((len(rows), vocab.max_len), PAD_ID, dtype=np.int64)
            for i, r in enumerate(rows):
                value = r.labels.get(task.name, "") if r.split != "unlabeled" else ""
                if value:
                    tokens[i] = vocab.encode_padded(value)
            out[task.name] = tokens
    return out


def reference_texts(rows: list[Row], task: str) -> list[str]:
    """Reference sentences for BLEU ('' where missing)."""
    return [r.labels.get(task, "") if r.split != "unlabeled" else "" for r in rows]


def build_augment(cfg: AugmentConfig) -> T.Compose | None:
    if not cfg.enabled:
        return None
    return T.Compose([
        T.RandomAffine(degrees=cfg.rotate_deg, translate=(cfg.translate, cfg.translate),
                       scale=(1 - cfg.scale, 1 + cfg.scale)),
        T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue),
    ])


class FundusImages(TorchDataset):
    """Images + targets of some rows of a dataset; item = dict(image, index, labelled, <task>...).

    With `cache`, each image is decoded and resized once and kept in memory (at the model's input size:
    ~27 kB per image at 96 px). Augmentation is applied after that resize, so caching changes no pixel.
    """

    def __init__(self, dataset: Dataset, rows: list[Row], tasks: list[TaskSpec], spec: PreprocessSpec,
                 augment: AugmentConfig | None = None, cache: bool = True):
        self.dataset, self.rows, self.tasks, self.spec = dataset, rows, tasks, spec
        self.targets = encode_targets(rows, tasks, dataset.vocabulary)
        self.augment = build_augment(augment) if augment is not None else None
        self.labelled = np.array([r.split != "unlabeled" and any(r.labels.values()) for r in rows])
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def resized(self, i: int) -> Image.Image:
        """The deployed load + resize of item i (cached)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = resize_image(load_image(self.dataset.image_path(self.rows[i])), self.spec)
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img = self.resized(i)
        if self.augment is not None:
            img = self.augment(img)
        item = {"image": torch.from_numpy(normalize(img, self.spec)), "index": torch.tensor(i),
                "labelled": torch.tensor(bool(self.labelled[i]))}
        for name, values in self.targets.items():
            item[name] = torch.from_numpy(np.asarray(values[i]))
        return item
