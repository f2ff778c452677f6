"""The one home of TensorFlow set-up and of every private TensorFlow API auditkit uses.

Each private use is named here with what it buys, measured on a whole `policies/paper.yaml` run
(benchmarks/bench_tf_runtime.py; figures in docs/engine.md), and its public fallback. A use that bought under 5% of
that run was dropped: the traced graph's flat call (`_call_flat`, -0.1% CPU time) and cheaper convolution input
gradients through the `_gradient_op_type` node attribute (2.0%).

- FREEZE: `convert_to_constants.convert_variables_to_constants_v2` folds a Keras model's weights into the loop's
  graph as constants (11% less CPU time on paper.yaml); public fallback: the model's own call, reading its
  variables.
- OP_DETERMINISM: `framework.config.is_op_determinism_enabled` / `disable_op_determinism` let training switch
  deterministic ops off again afterwards; the public API can only switch them on. Not a speed measure: without it
  seeded training would leave every later TF op in the process deterministic (slower).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

def configure_tensorflow() -> Any:
    """Import TF once, with threading chosen for a small CPU: all cores inside an op (AUDITKIT_THREADS caps them),
    and as many ops at a time as there are cores, so that the cells of one side-by-side loop call run at once (one
    UAP loop is a chain of small dependent ops that keeps two cores only half busy).
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
    directly: tf.function's own dispatch matches the arguments against its signature on each call (see
    docs/engine.md for what that cost)."""

    def __init__(self, tf, fn, signature: list):
        self._function = tf.function(fn, input_signature=signature)
        self._traced = None

    def __call__(self, *args):
        if self._traced is None:
            with _TRACING:
                if self._traced is None:
                    self._traced = self._function.get_concrete_function()
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


def function_from_graph_def(tf, graph_def, inputs: list[str], outputs: list[str]):
    """A callable running `graph_def` from the named input tensors to the named outputs (public API)."""

    def import_graph_def():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph_def, [])
    graph = wrapped.graph
    return wrapped.prune([graph.as_graph_element(n) for n in inputs], [graph.as_graph_element(n) for n in outputs])
