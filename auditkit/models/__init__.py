"""Load any supported model behind the one image-space adapter interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import AuditkitError
from .adapters import KerasAdapter, ModelAdapter, OnnxAdapter, SavedModelAdapter, TFAdapter, configure_tensorflow
from .checks import check_keras_file
from .spec import ModelSpec, read_sidecar, sidecar_path

ZOO_NAMES = ("covidnet_small", "covidnet_large")

__all__ = ["ModelAdapter", "TFAdapter", "ModelSpec", "load_model", "keras_adapter", "configure_tensorflow", "ZOO_NAMES"]


def load_model(ref: str | Path, spec_overrides: Mapping[str, Any] | None = None) -> ModelAdapter:
    """A zoo name, a `.keras` file, a SavedModel directory or an `.onnx` file, as an adapter.

    The spec comes from the model itself, then `model.yaml` beside it, then `spec_overrides` (CLI flags).
    """
    overrides = dict(spec_overrides or {})
    ref_str = str(ref)
    if ref_str in ZOO_NAMES and not Path(ref_str).exists():
        from . import zoo

        entry = zoo.ZOO[ref_str]
        model = zoo.load_zoo_model(ref_str)
        spec = {"classes": list(entry.classes), "channels": 1, "output": "softmax"} | overrides
        return KerasAdapter(ref_str, zoo.weights_path(ref_str), model, spec, f"zoo model {ref_str}")

    path = Path(ref_str)
    if not path.exists():
        raise AuditkitError(
            f"no such model file or directory, and not a zoo name (zoo: {', '.join(ZOO_NAMES)})", ref_str)
    side = sidecar_path(path)
    spec = (read_sidecar(side) if side else {}) | overrides
    where = str(side) if side else ref_str
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise AuditkitError("directory is not a TF SavedModel (no saved_model.pb)", ref_str)
        return SavedModelAdapter(path.name, path, spec, where)
    suffix = path.suffix.lower()
    if suffix == ".keras":
        check_keras_file(path)
        return KerasAdapter(path.stem, path, _load_keras_file(path), spec, where)
    if suffix == ".onnx":
        return OnnxAdapter(path.stem, path, spec, where)
    if suffix in (".h5", ".hdf5"):
        raise AuditkitError("legacy HDF5 Keras models are not accepted; re-save as .keras (model.save('m.keras'))",
                            ref_str)
    raise AuditkitError("unknown model format (expected .keras, .onnx or a SavedModel directory)", ref_str)


def keras_adapter(model, name: str = "model", spec_overrides: Mapping[str, Any] | None = None) -> KerasAdapter:
    """Wrap an in-memory Keras model (Python API, tests, hardening)."""
    return KerasAdapter(name, None, model, dict(spec_overrides or {}), name)


def _load_keras_file(path: Path):
    configure_tensorflow()
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AuditkitError(f"cannot load Keras model ({msg})", str(path)) from None
