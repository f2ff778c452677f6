"""The one home of TensorFlow set-up and of every private TensorFlow API auditkit uses.

Each private use is named here with what it buys (measured; docs/engine.md has the figures and how they were
taken) and its public fallback:

- FLAT_CALL: `ConcreteFunction._call_flat` in GraphFunction runs a traced graph with no argument binding;
  public fallback: calling the ConcreteFunction (binds the arguments to its structure on every call).
- FREEZE: `convert_to_constants.convert_variables_to_constants_v2` folds a Keras model's weights into the loop's
  graph as constants; public fallback: the model's own call, reading its variables.
- GRADIENT_OVERRIDE: the `_gradient_op_type` node attribute (what TF1's `gradient_override_map` sets) gives a
  frozen graph's convolutions cheaper registered input gradients (fast_gradients); public fallback: TF's own
  gradients.
- OP_DETERMINISM: `framework.config.is_op_determinism_enabled` / `disable_op_determinism` let training switch
  deterministic ops off again afterwards; the public API can only switch them on. Not a speed measure: without it
  seeded training would leave every later TF op in the process deterministic (slower).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

GRADIENT_OVERRIDE_ATTR = "_gradient_op_type"


def configure_tensorflow() -> Any:
    """Import TF once, with threading chosen for a small CPU: all cores inside an op (AUDITKIT_THREADS caps them),
    and as many ops at a time as there are cores, so that the audit's concurrent cells run side by side.

    One UAP loop is a chain of small dependent ops that keeps two cores only half busy; two cells at a time
    crafted 1.4x faster than one after the other on a 2-core machine, with the same UAPs.
    TF's oneDNN kernels are off unless TF_ENABLE_ONEDNN_OPTS says otherwise (it must be set before TF is first
    imported): their per-op overhead made a single-image UAP step at 224 px 2.9x slower, while batched calls and
    training ran at the same speed.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if not getattr(configure_tensorflow, "done", False):
        tf = _import_tensorflow_quietly()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("AUDITKIT_THREADS", "0")))
            tf.config.threading.set_inter_op_parallelism_threads(os.cpu_count() or 1)
        except RuntimeError:  # already initialised by the caller; keep their setting
            pass
        configure_tensorflow.done = True
    import tensorflow as tf

    return tf


# One trace at a time: concurrent cells' graphs differentiate the same frozen model function, whose gradient TF
# builds at the first trace that needs it, and not thread-safely.
_TRACING = threading.Lock()


class GraphFunction:
    """`fn` as a TF graph for a fixed input signature, traced at the first call, which every later call runs
    directly: tf.function's own dispatch matches the arguments against its signature on each call, 0.6-1 ms a
    call on a 2-core Xeon, a quarter of a single-image UAP step at 64 px. Arguments that fit the signature go
    straight to the traced graph (its flat call, private to TF 2.21): the public call still bound them to the
    signature's structure, 0.1-0.2 ms of a 2.7 ms single-image step at 224 px. Others take the public call, which
    says what does not fit."""

    def __init__(self, tf, fn, signature: list):
        self._function = tf.function(fn, input_signature=signature)
        self._tf, self._signature = tf, signature
        self._traced = self._flat_call = None

    def __call__(self, *args):
        if self._traced is None:
            with _TRACING:
                if self._traced is None:
                    traced = self._function.get_concrete_function()
                    self._flat_call = getattr(traced, "_call_flat", None)
                    self._traced = traced
        tf = self._tf
        if self._flat_call is not None and len(args) == len(self._signature):  # private: see FLAT_CALL
            flat = [a if isinstance(a, tf.Tensor) else tf.constant(a, spec.dtype)
                    for a, spec in zip(args, self._signature)]
            if all(spec.is_compatible_with(t) for spec, t in zip(self._signature, flat)):
                return self._flat_call(flat, self._traced.captured_inputs)
        return self._traced(*args)


@contextlib.contextmanager
def op_determinism():
    """Deterministic TF ops for the duration; switched back off afterwards if they were off."""
    configure_tensorflow()
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # private: see OP_DETERMINISM

    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def _import_tensorflow_quietly():
    """`import tensorflow` with fd 2 sent to /dev/null: TF 2.21 prints its C++ start-up banner (oneDNN notice)
    through absl before any log level applies. Import errors still surface as Python exceptions."""
    import os
    import sys

    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


def freeze(concrete_function):
    """The traced function with its variables folded in as constants (private: see FREEZE)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete_function)


def override_gradient(node_def, gradient_name: str) -> None:
    """Have TF differentiate this graph node with the gradient registered as `gradient_name` (private: see
    GRADIENT_OVERRIDE)."""
    node_def.attr[GRADIENT_OVERRIDE_ATTR].s = gradient_name.encode()


def function_from_graph_def(tf, graph_def, inputs: list[str], outputs: list[str]):
    """A callable running `graph_def` from the named input tensors to the named outputs (public API)."""

    def import_graph_def():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph_def, [])
    graph = wrapped.graph
    return wrapped.prune([graph.as_graph_element(n) for n in inputs], [graph.as_graph_element(n) for n in outputs])
