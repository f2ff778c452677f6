"""The loop operations as TensorFlow graphs, traced once per (model and weights, norm, clip, criterion kind).

Each call takes the whole crafting set (images and labels, held as tensors for the craft) and the indices of its
images, so no call converts images. Every single-image step goes through one graph, `walk` (one image a call for
the plain loop): inlined into other graphs, the step was optimised differently and rounded the last bit of rho
differently in about 2% of steps.
"""
from __future__ import annotations

import threading
import weakref

from ...models.base import TFAdapter
from ...models.tf_runtime import GraphFunction
from ..criteria import Criterion
from ..geometry import GRAD_NORM_FLOOR

_LOCK = threading.Lock()
# model -> {(norm, clip, targeted, step_norm): (weights version, loop)}: concurrent cells share one loop, traced once
_LOOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_loop(model: TFAdapter, norm: str, clip: bool, criterion: Criterion, step_norm: str) -> TFLoop:
    """The traced loop for this model, traced again when its weights change (hardening trains in place)."""
    key = (norm, clip, criterion.targeted, step_norm)
    version, log_probs = model.loop_log_probs()
    with _LOCK:
        cache = _LOOPS.setdefault(model, {})
        if key not in cache or cache[key][0] != version:
            cache[key] = version, TFLoop(model, log_probs, norm, clip, criterion, step_norm)
        return cache[key][1]


class TFLoop:
    """LoopOps (see backends) over a TF log-probability function of image-space batches."""

    def __init__(self, model: TFAdapter, log_probs_of, norm: str, clip: bool, criterion: Criterion,
                 step_norm: str):
        tf = self._tf = model.tf
        self._log_probs_of, self._norm, self._clip, self._criterion = log_probs_of, norm, clip, criterion
        self._step_norm = step_norm
        size = model.spec.input_size
        plane, scalar = tf.TensorSpec([size, size], tf.float32), tf.TensorSpec([], tf.float32)
        index, indices = tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)
        held = [tf.TensorSpec([None, size, size], tf.float32), tf.TensorSpec([None], tf.int32)]
        self.walk = GraphFunction(tf, self._walk, held + [indices, tf.TensorSpec([None], tf.bool), plane, scalar,
                                                          scalar])
        self.sgd_step = GraphFunction(tf, self._sgd_step, held + [indices, plane, plane, scalar, scalar, scalar,
                                                                  scalar])
        self.fooled_batch = GraphFunction(tf, self._fooled_batch, held + [indices, plane])
        self.accepted_batch = GraphFunction(tf, self._accepted_batch, held + [indices, plane, scalar])
        self.scan = GraphFunction(tf, self._scan, held + [indices, plane, scalar, index])

    def hold(self, *arrays):
        """The arrays as the calls take them for a whole craft (tensors), converted once."""
        return tuple(self._tf.constant(a) for a in arrays)

    # The ops every graph is made of.
    def _perturbed(self, x):
        return self._tf.clip_by_value(x, 0.0, 1.0) if self._clip else x

    def _predict(self, x):
        return self._tf.argmax(self._log_probs_of(x), axis=1, output_type=self._tf.int32)

    def _project(self, v, xi):
        tf = self._tf
        if self._norm == "inf":
            return tf.clip_by_value(v, -xi, xi)
        return v * tf.minimum(1.0, xi / tf.maximum(tf.norm(v), 1e-30))

    def _step(self, eps, g, axis=None):
        """The FGSM step: eps along the direction (targeted steps descend the target's cross-entropy)."""
        return (-eps if self._criterion.targeted else eps) * self._direction(g, self._step_norm, axis)

    def _direction(self, g, norm, axis=None):
        """A step's direction: sign (L-inf) or unit L2 length over `axis` (one image's plane: [1, 2])."""
        tf = self._tf
        if norm == "inf":
            return tf.sign(g)
        norm = tf.norm(g) if axis is None else tf.norm(g, axis=axis, keepdims=True)
        return g / tf.maximum(norm, GRAD_NORM_FLOOR)

    # The graphs.
    def _one_step(self, images, labels, j, rho, xi, eps):
        """Check, gradient, step, check, project for image j: (rho after it, whether j was unfooled, whether its
        step was accepted). The check and the gradient share one forward pass; the backward pass runs only for an
        image not yet fooled."""
        tf, succeeded = self._tf, self._criterion.succeeded
        x, y = images[j], labels[j]
        xr = self._perturbed(x + rho)[None]
        with tf.GradientTape() as tape:
            tape.watch(xr)
            log_probs = self._log_probs_of(xr)
            loss = -log_probs[0, y]
        already = succeeded(tf.argmax(log_probs, axis=1, output_type=tf.int32)[0], y)

        def attack():
            g = tape.gradient(loss, xr)[0]
            x_adv = self._perturbed(x + rho + self._step(eps, g))
            success = succeeded(self._predict(x_adv[None])[0], y)
            return tf.cond(success, lambda: self._project(x_adv - x, xi), lambda: rho), success

        new_rho, accepted = tf.cond(already, lambda: (rho, tf.constant(False)), attack)
        return new_rho, tf.logical_not(already), accepted

    def _walk(self, images, labels, idx, skip, rho, xi, eps):
        """The plain loop over images `idx`, in order, in one graph call (see LoopOps.walk)."""
        tf = self._tf
        n = tf.size(idx)

        def body(t, rho, moved, outcomes):
            def visit():
                new_rho, unfooled, accepted = self._one_step(images, labels, idx[t], rho, xi, eps)
                return new_rho, tf.logical_not(unfooled), accepted

            new_rho, fooled_here, accepted = tf.cond(tf.logical_and(skip[t], tf.logical_not(moved)),
                                                     lambda: (rho, tf.constant(True), tf.constant(False)), visit)
            outcome = tf.stack([fooled_here, accepted])
            return t + 1, new_rho, tf.logical_or(moved, accepted), outcomes.write(t, outcome)

        _, rho, _, outcomes = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), rho, tf.constant(False),
                                                                         tf.TensorArray(tf.bool, size=n)))
        outcomes = outcomes.stack()
        return rho, outcomes[:, 0], outcomes[:, 1]

    def _fooled_batch(self, images, labels, idx, rho):
        tf = self._tf
        pred = self._predict(self._perturbed(tf.gather(images, idx) + rho))
        return self._criterion.succeeded(pred, tf.gather(labels, idx))

    def _accepted_batch(self, images, labels, idx, rho, eps):
        tf = self._tf
        x, y = tf.gather(images, idx), tf.gather(labels, idx)
        xr = self._perturbed(x + rho)
        with tf.GradientTape() as tape:
            tape.watch(xr)
            loss = -tf.gather(self._log_probs_of(xr), y, axis=1, batch_dims=1)
        g = tape.gradient(loss, xr)  # per-image gradients: the summed losses do not interact
        x_adv = self._perturbed(x + rho + self._step(eps, g, axis=[1, 2]))
        return self._criterion.succeeded(self._predict(x_adv), y)

    def _scan(self, images, labels, idx, rho, eps, probe):
        """Whether each image of a window is fooled, and whether the steps of its first `probe` unfooled images
        (positions in the window) would be accepted: all the look-ahead needs after rho moved, in one call."""
        tf = self._tf
        is_fooled = self._fooled_batch(images, labels, idx, rho)
        candidates = tf.cast(tf.where(tf.logical_not(is_fooled))[:probe, 0], tf.int32)
        accepted = tf.cond(tf.size(candidates) > 0,
                           lambda: self._accepted_batch(images, labels, tf.gather(idx, candidates), rho, eps),
                           lambda: tf.zeros([0], tf.bool))
        return is_fooled, candidates, accepted

    def _sgd_step(self, images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum):
        tf = self._tf
        x, y = tf.gather(images, idx), tf.gather(labels, idx)
        with tf.GradientTape() as tape:
            tape.watch(rho)
            log_probs = self._log_probs_of(self._perturbed(x + rho))
            ce = -tf.gather(log_probs, y, axis=1, batch_dims=1)
            objective = -tf.reduce_mean(ce) if self._criterion.targeted else tf.reduce_mean(tf.minimum(ce, loss_cap))
        g = tape.gradient(objective, rho)
        velocity = momentum * velocity + g / tf.maximum(tf.reduce_max(tf.abs(g)), GRAD_NORM_FLOOR)
        was_fooled = self._criterion.succeeded(tf.argmax(log_probs, axis=1, output_type=tf.int32), y)
        return self._project(rho + alpha * self._direction(velocity, self._norm), xi), velocity, was_fooled
