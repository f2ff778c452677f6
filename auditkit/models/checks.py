"""Checks a model file gets at load time, so that a bad one is refused with what is wrong, not later with an
internal error from the runtime ("Invalid rank" from onnxruntime in the middle of an audit)."""
from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import AuditkitError
from ..quiet import quiet_onnxruntime
from .spec import ModelSpec


def input_dims(shape) -> list[int | None] | None:
    """A model input's shape as a list (None for a free dimension), or None where even its rank is unknown."""
    try:
        return [d if isinstance(d, int) else None for d in shape]
    except (TypeError, ValueError):  # a TensorShape of unknown rank cannot be iterated
        return None


def check_input_rank(shape, where: str) -> None:
    """auditkit feeds images as rank-4 arrays; a model that takes anything else is refused at load."""
    dims = input_dims(shape)
    if dims is not None and len(dims) != 4:
        raise AuditkitError(f"the model's input has rank {len(dims)} (shape {_text(dims)}); auditkit feeds "
                            "images as rank 4: [N, H, W, C] (layout NHWC) or [N, C, H, W] (layout NCHW)", where)


def check_input_shape(shape, spec: ModelSpec, where: str) -> None:
    """The input shape the spec makes auditkit feed must fit the model's declared input, dimension by dimension."""
    dims = input_dims(shape)
    if dims is None:
        return
    size, channels = spec.input_size, spec.channels
    expected = [None, size, size, channels] if spec.layout == "NHWC" else [None, channels, size, size]
    if any(e is not None and f is not None and e != f for e, f in zip(expected, dims)):
        raise AuditkitError(f"the model's input is {_text(dims)}, but its spec ({spec.layout}, input_size {size}, "
                            f"channels {channels}) gives {_text(expected)}; fix layout, input_size or channels in "
                            "model.yaml", where)


def check_keras_file(path: Path) -> None:
    """A .keras model is a zip archive; Keras says 'File not found' for a file that exists but is not one."""
    if not zipfile.is_zipfile(path):
        raise AuditkitError("not a model file: a .keras model is a zip archive and this file is not one", str(path))


def onnx_session(path: Path):
    """An onnxruntime session for the file, or AuditkitError saying why not (a file that does not parse is not a
    model file)."""
    import onnxruntime as ort

    quiet_onnxruntime(ort)
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception zoo
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "INVALID_PROTOBUF" in first:
            raise AuditkitError("not a model file: not an ONNX protobuf", str(path)) from None
        raise AuditkitError(f"not a loadable ONNX model ({first})", str(path)) from None


def _text(dims: list[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d)
                           for i, d in enumerate(dims)) + "]"
