"""Universal adversarial perturbations: the paper's loop (METHOD.md), projection and random controls.

The model is seen only through a TF adapter (image-space log-probabilities), so every TF-differentiable model
is attacked by the same compiled loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .models.adapters import TFAdapter

NORMS = ("2", "inf")
GRAD_NORM_FLOOR = 1e-12
MAX_WINDOW = 256  # speculative look-ahead, images per batched check
MIN_PROBE = 4  # probe steps in a batch only after this many rejections in a row: acceptances make probing waste


@dataclass(frozen=True)
class Nontargeted:
    """Success: the prediction leaves the clean prediction."""

    targeted = False

    def labels(self, clean_pred: np.ndarray) -> np.ndarray:
        return clean_pred


@dataclass(frozen=True)
class Targeted:
    """Success: the prediction is `target`."""

    target: int
    targeted = True

    def labels(self, clean_pred: np.ndarray) -> np.ndarray:
        return np.full_like(clean_pred, self.target)


Criterion = Nontargeted | Targeted


@dataclass
class CraftResult:
    rho: np.ndarray  # float32 (H, W)
    passes: int
    rates: list[float]  # flip rate (nontargeted) or R_s (targeted) on the crafting set after each pass
    visited: int  # images visited
    steps: int  # gradient steps taken (images that were not yet fooled)
    seconds: float


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def image_norms(images: np.ndarray, norm: str) -> np.ndarray:
    """Per-image norm of the grayscale plane in [0, 1] scale."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    return np.abs(flat).max(axis=1) if check_norm(norm) == "inf" else np.linalg.norm(flat, axis=1)


def xi_for(images: np.ndarray, norm: str, zeta: float) -> tuple[float, float]:
    """(xi, mean image norm): the budget is zeta times the crafting set's mean image norm."""
    mean_norm = float(image_norms(images, norm).mean())
    return zeta * mean_norm, mean_norm


def project(v: np.ndarray, norm: str, xi: float) -> np.ndarray:
    """Closest point of the xi-ball (L2: rescale; L-inf: clip)."""
    if check_norm(norm) == "inf":
        return np.clip(v, -xi, xi).astype(np.float32)
    n = float(np.linalg.norm(v))
    return (v * min(1.0, xi / n) if n > 0 else v).astype(np.float32)


def random_control(shape: tuple[int, int], norm: str, xi: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform draw from the L2 ball of radius xi, or from the cube [-xi, xi]^(H x W)."""
    if check_norm(norm) == "inf":
        return rng.uniform(-xi, xi, size=shape).astype(np.float32)
    d = int(np.prod(shape))
    direction = rng.standard_normal(d)
    radius = xi * rng.random() ** (1.0 / d)
    return (direction / np.linalg.norm(direction) * radius).reshape(shape).astype(np.float32)


def perturb(images: np.ndarray, rho: np.ndarray, clip: bool) -> np.ndarray:
    x = np.asarray(images, np.float32) + rho
    return np.clip(x, 0.0, 1.0) if clip else x


class _CompiledLoop:
    """The loop's graph calls for one (model, norm, clip, criterion kind): traced once, reused across cells."""

    def __init__(self, model: TFAdapter, norm: str, clip: bool, targeted: bool):
        tf = model.tf
        size = model.spec.input_size
        plane = tf.TensorSpec([size, size], tf.float32)
        scalar = tf.TensorSpec([], tf.float32)

        def perturbed(x):
            return tf.clip_by_value(x, 0.0, 1.0) if clip else x

        def fooled(pred, y):
            return tf.equal(pred, y) if targeted else tf.not_equal(pred, y)

        def project_tf(v, xi):
            if norm == "inf":
                return tf.clip_by_value(v, -xi, xi)
            return v * tf.minimum(1.0, xi / tf.maximum(tf.norm(v), 1e-30))

        def step(x, rho, y, xi, eps):
            """Check, gradient, step, check, project: one visited image in one graph call.

            The check and the gradient share one forward pass; the backward pass runs only for an image not yet
            fooled.
            """
            xr = perturbed(x + rho)[None]
            with tf.GradientTape() as tape:
                tape.watch(xr)
                log_probs = model.tf_log_probs(xr)
                loss = -log_probs[0, y]
            pred = tf.argmax(log_probs, axis=1, output_type=tf.int32)[0]
            already = fooled(pred, y)

            def attack():
                g = tape.gradient(loss, xr)[0]
                if norm == "inf":
                    direction = tf.sign(g)
                else:
                    direction = g / tf.maximum(tf.norm(g), GRAD_NORM_FLOOR)
                x_adv = perturbed(x + rho + (-eps if targeted else eps) * direction)
                pred_adv = tf.argmax(model.tf_log_probs(x_adv[None]), axis=1, output_type=tf.int32)[0]
                success = fooled(pred_adv, y)
                return tf.cond(success, lambda: project_tf(x_adv - x, xi), lambda: rho), success

            new_rho, accepted = tf.cond(already, lambda: (rho, tf.constant(False)), attack)
            return new_rho, tf.logical_not(already), accepted

        def fooled_batch(x, rho, y):
            pred = tf.argmax(model.tf_log_probs(perturbed(x + rho)), axis=1, output_type=tf.int32)
            return fooled(pred, y)

        def accepted_batch(x, rho, y, eps):
            """For images not yet fooled: whether each one's step from this rho would be accepted (batched)."""
            xr = perturbed(x + rho)
            with tf.GradientTape() as tape:
                tape.watch(xr)
                loss = -tf.gather(model.tf_log_probs(xr), y, axis=1, batch_dims=1)
            g = tape.gradient(loss, xr)  # per-image gradients: the summed losses do not interact
            if norm == "inf":
                direction = tf.sign(g)
            else:
                direction = g / tf.maximum(tf.norm(g, axis=[1, 2], keepdims=True), GRAD_NORM_FLOOR)
            x_adv = perturbed(x + rho + (-eps if targeted else eps) * direction)
            return fooled(tf.argmax(model.tf_log_probs(x_adv), axis=1, output_type=tf.int32), y)

        def sgd_step(x, rho, y, alpha, xi, loss_cap):
            """One stochastic PGD step on a mini-batch: ascend the batch-mean (capped) cross-entropy, project."""
            with tf.GradientTape() as tape:
                tape.watch(rho)
                ce = -tf.gather(model.tf_log_probs(perturbed(x + rho)), y, axis=1, batch_dims=1)
                objective = -tf.reduce_mean(ce) if targeted else tf.reduce_mean(tf.minimum(ce, loss_cap))
            g = tape.gradient(objective, rho)
            if norm == "inf":
                direction = tf.sign(g)
            else:
                direction = g / tf.maximum(tf.norm(g), GRAD_NORM_FLOOR)
            return project_tf(rho + alpha * direction, xi)

        batch = tf.TensorSpec([None, size, size], tf.float32)
        self.step = tf.function(step, input_signature=[plane, plane, tf.TensorSpec([], tf.int32), scalar, scalar])
        self.sgd_step = tf.function(sgd_step, input_signature=[batch, plane, tf.TensorSpec([None], tf.int32),
                                                               scalar, scalar, scalar])
        self.fooled_batch = tf.function(fooled_batch, input_signature=[batch, plane, tf.TensorSpec([None], tf.int32)])
        self.accepted_batch = tf.function(accepted_batch, input_signature=[batch, plane, tf.TensorSpec([None], tf.int32),
                                                                           scalar])


def _compiled(model: TFAdapter, norm: str, clip: bool, targeted: bool) -> _CompiledLoop:
    """The loop ops for this model: traced TF for a TF adapter, else the adapter's own (`uap_loop`, e.g. ONNX)."""
    cache = model.__dict__.setdefault("_uap_loops", {})
    key = (norm, clip, targeted)
    if key not in cache:
        cache[key] = (_CompiledLoop(model, norm, clip, targeted) if isinstance(model, TFAdapter)
                      else model.uap_loop(norm, clip, targeted))
    return cache[key]


def _prepare(model: TFAdapter, images: np.ndarray, criterion: Criterion, clean_pred: np.ndarray | None, norm: str,
             clip: bool) -> tuple[np.ndarray, np.ndarray, _CompiledLoop]:
    """(checked images, the labels the criterion compares predictions with, the loop ops) for one crafting run."""
    model.require_gradients()
    images = model.check_images(images)
    if clean_pred is None:
        clean_pred = model.predict(images)
    return images, criterion.labels(np.asarray(clean_pred)).astype(np.int32), _compiled(model, norm, clip,
                                                                                       criterion.targeted)


@dataclass
class UAPAttack:
    """The paper's UAP loop (Moosavi-Dezfooli et al. 2017 with an FGSM inner step; Hirano & Takemoto 2020).

    `speculative=True` evaluates a window of upcoming images against the current rho in batched calls: which are
    already fooled, and, for the others, whether their step would be accepted. rho changes only at an accepted
    step, so every image before the first acceptance is done (skipped or rejected) exactly as the plain loop
    would; the accepted image itself is then stepped by the plain loop's single-image call, and the window
    resumes after it. The result equals the plain loop's.
    """

    norm: str
    xi: float
    eps: float = 0.001
    max_iter: int = 15
    delta: float = 1e-6
    clip: bool = True
    speculative: bool = True
    batch_size: int = 64
    progress: Callable[[int, int, int, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.norm)
        if not (self.xi >= 0 and self.eps > 0 and self.max_iter >= 1 and 0 <= self.delta < 1):
            raise ValueError(f"invalid UAP settings: {self}")

    def fooled(self, model: TFAdapter, images: np.ndarray, rho: np.ndarray, labels: np.ndarray,
               targeted: bool) -> np.ndarray:
        """Whether each image counts as fooled with rho added (batched)."""
        loop = _compiled(model, self.norm, self.clip, targeted)
        out = [loop.fooled_batch(images[i : i + self.batch_size], rho, labels[i : i + self.batch_size]).numpy()
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, bool)

    def craft(self, model: TFAdapter, images: np.ndarray, criterion: Criterion, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); `rng` draws each pass's visiting order."""
        images, labels, loop = _prepare(model, images, criterion, clean_pred, self.norm, self.clip)
        n = len(images)
        xi, eps = np.float32(self.xi), np.float32(self.eps)
        rho = np.zeros(images.shape[1:], np.float32)
        rates: list[float] = []
        visited = steps = 0
        start = time.perf_counter()
        for pass_no in range(1, self.max_iter + 1):
            order = rng.permutation(n)
            rho, pass_steps = self._one_pass(loop, images, labels, order, rho, xi, eps, pass_no)
            steps += pass_steps
            visited += n
            rate = float(self.fooled(model, images, rho, labels, criterion.targeted).mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(pass_no, n, n, rate)
            if rate >= 1.0 - self.delta:
                break
        return CraftResult(rho, len(rates), rates, visited, steps, time.perf_counter() - start)

    def _one_pass(self, loop: _CompiledLoop, images, labels, order, rho, xi, eps, pass_no):
        n, i, steps, shown = len(order), 0, 0, -1
        window, probe = 1, 1  # look-ahead sizes: images checked for "fooled", unfooled images probed for a step
        while i < n:
            if self.progress and i // 64 > shown:
                shown = i // 64
                self.progress(pass_no, i, n, None)
            found = False  # whether the look-ahead picked the image stepped below
            if self.speculative and (window > 1 or probe >= MIN_PROBE):
                idx = order[i : i + max(window, probe)]
                candidates = np.flatnonzero(~loop.fooled_batch(images[idx], rho, labels[idx]).numpy())
                lead = int(candidates[0]) if len(candidates) else len(idx)
                window = min(MAX_WINDOW, max(1, 2 * lead))
                if not len(candidates):
                    i += len(idx)
                    continue
                if probe >= MIN_PROBE:
                    probed = candidates[:probe]
                    sel = idx[probed]
                    accepted = loop.accepted_batch(images[sel], rho, labels[sel], eps).numpy()
                    if not accepted.any():  # all rejected: rho stays; done through the last image probed
                        i += int(probed[-1]) + 1 if len(candidates) > probe else len(idx)
                        steps += len(probed)
                        probe = min(self.batch_size, 2 * probe)
                        continue
                    first = int(np.argmax(accepted))
                    steps += first
                    lead, probe, found = int(probed[first]), 2 * first, True
                i += lead
            j = order[i]  # plain loop, or the first image whose step the look-ahead found accepted
            rho, unfooled, accepted = loop.step(images[j], rho, labels[j], xi, eps)
            steps += int(unfooled)
            if self.speculative and not unfooled:
                window = max(window, 2)
            elif self.speculative and not accepted:
                probe = min(self.batch_size, max(1, 2 * probe))
            elif self.speculative and not found:
                probe = 1
            i += 1
        return np.asarray(rho, np.float32), steps


@dataclass
class SGDUAPAttack:
    """Stochastic-gradient UAP (Shafahi et al. 2020, "Universal adversarial training"): a different algorithm
    from the paper's. rho follows signed (L-inf) or normalised (L2) gradient steps of the mini-batch mean
    cross-entropy — capped at `loss_cap` for nontargeted attacks so images already fooled stop pulling — with a
    cosine-decayed step of `step_size` x xi, projected onto the xi-ball after every step. `epochs` passes.
    """

    norm: str
    xi: float
    epochs: int = 15
    batch_size: int = 32
    step_size: float = 0.1
    loss_cap: float = 3.0
    delta: float = 1e-6
    clip: bool = True
    progress: Callable[[int, int, int, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.norm)
        if not (self.xi >= 0 and self.epochs >= 1 and self.batch_size >= 1 and self.step_size > 0):
            raise ValueError(f"invalid SGD-UAP settings: {self}")

    def craft(self, model: TFAdapter, images: np.ndarray, criterion: Criterion, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        images, labels, loop = _prepare(model, images, criterion, clean_pred, self.norm, self.clip)
        n = len(images)
        exact = UAPAttack(norm=self.norm, xi=self.xi, clip=self.clip, batch_size=64)
        per_epoch = -(-n // self.batch_size)
        total = self.epochs * per_epoch
        xi, cap = np.float32(self.xi), np.float32(self.loss_cap)
        rho = np.zeros(images.shape[1:], np.float32)
        rates: list[float] = []
        start, t = time.perf_counter(), 0
        for epoch in range(1, self.epochs + 1):
            order = rng.permutation(n)
            for b in range(0, n, self.batch_size):
                if self.progress and b == 0:
                    self.progress(epoch, 0, n, None)
                idx = order[b : b + self.batch_size]
                alpha = self.step_size * self.xi * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / total)))
                rho = loop.sgd_step(images[idx], rho, labels[idx], np.float32(alpha), xi, cap)
                t += 1
            rho = np.asarray(rho, np.float32)
            rate = float(exact.fooled(model, images, rho, labels, criterion.targeted).mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(epoch, n, n, rate)
            if rate >= 1.0 - self.delta:
                break
        return CraftResult(np.asarray(rho, np.float32), len(rates), rates, n * len(rates), t,
                           time.perf_counter() - start)
