"""Universal adversarial perturbations: the paper's loop (METHOD.md), projection and random controls.

The model is seen only through a TF adapter (image-space log-probabilities), so every TF-differentiable model
is attacked by the same compiled loop.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .models.adapters import GraphFunction, TFAdapter

NORMS = ("2", "inf")
GRAD_NORM_FLOOR = 1e-12
MAX_WINDOW = 256  # speculative look-ahead, images per batched check
EVAL_BATCH = 128  # most images per batched status check
WALK = 32  # most images one walk call visits where steps are accepted often
MIN_PROBE = 6  # batched step probes only where about this many steps are rejected per accepted one
_LOOPS_LOCK = threading.Lock()


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
    """The loop's graph calls for one (model and weights, norm, clip, criterion kind): traced once, reused across
    cells. Each call takes the whole crafting set (images and labels, held as tensors for the craft) and the indices
    of its images, so no call converts images."""

    def __init__(self, model: TFAdapter, log_probs_of, norm: str, clip: bool, targeted: bool):
        tf = model.tf
        self._tf = tf
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

        def one_step(images, labels, j, rho, xi, eps):
            """Check, gradient, step, check, project for image j: (rho after it, whether j was unfooled, whether its
            step was accepted). The check and the gradient share one forward pass; the backward pass runs only for an
            image not yet fooled."""
            x, y = images[j], labels[j]
            xr = perturbed(x + rho)[None]
            with tf.GradientTape() as tape:
                tape.watch(xr)
                log_probs = log_probs_of(xr)
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
                pred_adv = tf.argmax(log_probs_of(x_adv[None]), axis=1, output_type=tf.int32)[0]
                success = fooled(pred_adv, y)
                return tf.cond(success, lambda: project_tf(x_adv - x, xi), lambda: rho), success

            new_rho, accepted = tf.cond(already, lambda: (rho, tf.constant(False)), attack)
            return new_rho, tf.logical_not(already), accepted

        def walk(images, labels, idx, skip, rho, xi, eps):
            """The plain loop over images `idx`, in order, in one graph call: (rho after them, whether each image was
            fooled when visited, whether each one's step was accepted). `skip`: images known to be fooled under the
            rho the walk starts from, passed over until a step is accepted (as the plain loop would: no step).
            Every single-image step goes through this one graph (one image a call for the plain loop): inlined into
            other graphs, the step was optimised differently and rounded the last bit of rho differently in about
            2% of steps."""
            n = tf.size(idx)

            def body(t, rho, moved, outcomes):
                def visit():
                    new_rho, unfooled, accepted = one_step(images, labels, idx[t], rho, xi, eps)
                    return new_rho, tf.logical_not(unfooled), accepted

                new_rho, fooled_here, accepted = tf.cond(tf.logical_and(skip[t], tf.logical_not(moved)),
                                                         lambda: (rho, tf.constant(True), tf.constant(False)), visit)
                outcome = tf.stack([fooled_here, accepted])
                return t + 1, new_rho, tf.logical_or(moved, accepted), outcomes.write(t, outcome)

            _, rho, _, outcomes = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), rho, tf.constant(False),
                                                                             tf.TensorArray(tf.bool, size=n)))
            outcomes = outcomes.stack()
            return rho, outcomes[:, 0], outcomes[:, 1]

        def fooled_batch(images, labels, idx, rho):
            pred = tf.argmax(log_probs_of(perturbed(tf.gather(images, idx) + rho)), axis=1, output_type=tf.int32)
            return fooled(pred, tf.gather(labels, idx))

        def accepted_batch(images, labels, idx, rho, eps):
            """For images not yet fooled: whether each one's step from this rho would be accepted (batched)."""
            x, y = tf.gather(images, idx), tf.gather(labels, idx)
            xr = perturbed(x + rho)
            with tf.GradientTape() as tape:
                tape.watch(xr)
                loss = -tf.gather(log_probs_of(xr), y, axis=1, batch_dims=1)
            g = tape.gradient(loss, xr)  # per-image gradients: the summed losses do not interact
            if norm == "inf":
                direction = tf.sign(g)
            else:
                direction = g / tf.maximum(tf.norm(g, axis=[1, 2], keepdims=True), GRAD_NORM_FLOOR)
            x_adv = perturbed(x + rho + (-eps if targeted else eps) * direction)
            return fooled(tf.argmax(log_probs_of(x_adv), axis=1, output_type=tf.int32), y)

        def scan(images, labels, idx, rho, eps, probe):
            """Whether each image of a window is fooled, and whether the steps of its first `probe` unfooled images
            (positions in the window) would be accepted: all the look-ahead needs after rho moved, in one call."""
            is_fooled = fooled_batch(images, labels, idx, rho)
            candidates = tf.cast(tf.where(tf.logical_not(is_fooled))[:probe, 0], tf.int32)
            accepted = tf.cond(tf.size(candidates) > 0,
                               lambda: accepted_batch(images, labels, tf.gather(idx, candidates), rho, eps),
                               lambda: tf.zeros([0], tf.bool))
            return is_fooled, candidates, accepted

        def sgd_step(images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum):
            """One stochastic PGD step on a mini-batch: ascend the batch-mean (capped) cross-entropy along the
            momentum of its scale-free gradients, project. Also says which images were fooled before the step."""
            x, y = tf.gather(images, idx), tf.gather(labels, idx)
            with tf.GradientTape() as tape:
                tape.watch(rho)
                log_probs = log_probs_of(perturbed(x + rho))
                ce = -tf.gather(log_probs, y, axis=1, batch_dims=1)
                objective = -tf.reduce_mean(ce) if targeted else tf.reduce_mean(tf.minimum(ce, loss_cap))
            g = tape.gradient(objective, rho)
            velocity = momentum * velocity + g / tf.maximum(tf.reduce_max(tf.abs(g)), GRAD_NORM_FLOOR)
            if norm == "inf":
                direction = tf.sign(velocity)
            else:
                direction = velocity / tf.maximum(tf.norm(velocity), GRAD_NORM_FLOOR)
            was_fooled = fooled(tf.argmax(log_probs, axis=1, output_type=tf.int32), y)
            return project_tf(rho + alpha * direction, xi), velocity, was_fooled

        images, labels = tf.TensorSpec([None, size, size], tf.float32), tf.TensorSpec([None], tf.int32)
        index, indices = tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)
        held = [images, labels]
        self.walk = GraphFunction(tf, walk, held + [indices, tf.TensorSpec([None], tf.bool), plane, scalar, scalar])
        self.sgd_step = GraphFunction(tf, sgd_step, held + [indices, plane, plane, scalar, scalar, scalar, scalar])
        self.fooled_batch = GraphFunction(tf, fooled_batch, held + [indices, plane])
        self.accepted_batch = GraphFunction(tf, accepted_batch, held + [indices, plane, scalar])
        self.scan = GraphFunction(tf, scan, held + [indices, plane, scalar, index])

    def hold(self, *arrays):
        """The arrays as the calls take them for a whole craft (tensors), converted once."""
        return tuple(self._tf.constant(a) for a in arrays)


def _compiled(model: TFAdapter, norm: str, clip: bool, targeted: bool) -> _CompiledLoop:
    """The loop ops for this model: traced TF for a TF adapter, else the adapter's own (`uap_loop`, e.g. ONNX)."""
    key = (norm, clip, targeted)
    version, log_probs = model.loop_log_probs() if isinstance(model, TFAdapter) else (None, None)
    with _LOOPS_LOCK:  # concurrent cells share one loop object, so its graphs are traced once
        cache = model.__dict__.setdefault("_uap_loops", {})
        if key not in cache or cache[key][0] != version:
            cache[key] = version, (_CompiledLoop(model, log_probs, norm, clip, targeted) if log_probs
                                   else model.uap_loop(norm, clip, targeted))
        return cache[key][1]


def _fooled(loop: _CompiledLoop, images, labels, idx: np.ndarray, rho) -> np.ndarray:
    """Whether each image `idx` of the held crafting set counts as fooled with rho added, in equal batches of at most
    EVAL_BATCH (at 224 px, 100 images took 30 ms in one batch and 35 ms in batches of 64 and 36)."""
    cuts = np.linspace(0, len(idx), -(-len(idx) // EVAL_BATCH) + 1).astype(int)
    out = [loop.fooled_batch(images, labels, idx[a:b], rho).numpy() for a, b in zip(cuts[:-1], cuts[1:])]
    return np.concatenate(out) if out else np.zeros(0, bool)


_SHARED: dict[tuple[int, type], list] = {}  # (id, loop kind) of a crafting set in use -> [its held copy, crafts]
_SHARED_LOCK = threading.Lock()


@contextlib.contextmanager
def _prepared(model: TFAdapter, images: np.ndarray, criterion: Criterion, clean_pred: np.ndarray | None, norm: str,
              clip: bool):
    """(the loop ops; the checked images and the labels the criterion compares predictions with, held for its calls;
    the number of images; a zero rho) for one crafting run. Concurrent crafts on one array (an audit's cells) share
    one held copy of it, dropped when the last of them ends."""
    model.require_gradients()
    images = model.check_images(images)
    if clean_pred is None:
        clean_pred = model.predict(images)
    loop = _compiled(model, norm, clip, criterion.targeted)
    labels = criterion.labels(np.asarray(clean_pred)).astype(np.int32)
    key = (id(images), type(loop))
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            shared = _SHARED[key] = [loop.hold(images)[0], 0]
        shared[1] += 1
    try:
        yield loop, (shared[0], *loop.hold(labels)), len(images), np.zeros(images.shape[1:], np.float32)
    finally:
        with _SHARED_LOCK:
            shared[1] -= 1
            if not shared[1]:
                del _SHARED[key]


@dataclass
class _LookAhead:
    """Running estimates that size the speculative look-ahead: the share of checked images not yet fooled, and the
    share of steps accepted. Probing about 1/accept unfooled images finds the next accepted step in one call."""

    unfooled: float = 0.5
    accept: float = 0.5

    def probe(self, cap: int) -> int:
        """Unfooled images to probe in one batched call; 1 (walk through the images instead) where steps are
        accepted so often that a batched probe would mostly be redone by the single-image step after it."""
        run = round(1.0 / max(self.accept, 1e-3))
        return int(min(cap, run)) if run >= MIN_PROBE else 1

    def window(self, probe: int) -> int:
        return int(min(MAX_WINDOW, max(probe, round(probe / max(self.unfooled, 1e-3)))))

    def checked(self, n: int, unfooled: int) -> None:
        self.unfooled = _running(self.unfooled, n, unfooled)

    def stepped(self, n: int, accepted: int) -> None:
        self.accept = _running(self.accept, n, accepted)


def _running(estimate: float, n: int, count: int) -> float:
    """An exponential running share updated with `count` of `n` new observations, each weighing 5%."""
    return estimate + (1.0 - 0.95**n) * (count / n - estimate) if n else estimate


@dataclass
class UAPAttack:
    """The paper's UAP loop (Moosavi-Dezfooli et al. 2017 with an FGSM inner step; Hirano & Takemoto 2020).

    `speculative=True` evaluates a window of upcoming images against the current rho in one batched call: which are
    already fooled, and, for the first unfooled ones, whether their step would be accepted. rho changes only at an
    accepted step, so every image before the first acceptance is done (skipped or rejected) exactly as the plain
    loop would; the accepted image itself is then stepped by the plain loop's single-image graph, and the window
    resumes after it. Statuses stay known until rho moves (the per-pass evaluation supplies them for the start of
    the next pass), and window and probe sizes follow running estimates of how many images are unfooled and how
    many steps are accepted. Where most steps are accepted, batched checks would mostly be redone after the next
    step: the loop then walks through the next WALK images in one call of that graph instead, visiting them in
    order as the plain loop does (one image a call), past the images it knows are fooled until rho moves.
    The result equals the plain loop's. Both stop after a pass that accepts no step (every
    later pass would repeat it), as well as at a crafting rate of 1 - delta or after max_iter passes;
    `stop_at_fixed_point=False` runs the remaining passes anyway (same UAP; a benchmark compares equal passes so).
    """

    norm: str
    xi: float
    eps: float = 0.001
    max_iter: int = 15
    delta: float = 1e-6
    clip: bool = True
    speculative: bool = True
    stop_at_fixed_point: bool = True
    batch_size: int = 64  # most step probes in one batched call
    progress: Callable[[int, int, int, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.norm)
        if not (self.xi >= 0 and self.eps > 0 and self.max_iter >= 1 and 0 <= self.delta < 1):
            raise ValueError(f"invalid UAP settings: {self}")

    def craft(self, model: TFAdapter, images: np.ndarray, criterion: Criterion, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); `rng` draws each pass's visiting order."""
        with _prepared(model, images, criterion, clean_pred, self.norm, self.clip) as prepared:
            return self._craft(*prepared, rng)

    def _craft(self, loop: _CompiledLoop, held: tuple, n: int, rho, rng: np.random.Generator) -> CraftResult:
        xi, eps = loop.hold(np.float32(self.xi), np.float32(self.eps))
        rates: list[float] = []
        visited = steps = 0
        start = time.perf_counter()
        # status[j]: whether image j is fooled under the current rho, where valid[j]. The plain loop keeps none;
        # the speculative one reuses what its look-ahead saw in the per-pass evaluation and the next pass.
        status, valid = np.zeros(n, bool), np.zeros(n, bool)
        ahead = _LookAhead()
        for pass_no in range(1, self.max_iter + 1):
            if self.speculative and pass_no == 1:
                self._complete(loop, held, rho, status, valid)
            order = rng.permutation(n).astype(np.int32)
            rho, pass_steps, moved = self._one_pass(loop, held, order, rho, xi, eps, pass_no, status, valid, ahead)
            steps += pass_steps
            visited += n
            self._complete(loop, held, rho, status, valid)
            rate = float(status.mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(pass_no, n, n, rate)
            # A pass that accepted no step saw one rho throughout, and every image's outcome depends only on rho:
            # each later pass would repeat it, whatever its order, so stopping here gives the same rho and rate.
            if rate >= 1.0 - self.delta or (self.stop_at_fixed_point and not moved):
                break
        return CraftResult(rho, len(rates), rates, visited, steps, time.perf_counter() - start)

    def _complete(self, loop, held, rho, status, valid) -> None:
        """Batched statuses under rho for every image whose status is not known (all, for the plain loop)."""
        todo = (np.flatnonzero(~valid) if self.speculative else np.arange(len(status))).astype(np.int32)
        if len(todo):
            status[todo] = _fooled(loop, *held, todo, rho)
        valid[:] = self.speculative

    def _one_pass(self, loop: _CompiledLoop, held, order, rho, xi, eps, pass_no, status, valid, ahead):
        """One pass over `order`: (rho, gradient steps, whether any step was accepted). Speculative: look-ahead
        checks fill `status` where not `valid`; an accepted step (rho moves) invalidates every status."""
        n, i, steps, shown, moved = len(order), 0, 0, -1, False
        while i < n:
            if self.progress and i // 64 > shown:
                shown = i // 64
                self.progress(pass_no, i, n, None)
            probed = 0  # unfooled images whose step the look-ahead found rejected, before the walk below
            probe = ahead.probe(self.batch_size) if self.speculative else 1
            if probe > 1:
                known = valid[order[i : i + MAX_WINDOW]]
                run = len(known) if known.all() else int(np.argmin(known))  # statuses known without a model call
                if run:
                    idx = order[i : i + run]
                    candidates = np.flatnonzero(~status[idx])[:probe]
                    accepted = (loop.accepted_batch(*held, idx[candidates], rho, eps).numpy() if len(candidates)
                                else None)
                else:
                    idx = order[i : i + ahead.window(probe)]
                    is_fooled, candidates, accepted = (t.numpy() for t in loop.scan(*held, idx, rho, eps,
                                                                                    np.int32(probe)))
                    status[idx], valid[idx] = is_fooled, True
                    ahead.checked(len(idx), len(idx) - int(is_fooled.sum()))
                if not len(candidates):
                    i += len(idx)
                    continue
                if not accepted.any():  # all rejected: rho stays
                    steps += len(candidates)
                    ahead.stepped(len(candidates), 0)
                    more = np.count_nonzero(~status[idx]) > len(candidates)  # unfooled images beyond the probe
                    i += int(candidates[-1]) + 1 if more else len(idx)
                    continue
                probed = int(np.argmax(accepted))
                steps += probed
                i += int(candidates[probed])
            # the images the walk below visits in one call: where steps are accepted often, the next WALK ones
            walk = order[i : i + (WALK if self.speculative and probe == 1 else 1)]
            skip = valid[walk] & status[walk] if self.speculative else np.zeros(len(walk), bool)
            if skip.all():
                i += len(walk)
                continue
            rho, was_fooled, accepted_here = loop.walk(*held, walk, skip, rho, xi, eps)
            was_fooled, accepted_here = was_fooled.numpy(), accepted_here.numpy()
            unfooled = len(walk) - int(was_fooled.sum())
            steps += unfooled
            moved = moved or bool(accepted_here.any())
            if self.speculative:
                ahead.stepped(probed + unfooled, int(accepted_here.sum()))
                if len(walk) > 1:
                    ahead.checked(int(np.count_nonzero(~skip)), unfooled)
                after = len(walk) - int(np.argmax(accepted_here[::-1])) if accepted_here.any() else 0
                if after:
                    valid[:] = False  # rho moved: only the images walked after its last move are known
                status[walk[after:]], valid[walk[after:]] = was_fooled[after:], True
            i += len(walk)
        return np.asarray(rho, np.float32), steps, moved


@dataclass
class SGDUAPAttack:
    """Stochastic-gradient UAP (Shafahi et al. 2020, "Universal adversarial training"): a different algorithm
    from the paper's. rho follows signed (L-inf) or normalised (L2) steps along the momentum of the mini-batch mean
    cross-entropy's gradients — capped at `loss_cap` for nontargeted attacks so images already fooled stop
    pulling — with a cosine-decayed step of `step_size` x xi, projected onto the xi-ball after every step.
    `epochs` passes. Each epoch's rate is a running one, as training accuracy is: over the epoch's mini-batches,
    each measured just before its own step (the audit evaluates the final UAP on every split anyway).
    """

    norm: str
    xi: float
    epochs: int = 15
    batch_size: int = 32
    step_size: float = 0.5
    loss_cap: float = 3.0
    momentum: float = 0.9
    delta: float = 1e-6
    clip: bool = True
    progress: Callable[[int, int, int, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.norm)
        if not (self.xi >= 0 and self.epochs >= 1 and self.batch_size >= 1 and self.step_size > 0
                and 0 <= self.momentum < 1):
            raise ValueError(f"invalid SGD-UAP settings: {self}")

    def craft(self, model: TFAdapter, images: np.ndarray, criterion: Criterion, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        with _prepared(model, images, criterion, clean_pred, self.norm, self.clip) as prepared:
            return self._craft(*prepared, rng)

    def _craft(self, loop: _CompiledLoop, held: tuple, n: int, rho, rng: np.random.Generator) -> CraftResult:
        total = self.epochs * -(-n // self.batch_size)
        xi, cap, momentum = loop.hold(np.float32(self.xi), np.float32(self.loss_cap), np.float32(self.momentum))
        velocity = np.zeros_like(rho)
        rates: list[float] = []
        start, t = time.perf_counter(), 0
        for epoch in range(1, self.epochs + 1):
            order, fooled = rng.permutation(n).astype(np.int32), 0
            for b in range(0, n, self.batch_size):
                if self.progress and b == 0:
                    self.progress(epoch, 0, n, None)
                idx = order[b : b + self.batch_size]
                alpha = self.step_size * self.xi * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / total)))
                rho, velocity, was_fooled = loop.sgd_step(*held, idx, rho, velocity, np.float32(alpha), xi, cap,
                                                          momentum)
                fooled += int(np.sum(was_fooled))
                t += 1
            rate = fooled / n if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(epoch, n, n, rate)
            if rate >= 1.0 - self.delta:
                break
        return CraftResult(np.asarray(rho, np.float32), len(rates), rates, n * len(rates), t,
                           time.perf_counter() - start)
