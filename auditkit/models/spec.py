"""What a model expects: classes, input size, channels, scaling and output type (the sidecar `model.yaml`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import AuditkitError
from ..messages import quote, shown
from ..yaml_budget import check_expanded_size, read_text

SPEC_FIELDS = ("classes", "input_size", "channels", "scale", "mean", "std", "layout", "output")


@dataclass(frozen=True)
class ModelSpec:
    """The model's preprocessing, applied as differentiable ops after the image-space input.

    model_input = (image * scale - mean) / std, with the grayscale plane repeated to `channels`.
    """

    classes: tuple[str, ...] | None = None
    input_size: int | None = None
    channels: int | None = None
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NHWC"
    output: str | None = None  # "softmax" | "logits"; None = detect

    def merged(self, overrides: Mapping[str, Any], where: str) -> ModelSpec:
        """This spec with `overrides` (sidecar or CLI values) validated and applied."""
        values = dataclasses.asdict(self)
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in SPEC_FIELDS:
                raise AuditkitError(f"unknown model spec key {quote(key)} (known: {', '.join(SPEC_FIELDS)})", where)
            values[key] = _check(key, value, where)
        return ModelSpec(**values)


def _check(key: str, value: Any, where: str) -> Any:
    here = f"{where}: {key}"
    if key == "classes":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise AuditkitError(f"must be a non-empty list of class names, got {shown(value)}", here)
        if len(set(value)) != len(value):
            raise AuditkitError(f"class names must be unique, got {shown(value)}", here)
        return tuple(value)
    if key in ("input_size", "channels"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AuditkitError(f"must be a positive integer, got {shown(value)}", here)
        if key == "channels" and value not in (1, 3):
            raise AuditkitError(f"must be 1 or 3, got {value}", here)
        return value
    if key == "scale":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AuditkitError(f"must be a positive number, got {shown(value)}", here)
        return float(value)
    if key in ("mean", "std"):
        seq = value if isinstance(value, (list, tuple)) else [value]
        if not seq or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
            raise AuditkitError(f"must be a number or a list of numbers, got {shown(value)}", here)
        if key == "std" and any(v <= 0 for v in seq):
            raise AuditkitError(f"must be positive, got {shown(value)}", here)
        return tuple(float(v) for v in seq)
    if key == "layout":
        if value not in ("NHWC", "NCHW"):
            raise AuditkitError(f"must be NHWC or NCHW, got {shown(value)}", here)
        return value
    if value not in ("softmax", "logits"):
        raise AuditkitError(f"must be softmax or logits, got {shown(value)}", here)
    return value


def sidecar_path(model_path: Path) -> Path | None:
    """`model.yaml` next to the model: `<dir>/model.yaml` for a directory, else `<stem>.yaml` or `model.yaml`."""
    candidates = [model_path / "model.yaml"] if model_path.is_dir() else []
    candidates += [model_path.with_suffix(".yaml"), model_path.parent / "model.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def read_sidecar(path: Path) -> dict[str, Any]:
    text = read_text(path, "model spec")
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters already here
    except yaml.YAMLError as exc:
        raise AuditkitError(f"invalid YAML ({str(exc).splitlines()[0]})", str(path)) from None
    try:
        node = loader.get_single_node()
        check_expanded_size(node, str(path))
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise AuditkitError(f"invalid YAML ({getattr(exc, 'problem', exc)})", f"{path}{line}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AuditkitError("model spec must be a mapping of keys to values", str(path))
    return data
