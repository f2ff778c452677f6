"""Black-box UAP crafting: no gradients, only `model.predict_proba` queries.

For a model nothing can differentiate (an ONNX file with operations no gradient path supports, a model behind
an API). It optimises the SGD mode's objective (batch-mean cross-entropy at the clean prediction, capped, for
nontargeted attacks; minus the target cross-entropy for targeted ones) with gradients *estimated* from queries:
antithetic NES (Gaussian) or SPSA (Rademacher) samples in a low-resolution perturbation space (low_res x
low_res, bilinearly upsampled to the image), then signed (L-inf) or normalised (L2) steps, projected onto the
xi-ball in image space.

Slower and weaker than white-box crafting: a black-box fooling rate is a lower bound on the model's
vulnerability, not an estimate of it.
"""
from __future__ import annotations

import time

import numpy as np

from ..models.base import PROB_FLOOR
from .base import AttackSettings, CraftResult, ProgressFn
from .criteria import criterion_for
from .geometry import check_budget, perturb, project

LOSS_CAP = 3.0  # as the SGD algorithm's default: fooled images stop pulling
MOMENTUM = 0.95


def upsampling_matrix(low: int, size: int) -> np.ndarray:
    """(size, low) bilinear interpolation weights, half-pixel centres, edges clamped (rows sum to 1)."""
    if low >= size:
        return np.eye(size, dtype=np.float32)
    centres = np.clip((np.arange(size) + 0.5) * low / size - 0.5, 0, low - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, low - 1)
    frac = centres - left
    a = np.zeros((size, low), np.float64)
    a[np.arange(size), left] += 1 - frac
    a[np.arange(size), right] += frac
    return a.astype(np.float32)


class BlackBoxUAP:
    """Query-only UAP (see the module docstring). Per mini-batch step: `samples` antithetic pairs, i.e.
    2 x samples x batch_size queries; `sigma` (exploration radius) and `step_size` are fractions of xi (per
    pixel for L-inf, of the whole plane for L2); the step follows SGDUAP's cosine decay and the sign
    (L-inf) or direction (L2) of a momentum average of the normalised estimates: the universal gradient
    changes slowly, so averaging over batches buys back much of the estimates' noise.

    `low_res` trades estimate quality for expressiveness: a CNN whose weak spots are fine-grained (the cxr3
    CNN at 64 x 64) needs low_res = the image size; smooth decision functions get by with far fewer."""

    def __init__(self, settings: AttackSettings, progress: ProgressFn | None = None):
        self.settings, self.progress = settings, progress
        self._norm, self._clip, self._b = settings.norm, settings.clip, settings.blackbox

    def craft(self, model, images: np.ndarray, xi: float, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); `rng` draws batches and sample directions."""
        s, b = self.settings, self._b
        xi = check_budget(xi)
        criterion = criterion_for(s, model.classes)
        images = model.check_images(images)
        n, size = len(images), images.shape[1]
        queries = 0
        if clean_pred is None:
            clean_pred = model.predict(images)
            queries += n
        labels = criterion.labels(np.asarray(clean_pred)).astype(np.int64)
        up = upsampling_matrix(b.low_res, size)
        low = up.shape[1]
        # the exploration / step unit: a pixel's share of the budget (L-inf), or of the plane's norm (L2)
        unit = xi if self._norm == "inf" else xi / size
        z = np.zeros((low, low), np.float32)
        m = np.zeros_like(z)
        rates: list[float] = []
        total = s.max_iter * -(-n // b.batch_size)
        start, t = time.perf_counter(), 0
        for epoch in range(1, s.max_iter + 1):
            if self.progress:
                self.progress(epoch, 0, n, None)
            order = rng.permutation(n)
            for first in range(0, n, b.batch_size):
                idx = order[first : first + b.batch_size]
                g = self._estimate(model, images[idx], labels[idx], criterion.targeted, z, up, unit, rng)
                queries += 2 * b.samples * len(idx)
                m = MOMENTUM * m + g / max(float(np.linalg.norm(g)), 1e-12)
                alpha = b.step_size * xi * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / total)))
                z = self._constrain(z + alpha * self._direction(m, up), up, xi)
                t += 1
            rho = project(up @ z @ up.T, self._norm, xi)
            pred = model.predict(perturb(images, rho, self._clip))
            queries += n
            rate = float(criterion.succeeded(pred, labels).mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(epoch, n, n, rate)
            if rate >= 1.0 - s.delta:
                break
        return CraftResult(rho, len(rates), rates, n * len(rates), t, time.perf_counter() - start, queries)

    def _objective(self, model, x, labels, targeted, rhos) -> np.ndarray:
        """The SGD algorithm's objective for each candidate rho (S, H, W) on the batch x: one query per image."""
        batch = perturb(x[None], rhos[:, None], self._clip).reshape(-1, *x.shape[1:])
        p = model.predict_proba(batch).reshape(len(rhos), len(x), -1)
        ce = -np.log(np.maximum(p[:, np.arange(len(x)), labels].astype(np.float64), PROB_FLOOR))
        return -ce.mean(axis=1) if targeted else np.minimum(ce, LOSS_CAP).mean(axis=1)

    def _estimate(self, model, x, labels, targeted, z, up, unit, rng) -> np.ndarray:
        """Antithetic finite-difference estimate of the objective's gradient w.r.t. the low-res plane."""
        samples = self._b.samples
        shape = (samples,) + z.shape
        u = rng.standard_normal(shape) if self._b.estimator == "nes" else rng.choice([-1.0, 1.0], size=shape)
        u = u.astype(np.float32)
        d = np.float32(self._b.sigma * unit) * u
        candidates = np.concatenate([z + d, z - d])
        f = self._objective(model, x, labels, targeted, up @ candidates @ up.T)
        return np.tensordot(f[:samples] - f[samples:], u, axes=1).astype(np.float32)

    def _direction(self, g, up):
        if self._norm == "inf":
            return np.sign(g)
        return g / max(float(np.linalg.norm(up @ g @ up.T)), 1e-12)

    def _constrain(self, z, up, xi):
        """Keep the upsampled plane in the xi-ball: bilinear weights are convex, so clipping z suffices for
        L-inf; for L2 z is rescaled by the norm of its upsampled plane."""
        if self._norm == "inf":
            return np.clip(z, -xi, xi).astype(np.float32)
        n = float(np.linalg.norm(up @ z @ up.T))
        return (z * min(1.0, xi / n) if n > 0 else z).astype(np.float32)
