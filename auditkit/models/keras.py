"""Keras models (.keras files, zoo models, in-memory models)."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditkitError
from .checks import check_input_rank, check_input_shape
from .base import TFAdapter, complete_spec, infer_spec
from .tf_runtime import configure_tensorflow, freeze


class KerasAdapter(TFAdapter):
    format = "keras"

    def __init__(self, name: str, path: Path | None, model, spec_overrides: dict[str, Any], where: str):
        self.model = model
        check_input_rank(model.inputs[0].shape, str(path or name))
        graph = infer_spec(model.inputs[0].shape, keras_output_kind(model), model.outputs[0].shape[-1])
        spec = complete_spec(graph.merged(spec_overrides, where), name, graph)
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
    """The Keras model's inference call with its current weights as constants, or the call itself (weights read as
    variables) where TF cannot freeze the model or differentiate it frozen."""
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    unfrozen = lambda x: model(x, training=False)  # noqa: E731
    try:
        traced = tf.function(unfrozen, autograph=False).get_concrete_function(spec)
        frozen = freeze(traced)
    except Exception:  # noqa: BLE001 - a model TF cannot freeze still runs, unfrozen
        return unfrozen
    if not _differentiable(frozen):
        return unfrozen
    return lambda x: frozen(x)[0]


def _differentiable(frozen) -> bool:
    """Whether TF can differentiate the frozen function: not where it still calls a function that freezing did not
    inline (Keras' XLA-compiled grouped convolution: TF finds no gradient for it, where the unfrozen model has one).
    Looked up in the graph: a trial gradient took 0.4-0.6 s a model at 224 px."""
    return not any(op.type in ("PartitionedCall", "StatefulPartitionedCall") for op in frozen.graph.get_operations())


def keras_output_kind(model) -> str:
    activation = getattr(model.layers[-1], "activation", None)
    name = getattr(activation, "__name__", "")
    return "softmax" if name == "softmax" or type(model.layers[-1]).__name__ == "Softmax" else "logits"


def load_keras_file(path: Path):
    configure_tensorflow()
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AuditkitError(f"cannot load Keras model ({msg})", str(path)) from None
