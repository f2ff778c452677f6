"""Benchmark: white-box UAP crafting on one network as Keras and as its tf2onnx export, time per visited image.

    python benchmarks/bench_onnx_vs_keras.py [--size 64] [--images 64] [--passes 2]

covidnet_small (the shipped weights, built at --size px) crafts a nontargeted L-inf UAP (zeta 2%, the paper
loop) on the built-in phantoms, once through the Keras adapter (the compiled TF loop) and once through its ONNX
export (the numpy loop over onnxruntime and onnx-ad gradients), from the same seed, the fastest of REPEATS
crafts after a warm-up (graphs traced, gradients self-checked). Printed per model: seconds,
images visited, gradient steps, ms per visited image and per step, and the largest difference between the UAPs.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from auditkit.data import Preprocess, load_dataset
from auditkit.models import keras_adapter, load_model, zoo
from auditkit.phantoms import PHANTOM_CLASSES, default_phantom_manifest
from auditkit.uap import make_attack
from auditkit.uap.base import AttackSettings, cell_rng
from auditkit.uap.geometry import xi_for

REPEATS = 3  # timed crafts per model; the fastest counts (the machine is shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    model = zoo.build_model("covidnet_small", input_size=args.size)
    model.load_weights(zoo.weights_path("covidnet_small"))
    keras = keras_adapter(model, "covidnet_small", {"classes": list(PHANTOM_CLASSES)})
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(model, Path(tmp) / "covidnet_small.onnx", args.size)
        onnx = load_model(onnx_path, {"classes": list(PHANTOM_CLASSES)})
        data = load_dataset(default_phantom_manifest(), PHANTOM_CLASSES,
                            preprocess=Preprocess(size=args.size, crop_top=1 / 6)).subset("train")
        images = data.floats()[: args.images]
        settings = AttackSettings(kind="nontargeted", norm="inf", zeta=0.02, max_iter=args.passes, eps=0.001)
        xi, _ = xi_for(images, settings.norm, settings.zeta)
        print(f"{platform.processor() or platform.machine()}, cpus={os.cpu_count()}; covidnet_small at "
              f"{args.size} px, {len(images)} crafting images, {args.passes} passes; onnx gradients: ", end="")
        rows = {}
        for name, adapter in (("keras", keras), ("onnx", onnx)):
            adapter.require_gradients()  # set-up and self-check outside the timing
            attack = make_attack(settings)
            attack.craft(adapter, images[:4], xi, cell_rng(1, "warm-up"))  # traces the loop's graphs
            rows[name] = min((timed_craft(attack, adapter, images, xi, settings.key) for _ in range(REPEATS)),
                             key=lambda run: run[1])
        print(onnx.gradient_source())
    print("| model | seconds | visited | steps | ms / visited | ms / step | flip rate after each pass |")
    print("|---|---|---|---|---|---|---|")
    for name, (result, seconds) in rows.items():
        rates = ", ".join(f"{r:.3f}" for r in result.rates)
        print(f"| {name} | {seconds:.2f} | {result.visited} | {result.steps} | {1e3 * seconds / result.visited:.2f} | "
              f"{1e3 * seconds / max(result.steps, 1):.2f} | {rates} |")
    ratio = (rows["onnx"][1] / rows["onnx"][0].visited) / (rows["keras"][1] / rows["keras"][0].visited)
    diff = float(np.abs(rows["onnx"][0].rho - rows["keras"][0].rho).max())
    print(f"ONNX / Keras time per visited image: {ratio:.2f}x; max |UAP difference|: {diff:.2e}")


def timed_craft(attack, adapter, images, xi, key):
    """(the crafted result, wall seconds) from the same seeded stream each time."""
    start = time.perf_counter()
    result = attack.craft(adapter, images, xi, cell_rng(0, key))
    return result, time.perf_counter() - start


def export(model, path: Path, size: int) -> Path:
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=17, output_path=str(path))
    return path


if __name__ == "__main__":
    main()
