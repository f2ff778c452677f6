"""Load any supported model behind the one image-space adapter interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import AuditkitError
from .base import ModelAdapter, TFAdapter
from .registry import ZOO_NAMES
from .spec import MissingSpec, ModelSpec, read_sidecar, sidecar_candidates, sidecar_path

__all__ = ["ModelAdapter", "TFAdapter", "ModelSpec", "load_model", "keras_adapter", "ZOO_NAMES"]


def load_model(ref: str | Path, spec_overrides: Mapping[str, Any] | None = None,
               spec_file: str | Path | None = None) -> ModelAdapter:
    """A zoo name, a `.keras` file, a SavedModel directory, an `.onnx` file or a TF1 checkpoint (`.meta` file or its
    directory), as an adapter.

    The spec comes from the model itself, then `spec_file` (default: the `model.yaml` beside the model), then
    `spec_overrides` (CLI flags). The spec file counts as one of the model's files (its identity).
    """
    ref_str = str(ref)
    path = Path(ref_str)
    zoo_name = ref_str in ZOO_NAMES and not path.exists()
    if not zoo_name and not path.exists():
        raise AuditkitError(
            f"no such model file or directory, and not a zoo name (zoo: {', '.join(ZOO_NAMES)})", ref_str)
    side = Path(spec_file) if spec_file is not None else None if zoo_name else sidecar_path(path)
    spec = (read_sidecar(side) if side else {}) | dict(spec_overrides or {})
    if zoo_name:
        from . import zoo
        from .keras import KerasAdapter

        adapter = KerasAdapter(ref_str, zoo.weights_path(ref_str), zoo.load_zoo_model(ref_str),
                               zoo.zoo_spec(ref_str) | spec, f"zoo model {ref_str}")
    else:
        looked_for = [] if side else sidecar_candidates(path)
        try:
            adapter = _load_file(path, spec, str(side) if side else ref_str)
        except MissingSpec as exc:
            raise exc.with_sources(side, looked_for) from None
        adapter.spec_looked_for = tuple(looked_for)
    adapter.spec_file = side
    return adapter


def _load_file(path: Path, spec: dict[str, Any], where: str) -> ModelAdapter:
    ref_str = str(path)
    suffix = path.suffix.lower()
    if suffix == ".meta" or (path.is_dir() and not (path / "saved_model.pb").is_file() and any(path.glob("*.meta"))):
        from .tf1 import TF1CheckpointAdapter, find_meta

        meta = find_meta(path)
        return TF1CheckpointAdapter(meta.parent.name if meta.stem == "model" else meta.stem, meta, spec, where)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise AuditkitError("directory is not a TF SavedModel (no saved_model.pb) or a TF1 checkpoint "
                                "(no .meta file)", ref_str)
        from .savedmodel import SavedModelAdapter

        return SavedModelAdapter(path.name, path, spec, where)
    if suffix == ".keras":
        from .checks import check_keras_file
        from .keras import KerasAdapter, load_keras_file

        check_keras_file(path)
        return KerasAdapter(path.stem, path, load_keras_file(path), spec, where)
    if suffix == ".onnx":
        from .onnx import OnnxAdapter

        return OnnxAdapter(path.stem, path, spec, where)
    if suffix in (".h5", ".hdf5"):
        raise AuditkitError("legacy HDF5 Keras models are not accepted; re-save as .keras (model.save('m.keras'))",
                            ref_str)
    raise AuditkitError("unknown model format (expected .keras, .onnx, a SavedModel directory or a TF1 .meta "
                        "checkpoint)", ref_str)


def keras_adapter(model, name: str = "model", spec_overrides: Mapping[str, Any] | None = None):
    """Wrap an in-memory Keras model (Python API, tests, hardening)."""
    from .keras import KerasAdapter

    return KerasAdapter(name, None, model, dict(spec_overrides or {}), name)
