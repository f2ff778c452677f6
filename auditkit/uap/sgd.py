"""Stochastic-gradient UAP (Shafahi et al. 2020, "Universal adversarial training"): a different algorithm from the
paper's, usually stronger at small step sizes."""
from __future__ import annotations

import time

import numpy as np

from .backends import Call, Cell, Crafting, LoopAttack
from .base import CraftResult


class SGDUAP(LoopAttack):
    """rho follows signed (L-inf) or normalised (L2) steps along the momentum of the mini-batch mean cross-entropy's
    gradients — capped at `loss_cap` for nontargeted attacks so images already fooled stop pulling — with a
    cosine-decayed step of `step_size` x xi, projected onto the xi-ball after every step; `max_iter` epochs.
    Each epoch's rate is a running one, as training accuracy is: over the epoch's mini-batches, each measured just
    before its own step (the audit evaluates the final UAP on every split anyway).
    """

    def crafting(self, cell: Cell, n: int, rho: np.ndarray, rng: np.random.Generator) -> Crafting:
        s, sgd = self.settings, self.settings.sgd
        total, budget = s.max_iter * -(-n // sgd.batch_size), cell.xi
        velocity = np.zeros_like(rho)
        rates: list[float] = []
        start, t = time.perf_counter(), 0
        for epoch in range(1, s.max_iter + 1):
            order, fooled = rng.permutation(n).astype(np.int32), 0
            for b in range(0, n, sgd.batch_size):
                if self.progress and b == 0:
                    self.progress(epoch, 0, n, None)
                idx = order[b : b + sgd.batch_size]
                alpha = sgd.step_size * budget * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / total)))
                rho, velocity, was_fooled = yield Call("sgd", cell, idx, rho, velocity=velocity, alpha=alpha)
                fooled += int(np.sum(was_fooled))
                t += 1
            rate = fooled / n if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(epoch, n, n, rate)
            if rate >= 1.0 - s.delta:
                break
        return CraftResult(np.asarray(rho, np.float32), len(rates), rates, n * len(rates), t,
                           time.perf_counter() - start)
