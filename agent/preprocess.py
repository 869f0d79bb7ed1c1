"""What the device does to a frame before the model sees it, defined once.

The trainer imports this module for every image it trains, calibrates and evaluates on,
so a bundle's model always sees frames prepared exactly as the camera box prepares them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

_RESIZE_METHODS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


class ImageError(ValueError):
    """An image file that cannot be read, or a frame that cannot be prepared."""


@dataclass(frozen=True)
class Preprocessing:
    """The exact recipe from a camera frame to the model's float input.

    Steps, in order: ROI crop (in frame pixels), to 3-channel RGB (grey is replicated),
    resize to ``input_size`` with ``resize``, then ``x * scale + offset`` in float32.
    The defaults are MobileNetV2's own scaling to [-1, 1].
    """

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    channels: int = 3
    color_order: str = "RGB"
    resize: str = "area"
    roi: tuple[int, int, int, int] | None = None  # (x, y, width, height)
    scale: float = 1.0 / 127.5
    offset: float = -1.0

    def __post_init__(self) -> None:
        if self.resize not in _RESIZE_METHODS:
            raise ValueError(f"unknown resize method {self.resize!r}; use one of {sorted(_RESIZE_METHODS)}")
        if self.channels != 3 or self.color_order != "RGB":
            raise ValueError("only 3-channel RGB model inputs are supported")
        h, w = self.input_size
        if h < 32 or w < 32:
            raise ValueError(f"input_size {self.input_size} is too small; MobileNetV2 needs at least 32x32")
        if self.roi is not None:
            x, y, rw, rh = self.roi
            if x < 0 or y < 0 or rw <= 0 or rh <= 0:
                raise ValueError(f"roi {self.roi} must be (x, y, width, height) with x, y >= 0 and a positive size")

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["roi"] = list(self.roi) if self.roi is not None else None
        d["scaling"] = "x * scale + offset on 0..255 RGB"
        return d

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> Preprocessing:
        roi = d.get("roi")
        return cls(
            input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
            channels=int(d.get("channels", 3)),
            color_order=str(d.get("color_order", "RGB")),
            resize=str(d.get("resize", "area")),
            roi=tuple(int(v) for v in roi) if roi is not None else None,  # type: ignore[arg-type]
            scale=float(d["scale"]),
            offset=float(d["offset"]),
        )

    def with_roi(self, roi: tuple[int, int, int, int] | None) -> Preprocessing:
        return replace(self, roi=roi)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as OpenCV does (BGR or grey, uint8); raise ImageError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file")
    data = np.fromfile(str(p), dtype=np.uint8)
    frame = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if frame is None:
        raise ImageError(f"{p}: not a readable image (corrupt, truncated or an unsupported format)")
    return to_uint8(frame, str(p))


def to_uint8(frame: np.ndarray, name: str = "frame") -> np.ndarray:
    """Bring 16-bit or float frames to uint8 so every later step sees one type."""
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype == np.uint16:
        return (frame >> 8).astype(np.uint8)
    if np.issubdtype(frame.dtype, np.floating):
        return np.clip(frame * (255.0 if frame.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    raise ImageError(f"{name}: unsupported pixel type {frame.dtype}")


def to_rgb(frame: np.ndarray, name: str = "frame") -> np.ndarray:
    """OpenCV's BGR / BGRA / grey frame to 3-channel RGB uint8."""
    frame = to_uint8(frame, name)
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.ndim == 3 and frame.shape[2] == 1:
        return cv2.cvtColor(frame[:, :, 0], cv2.COLOR_GRAY2RGB)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    raise ImageError(f"{name}: frame of shape {frame.shape} is not a grey, BGR or BGRA image")


def crop_roi(frame: np.ndarray, roi: tuple[int, int, int, int] | None, name: str = "frame") -> np.ndarray:
    if roi is None:
        return frame
    x, y, w, h = roi
    fh, fw = frame.shape[:2]
    if x + w > fw or y + h > fh:
        raise ImageError(
            f"{name}: ROI (x={x}, y={y}, w={w}, h={h}) reaches outside the {fw}x{fh} frame; "
            "fix capture.roi / the bundle's ROI, or the camera resolution"
        )
    return frame[y : y + h, x : x + w]


def prepare_rgb(frame: np.ndarray, spec: Preprocessing, name: str = "frame") -> np.ndarray:
    """ROI, RGB and resize: the uint8 picture the model sees (also what Grad-CAM is drawn over)."""
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise ImageError(f"{name}: empty frame")
    # Resize before the colour conversion: both act on each channel alone, so the order does not change
    # a pixel, and a 640x480 frame is converted after it has shrunk (and a grey one resized on one channel).
    small = to_uint8(crop_roi(frame, spec.roi, name), name)
    h, w = spec.input_size
    if small.shape[:2] != (h, w):
        small = cv2.resize(small, (w, h), interpolation=_RESIZE_METHODS[spec.resize])
    return to_rgb(small, name)


def scale_to_float(rgb: np.ndarray, spec: Preprocessing) -> np.ndarray:
    return rgb.astype(np.float32) * np.float32(spec.scale) + np.float32(spec.offset)


def preprocess(frame: np.ndarray, spec: Preprocessing, name: str = "frame") -> np.ndarray:
    """Frame (BGR / grey, any size) to the model's float32 HxWx3 input."""
    return scale_to_float(prepare_rgb(frame, spec, name), spec)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
