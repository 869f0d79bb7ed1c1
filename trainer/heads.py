"""Metric-learning heads as Keras 3 layers: L2-Softmax, ArcFace, AdaCos (adaptive and fixed scale).

Each head takes ``[embedding, labels]`` while training (labels: int class ids, shape (B,)) and
``embedding`` alone at inference, and returns logits for a softmax cross-entropy. The class
centres live in a kernel ``W`` of shape (D, K); :meth:`class_weights` returns it L2-normalised per
column, which is what Grad-CAM uses as the head (``head.npz`` key ``class_weights``).

Only ``keras.ops`` is used, so the layers run on any Keras backend.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

HEADS = ("l2softmax", "arcface", "adacos", "adacos-fixed")


def _split(inputs: Any) -> tuple[Any, Any]:
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 2:
            raise ValueError("a head takes [embedding, labels] or embedding alone")
        return inputs[0], inputs[1]
    return inputs, None


class _CosineHead(keras.layers.Layer):
    """Shared parts: the (D, K) centre kernel and cosine similarities to normalised centres."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError("a metric-learning head needs at least 2 classes")
        self.num_classes = int(num_classes)

    def build(self, input_shape: Any) -> None:
        # [embedding shape, labels shape] while training, the embedding shape alone otherwise
        emb_shape = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(emb_shape[-1]), self.num_classes),
            initializer="glorot_uniform",
            trainable=True,
        )

    def cosine(self, embedding: Any) -> Any:
        x = ops.normalize(embedding, axis=-1)
        w = ops.normalize(self.kernel, axis=0)
        return ops.clip(ops.matmul(x, w), -1.0 + 1e-7, 1.0 - 1e-7)

    def class_weights(self) -> np.ndarray:
        """(D, K) float32 class centres, each column L2-normalised."""
        w = np.asarray(keras.ops.convert_to_numpy(self.kernel), np.float32)
        return w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), 1e-12)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


class L2Softmax(_CosineHead):
    """L2-constrained softmax (Ranjan et al. 2017): logits = alpha * normalize(x) @ W + b."""

    def __init__(self, num_classes: int, alpha: float = 16.0, **kwargs: Any) -> None:
        super().__init__(num_classes, **kwargs)
        self.alpha = float(alpha)

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros", trainable=True)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        embedding, _ = _split(inputs)
        x = ops.normalize(embedding, axis=-1) * self.alpha
        return ops.matmul(x, self.kernel) + self.bias

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha}


class ArcFace(_CosineHead):
    """Additive angular margin (Deng et al. 2019): the true class's logit is s * cos(theta + m)."""

    def __init__(self, num_classes: int, s: float = 30.0, m: float = 0.3, **kwargs: Any) -> None:
        super().__init__(num_classes, **kwargs)
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m={m} must be in [0, pi/2)")
        self.s, self.m = float(s), float(m)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        embedding, labels = _split(inputs)
        cos = self.cosine(embedding)
        if labels is None:
            return self.s * cos
        theta = ops.arccos(cos)
        # Past pi - m, cos(theta + m) would rise again; clamp so the margin always costs.
        target = ops.cos(ops.minimum(theta + self.m, math.pi))
        onehot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.num_classes)
        return self.s * (onehot * target + (1.0 - onehot) * cos)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "s": self.s, "m": self.m}


def adacos_initial_scale(num_classes: int) -> float:
    """AdaCos' fixed scale sqrt(2) * log(K - 1).

    With K = 2 that is log(1) = 0, and a zero scale never moves (the adaptive rule multiplies by
    it), so K - 1 is taken as at least 2 here.
    """
    return math.sqrt(2.0) * math.log(max(num_classes - 1, 2))


class AdaCos(_CosineHead):
    """AdaCos (Zhang et al. 2019): cosine logits with a scale set from the batch, no margin.

    ``adaptive=True`` (dynamic AdaCos): in every training batch
    ``s = log(B_avg) / cos(min(pi/4, theta_med))``, where B_avg is the batch mean of
    ``sum over non-target classes of exp(s * cos)`` and theta_med the median angle to the true class.
    ``adaptive=False`` keeps the fixed scale ``sqrt(2) * log(K - 1)``.
    """

    def __init__(self, num_classes: int, adaptive: bool = True, **kwargs: Any) -> None:
        super().__init__(num_classes, **kwargs)
        self.adaptive = bool(adaptive)

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer=keras.initializers.Constant(adacos_initial_scale(self.num_classes)),
            trainable=False,
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        embedding, labels = _split(inputs)
        cos = self.cosine(embedding)
        if labels is not None and training and self.adaptive:
            onehot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.num_classes)
            s = ops.stop_gradient(self.scale)
            b_avg = ops.mean(ops.sum((1.0 - onehot) * ops.exp(s * cos), axis=1))
            theta_true = ops.arccos(ops.sum(onehot * cos, axis=1))
            theta_med = ops.stop_gradient(ops.quantile(theta_true, 0.5))
            new_s = ops.log(ops.maximum(b_avg, 1e-12)) / ops.cos(ops.minimum(theta_med, math.pi / 4))
            self.scale.assign(ops.stop_gradient(ops.maximum(new_s, 1e-3)))
        return self.scale * cos

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "adaptive": self.adaptive}


def make_head(loss: str, num_classes: int, s: float = 30.0, m: float = 0.3) -> _CosineHead:
    """The head named on the command line (``--loss``)."""
    if loss == "l2softmax":
        return L2Softmax(num_classes, alpha=s if s else 16.0, name="head")
    if loss == "arcface":
        return ArcFace(num_classes, s=s, m=m, name="head")
    if loss == "adacos":
        return AdaCos(num_classes, adaptive=True, name="head")
    if loss == "adacos-fixed":
        return AdaCos(num_classes, adaptive=False, name="head")
    raise ValueError(f"unknown loss {loss!r}; use one of {', '.join(HEADS)}")
