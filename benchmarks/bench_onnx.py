"""Benchmark: auditkit's ONNX support on cxr3 at 64x64: gradient paths, black-box crafting, UAP transfer.

    python benchmarks/bench_onnx.py [--seed S]

1. Gradient paths: the cxr3 CNN (tests/cxr3_model.py) exported with tf2onnx, and a small untrained PyTorch CNN
   exported with the legacy and the dynamo exporters; each path (onnx-ad; torch via onnx2fx) forced in turn:
   its self-check error, its error against the source framework's own gradient, its time per call.
2. Black-box vs white-box UAP on the cxr3 CNN's ONNX export, and random controls.
3. Transfer: UAPs crafted on two cxr3 CNNs, each evaluated on both and on the ONNX export of the first.

One process; imports helpers from tests/ and benchmarks/bench_uap.py. Needs ../shared/data/cxr3 next to the repo.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_uap import fmt_rate, machine_line, timed  # noqa: E402
from cxr3_model import (  # noqa: E402
    CLASSES, RECIPE, cached_cnn, cnn_adapter, crafting_subset, cxr3_missing_reason, load_cxr3, train_cnn)
from test_onnx_grad import per_sample_error  # noqa: E402
from torch_net import small_torch_net  # noqa: E402

from auditkit import metrics  # noqa: E402
from auditkit.models import keras_adapter, load_model, onnx_grad  # noqa: E402
from auditkit.models.tf_runtime import configure_tensorflow  # noqa: E402
from auditkit.uap.base import AttackSettings, BlackBoxSettings  # noqa: E402
from auditkit.uap.blackbox import BlackBoxUAP  # noqa: E402
from auditkit.uap.geometry import perturb, random_control, xi_for  # noqa: E402
from auditkit.uap.paper import PaperUAP  # noqa: E402

SIZE = RECIPE["size"]
TORCH_SPEC = {"classes": list(CLASSES), "scale": 2.0, "mean": [0.5], "std": [0.25]}
SECOND_RECIPE = RECIPE | {"filters": [8, 16, 32, 64], "dense": 64, "seed": 1}  # the transfer study's 2nd CNN
REPEATS = 9  # timed calls per median, after one warm-up call
CONTROLS = 5
ZETA = 0.02
# the white-box UAP of sections 2 and 3: L-inf, eps 0.002, 5 passes
WHITE_BOX = AttackSettings(kind="nontargeted", norm="inf", zeta=ZETA, eps=0.002, max_iter=5, clip=True)


def median_ms(fn) -> float:
    fn()
    return 1e3 * statistics.median(timed(fn) for _ in range(REPEATS))


def export_keras(model, path: Path):
    """The Keras model through tf2onnx (NHWC, dynamic batch), loaded as an auditkit ONNX adapter."""
    import tensorflow as tf
    import tf2onnx

    sig = (tf.TensorSpec((None, SIZE, SIZE, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=sig, opset=17, output_path=str(path))
    return load_model(path, {"classes": list(CLASSES)})


def export_torch(net, path: Path, dynamo: bool):
    """`net` through torch.onnx.export (dynamic batch); the exporter's chatter goes to stderr."""
    import torch

    if dynamo:
        kwargs = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}, "external_data": False}
    else:
        kwargs = {"dynamo": False, "dynamic_axes": {"x": {0: "batch"}}, "opset_version": 17}
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 1, SIZE, SIZE),), str(path), input_names=["x"], **kwargs)
    return load_model(path, TORCH_SPEC)


def torch_gradient(net):
    """(images, labels) -> d cross-entropy / d image plane by torch autograd, with TORCH_SPEC's preprocessing."""
    import torch

    def grad(images, labels):
        x = torch.from_numpy(images).requires_grad_(True)
        z = (x[:, None] * TORCH_SPEC["scale"] - TORCH_SPEC["mean"][0]) / TORCH_SPEC["std"][0]
        log_probs = torch.log_softmax(net(z), dim=1)
        (g,) = torch.autograd.grad(-log_probs[torch.arange(len(x)), torch.from_numpy(labels)].sum(), x)
        return g.numpy()

    return grad


def forced_paths(adapter):
    """[(path name, gradient fn or None, self-check error or failure text)]: each backend in
    find_gradient_path's order, tried on its own instead of stopping at the first that passes."""
    import onnx

    wrapped = onnx_grad.image_space_model(onnx.load(adapter.path), adapter.input_name, adapter.spec)
    forward_session, batching = onnx_grad.session(wrapped), onnx_grad.Batching(adapter.batch)

    def run(x, onehot):
        feed = {onnx_grad.IMAGE: x, onnx_grad.ONEHOT: onehot}
        return forward_session.run([onnx_grad.LOG_PROBS, onnx_grad.LOSS], feed)

    def forward(images, onehot):
        return onnx_grad.run_batched(run, batching, images, onehot)

    out = []
    for backend in (onnx_grad.OnnxAdGradient, onnx_grad.TorchGradient):
        try:
            gradient = backend(wrapped, batching)
            out.append((backend.name, gradient, onnx_grad.self_check(gradient, forward, adapter.spec)))
        except Exception as exc:  # noqa: BLE001 - report the failure, as find_gradient_path records it
            out.append((backend.name, None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"))
    return out


def gradient_section(subjects, images) -> None:
    print(f"\n## 1. Gradient paths (loss at the runner-up class; error vs the source framework on 16 test images,"
          f" median per-sample relative L2; times: median of {REPEATS} calls after a warm-up)\n")
    print("| model | path | self-check rel. error | rel. error vs source (median, 16) | ms, 1 image | ms, 32 images |")
    print("|---|---|---:|---:|---:|---:|")
    for name, adapter, source, reference in subjects:
        labels = np.argsort(adapter.predict_proba(images), axis=1)[:, -2]
        onehot = np.eye(len(CLASSES), dtype=np.float32)[labels]
        ref = reference(images[:16], labels[:16])
        for path, gradient, check in forced_paths(adapter):
            if gradient is None:
                print(f"| {name} | {path} | failed: {check} | | | |")
                continue
            err = np.median(per_sample_error(gradient(images[:16], onehot[:16])[1], ref))
            t1, t32 = (median_ms(lambda k=k: gradient(images[:k], onehot[:k])) for k in (1, 32))
            over = "" if check <= onnx_grad.MAX_REL_ERROR else f" (over the {onnx_grad.MAX_REL_ERROR:g} limit)"
            print(f"| {name} | {path} | {check:.1e}{over} | {err:.1e} | {t1:.2f} | {t32:.1f} |")
        t1, t32 = (median_ms(lambda k=k: reference(images[:k], labels[:k])) for k in (1, 32))
        print(f"| {name} | {source} (reference) | - | - | {t1:.2f} | {t32:.1f} |")
    print()
    for name, adapter, _, _ in subjects:
        chosen = adapter.gradient_path
        print(f"- {name}: auditkit uses {chosen.describe() if chosen else adapter.craft_refusal}")


def r_f(model, test, rho) -> metrics.Rate:
    return metrics.fooling_rate(test.labels, model.predict(perturb(test.floats(), rho, clip=True)))


def controls(shape, xi):
    return [random_control(shape, "inf", xi, np.random.default_rng(s)) for s in range(CONTROLS)]


def blackbox_section(model, train, test, seed) -> None:
    """Black-box vs white-box UAP on `model` (the ONNX export), crafted as tests/test_blackbox.py does."""
    craft = crafting_subset(train, 200).floats()
    xi, _ = xi_for(craft, "inf", ZETA)
    black_box = WHITE_BOX.model_copy(update={"algorithm": "blackbox", "max_iter": 10,
                                             "blackbox": BlackBoxSettings(low_res=SIZE)})
    black = BlackBoxUAP(black_box).craft(model, craft, xi, np.random.default_rng(seed))
    white = PaperUAP(WHITE_BOX).craft(model, craft, xi, np.random.default_rng(seed))
    print(f"\n## 2. Black-box vs white-box UAP on the cxr3 CNN's ONNX export ({len(craft)} train images, "
          f"xi = {xi:.5f}; test split: {len(test)} images)\n")
    print("| crafting | queries | gradient steps | passes | wall s | test R_f [95% Wilson] |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| black-box NES (10 epochs, low_res {SIZE}) | {black.queries} | - | {black.passes} | "
          f"{black.seconds:.1f} | {fmt_rate(r_f(model, test, black.rho))} |")
    print(f"| white-box paper loop ({model.gradient_path.name}, eps 0.002, 5 passes) | - | {white.steps} | "
          f"{white.passes} | {white.seconds:.1f} | {fmt_rate(r_f(model, test, white.rho))} |")
    pooled = metrics.pooled_rate([r_f(model, test, rho) for rho in controls(craft.shape[1:], xi)])
    print(f"| random controls (mean of {CONTROLS}) | - | - | - | - | {fmt_rate(pooled)} |")


def transfer_section(a, onnx_a, train, test, seed) -> None:
    """UAPs crafted on A (the cxr3 CNN) and on B (trained here), each evaluated on A, B and A's ONNX export."""
    start = time.perf_counter()
    b = keras_adapter(train_cnn(train, SECOND_RECIPE), "cxr3_cnn_b", {"classes": list(CLASSES)})
    train_seconds = time.perf_counter() - start
    craft = crafting_subset(train, 300).floats()
    xi, _ = xi_for(craft, "inf", ZETA)
    attack = PaperUAP(WHITE_BOX)
    uaps = {name: attack.craft(model, craft, xi, np.random.default_rng(seed)).rho
            for name, model in (("A", a), ("B", b))}
    targets = {"A (Keras)": a, "B (Keras)": b, "A (ONNX)": onnx_a}
    print(f"\n## 3. Transfer: nontargeted UAPs (paper loop, eps 0.002, 5 passes, {len(craft)} train images, "
          f"xi = {xi:.5f}), test R_f [95% Wilson]\n")
    print(f"A: the cxr3 CNN, filters {RECIPE['filters']}, dense {RECIPE['dense']}, seed {RECIPE['seed']}. "
          f"B: filters {SECOND_RECIPE['filters']}, dense {SECOND_RECIPE['dense']}, seed {SECOND_RECIPE['seed']}, "
          f"trained here in {train_seconds:.1f} s.\n")
    print("| source \\ target | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets))
    print("| (clean accuracy) | " + " | ".join(fmt_rate(metrics.accuracy(test.labels, m.predict(test.floats())))
                                           for m in targets.values()) + " |")
    for name, rho in uaps.items():
        print(f"| UAP from {name} | " + " | ".join(fmt_rate(r_f(m, test, rho)) for m in targets.values()) + " |")
    rhos = controls(craft.shape[1:], xi)
    print(f"| random (mean of {CONTROLS}) | " + " | ".join(
        fmt_rate(metrics.pooled_rate([r_f(m, test, rho) for rho in rhos])) for m in targets.values()) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1, help="UAP visiting order / black-box sampling seed")
    args = ap.parse_args(argv)
    missing = cxr3_missing_reason()
    if missing:
        raise SystemExit(f"bench_onnx: {missing}")

    tf = configure_tensorflow()
    import onnxruntime
    import torch

    print(f"# ONNX benchmark: cxr3 at {SIZE}x{SIZE}, L-inf zeta={ZETA}, clip, seed {args.seed}\n")
    print(machine_line())
    print(f"python {platform.python_version()}, tensorflow {tf.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"torch {torch.__version__}")
    data = load_cxr3()
    train, test = data.subset("train"), data.subset("test")
    keras_a, path_a, seconds = cached_cnn(data)
    print(f"model A: cxr3 CNN {path_a.name} ({'trained in %.1f s' % seconds if seconds is not None else 'cached'})")
    a = cnn_adapter(keras_a)
    net = small_torch_net(SIZE, len(CLASSES))
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        onnx_a = export_keras(keras_a, Path(tmp) / "cxr3_cnn.onnx")
        subjects = [("cxr3 CNN, tf2onnx", onnx_a, "Keras GradientTape", a.loss_gradient)]
        subjects += [(f"torch CNN, {kind} exporter", export_torch(net, Path(tmp) / f"{kind}.onnx", kind == "dynamo"),
                      "torch autograd", torch_gradient(net)) for kind in ("legacy", "dynamo")]
        gradient_section(subjects, test.floats()[:32])
        blackbox_section(onnx_a, train, test, args.seed)
        transfer_section(a, onnx_a, train, test, args.seed)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
