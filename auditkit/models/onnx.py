"""ONNX models: inference through onnxruntime, input gradients through onnx-ad (or torch) after a self-check."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditkitError
from .identity import onnx_files
from .spec import ModelSpec
from .checks import check_input_rank, check_input_shape, onnx_session
from .base import ModelAdapter, complete_spec, detect_output, infer_spec, model_input, probe_images


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
        super().__init__(name, path, complete_spec(graph.merged(spec_overrides, where), name, graph))
        check_input_shape(shape, self.spec, str(path))
        if self.spec.output is None:
            raw = self._run(onnx_input(probe_images(self.spec), self.spec))
            self.spec = dataclasses.replace(self.spec, output=detect_output(raw))
        self._gradient_state = None
        self._parameters: int | None = None

    def model_files(self) -> list[Path]:
        return onnx_files(self.path)

    @property
    def parameters(self) -> int:
        """The number of values in the graph's initializers (its weights and constants), counted once."""
        if self._parameters is None:
            import onnx

            graph = onnx.load(str(self.path), load_external_data=False).graph
            self._parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
        return self._parameters

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
        out = self._run(onnx_input(images, self.spec))
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


def onnx_input(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return np.ascontiguousarray(model_input(images, spec, np), dtype=np.float32)


