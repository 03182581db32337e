"""The one preprocessing implementation: image file -> normalized float32 CHW array.

Training (train/data), calibration (compress/), benchmarks and the device (deploy/predict) all call
these functions, so a model never sees pixels prepared differently from how it was trained (no skew).
Only numpy and Pillow: this runs on the Jetson.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from deploy.errors import UserError

RESIZE_MODES = ("letterbox", "center_crop", "stretch")
# ImageNet statistics: what torchvision/timm ResNets were trained with (PreprocessSpec's default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(UserError):
    """An image file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels are prepared. Travels inside the deployment contract.

    resize: "letterbox" pads the image to a square with black (the fundus background) and resizes it,
    so the whole circular field of view is kept whatever the camera's aspect ratio; "center_crop" crops
    the central square; "stretch" resizes without keeping the aspect ratio.
    """

    size: int = 128
    resize: str = "letterbox"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.size < 16:
            raise ValueError(f"input size must be >= 16 pixels, got {self.size}")
        if self.channel_order not in ("RGB", "BGR") or self.layout != "NCHW":
            raise ValueError("supported: channel_order RGB or BGR, layout NCHW")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {self.interpolation!r}")
        check_normalisation(self.mean, self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


def check_normalisation(mean, std) -> None:
    """ValueError unless mean and std are 3 finite values (one per RGB channel) and every std is > 0:
    a zero std divides by zero, a negative one silently inverts the image. None = not given (a config
    section that takes the run's value)."""
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        try:
            ok = len(values) == 3 and all(np.isfinite(float(v)) for v in values)
        except (TypeError, ValueError):  # not a sequence, or not numbers
            ok = False
        if not ok:
            raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    if std is not None and min(float(v) for v in std) <= 0:
        raise ValueError(f"std must be > 0 for every channel, got {tuple(std)!r}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: grayscale is replicated, alpha composited on black, 16-bit rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        # 16-bit data may not use the full range; scale by the type's range when it does, else by max.
        scale = 65535.0 if hi > 255 and img.mode != "F" else max(hi, 1.0)
        arr8 = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file fully into 8-bit RGB, or raise ImageError naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:  # missing, removed meanwhile, or unreadable
        raise ImageError(f"{path}: file not found or unreadable ({exc.strerror}); check the path "
                         f"(paths in a manifest are relative to it)") from exc
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file; point at an image file")
    if size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes); re-copy it from the camera or drop its row")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are the same problem here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # forces a full decode, so truncated files fail here and not later
                return to_rgb(img)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image Pillow can read; convert it to JPEG or PNG") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: image is implausibly large for a fundus photograph ({exc}); resize it "
                         "(e.g. to 4000 px on the long side) before prediction") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc}); re-export it or drop its row") from exc


def resize_image(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Apply the spec's resize rule; returns a spec.size x spec.size RGB image."""
    resample = Image.Resampling.BILINEAR if spec.interpolation == "bilinear" else Image.Resampling.BICUBIC
    w, h = img.size
    if spec.resize == "letterbox" and w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    elif spec.resize == "center_crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (spec.size, spec.size):
        img = img.resize((spec.size, spec.size), resample=resample)
    return img


def normalize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resized RGB image -> float32 CHW array, scaled to [0,1] then standardized by mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if spec.channel_order == "BGR":
        arr = arr[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if spec.channel_order == "BGR":
        mean, std = mean[::-1], std[::-1]
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image (any mode) -> model input (3, size, size) float32."""
    return normalize(resize_image(to_rgb(img), spec), spec)


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Image file -> model input (3, size, size) float32; raises ImageError for unusable files."""
    return preprocess_image(load_image(path), spec)
