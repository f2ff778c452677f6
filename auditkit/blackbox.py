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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .attacks import CraftResult, Criterion, check_norm, perturb, project
from .models.adapters import PROB_FLOOR, ModelAdapter

ESTIMATORS = ("nes", "spsa")


@dataclass
class BlackBoxCraftResult(CraftResult):
    queries: int = 0  # images sent to the model, crafting-set evaluations included


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


@dataclass
class BlackBoxUAPAttack:
    """Query-only UAP (see the module docstring). Per mini-batch step: `samples` antithetic pairs, i.e.
    2 x samples x batch_size queries; `sigma` (exploration radius) and `step_size` are fractions of xi (per
    pixel for L-inf, of the whole plane for L2); the step follows SGDUAPAttack's cosine decay and the sign
    (L-inf) or direction (L2) of a momentum average of the normalised estimates: the universal gradient
    changes slowly, so averaging over batches buys back much of the estimates' noise.

    `low_res` trades estimate quality for expressiveness: a CNN whose weak spots are fine-grained (the cxr3
    CNN at 64 x 64) needs low_res = the image size; smooth decision functions get by with far fewer."""

    norm: str
    xi: float
    epochs: int = 10
    batch_size: int = 32
    samples: int = 10
    sigma: float = 0.5
    step_size: float = 0.2
    low_res: int = 32
    clip: bool = True
    delta: float = 1e-6
    loss_cap: float = 3.0
    momentum: float = 0.95
    estimator: str = "nes"
    progress: Callable[[int, int, int, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.norm)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not (self.xi >= 0 and self.epochs >= 1 and self.batch_size >= 1 and self.samples >= 1
                and self.sigma > 0 and self.step_size > 0 and self.low_res >= 1 and 0 <= self.momentum < 1):
            raise ValueError(f"invalid black-box UAP settings: {self}")

    def craft(self, model: ModelAdapter, images: np.ndarray, criterion: Criterion, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> BlackBoxCraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); `rng` draws batches and sample directions."""
        images = model.check_images(images)
        n, size = len(images), images.shape[1]
        queries = 0
        if clean_pred is None:
            clean_pred = model.predict(images)
            queries += n
        labels = criterion.labels(np.asarray(clean_pred)).astype(np.int64)
        up = upsampling_matrix(self.low_res, size)
        low = up.shape[1]
        # the exploration / step unit: a pixel's share of the budget (L-inf), or of the plane's norm (L2)
        unit = self.xi if self.norm == "inf" else self.xi / size
        z = np.zeros((low, low), np.float32)
        m = np.zeros_like(z)
        rates: list[float] = []
        per_epoch = -(-n // self.batch_size)
        total = self.epochs * per_epoch
        start, t = time.perf_counter(), 0
        for epoch in range(1, self.epochs + 1):
            if self.progress:
                self.progress(epoch, 0, n, None)
            order = rng.permutation(n)
            for b in range(0, n, self.batch_size):
                idx = order[b : b + self.batch_size]
                g = self._estimate(model, images[idx], labels[idx], criterion.targeted, z, up, unit, rng)
                queries += 2 * self.samples * len(idx)
                m = self.momentum * m + g / max(float(np.linalg.norm(g)), 1e-12)
                alpha = self.step_size * self.xi * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / total)))
                z = self._constrain(z + alpha * self._direction(m, up), up)
                t += 1
            rho = self._rho(z, up)
            pred = model.predict(perturb(images, rho, self.clip))
            queries += n
            fooled = pred == labels if criterion.targeted else pred != labels
            rate = float(fooled.mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(epoch, n, n, rate)
            if rate >= 1.0 - self.delta:
                break
        return BlackBoxCraftResult(rho, len(rates), rates, n * len(rates), t, time.perf_counter() - start, queries)

    def _objective(self, model, x, labels, targeted, rhos) -> np.ndarray:
        """The SGD mode's objective for each candidate rho (S, H, W) on the batch x: one query per image."""
        batch = perturb(x[None], rhos[:, None], self.clip).reshape(-1, *x.shape[1:])
        p = model.predict_proba(batch).reshape(len(rhos), len(x), -1)
        ce = -np.log(np.maximum(p[:, np.arange(len(x)), labels].astype(np.float64), PROB_FLOOR))
        return -ce.mean(axis=1) if targeted else np.minimum(ce, self.loss_cap).mean(axis=1)

    def _estimate(self, model, x, labels, targeted, z, up, unit, rng) -> np.ndarray:
        """Antithetic finite-difference estimate of the objective's gradient w.r.t. the low-res plane."""
        shape = (self.samples,) + z.shape
        u = rng.standard_normal(shape) if self.estimator == "nes" else rng.choice([-1.0, 1.0], size=shape)
        u = u.astype(np.float32)
        d = np.float32(self.sigma * unit) * u
        candidates = np.concatenate([z + d, z - d])
        f = self._objective(model, x, labels, targeted, up @ candidates @ up.T)
        return np.tensordot(f[: self.samples] - f[self.samples :], u, axes=1).astype(np.float32)

    def _direction(self, g, up):
        if self.norm == "inf":
            return np.sign(g)
        return g / max(float(np.linalg.norm(up @ g @ up.T)), 1e-12)

    def _constrain(self, z, up):
        """Keep the upsampled plane in the xi-ball: bilinear weights are convex, so clipping z suffices for
        L-inf; for L2 z is rescaled by the norm of its upsampled plane."""
        if self.norm == "inf":
            return np.clip(z, -self.xi, self.xi).astype(np.float32)
        n = float(np.linalg.norm(up @ z @ up.T))
        return (z * min(1.0, self.xi / n) if n > 0 else z).astype(np.float32)

    def _rho(self, z, up) -> np.ndarray:
        return project(up @ z @ up.T, self.norm, self.xi)
