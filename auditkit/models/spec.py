"""What a model expects: classes, input size, channels, scaling, output type and the image preprocessing it was
trained with (the sidecar `model.yaml`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..data import RESIZE_METHODS
from ..errors import AuditkitError
from ..messages import quote, shown
from ..yaml_budget import check_expanded_size, read_text

SPEC_FIELDS = ("classes", "input_size", "channels", "scale", "mean", "std", "layout", "output", "crop_top", "resize",
               "input", "logits", "probabilities")
TENSOR_FIELDS = ("input", "logits", "probabilities")  # tensor names in a graph (TF1 checkpoints)
DEFAULT_CROP_TOP = 1 / 6  # where neither the model nor the policy states one: COVID-Net's, auditkit's old default
DEFAULT_RESIZE = "bilinear"


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
    crop_top: float | None = None  # fraction of rows dropped from the top before resizing; None = not stated
    resize: str | None = None  # resampling filter to the input size; None = not stated
    input: str | None = None  # TF1 checkpoints: the input tensor's name, e.g. input_1:0
    logits: str | None = None  # TF1 checkpoints: the logits tensor's name...
    probabilities: str | None = None  # ...or the softmax output's

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
    if key in TENSOR_FIELDS:
        if not isinstance(value, str) or not value:
            raise AuditkitError(f"must be a tensor name such as dense_3/MatMul:0, got {value!r}", here)
        return value
    if key == "crop_top":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 0.5:
            raise AuditkitError(f"must be a fraction in [0, 0.5), got {value!r}", here)
        return float(value)
    if key == "resize":
        if value not in RESIZE_METHODS:
            raise AuditkitError(f"must be one of {', '.join(RESIZE_METHODS)}, got {value!r}", here)
        return value
    if value not in ("softmax", "logits"):
        raise AuditkitError(f"must be softmax or logits, got {shown(value)}", here)
    return value


# The flag that sets each spec value on the command line (run, inspect).
SPEC_FLAGS = {"classes": "--classes", "input_size": "--input-size", "channels": "--channels", "scale": "--scale",
              "mean": "--mean", "std": "--std", "layout": "--layout", "output": "--output"}


class MissingSpec(AuditkitError):
    """The spec lacks values the audit needs; load_model says where it looked for them."""

    def __init__(self, message: str, fields: list[str], where: str | None = None):
        super().__init__(message, where)
        self.fields = fields

    def with_sources(self, spec_file: Path | None, looked_for: list[Path]) -> AuditkitError:
        """The same problem, naming the spec file read (or the files looked for) and the flags that set the values."""
        if spec_file is not None:
            source = f"not stated in {spec_file}"
        else:
            source = f"no spec file found (looked for {', '.join(str(p) for p in looked_for)})"
        flags = " / ".join(SPEC_FLAGS[f] for f in self.fields if f in SPEC_FLAGS)
        return AuditkitError(f"{self.message}: {source}; state {', '.join(self.fields)} there, with --model-spec "
                             f"FILE, or with {flags}", self.where)


def sidecar_candidates(model_path: Path) -> list[Path]:
    """Where a model's spec may be: `<dir>/model.yaml` for a directory; for a file `m.onnx`: `m.yaml`,
    `m.onnx.yaml`, then `model.yaml` in its folder."""
    if model_path.is_dir():
        return [model_path / "model.yaml"]
    return [model_path.with_suffix(".yaml"), model_path.with_name(model_path.name + ".yaml"),
            model_path.parent / "model.yaml"]


def sidecar_path(model_path: Path) -> Path | None:
    """The model's spec file, or None. Both `m.yaml` and `m.onnx.yaml` present is refused: which one holds?"""
    found = [c for c in sidecar_candidates(model_path) if c.is_file()]
    if len(found) > 1 and found[1].name != "model.yaml":
        raise AuditkitError(f"two spec files for one model: {found[0]} and {found[1]}; keep one", str(model_path))
    return found[0] if found else None


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


@dataclass(frozen=True)
class InputPreprocessing:
    """The preprocessing an audit feeds the model with, where each value came from, and what a reader should know."""

    crop_top: float
    resize: str
    crop_top_from: str  # "model" | "policy" | "auditkit default"
    resize_from: str
    warnings: tuple[str, ...]


def resolve_preprocessing(spec: ModelSpec, crop_top: float | str, resize: str) -> InputPreprocessing:
    """The policy's `crop_top` / `resize` ("model": the model's own) against what the model states.

    A policy value that differs from the model's declared one is used, with a warning: the model was trained
    on other inputs. A model that states nothing gets auditkit's defaults, with a warning saying so."""
    values, sources, warnings = {}, {}, []
    for key, asked, default in (("crop_top", crop_top, DEFAULT_CROP_TOP), ("resize", resize, DEFAULT_RESIZE)):
        declared = getattr(spec, key)
        if asked != "model":
            values[key], sources[key] = asked, "policy"
            if declared is not None and not _same(declared, asked):
                warnings.append(f"the policy sets preprocess.{key} {_show(asked)} but the model declares "
                                f"{_show(declared)}: the model sees inputs unlike those it was trained on "
                                f"(set data.preprocess.{key}: model to use the model's)")
        elif declared is not None:
            values[key], sources[key] = declared, "model"
        else:
            values[key], sources[key] = default, "auditkit default"
            warnings.append(f"the model does not state its {key}; auditkit's default {_show(default)} is used "
                            f"(state {key} in the model's model.yaml, or set data.preprocess.{key} in the policy)")
    return InputPreprocessing(values["crop_top"], values["resize"], sources["crop_top"], sources["resize"],
                              tuple(warnings))


def _same(a: float | str, b: float | str) -> bool:
    """Equal values; fractions within 1e-6 (a policy's 0.16666667 is the model's 1/6)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(a - b) < 1e-6


def _show(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
