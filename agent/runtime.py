"""The TFLite interpreter on the device: import chain, tensor details, (de)quantisation.

ai-edge-litert is the maintained runtime; tflite-runtime is the older one (numpy<2 only).
TensorFlow is never imported here: the camera box does not have it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RUNTIME_MISSING = (
    "No TFLite runtime is installed. Install 'ai-edge-litert' (pip install 'yugami[agent]') "
    "or, on a box where it has no wheel, 'tflite-runtime' with numpy<2 (pip install 'yugami[tflite-runtime]')."
)


def load_interpreter_class() -> tuple[type, str]:
    """The Interpreter class of the first runtime that imports, and that runtime's name."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise ImportError(RUNTIME_MISSING) from exc


@dataclass(frozen=True)
class TensorInfo:
    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8") and self.scale != 0.0

    @classmethod
    def from_details(cls, d: dict[str, Any]) -> TensorInfo:
        scale, zero_point = d.get("quantization", (0.0, 0))
        return cls(
            name=str(d["name"]),
            index=int(d["index"]),
            shape=tuple(int(v) for v in d["shape"]),
            dtype=np.dtype(d["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quantization": {"scale": self.scale, "zero_point": self.zero_point},
        }


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float values to the tensor's storage type (int8, uint8 or float32), as its details say."""
    if not info.quantized:
        return x.astype(info.dtype, copy=False)
    limits = np.iinfo(info.dtype)
    q = np.round(x / np.float32(info.scale)) + info.zero_point
    return np.clip(q, limits.min, limits.max).astype(info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    if not info.quantized:
        return q.astype(np.float32, copy=False)
    return (q.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)


class TFLiteModel:
    """One TFLite model with its inputs and outputs read from the tensor details.

    ``run`` takes float inputs and returns float outputs; quantisation in between follows each
    tensor's own (scale, zero_point), so int8, uint8 and float32 models are driven the same way.
    """

    def __init__(self, model: str | Path | bytes, num_threads: int | None = None) -> None:
        interpreter_class, self.runtime = load_interpreter_class()
        kwargs: dict[str, Any] = {"num_threads": num_threads} if num_threads else {}
        if isinstance(model, bytes):
            self._interpreter = interpreter_class(model_content=model, **kwargs)
        else:
            self._interpreter = interpreter_class(model_path=str(model), **kwargs)
        self._interpreter.allocate_tensors()
        self.inputs = [TensorInfo.from_details(d) for d in self._interpreter.get_input_details()]
        self.outputs = [TensorInfo.from_details(d) for d in self._interpreter.get_output_details()]
        logger.debug("loaded TFLite model via %s: inputs %s outputs %s", self.runtime, self.inputs, self.outputs)

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    def set_input(self, x: np.ndarray, raw: bool = False) -> None:
        """Put one batch into input 0; ``raw`` means ``x`` is already in the tensor's storage type."""
        info = self.input
        if tuple(x.shape) != info.shape:
            if x.ndim == len(info.shape) - 1:
                x = x[None]
            if tuple(x.shape) != info.shape:
                raise ValueError(f"input of shape {x.shape} does not fit the model's input {info.shape}")
        self._interpreter.set_tensor(info.index, x if raw else quantize(x, info))

    def invoke(self) -> None:
        self._interpreter.invoke()

    def get_output(self, info: TensorInfo, raw: bool = False) -> np.ndarray:
        q = self._interpreter.get_tensor(info.index)
        return q if raw else dequantize(q, info)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Float input in, float outputs out (in the model's output order)."""
        self.set_input(x)
        self.invoke()
        return [self.get_output(info) for info in self.outputs]

    def output_by_name(self, name: str) -> TensorInfo:
        for info in self.outputs:
            if info.name == name:
                return info
        raise KeyError(f"the model has no output named {name!r}; it has {[o.name for o in self.outputs]}")
