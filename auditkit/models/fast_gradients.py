"""Cheaper input gradients for convolutions of a frozen TF graph, for the UAP loop.

TF's CPU kernel for a convolution's input gradient (Conv2DBackpropInput) is slow for the shapes a small CNN has:
in an op-level trace of covidnet_small's gradient for 64 images at 224 px, it took 32 of the 118 ms of op time for
the 8x8 stride-8 stem and 2-6 ms for each 1x1 convolution, while the same sums as a matrix product take a few ms.
Three kinds of Conv2D get their input gradient from other ops instead (the forward pass is untouched, so
predictions are the same bit for bit):

- 1x1 kernel, stride 1: the gradient is a matrix product with the transposed kernel;
- k x k kernel with stride k and no padding (a patch embedding such as a stem): a matrix product, then the patches
  put back in place with a transpose;
- stride 1, odd kernel sizes, SAME padding: a forward convolution of the output gradient with the kernel flipped
  and its channels swapped (1.15-2.3x faster than the backprop kernel; rounds differently, by ~1e-6 relative).

Only convolutions whose kernel is a constant are rewritten (the loop's graph freezes the weights), so no kernel
gradient is ever needed: these gradient functions return none for it.
"""
from __future__ import annotations

import threading
from typing import Any

from .tf_runtime import function_from_graph_def, override_gradient

MATMUL = "AuditkitConv2DInputGradMatMul"
PATCHES = "AuditkitConv2DInputGradPatches"
FLIPPED = "AuditkitConv2DInputGradFlipped"
_REGISTERED = threading.Lock()


def _register(tf) -> None:
    with _REGISTERED:
        if getattr(_register, "done", False):
            return

        @tf.RegisterGradient(MATMUL)
        def _matmul_grad(op, dy):
            x, kernel = op.inputs
            cin, cout = kernel.shape[2], kernel.shape[3]
            dx = tf.matmul(tf.reshape(dy, [-1, cout]), tf.reshape(kernel, [cin, cout]), transpose_b=True)
            return tf.reshape(dx, tf.shape(x)), None

        @tf.RegisterGradient(PATCHES)
        def _patches_grad(op, dy):
            x, kernel = op.inputs
            k, _, cin, cout = kernel.shape
            dx = tf.matmul(tf.reshape(dy, [-1, cout]), tf.reshape(kernel, [k * k * cin, cout]), transpose_b=True)
            rows = tf.shape(dy)[0] * tf.shape(dy)[1]  # (patch row, patch column, kernel row, kernel column x cin)
            dx = tf.transpose(tf.reshape(dx, [rows, tf.shape(dy)[2], k, k * cin]), [0, 2, 1, 3])
            return tf.reshape(dx, tf.shape(x)), None

        @tf.RegisterGradient(FLIPPED)
        def _flipped_grad(op, dy):
            kernel = op.inputs[1]
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            return tf.nn.conv2d(dy, flipped, strides=1, padding="SAME"), None

        _register.done = True


def _gradient_kind(node, kernel_shape, input_shape) -> str | None:
    """Which cheaper input gradient fits this Conv2D node (kernel shape kh, kw, cin, cout), if any."""
    attr = node.attr
    if attr["data_format"].s not in (b"", b"NHWC") or any(d != 1 for d in attr["dilations"].list.i):
        return None
    padding = attr["padding"].s
    if padding not in (b"SAME", b"VALID"):
        return None
    if input_shape is None or len(input_shape) != 4 or input_shape[3] != kernel_shape[2]:
        return None  # unknown input channels, or a grouped convolution
    _, sh, sw, _ = attr["strides"].list.i
    kh, kw = kernel_shape[:2]
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return MATMUL
    height, width = input_shape[1:3]
    if kh == kw == sh == sw and height and width and height % kh == 0 and width % kw == 0:
        return PATCHES  # no padding (SAME pads nothing here) and no row or column left over
    if (sh, sw) == (1, 1) and kh % 2 == 1 and kw % 2 == 1 and padding == b"SAME":
        return FLIPPED
    return None


def with_fast_input_gradients(frozen, tf) -> tuple[Any, dict[str, str]]:
    """(a function computing what `frozen` does, with cheaper input gradients for its eligible convolutions;
    {node name: gradient kind} for those). `frozen`: a ConcreteFunction whose weights are constants."""
    graph_def = frozen.graph.as_graph_def()
    nodes = {node.name: node for node in graph_def.node}
    shapes = {op.name: op.inputs[0].shape for op in frozen.graph.get_operations() if op.type == "Conv2D"}
    rewritten: dict[str, str] = {}
    for node in graph_def.node:
        if node.op != "Conv2D":
            continue
        source = nodes.get(node.input[1].split(":")[0])
        while source is not None and source.op == "Identity":
            source = nodes.get(source.input[0].split(":")[0])
        if source is None or source.op != "Const":
            continue
        kernel_shape = tf.make_ndarray(source.attr["value"].tensor).shape
        input_shape = shapes[node.name].as_list() if shapes[node.name].rank is not None else None
        kind = _gradient_kind(node, kernel_shape, input_shape)
        if kind:
            override_gradient(node, kind)
            rewritten[node.name] = kind
    if not rewritten:
        return frozen, rewritten
    _register(tf)
    function = function_from_graph_def(tf, graph_def, [t.name for t in frozen.inputs],
                                       [t.name for t in frozen.outputs])
    return function, rewritten
