"""The interface every inference backend implements, and the model-file checks they share.

A backend turns a preprocessed batch (float32 [N, 3, S, S]) into the model's raw named outputs. The
ONNX Runtime backend lives in deploy.runtime, the TensorRT one in deploy.trt_runtime; both build on
this module, which imports neither (so neither imports the other).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from deploy.errors import UserError

# First bytes of files people mistake for models, to say what the file really is.
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"PK\x03\x04": "a zip archive",
          b"%PDF": "a PDF document", b"{": "a JSON/text file"}


class ModelError(UserError):
    """A model file that is missing, is not a model, or cannot run here; the message says the fix."""


def sniff_file(path: Path) -> str:
    """A short description of what a file looks like from its first bytes ('' when unknown)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return ""
    if not head:
        return "an empty file"
    return next((what for magic, what in _MAGIC.items() if head.startswith(magic)), "")


def check_model_file(path: str | Path) -> Path:
    """The model path if it is an existing non-empty file, else ModelError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; pass the .onnx or .engine written by export/build_engine")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: model file is empty (0 bytes); copy it to the device again")
    return path


class Backend(ABC):
    """A loaded model that maps a preprocessed batch to named raw outputs."""

    name: str = "backend"
    input_name: str
    input_shape: tuple  # ints, or None for a dynamic dimension
    output_shapes: dict[str, tuple]
    output_dtypes: dict[str, np.dtype]
    max_batch: int | None = None  # None: no limit from the model

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for one batch; the batch must fit `max_batch`."""

    def describe(self) -> dict:
        """JSON-friendly facts about the backend (for logs and benchmark reports)."""
        return {"backend": self.name, "max_batch": self.max_batch}

    @abstractmethod
    def close(self) -> None:
        """Release resources (device memory, sessions). Safe to call twice."""
