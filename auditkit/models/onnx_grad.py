"""Input gradients for ONNX models, so that an ONNX file can be attacked white-box.

The ONNX graph is first wrapped into a function of auditkit's image plane: the model's preprocessing (scale,
mean/std, channel replication, layout) goes in front and the log class probabilities and per-image
cross-entropy behind, so a gradient is directly d loss / d image plane. Two ways to differentiate it:

- onnx-ad: a reverse-mode ONNX graph run in onnxruntime (one per batch size; onnx-ad needs static shapes);
- torch (the `auditkit[torch]` extra): onnx2fx turns the wrapped graph into a torch module; autograd.

A path is used only after its gradient agrees with central finite differences through onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .base import PROB_FLOOR
from .spec import ModelSpec

IMAGE, ONEHOT, LOG_PROBS, LOSS = "auditkit_image", "auditkit_onehot", "auditkit_log_probs", "auditkit_loss"
ADJ_IMAGE = "adj_" + IMAGE
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes a dynamic-batch gradient is run at (padded up)
MAX_REL_ERROR = 1e-2
# central-difference steps on the image scale, along unit-L2 directions: the larger one beats float32 rounding,
# the smaller one ReLU / max-pool kinks; a path is judged by the better of the two
FD_STEPS = (1e-2, 1e-3)
PROBES = 8  # self-check images

GradientFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def session(model):
    """An onnxruntime CPU session for an in-memory model (warnings about unused initializers silenced).

    One thread inside each call: the UAP loop makes many small calls, cells run side by side, and onnxruntime's
    spinning worker threads then fight each other. covidnet_small's tf2onnx export at 128 px, 256 crafting images,
    2 passes on a shared 2-core Xeon: 2.1-2.5 ms per visited image with the default threads, 0.63-0.64 ms with one
    (Keras loop: 0.59-0.72 ms), the same UAP bit for bit (benchmarks/bench_onnx_vs_keras.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def image_space_model(model, input_name: str, spec: ModelSpec):
    """`model` as a function of the image plane: (image (B,H,W), one-hot label (B,K)) -> (log-probs, loss (B,)).

    The preprocessing is the same float32 arithmetic as adapters.model_input, so the wrapped graph
    reproduces the adapter's forward pass exactly; the loss is -log(max(p, 1e-30)) for softmax outputs
    and -log_softmax for logits, picked by the one-hot label.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    original = next(v for v in graph.input if v.name == input_name)
    batch = original.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "batch")
    size, channels, k = spec.input_size, spec.channels, len(spec.classes)

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), f"auditkit_{name}")

    consts = [
        const("plane_shape", [-1, size, size, 1], np.int64),
        const("scale", spec.scale),
        const("replicate", np.ones((1, channels))),
        const("mean", np.broadcast_to(np.asarray(spec.mean, np.float32), (channels,))),
        const("std", np.broadcast_to(np.asarray(spec.std, np.float32), (channels,))),
        const("out_shape", [-1, k], np.int64),
        const("floor", PROB_FLOOR),
        const("ones", np.ones((k, 1))),
        const("flat", [-1], np.int64),
    ]
    # channel replication as a MatMul with a row of ones: exact copies, and its adjoint is a fast GEMM where
    # broadcasting's (a ReduceSum over the channel axis) is slow in onnxruntime
    pre = [
        helper.make_node("Reshape", [IMAGE, "auditkit_plane_shape"], ["auditkit_x4"]),
        helper.make_node("Mul", ["auditkit_x4", "auditkit_scale"], ["auditkit_scaled"]),
        helper.make_node("MatMul", ["auditkit_scaled", "auditkit_replicate"], ["auditkit_channels"]),
        helper.make_node("Sub", ["auditkit_channels", "auditkit_mean"], ["auditkit_centred"]),
        helper.make_node("Div", ["auditkit_centred", "auditkit_std"],
                         [input_name if spec.layout == "NHWC" else "auditkit_nhwc"]),
    ]
    if spec.layout == "NCHW":
        pre.append(helper.make_node("Transpose", ["auditkit_nhwc"], [input_name], perm=[0, 3, 1, 2]))
    out = helper.make_node("Reshape", [graph.output[0].name, "auditkit_out_shape"], ["auditkit_out"])
    if spec.output == "logits":
        head = [helper.make_node("LogSoftmax", ["auditkit_out"], [LOG_PROBS], axis=1)]
    else:
        head = [helper.make_node("Max", ["auditkit_out", "auditkit_floor"], ["auditkit_floored"]),
                helper.make_node("Log", ["auditkit_floored"], [LOG_PROBS])]
    head += [
        helper.make_node("Mul", [LOG_PROBS, ONEHOT], ["auditkit_picked"]),
        helper.make_node("MatMul", ["auditkit_picked", "auditkit_ones"], ["auditkit_summed"]),
        helper.make_node("Reshape", ["auditkit_summed", "auditkit_flat"], ["auditkit_neg_loss"]),
        helper.make_node("Neg", ["auditkit_neg_loss"], [LOSS]),
    ]
    new = helper.make_graph(
        pre + list(graph.node) + [out] + head, graph.name or "model",
        [helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, [batch_dim, size, size]),
         helper.make_tensor_value_info(ONEHOT, TensorProto.FLOAT, [batch_dim, k])]
        + [v for v in graph.input if v.name != input_name],  # old exporters list initializers as inputs
        [helper.make_tensor_value_info(LOG_PROBS, TensorProto.FLOAT, [batch_dim, k]),
         helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [batch_dim])],
        initializer=list(graph.initializer) + consts,
    )
    new.sparse_initializer.extend(graph.sparse_initializer)
    wrapped = helper.make_model(new, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                functions=list(model.functions))
    return onnx.shape_inference.infer_shapes(wrapped, data_prop=True)


def with_batch(model, batch: int):
    """`model` with its batch size fixed and every shape re-inferred (onnx-ad needs static shapes)."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in list(fixed.graph.input[:2]) + list(fixed.graph.output):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = batch
    del fixed.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)


def explicit_pads(model):
    """Convs with asymmetric padding (TF 'SAME' with stride 2) or auto_pad SAME_* rewritten as Pad + Conv(pads=0).

    onnx-ad's Conv adjoint is a ConvTranspose with an output_shape, which pads symmetrically: its gradient is
    silently wrong for any other padding. An explicit zero Pad followed by an unpadded Conv is the same function.
    """
    import onnx
    from onnx import helper, numpy_helper

    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    nodes, extra, changed = [], [], False
    for node in model.graph.node:
        pads = _asymmetric_pads(node, shapes) if node.op_type == "Conv" else None
        if pads is None:
            nodes.append(node)
            continue
        changed = True
        padded = f"{node.output[0]}__auditkit_padded"
        if opset(model) >= 11:
            pads_name = f"{node.output[0]}__auditkit_pads"
            extra.append(numpy_helper.from_array(np.asarray(pads, np.int64), pads_name))
            nodes.append(helper.make_node("Pad", [node.input[0], pads_name], [padded], mode="constant"))
        else:
            nodes.append(helper.make_node("Pad", [node.input[0]], [padded], mode="constant", pads=pads))
        conv = helper.make_node("Conv", [padded] + list(node.input[1:]), list(node.output), name=node.name)
        for a in node.attribute:
            if a.name not in ("pads", "auto_pad"):
                conv.attribute.append(a)
        nodes.append(conv)
    if not changed:
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    rewritten.graph.initializer.extend(extra)
    del rewritten.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(rewritten, strict_mode=True, data_prop=True)


def _asymmetric_pads(node, shapes) -> list[int] | None:
    """The full Pad `pads` (N, C, spatial...) for a Conv whose padding is not symmetric, else None."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto = attrs.get("auto_pad", b"NOTSET").decode()
    shape = shapes.get(node.input[0])
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if not shape or 0 in shape:
            return None  # unknown shape: onnx-ad refuses auto_pad with its own message
        spatial = shape[2:]
        kernel = attrs.get("kernel_shape") or shapes[node.input[1]][2:]
        strides = attrs.get("strides", [1] * len(spatial))
        dilations = attrs.get("dilations", [1] * len(spatial))
        total = [max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
                 for n, k, s, d in zip(spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        begin = small if auto == "SAME_UPPER" else [t - b for t, b in zip(total, small)]
        pads = begin + [t - b for t, b in zip(total, begin)]
    elif auto == "NOTSET" and "pads" in attrs:
        pads = list(attrs["pads"])
    else:
        return None
    half = len(pads) // 2
    if pads[:half] == pads[half:]:
        return None
    return [0, 0] + pads[:half] + [0, 0] + pads[half:]


@dataclass
class Batching:
    """How the wrapped model is fed: a fixed batch size (from the file) or dynamic."""

    fixed: int | None

    def chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(start, stop, padded size) covering n rows."""
        step = self.fixed or BUCKETS[-1]
        out = []
        for start in range(0, n, step):
            stop = min(n, start + step)
            size = self.fixed or next(b for b in BUCKETS if b >= stop - start)
            out.append((start, stop, size))
        return out


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) == size:
        return np.ascontiguousarray(a)
    return np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])


def run_batched(fn, batching: Batching, images: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, ...]:
    """fn(images, onehot) -> arrays with a leading batch axis, run over padded chunks and trimmed."""
    parts = []
    for start, stop, size in batching.chunks(len(images)):
        out = fn(_padded(images[start:stop], size), _padded(onehot[start:stop], size))
        parts.append([o[: stop - start] for o in out])
    return tuple(np.concatenate(p) for p in zip(*parts))


class OnnxAdGradient:
    """Reverse-mode gradient graphs from onnx-ad, run in onnxruntime: one session per batch size."""

    name = "onnx-ad"

    def __init__(self, wrapped, batching: Batching):
        import onnx_ad  # noqa: F401 - fail here, with the import error, if it is missing

        foreign = sorted({f"{n.domain}:{n.op_type}" for n in wrapped.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise onnx_ad.UnsupportedOperator(f"no derivative rules for {', '.join(foreign)} (it covers the default "
                                              "ONNX domain only)")
        self._wrapped, self._sessions = wrapped, {}
        self.batching = batching
        self._session(batching.fixed or 1)  # build one now: unsupported ops fail at load, not mid-attack

    def _session(self, batch: int):
        if batch not in self._sessions:
            import onnx_ad

            fixed = explicit_pads(with_batch(self._wrapped, batch))
            adjoint = onnx_ad.reverse(fixed, inputs=[IMAGE], outputs=[LOSS], prefix="adj_", dim="nadj",
                                      layout="onnx")
            self._sessions[batch] = session(_streamlined(adjoint))
        return self._sessions[batch]

    def _run(self, images, onehot):
        seed = np.ones((len(images), 1), np.float32)
        lp, g = self._session(len(images)).run(
            [LOG_PROBS, ADJ_IMAGE], {IMAGE: images, ONEHOT: onehot, "adj_" + LOSS: seed})
        return lp, g[..., 0]

    def __call__(self, images: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return run_batched(self._run, self.batching, images, onehot)


def _streamlined(adjoint):
    """The adjoint with one seed, its no-op ReduceSums made Identity and its dead nodes dropped.

    onnxruntime runs every node, used or not, and its ReduceSum over a size-1 axis of a large tensor is
    pathologically slow: broadcast bookkeeping and the adjoints of constants (which nothing reads) cost more
    than the whole backward pass of a small CNN otherwise.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(adjoint)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in ("adj_" + LOSS, ADJ_IMAGE):
            value.type.tensor_type.shape.dim[-1].Clear()
            value.type.tensor_type.shape.dim[-1].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input)}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    needed, kept = {v.name for v in model.graph.output}, []
    for node in reversed(model.graph.node):
        if not needed.intersection(node.output):
            continue
        if node.op_type == "ReduceSum" and len(node.input) > 1 and node.input[1] in consts:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            shape, axes = shapes.get(node.input[0]), consts[node.input[1]].ravel()
            if (attrs.get("keepdims", 1) == 1 and shape and (len(axes) or attrs.get("noop_with_empty_axes"))
                    and all(shape[a] == 1 for a in axes)):
                node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        kept.append(node)
        needed.update(_reads(node))
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    return model


def _reads(node) -> set[str]:
    """Every name a node reads, its subgraphs' included (If / Loop / Scan bodies read the outer scope)."""
    from onnx import AttributeProto

    names = set(node.input)
    for a in node.attribute:
        for g in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
            for inner in g.node:
                names |= _reads(inner)
    return names


class TorchGradient:
    """The wrapped graph as a torch module (onnx2fx), differentiated by autograd."""

    name = "torch"

    def __init__(self, wrapped, batching: Batching):
        import onnx2fx
        import torch

        self._torch = torch
        self._module = onnx2fx.convert(wrapped).eval()
        self.batching = batching

    def _run(self, images, onehot):
        torch = self._torch
        x = torch.from_numpy(images).requires_grad_(True)
        log_probs, loss = self._module(x, torch.from_numpy(onehot))
        (g,) = torch.autograd.grad(loss.sum(), x)
        return log_probs.detach().numpy(), g.numpy()

    def __call__(self, images: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return run_batched(self._run, self.batching, images, onehot)


def relative_errors(gradient: GradientFn, losses: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    images: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator,
                    random_directions: int = 3) -> np.ndarray:
    """Per image, the worst gap between the gradient's directional derivatives and central finite differences.

    Directions per image (unit L2): sign(g), g/|g| and random ones. The finite differences use the float32
    forward pass, with the loss differences taken in float64. A gap is relative to the larger of |g| (the
    largest directional derivative there is) and the two derivatives compared; per image, the better of the
    FD_STEPS counts.
    """
    onehot = np.eye(k, dtype=np.float32)[labels]
    _, g = gradient(images, onehot)
    g = g.astype(np.float64)
    n = len(images)
    dirs = [np.sign(g), g] + [rng.standard_normal(g.shape) for _ in range(random_directions)]
    dirs = np.stack([d / np.maximum(np.linalg.norm(d.reshape(n, -1), axis=1), 1e-30)[:, None, None]
                     for d in dirs])  # (D, N, H, W)
    analytic = np.einsum("dnhw,nhw->dn", dirs, g)
    gnorm = np.linalg.norm(g.reshape(n, -1), axis=1)
    m = len(dirs) * n
    errors = []
    for step in FD_STEPS:
        probes = np.concatenate([images[None] + step * dirs, images[None] - step * dirs]).astype(np.float32)
        loss = losses(probes.reshape(2 * m, *images.shape[1:]), np.tile(onehot, (2 * len(dirs), 1)))
        loss = loss.astype(np.float64)
        fd = (loss[:m] - loss[m:]).reshape(len(dirs), n) / (2 * step)
        scale = np.maximum(np.maximum(np.abs(fd), np.abs(analytic)), np.maximum(gnorm, 1e-6))
        errors.append(np.max(np.abs(analytic - fd) / scale, axis=0))
    return np.min(errors, axis=0)


def self_check(gradient: GradientFn, forward: GradientFn, spec: ModelSpec) -> float:
    """Median over seeded random probe images of the worst finite-difference gap (see relative_errors).

    Each probe is labelled with its runner-up class: its loss is neither saturated nor floored, so its
    gradient carries signal. The median keeps one probe that straddles a ReLU kink from refusing a good path.
    """
    rng = np.random.default_rng(0)
    k = len(spec.classes)
    images = rng.random((PROBES, spec.input_size, spec.input_size), dtype=np.float32)
    log_probs, _ = forward(images, np.zeros((PROBES, k), np.float32))
    labels = np.argsort(log_probs, axis=1)[:, -2] if k > 1 else np.zeros(PROBES, int)

    def losses(x, onehot):
        return forward(x, onehot)[1]

    return float(np.median(relative_errors(gradient, losses, images, labels, k, rng)))


@dataclass
class GradientPath:
    """A differentiation route that passed its self-check."""

    name: str  # "onnx-ad" | "torch"
    gradient: GradientFn  # (images (N,H,W), one-hot (N,K)) -> (log-probs (N,K), d loss_i / d image_i (N,H,W))
    error: float  # its self-check relative error
    passed_over: tuple[str, ...] = ()  # why the paths tried before it failed

    def describe(self) -> str:
        text = f"{self.name}, checked against finite differences (relative error {self.error:.1e})"
        return text + (f"; fallback after: {'; '.join(self.passed_over)}" if self.passed_over else "")


def find_gradient_path(model, input_name: str, spec: ModelSpec, batch: int | None
                       ) -> tuple[GradientFn | None, GradientPath | None, list[str]]:
    """(forward through the wrapped graph, the first path passing its self-check or None, why others failed).

    onnx-ad first, then torch. The forward is None when the graph cannot even be wrapped.
    """
    try:
        wrapped = image_space_model(model, input_name, spec)
        forward_session = session(wrapped)
    except Exception as exc:  # noqa: BLE001 - onnx / onnxruntime raise many types for graphs they reject
        return None, None, [f"the graph cannot be wrapped for differentiation ({_first_line(exc)})"]
    batching = Batching(batch)

    def forward(images, onehot):
        return run_batched(lambda x, o: forward_session.run([LOG_PROBS, LOSS], {IMAGE: x, ONEHOT: o}),
                           batching, images, onehot)

    failures = []
    for backend, missing in ((OnnxAdGradient, "pip install onnx-ad==0.3.0"),
                             (TorchGradient, "pip install 'auditkit[torch]'")):
        try:
            gradient = backend(wrapped, batching)
            error = self_check(gradient, forward, spec)
        except ImportError as exc:
            failures.append(f"{backend.name}: not installed ({exc.name or exc}; {missing})")
            continue
        except Exception as exc:  # noqa: BLE001 - a converter or runtime rejecting one op must not stop the next
            failures.append(f"{backend.name}: {_first_line(exc)}")
            continue
        if error <= MAX_REL_ERROR:
            return forward, GradientPath(backend.name, gradient, error, tuple(failures)), failures
        failures.append(f"{backend.name}: its gradient disagrees with finite differences "
                        f"(relative error {error:.2g} > {MAX_REL_ERROR:g})")
    return forward, None, failures


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def refusal(name: str, failures: list[str]) -> str:
    return (f"ONNX model {name!r} cannot be attacked white-box: no input-gradient path works "
            f"({'; '.join(failures)}). Craft on a white-box twin and evaluate here with --surrogate MODEL, "
            "or use the black-box mode (queries only; slower and weaker)")
