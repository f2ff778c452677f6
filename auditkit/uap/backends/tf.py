"""The loop operations as TensorFlow graphs, traced once per (model and weights, norm, clip, step norm).

Each call takes the whole crafting set (images and clean labels, held as tensors for the craft) and, for each of
several cells, the indices of its images (concatenated, cut by `splits`), its rho and its constants. A graph is a
`tf.while_loop` over the cells whose iterations run side by side; each iteration runs one cell's operation on
that cell's images alone, with the same shapes as when the cell is crafted alone. Stacking the cells' images into
one batch instead rounds each image's gradient differently from a batch of one (per-image gradients differed by up
to 3e-7 and 8% of their signs at 224 px, see docs/engine.md), so a cell's UAP would depend on its neighbours.
Every single-image step goes through one graph, `walk`: inlined into other graphs, the step was optimised
differently and rounded the last bit of rho differently in about 2% of steps.
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import numpy as np

from ...models.base import TFAdapter
from ...models.tf_runtime import GraphFunction
from ..criteria import succeeded_for
from ..geometry import GRAD_NORM_FLOOR
from . import Call

_LOCK = threading.Lock()
# model -> {(norm, clip, step_norm): (weights version, loop)}: every craft on a model shares one loop, traced once
_LOOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SIDE_BY_SIDE = 16  # most cells' iterations of a call's loop in flight at once


def compiled_loop(model: TFAdapter, norm: str, clip: bool, step_norm: str) -> TFLoop:
    """The traced loop for this model, traced again when its weights change (hardening trains in place)."""
    key = (norm, clip, step_norm)
    version, log_probs = model.loop_log_probs()
    with _LOCK:
        cache = _LOOPS.setdefault(model, {})
        if key not in cache or cache[key][0] != version:
            cache[key] = version, TFLoop(model, log_probs, norm, clip, step_norm)
        return cache[key][1]


def _cut(values: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1]) if len(counts) else []


class TFLoop:
    """LoopOps (see backends) over a TF log-probability function of image-space batches."""

    def __init__(self, model: TFAdapter, log_probs_of, norm: str, clip: bool, step_norm: str):
        tf = self._tf = model.tf
        self._log_probs_of, self._norm, self._clip, self._step_norm = log_probs_of, norm, clip, step_norm
        size = model.spec.input_size
        planes, values = tf.TensorSpec([None, size, size], tf.float32), tf.TensorSpec([None], tf.float32)
        ints, flags = tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.bool)
        # held images, held labels, indices, splits, rho per cell, target per cell
        common = [planes, ints, ints, ints, planes, ints]
        self._graphs = {
            "walk": GraphFunction(tf, self._walk_cells, common + [flags, values, values]),  # skip, xi, eps
            "fooled": GraphFunction(tf, self._fooled_cells, common),
            "accepted": GraphFunction(tf, self._accepted_cells, common + [values]),  # eps
            "scan": GraphFunction(tf, self._scan_cells, common + [values, ints]),  # eps, probe
            # velocity, alpha, xi, loss cap, momentum
            "sgd": GraphFunction(tf, self._sgd_cells, common + [planes, values, values, values, values]),
        }

    def hold(self, *arrays):
        """The arrays as the calls take them for a whole craft (tensors), converted once."""
        return tuple(self._tf.constant(a) for a in arrays)

    def run(self, op: str, images, labels, calls: Sequence[Call]) -> list:
        counts = [len(c.idx) for c in calls]
        idx = np.concatenate([c.idx for c in calls]).astype(np.int32)
        splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        rho = np.stack([c.rho for c in calls]).astype(np.float32)
        target = np.int32([c.cell.target for c in calls])
        per_cell = {
            "walk": lambda: (np.concatenate([c.skip for c in calls]).astype(bool),
                             np.float32([c.cell.xi for c in calls]), np.float32([c.cell.eps for c in calls])),
            "fooled": lambda: (),
            "accepted": lambda: (np.float32([c.cell.eps for c in calls]),),
            "scan": lambda: (np.float32([c.cell.eps for c in calls]), np.int32([c.probe for c in calls])),
            "sgd": lambda: (np.stack([c.velocity for c in calls]).astype(np.float32),
                            np.float32([c.alpha for c in calls]), np.float32([c.cell.xi for c in calls]),
                            np.float32([c.cell.loss_cap for c in calls]),
                            np.float32([c.cell.momentum for c in calls])),
        }[op]()
        out = [np.asarray(t) for t in self._graphs[op](images, labels, idx, splits, rho, target, *per_cell)]
        if op == "walk":
            return list(zip(out[0], _cut(out[1], counts), _cut(out[2], counts)))
        if op in ("fooled", "accepted"):
            return _cut(out[0], counts)
        if op == "scan":
            probed = out[3].tolist()
            return list(zip(_cut(out[0], counts), _cut(out[1], probed), _cut(out[2], probed)))
        return list(zip(out[0], out[1], _cut(out[2], counts)))

    # The loop over cells.
    def _each_cell(self, splits, body, outputs: Sequence[tuple]):
        """body(k, lo, hi) for every cell k (its images at positions lo:hi), in one while loop whose iterations run
        side by side; `outputs`: (dtype, "stack" one value per cell | "concat" a run of values per cell)."""
        tf = self._tf
        n = tf.size(splits) - 1
        arrays = tuple(tf.TensorArray(dtype, size=n, infer_shape=False) for dtype, _ in outputs)

        def step(k, arrays):
            values = body(k, splits[k], splits[k + 1])
            return k + 1, tuple(a.write(k, v) for a, v in zip(arrays, values))

        _, arrays = tf.while_loop(lambda k, _: k < n, step, (tf.constant(0), arrays),
                                  parallel_iterations=SIDE_BY_SIDE)
        return tuple(a.stack() if how == "stack" else a.concat() for a, (_, how) in zip(arrays, outputs))

    def _walk_cells(self, images, labels, idx, splits, rho, target, skip, xi, eps):
        tf = self._tf
        return self._each_cell(splits, lambda k, lo, hi: self._walk(images, labels, idx[lo:hi], skip[lo:hi], rho[k],
                                                                   xi[k], eps[k], target[k]),
                               [(tf.float32, "stack"), (tf.bool, "concat"), (tf.bool, "concat")])

    def _fooled_cells(self, images, labels, idx, splits, rho, target):
        return self._each_cell(splits, lambda k, lo, hi: (self._fooled(images, labels, idx[lo:hi], rho[k],
                                                                       target[k]),),
                               [(self._tf.bool, "concat")])

    def _accepted_cells(self, images, labels, idx, splits, rho, target, eps):
        return self._each_cell(splits, lambda k, lo, hi: (self._accepted(images, labels, idx[lo:hi], rho[k], eps[k],
                                                                         target[k]),),
                               [(self._tf.bool, "concat")])

    def _scan_cells(self, images, labels, idx, splits, rho, target, eps, probe):
        tf = self._tf
        return self._each_cell(splits, lambda k, lo, hi: self._scan(images, labels, idx[lo:hi], rho[k], eps[k],
                                                                   probe[k], target[k]),
                               [(tf.bool, "concat"), (tf.int32, "concat"), (tf.bool, "concat"), (tf.int32, "stack")])

    def _sgd_cells(self, images, labels, idx, splits, rho, target, velocity, alpha, xi, loss_cap, momentum):
        tf = self._tf
        return self._each_cell(splits, lambda k, lo, hi: self._sgd_step(images, labels, idx[lo:hi], rho[k],
                                                                       velocity[k], alpha[k], xi[k], loss_cap[k],
                                                                       momentum[k], target[k]),
                               [(tf.float32, "stack"), (tf.float32, "stack"), (tf.bool, "concat")])

    # The ops every graph is made of, for one cell.
    def _perturbed(self, x):
        return self._tf.clip_by_value(x, 0.0, 1.0) if self._clip else x

    def _predict(self, x):
        return self._tf.argmax(self._log_probs_of(x), axis=1, output_type=self._tf.int32)

    def _labels(self, labels, target):
        """What predictions are compared with: the target, or the clean predictions."""
        return self._tf.where(target >= 0, target, labels)

    def _project(self, v, xi):
        tf = self._tf
        if self._norm == "inf":
            return tf.clip_by_value(v, -xi, xi)
        return v * tf.minimum(1.0, xi / tf.maximum(tf.norm(v), 1e-30))

    def _step(self, eps, g, target, axis=None):
        """The FGSM step: eps along the direction (targeted steps descend the target's cross-entropy)."""
        return self._tf.where(target >= 0, -eps, eps) * self._direction(g, self._step_norm, axis)

    def _direction(self, g, norm, axis=None):
        """A step's direction: sign (L-inf) or unit L2 length over `axis` (one image's plane: [1, 2])."""
        tf = self._tf
        if norm == "inf":
            return tf.sign(g)
        norm = tf.norm(g) if axis is None else tf.norm(g, axis=axis, keepdims=True)
        return g / tf.maximum(norm, GRAD_NORM_FLOOR)

    def _one_step(self, images, labels, j, rho, xi, eps, target):
        """Check, gradient, step, check, project for image j: (rho after it, whether j was unfooled, whether its
        step was accepted). The check and the gradient share one forward pass; the backward pass runs only for an
        image not yet fooled."""
        tf = self._tf
        x, y = images[j], self._labels(labels[j], target)
        xr = self._perturbed(x + rho)[None]
        with tf.GradientTape() as tape:
            tape.watch(xr)
            log_probs = self._log_probs_of(xr)
            loss = -log_probs[0, y]
        already = succeeded_for(target, tf.argmax(log_probs, axis=1, output_type=tf.int32)[0], y)

        def attack():
            g = tape.gradient(loss, xr)[0]
            x_adv = self._perturbed(x + rho + self._step(eps, g, target))
            success = succeeded_for(target, self._predict(x_adv[None])[0], y)
            return tf.cond(success, lambda: self._project(x_adv - x, xi), lambda: rho), success

        new_rho, accepted = tf.cond(already, lambda: (rho, tf.constant(False)), attack)
        return new_rho, tf.logical_not(already), accepted

    def _walk(self, images, labels, idx, skip, rho, xi, eps, target):
        """The plain loop over images `idx`, in order (see Call)."""
        tf = self._tf
        n = tf.size(idx)

        def body(t, rho, moved, outcomes):
            def visit():
                new_rho, unfooled, accepted = self._one_step(images, labels, idx[t], rho, xi, eps, target)
                return new_rho, tf.logical_not(unfooled), accepted

            new_rho, fooled_here, accepted = tf.cond(tf.logical_and(skip[t], tf.logical_not(moved)),
                                                     lambda: (rho, tf.constant(True), tf.constant(False)), visit)
            outcome = tf.stack([fooled_here, accepted])
            return t + 1, new_rho, tf.logical_or(moved, accepted), outcomes.write(t, outcome)

        _, rho, _, outcomes = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), rho, tf.constant(False),
                                                                         tf.TensorArray(tf.bool, size=n)))
        outcomes = tf.reshape(outcomes.stack(), [-1, 2])
        return rho, outcomes[:, 0], outcomes[:, 1]

    def _fooled(self, images, labels, idx, rho, target):
        tf = self._tf
        pred = self._predict(self._perturbed(tf.gather(images, idx) + rho))
        return succeeded_for(target, pred, self._labels(tf.gather(labels, idx), target))

    def _accepted(self, images, labels, idx, rho, eps, target):
        tf = self._tf
        x, y = tf.gather(images, idx), self._labels(tf.gather(labels, idx), target)
        xr = self._perturbed(x + rho)
        with tf.GradientTape() as tape:
            tape.watch(xr)
            loss = -tf.gather(self._log_probs_of(xr), y, axis=1, batch_dims=1)
        g = tape.gradient(loss, xr)  # per-image gradients: the summed losses do not interact
        x_adv = self._perturbed(x + rho + self._step(eps, g, target, axis=[1, 2]))
        return succeeded_for(target, self._predict(x_adv), y)

    def _scan(self, images, labels, idx, rho, eps, probe, target):
        """Whether each image of a window is fooled, and whether the steps of its first `probe` unfooled images
        (positions in the window) would be accepted: all the look-ahead needs after rho moved, in one call."""
        tf = self._tf
        is_fooled = self._fooled(images, labels, idx, rho, target)
        candidates = tf.cast(tf.where(tf.logical_not(is_fooled))[:probe, 0], tf.int32)
        accepted = tf.cond(tf.size(candidates) > 0,
                           lambda: self._accepted(images, labels, tf.gather(idx, candidates), rho, eps, target),
                           lambda: tf.zeros([0], tf.bool))
        return is_fooled, candidates, accepted, tf.size(candidates)

    def _sgd_step(self, images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum, target):
        tf = self._tf
        x, y = tf.gather(images, idx), self._labels(tf.gather(labels, idx), target)
        with tf.GradientTape() as tape:
            tape.watch(rho)
            log_probs = self._log_probs_of(self._perturbed(x + rho))
            ce = -tf.gather(log_probs, y, axis=1, batch_dims=1)
            objective = tf.cond(target >= 0, lambda: -tf.reduce_mean(ce),
                                lambda: tf.reduce_mean(tf.minimum(ce, loss_cap)))
        g = tape.gradient(objective, rho)
        velocity = momentum * velocity + g / tf.maximum(tf.reduce_max(tf.abs(g)), GRAD_NORM_FLOOR)
        was_fooled = succeeded_for(target, tf.argmax(log_probs, axis=1, output_type=tf.int32), y)
        return self._project(rho + alpha * self._direction(velocity, self._norm), xi), velocity, was_fooled
