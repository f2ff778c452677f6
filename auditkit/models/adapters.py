"""Model adapters: one interface in image space ([0, 1], H x W grayscale) over Keras, SavedModel and ONNX models."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditkitError
from ..fileio import sha256_files
from .checks import check_input_rank, check_input_shape, onnx_session
from .fast_gradients import with_fast_input_gradients
from .spec import ModelSpec

# log(max(p, PROB_FLOOR)): a floor far below Keras' 1e-7 keeps a gradient for targets the model deems near-impossible.
PROB_FLOOR = 1e-30
PREDICT_BATCH = 64


def configure_tensorflow() -> Any:
    """Import TF once, with threading chosen for a small CPU: all cores inside an op (AUDITKIT_THREADS caps them),
    and as many ops at a time as there are cores, so that the audit's concurrent cells run side by side.

    One UAP loop is a chain of small dependent ops that keeps two cores only half busy; two cells at a time
    crafted 1.4x faster than one after the other on a 2-core machine, with the same UAPs.
    TF's oneDNN kernels are off unless TF_ENABLE_ONEDNN_OPTS says otherwise (it must be set before TF is first
    imported): their per-op overhead made a single-image UAP step at 224 px 2.9x slower, while batched calls and
    training ran at the same speed.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if not getattr(configure_tensorflow, "done", False):
        tf = _import_tensorflow_quietly()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("AUDITKIT_THREADS", "0")))
            tf.config.threading.set_inter_op_parallelism_threads(os.cpu_count() or 1)
        except RuntimeError:  # already initialised by the caller; keep their setting
            pass
        configure_tensorflow.done = True
    import tensorflow as tf

    return tf


# One trace at a time: concurrent cells' graphs differentiate the same frozen model function, whose gradient TF
# builds at the first trace that needs it, and not thread-safely.
_TRACING = threading.Lock()


class GraphFunction:
    """`fn` as a TF graph for a fixed input signature, traced at the first call, which every later call runs
    directly: tf.function's own dispatch matches the arguments against its signature on each call, 0.6-1 ms a
    call on a 2-core Xeon, a quarter of a single-image UAP step at 64 px. Arguments that fit the signature go
    straight to the traced graph (its flat call, private to TF 2.21): the public call still bound them to the
    signature's structure, 0.1-0.2 ms of a 2.7 ms single-image step at 224 px. Others take the public call, which
    says what does not fit."""

    def __init__(self, tf, fn, signature: list):
        self._function = tf.function(fn, input_signature=signature)
        self._tf, self._signature = tf, signature
        self._traced = self._flat_call = None

    def __call__(self, *args):
        if self._traced is None:
            with _TRACING:
                if self._traced is None:
                    traced = self._function.get_concrete_function()
                    self._flat_call = getattr(traced, "_call_flat", None)
                    self._traced = traced
        tf = self._tf
        if self._flat_call is not None and len(args) == len(self._signature):
            flat = [a if isinstance(a, tf.Tensor) else tf.constant(a, spec.dtype)
                    for a, spec in zip(args, self._signature)]
            if all(spec.is_compatible_with(t) for spec, t in zip(self._signature, flat)):
                return self._flat_call(flat, self._traced.captured_inputs)
        return self._traced(*args)


def cross_entropy_gradient(tf, log_probs, images, labels):
    """Gradient of each image's cross-entropy at its label w.r.t. the images (TF, inside a graph), through the
    log-probability function `log_probs`."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = -tf.gather(log_probs(images), labels, axis=1, batch_dims=1)
    return tape.gradient(loss, images)


@contextlib.contextmanager
def op_determinism():
    """Deterministic TF ops for the duration; switched back off afterwards if they were off."""
    configure_tensorflow()
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # the public API can only switch it on

    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def _import_tensorflow_quietly():
    """`import tensorflow` with fd 2 sent to /dev/null: TF 2.21 prints its C++ start-up banner (oneDNN notice)
    through absl before any log level applies. Import errors still surface as Python exceptions."""
    import os
    import sys

    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


class ModelAdapter:
    """A classifier seen in image space. Subclasses set `spec` (complete) and implement `_predict_batch`."""

    format: str = ""
    can_craft: bool = False
    craft_refusal: str = ""

    def __init__(self, name: str, path: Path | None, spec: ModelSpec):
        self.name = name
        self.path = path
        self.spec = spec

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def parameters(self) -> int | None:
        return None

    def sha256(self) -> dict[str, str]:
        return sha256_files(self.path) if self.path is not None else {}

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


class KerasAdapter(TFAdapter):
    format = "keras"

    def __init__(self, name: str, path: Path | None, model, spec_overrides: dict[str, Any], where: str):
        self.model = model
        check_input_rank(model.inputs[0].shape, str(path or name))
        graph = infer_spec(model.inputs[0].shape, _keras_output_kind(model), model.outputs[0].shape[-1])
        spec = _complete(graph.merged(spec_overrides, where), name, graph)
        check_input_shape(model.inputs[0].shape, spec, str(path or name))
        super().__init__(name, path, spec, lambda x: model(x, training=False), model.count_params())
        self._loop_forward: tuple[bytes, Any] | None = None
        self._loop_lock = threading.Lock()

    def loop_log_probs(self):
        """The UAP loop runs the model with its current weights frozen as constants, which TF folds (batch-norm
        scales, no variable reads): a single-image forward pass at 224 px took 0.72 ms against 1.05 ms, a loop step
        15% less. The version is a digest of the weights, so a model trained in place (hardening) gets new graphs."""
        digest = _weights_digest(self.model)
        with self._loop_lock:
            if self._loop_forward is None or self._loop_forward[0] != digest:
                forward = _frozen_forward(self.model, self.tf)
                self._loop_forward = digest, lambda images: self.tf_log_probs(images, forward)
            return self._loop_forward


def _weights_digest(model) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.digest()


def _frozen_forward(model, tf):
    """The Keras model's inference call with its current weights as constants and cheaper input gradients for its
    convolutions (`fast_gradients`), or the call itself (weights read as variables) where TF cannot freeze the
    model or differentiate it frozen."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    unfrozen = lambda x: model(x, training=False)  # noqa: E731
    try:
        traced = tf.function(unfrozen, autograph=False).get_concrete_function(spec)
        frozen = convert_variables_to_constants_v2(traced)
    except Exception:  # noqa: BLE001 - a model TF cannot freeze still runs, unfrozen
        return unfrozen
    if not _differentiable(frozen):
        return unfrozen
    try:
        frozen, _ = with_fast_input_gradients(frozen, tf)
    except Exception:  # noqa: BLE001 - a graph TF cannot import again keeps TF's own gradients
        pass
    return lambda x: frozen(x)[0]


def _differentiable(frozen) -> bool:
    """Whether TF can differentiate the frozen function: not where it still calls a function that freezing did not
    inline (Keras' XLA-compiled grouped convolution: TF finds no gradient for it, where the unfrozen model has one).
    Looked up in the graph: a trial gradient took 0.4-0.6 s a model at 224 px."""
    return not any(op.type in ("PartitionedCall", "StatefulPartitionedCall") for op in frozen.graph.get_operations())


class SavedModelAdapter(TFAdapter):
    format = "savedmodel"

    def __init__(self, name: str, path: Path, spec_overrides: dict[str, Any], where: str):
        tf = configure_tensorflow()
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad SavedModel
            raise AuditkitError(f"not a loadable TF SavedModel ({type(exc).__name__}: {exc})".splitlines()[0],
                                str(path)) from None
        signature = getattr(loaded, "signatures", {}).get("serving_default")
        if signature is None:
            raise AuditkitError("SavedModel has no 'serving_default' signature", str(path))
        args, kwargs = signature.structured_input_signature
        if args or len(kwargs) != 1:
            raise AuditkitError("the serving signature must take exactly one named input", str(path))
        (input_name, input_spec), = kwargs.items()
        outputs = signature.structured_outputs
        if len(outputs) != 1:
            raise AuditkitError(f"the serving signature must have one output, has {sorted(outputs)}", str(path))
        (output_name, output_spec), = outputs.items()
        self._loaded = loaded  # keeps the signature's variables alive
        check_input_rank(input_spec.shape, str(path))
        graph = infer_spec(input_spec.shape, None, output_spec.shape[-1])

        def forward(x):
            return signature(**{input_name: x})[output_name]

        spec = _complete(graph.merged(spec_overrides, where), name, graph)
        check_input_shape(input_spec.shape, spec, str(path))
        if spec.output is None:
            probe = tf.constant(model_input(_probe_images(spec), spec, np), tf.float32)
            spec = dataclasses.replace(spec, output=_detect_output(forward(probe).numpy()))
        super().__init__(name, path, spec, forward, None)


class OnnxAdapter(ModelAdapter):
    """Inference through onnxruntime; input gradients through onnx-ad (or torch) once they pass a self-check.

    The gradient path is set up on first need (can_craft, loss_gradient, the UAP loop): evaluation-only use
    never pays for it. A fixed batch size in the file is honoured by running padded chunks of that size.
    """

    format = "onnx"

    def __init__(self, name: str, path: Path, spec_overrides: dict[str, Any], where: str):
        self.session = onnx_session(path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise AuditkitError(f"the ONNX model must have one input, has {len(inputs)}", str(path))
        self.input_name = inputs[0].name
        shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        check_input_rank(shape, str(path))
        self.batch = shape[0] if shape else None  # a fixed batch size, or None (dynamic)
        out_dim = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None
        graph = infer_spec(shape, None, out_dim)
        super().__init__(name, path, _complete(graph.merged(spec_overrides, where), name, graph))
        check_input_shape(shape, self.spec, str(path))
        if self.spec.output is None:
            raw = self._run(_onnx_input(_probe_images(self.spec), self.spec))
            self.spec = dataclasses.replace(self.spec, output=_detect_output(raw))
        self._gradient_state = None

    def _run(self, model_input: np.ndarray) -> np.ndarray:
        if self.batch is None:
            return self.session.run(None, {self.input_name: model_input})[0]
        out = []
        for start in range(0, len(model_input), self.batch):
            chunk = model_input[start : start + self.batch]
            fill = np.zeros((self.batch - len(chunk),) + chunk.shape[1:], chunk.dtype)
            out.append(self.session.run(None, {self.input_name: np.concatenate([chunk, fill])})[0][: len(chunk)])
        return np.concatenate(out)

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        out = self._run(_onnx_input(images, self.spec))
        if self.spec.output == "logits":
            out = out - out.max(axis=1, keepdims=True)
            e = np.exp(out)
            out = e / e.sum(axis=1, keepdims=True)
        return out.astype(np.float32)

    def _gradients(self):
        """(forward, gradient path or None, refusal): the first path that passes its self-check, found once."""
        if self._gradient_state is None:
            import onnx

            from . import onnx_grad

            forward, found, failures = onnx_grad.find_gradient_path(
                onnx.load(str(self.path)), self.input_name, self.spec, self.batch)
            self._gradient_state = (forward, found, "" if found else onnx_grad.refusal(self.name, failures))
        return self._gradient_state

    @property
    def can_craft(self) -> bool:
        return self._gradients()[1] is not None

    @property
    def craft_refusal(self) -> str:
        return self._gradients()[2]

    @property
    def gradient_path(self):
        """The onnx_grad.GradientPath in use (name, self-check error), or None."""
        return self._gradients()[1]

    def gradient_source(self) -> str | None:
        if self._gradient_state is None:  # evaluation only: the gradient path was never set up
            return None
        path = self.gradient_path
        return path.describe() if path else f"none: {self.craft_refusal}"

    def log_probs(self, images: np.ndarray) -> np.ndarray:
        """Log class probabilities (N, K) through the image-space graph the gradients come from."""
        forward = self._gradients()[0]
        if forward is None:
            self.require_gradients()
        images = self.check_images(images)
        return forward(images, np.zeros((len(images), len(self.classes)), np.float32))[0]

    def log_probs_and_gradient(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs (N, K), gradient of each image's cross-entropy at `labels` w.r.t. the image plane (N, H, W))."""
        self.require_gradients()
        images = self.check_images(images)
        onehot = np.eye(len(self.classes), dtype=np.float32)[np.asarray(labels, np.int64)]
        return self._gradients()[1].gradient(images, onehot)

    def loss_gradient(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the per-image cross-entropy w.r.t. the image-space input, (N, H, W)."""
        return self.log_probs_and_gradient(images, labels)[1]

    def uap_loop(self, norm: str, clip: bool, targeted: bool):
        """The UAP engine's loop ops for this model (numpy + onnxruntime)."""
        from .onnx_grad import ArrayUAPLoop

        return ArrayUAPLoop(self, norm, clip, targeted)


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


def _keras_output_kind(model) -> str:
    activation = getattr(model.layers[-1], "activation", None)
    name = getattr(activation, "__name__", "")
    return "softmax" if name == "softmax" or type(model.layers[-1]).__name__ == "Softmax" else "logits"


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


def _onnx_input(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return np.ascontiguousarray(model_input(images, spec, np), dtype=np.float32)


def _probe_images(spec: ModelSpec) -> np.ndarray:
    return np.random.default_rng(0).random((4, spec.input_size, spec.input_size), dtype=np.float32)


def _detect_output(raw: np.ndarray) -> str:
    """Rows that are non-negative and sum to 1 on random inputs are probabilities; anything else, logits."""
    is_prob = bool(np.all(raw >= 0) and np.allclose(raw.sum(axis=1), 1.0, atol=1e-3))
    return "softmax" if is_prob else "logits"


def _complete(spec: ModelSpec, name: str, graph: ModelSpec) -> ModelSpec:
    """The spec, once it says everything the audit needs and agrees with what the model's graph says."""
    missing = [k for k in ("classes", "input_size", "channels") if getattr(spec, k) is None]
    if missing:
        raise AuditkitError(
            f"cannot tell the model's {', '.join(missing)} from the file; declare them in model.yaml next to "
            "the model or with --model-spec", name)
    if spec.layout == "NCHW" or spec.channels == 3:
        n = len(spec.mean)
        if n not in (1, spec.channels) or len(spec.std) not in (1, spec.channels):
            raise AuditkitError(f"mean/std must have 1 or {spec.channels} values", name)
    for what, declared, actual in (
            ("number of classes", len(spec.classes), len(graph.classes) if graph.classes else None),
            ("input size", spec.input_size, graph.input_size), ("channels", spec.channels, graph.channels)):
        if actual is not None and declared != actual:
            raise AuditkitError(f"the model spec gives {what} {declared}, but the model's graph has {actual}", name)
    return spec
