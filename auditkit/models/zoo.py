"""Built-in reference models: small COVID-Net-style networks (Wang, Lin & Wong 2020, arXiv 2003.09871).

The COVID-Net design kept here: PEPX modules (1x1 projection -> 1x1 expansion -> 3x3 depthwise ->
1x1 projection -> 1x1 extension), stages whose PEPX modules are densely connected (each receives the
sum of the stage's input projection and every earlier PEPX output of the stage), stride-2 downsampling
between stages, then global pooling and a 3-class softmax. Scaled far down so that the UAP loop's per-image
gradient is cheap on a CPU: an 8x8 stride-8 stem puts the first stage at 28x28 px (a stage at 56x56 cost
3-5x more time per gradient), narrow stages, and average-pooling downsampling (max-pooling's gradient
alone took 8% of a gradient step).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from ..errors import AuditkitError
from ..fileio import sha256_file
from .registry import ZOO_CLASSES
from .tf_runtime import configure_tensorflow

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
STEM = 8  # kernel and stride of the stem: non-overlapping 8x8 patches


@dataclass(frozen=True)
class _Arch:
    stem: int  # filters of the 8x8 stride-8 stem
    widths: tuple[int, ...]  # channels of each stage (28, 14, 7, 4 px at 224 input)
    depths: tuple[int, ...]  # PEPX modules per stage
    head: int  # units of the hidden dense layer


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    input_size: int
    classes: tuple[str, ...]
    builder: Callable[[int, int], Any]  # (input_size, seed) -> keras.Model


def _covidnet(arch: _Arch, input_size: int, seed: int, name: str):
    """A Functional COVID-Net-style model: image (H, W, 1) in [0, 1] -> softmax over 3 classes."""
    configure_tensorflow()
    import keras
    from keras import layers

    counter = iter(range(1, 1_000_000))

    def init(kind: str = "he"):
        s = seed * 1_000_003 + next(counter)  # one fixed seed per layer: same seed, same weights
        return keras.initializers.HeNormal(seed=s) if kind == "he" else keras.initializers.GlorotUniform(seed=s)

    def conv(x, filters, kernel, nm, strides=1, act=None):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=act is not None,
                             activation=act, kernel_initializer=init(), name=nm)(x)

    def bn(x, nm):
        return layers.BatchNormalization(momentum=0.9, name=nm)(x)

    def pepx(x, width, nm):
        y = conv(x, width // 2, 1, f"{nm}_proj")
        y = conv(y, width, 1, f"{nm}_expand", act="relu")
        y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, depthwise_initializer=init(),
                                   name=f"{nm}_dw")(y)
        y = layers.ReLU(name=f"{nm}_dw_relu")(bn(y, f"{nm}_dw_bn"))
        y = conv(y, width // 2, 1, f"{nm}_proj2")
        y = conv(y, width, 1, f"{nm}_extend", act="relu")
        return bn(y, f"{nm}_bn")

    image = keras.Input((input_size, input_size, 1), name="image")
    x = conv(image, arch.stem, STEM, "stem", strides=STEM)  # no input rescaling: the batch norm below does it
    x = layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
    for i, (width, depth) in enumerate(zip(arch.widths, arch.depths), start=1):
        if i > 1:
            x = layers.AveragePooling2D(2, padding="same", name=f"stage{i}_down")(x)
        outs = [bn(conv(x, width, 1, f"stage{i}_in"), f"stage{i}_in_bn")]
        for j in range(1, depth + 1):
            inp = outs[0] if len(outs) == 1 else layers.Add(name=f"stage{i}_sum{j}")(outs)
            outs.append(pepx(inp, width, f"stage{i}_pepx{j}"))
        x = layers.ReLU(name=f"stage{i}_relu")(layers.Add(name=f"stage{i}_out")(outs))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(arch.head, activation="relu", kernel_initializer=init(), name="fc")(x)
    probs = layers.Dense(len(ZOO_CLASSES), activation="softmax", kernel_initializer=init("glorot"),
                         name="probs")(x)
    return keras.Model(image, probs, name=name)


def _entry(name: str, description: str, arch: _Arch) -> ZooEntry:
    return ZooEntry(name, description, 224, ZOO_CLASSES,
                    functools.partial(_covidnet, arch, name=name))


ZOO = {
    "covidnet_small": _entry(
        "covidnet_small", "COVID-Net-style CNN, small: 4 stages of 1-2 densely connected PEPX modules",
        _Arch(stem=16, widths=(24, 48, 96, 160), depths=(1, 2, 2, 1), head=64)),
    "covidnet_large": _entry(
        "covidnet_large", "COVID-Net-style CNN, large: 4 stages of 2-3 densely connected PEPX modules",
        _Arch(stem=24, widths=(32, 64, 128, 224), depths=(2, 3, 3, 2), head=128)),
}


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise AuditkitError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}", where="model")
    return ZOO[name]


def zoo_spec(name: str) -> dict:
    """The zoo model's spec: its classes, grayscale input, softmax output and COVID-Net's preprocessing (drop the
    top 1/6 of rows, bilinear resize), which the shipped weights were trained with."""
    return {"classes": list(zoo_entry(name).classes), "channels": 1, "output": "softmax",
            "crop_top": 1 / 6, "resize": "bilinear"}


def build_model(name: str, input_size: int | None = None, seed: int = 0):
    """A freshly initialised zoo model (weights fixed by `seed`); input "image" (H, W, 1) in [0, 1]."""
    entry = zoo_entry(name)
    size = entry.input_size if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise AuditkitError(f"input_size must be an integer >= 32, got {size!r}", where="input_size")
    return entry.builder(size, seed)


def count_flops(model) -> int:
    """FLOPs per image, counting one multiply-add as 2 FLOPs, over Conv2D, DepthwiseConv2D and Dense layers.

    Biases, normalisation, activations, pooling and additions are not counted (the usual convention for
    CNN FLOP figures). Computed from the layers' static shapes; nested models are walked.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
            continue
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        out_shape = tuple(layer.output.shape[1:])
        cin = int(layer.input.shape[-1])
        positions = math.prod(int(d) for d in out_shape[:-1])
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            macs = positions * kh * kw * cin * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            macs = positions * kh * kw * (cin // layer.groups) * layer.filters
        else:
            macs = positions * cin * layer.units
        total += 2 * macs
    return int(total)


def weights_path(name: str) -> Path:
    """Where the shipped weights of a zoo model live: auditkit/weights/<name>.weights.h5."""
    return WEIGHTS_DIR / f"{zoo_entry(name).name}.weights.h5"


def _info_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{zoo_entry(name).name}.json"


def weights_info(name: str) -> dict:
    """The shipped weights' metadata (trained_on, recipe, epochs, seed, test_accuracy, date, sha256); {} if none."""
    path = _info_path(name)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditkitError(f"unreadable weights metadata ({exc})", where=str(path)) from None


def load_zoo_model(name: str):
    """Build a zoo model and load its shipped weights (checked against the recorded sha256)."""
    entry = zoo_entry(name)
    path = weights_path(name)
    if not path.is_file():
        raise AuditkitError(f"zoo model {name} has no trained weights; run `auditkit zoo train {name}`",
                            where=str(path))
    expected = weights_info(name).get("sha256")
    if expected and sha256_file(path) != expected:
        raise AuditkitError(f"weights file does not match the sha256 recorded in {_info_path(name).name}",
                            where=str(path))
    model = build_model(entry.name)
    try:
        model.load_weights(path)
    except Exception as exc:  # noqa: BLE001 - h5py/Keras raise many types for a bad file
        raise AuditkitError(f"cannot load weights ({str(exc).strip().splitlines()[0]})", where=str(path)) from None
    return model
