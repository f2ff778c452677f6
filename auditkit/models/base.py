"""The one adapter interface: a classifier seen in image space ([0, 1], H x W grayscale), whatever its format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AuditkitError
from .identity import digest, hash_files, named_files, tree_files
from .spec import MissingSpec, ModelSpec
from .tf_runtime import GraphFunction, configure_tensorflow

# log(max(p, PROB_FLOOR)): a floor far below Keras' 1e-7 keeps a gradient for targets the model deems near-impossible.
PROB_FLOOR = 1e-30
PREDICT_BATCH = 64


class ModelAdapter:
    """A classifier seen in image space. Subclasses set `spec` (complete) and implement `_predict_batch`."""

    format: str = ""
    can_craft: bool = False
    craft_refusal: str = ""

    def __init__(self, name: str, path: Path | None, spec: ModelSpec):
        self.name = name
        self.path = path
        self.spec = spec
        self._sha256: dict[str, str] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def parameters(self) -> int | None:
        return None

    spec_file: Path | None = None  # the model.yaml the spec was read from (load_model sets it)
    spec_looked_for: tuple[Path, ...] = ()  # where load_model looked for one, when it found none

    def model_files(self) -> list[Path]:
        """The files that define the model, without its spec file."""
        if self.path is None:
            return []
        return tree_files(self.path) if self.path.is_dir() else [self.path]

    def files(self) -> dict[str, Path]:
        """Every file that defines the model, spec file included, by name relative to the model's folder."""
        if self.path is None:
            return {}
        paths = self.model_files()
        if self.spec_file is not None and self.spec_file.resolve() not in {p.resolve() for p in paths}:
            paths.append(self.spec_file)
        return named_files(paths, self.path if self.path.is_dir() else self.path.parent)

    def sha256(self) -> dict[str, str]:
        """SHA-256 of every file that defines the model, hashed once (at the first call)."""
        if self._sha256 is None:
            self._sha256 = hash_files(self.files())
        return self._sha256

    def digest(self) -> str:
        """One SHA-256 over all of the model's files (identity.digest)."""
        return digest(self.sha256())

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        size = self.spec.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise AuditkitError(
                f"model {self.name!r} takes {size}x{size} images, got an array of shape {images.shape}; "
                f"set data.preprocess.size to {size}"
            )
        return images

    def predict_proba(self, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Class probabilities, (N, K) float32."""
        images = self.check_images(images)
        out = [self._predict_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        return self.predict_proba(images, batch_size).argmax(axis=1)

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def gradient_source(self) -> str | None:
        """How input gradients are obtained, for the record; None where the model was never asked for them."""
        return None

    def require_gradients(self) -> None:
        if not self.can_craft:
            raise AuditkitError(self.craft_refusal, self.name)


class TFAdapter(ModelAdapter):
    """A model whose forward pass is a differentiable TF function of the image-space input."""

    can_craft = True

    def __init__(self, name: str, path: Path | None, spec: ModelSpec, forward, parameters: int | None = None):
        super().__init__(name, path, spec)
        self.tf = configure_tensorflow()
        self._forward = forward  # model-input tensor -> model-output tensor
        self._parameters = parameters
        size = spec.input_size
        sig = [self.tf.TensorSpec([None, size, size], self.tf.float32)]
        self._probs_fn = GraphFunction(self.tf, self.tf_probs, sig)
        self._grad_fn = GraphFunction(self.tf, self._loss_gradient, sig + [self.tf.TensorSpec([None], self.tf.int32)])

    @property
    def parameters(self) -> int | None:
        return self._parameters

    def gradient_source(self) -> str | None:
        return "TensorFlow automatic differentiation (exact)"

    def tf_log_probs(self, images, forward=None):
        """Log class probabilities (N, K); the cross-entropy for label y is minus column y. `forward`: the model's
        forward pass to use (default its own)."""
        out = (forward or self._forward)(model_input(images, self.spec, self.tf))
        if self.spec.output == "logits":
            return self.tf.nn.log_softmax(out, axis=-1)
        return self.tf.math.log(self.tf.maximum(out, PROB_FLOOR))

    def tf_probs(self, images):
        out = self._forward(model_input(images, self.spec, self.tf))
        return self.tf.nn.softmax(out, axis=-1) if self.spec.output == "logits" else out

    def loop_log_probs(self):
        """(version, log-probability function) for the UAP loop's graphs, which are traced again whenever the
        version changes."""
        return None, self.tf_log_probs

    def _loss_gradient(self, images, labels):
        return cross_entropy_gradient(self.tf, self.tf_log_probs, images, labels)

    def loss_gradient(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the per-image cross-entropy w.r.t. the image-space input, (N, H, W)."""
        images = self.check_images(images)
        return self._grad_fn(images, np.asarray(labels, np.int32)).numpy()

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        return self._probs_fn(images).numpy()


def cross_entropy_gradient(tf, log_probs, images, labels):
    """Gradient of each image's cross-entropy at its label w.r.t. the images (TF, inside a graph), through the
    log-probability function `log_probs`."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = -tf.gather(log_probs(images), labels, axis=1, batch_dims=1)
    return tape.gradient(loss, images)


def infer_spec(input_shape, output_kind: str | None, num_outputs: int | None) -> ModelSpec:
    """What the input and output shapes say: square size, channels, layout; output type if known."""
    dims = list(input_shape)
    layout, size, channels = "NHWC", None, None
    if len(dims) == 4:
        if dims[-1] in (1, 3):
            size, channels = dims[1], dims[-1]
        elif dims[1] in (1, 3):
            layout, size, channels = "NCHW", dims[2], dims[1]
    elif len(dims) == 3:  # (N, H, W): a grayscale model without a channel axis is not supported by the spec
        size = dims[1]
    classes = tuple(f"class{i}" for i in range(num_outputs)) if num_outputs else None
    return ModelSpec(classes=classes, input_size=size if isinstance(size, int) else None,
                     channels=channels if isinstance(channels, int) else None, layout=layout, output=output_kind)


def model_input(images, spec: ModelSpec, xp):
    """Image space (N, H, W) in [0, 1] -> the model's input; `xp` is numpy or tensorflow (differentiable)."""
    x = xp.expand_dims(images, -1)  # not images[..., None]: TF's gradient of that slice is a slow full-size op
    if spec.scale != 1.0:  # identity steps are skipped: each is a full-size op in every UAP step
        x = x * np.float32(spec.scale)
    if spec.channels == 3:
        x = xp.repeat(x, 3, axis=-1)
    if any(m != 0.0 for m in spec.mean):
        x = x - np.asarray(spec.mean, np.float32)
    if any(s != 1.0 for s in spec.std):
        x = x / np.asarray(spec.std, np.float32)
    return xp.transpose(x, (0, 3, 1, 2)) if spec.layout == "NCHW" else x


def probe_images(spec: ModelSpec) -> np.ndarray:
    return np.random.default_rng(0).random((4, spec.input_size, spec.input_size), dtype=np.float32)


def detect_output(raw: np.ndarray) -> str:
    """Rows that are non-negative and sum to 1 on random inputs are probabilities; anything else, logits."""
    is_prob = bool(np.all(raw >= 0) and np.allclose(raw.sum(axis=1), 1.0, atol=1e-3))
    return "softmax" if is_prob else "logits"


def complete_spec(spec: ModelSpec, name: str, graph: ModelSpec) -> ModelSpec:
    """The spec, once it says everything the audit needs and agrees with what the model's graph says."""
    missing = [k for k in ("classes", "input_size", "channels") if getattr(spec, k) is None]
    if missing:
        raise MissingSpec(f"cannot tell the model's {', '.join(missing)} from the file", missing, name)
    if spec.layout == "NCHW" or spec.channels == 3:
        n = len(spec.mean)
        if n not in (1, spec.channels) or len(spec.std) not in (1, spec.channels):
            raise AuditkitError(f"mean/std must have 1 or {spec.channels} values (--mean / --std)", name)
    for what, declared, actual in (
            ("number of classes", len(spec.classes), len(graph.classes) if graph.classes else None),
            ("input size", spec.input_size, graph.input_size), ("channels", spec.channels, graph.channels)):
        if actual is not None and declared != actual:
            raise AuditkitError(f"the model spec gives {what} {declared}, but the model's graph has {actual}", name)
    return spec
