"""The loop operations in numpy, over a model that gives log-probabilities and loss gradients as arrays (ONNX)."""
from __future__ import annotations

import numpy as np

from typing import Sequence

from ..criteria import compared_labels, succeeded_for
from ..geometry import GRAD_NORM_FLOOR, project
from . import Call, Cell


class ArrayLoop:
    """LoopOps (see backends) with the TF backend's semantics, one cell after another, image by image where it
    steps one image."""

    def __init__(self, model, norm: str, clip: bool, step_norm: str):
        self._model, self._norm, self._clip, self._step_norm = model, norm, clip, step_norm
        self._floor = np.float32(GRAD_NORM_FLOOR)

    def hold(self, *arrays):
        return tuple(np.asarray(a) for a in arrays)

    def run(self, op: str, images, labels, calls: Sequence[Call]) -> list:
        out = []
        for c in calls:
            cell, f32 = c.cell, np.float32
            if op == "walk":
                out.append(self.walk(images, labels, c.idx, c.skip, c.rho, f32(cell.xi), f32(cell.eps), cell))
            elif op == "fooled":
                out.append(self.fooled(images, labels, c.idx, c.rho, cell))
            elif op == "accepted":
                out.append(self.accepted(images, labels, c.idx, c.rho, f32(cell.eps), cell))
            elif op == "scan":
                out.append(self.scan(images, labels, c.idx, c.rho, f32(cell.eps), c.probe, cell))
            else:
                out.append(self.sgd_step(images, labels, c.idx, c.rho, c.velocity, f32(c.alpha), f32(cell.xi),
                                         f32(cell.loss_cap), f32(cell.momentum), cell))
        return out

    def _perturbed(self, x):
        return np.clip(x, np.float32(0), np.float32(1)) if self._clip else x

    def _predict(self, x):
        return np.argmax(self._model.log_probs(x), axis=1)

    def _direction(self, g, norm):
        """Sign, or unit L2 length of one image's plane or of each plane of a batch (the norms reduced as TF reduces
        them in each case, so the two backends agree)."""
        if norm == "inf":
            return np.sign(g)
        if g.ndim == 2:
            return g / np.maximum(np.linalg.norm(g), self._floor)
        return g / np.maximum(np.linalg.norm(g.reshape(len(g), -1), axis=1), self._floor)[:, None, None]

    def _step(self, eps, g, cell: Cell):
        """The FGSM step (targeted steps descend the target's cross-entropy)."""
        return (-eps if cell.target >= 0 else eps) * self._direction(g, self._step_norm)

    def _one_step(self, images, labels, j, rho, xi, eps, cell: Cell):
        """Check, gradient, step, check, project for one visited image -> (rho, was unfooled, accepted)."""
        x, y = images[j], int(compared_labels(cell.target, labels[j : j + 1])[0])
        xr = self._perturbed(x + rho)[None]
        if succeeded_for(cell.target, int(self._predict(xr)[0]), y):
            return rho, False, False
        _, g = self._model.log_probs_and_gradient(xr, np.asarray([y]))
        # x + (rho + step): the order TF's graph optimizer gives the traced loop, so the two agree bit for bit
        x_adv = self._perturbed(x + (rho + self._step(eps, g[0], cell)))
        success = bool(succeeded_for(cell.target, int(self._predict(x_adv[None])[0]), y))
        return (project(x_adv - x, self._norm, xi) if success else rho), True, success

    def walk(self, images, labels, idx, skip, rho, xi, eps, cell: Cell):
        was_fooled, accepted = np.ones(len(idx), bool), np.zeros(len(idx), bool)
        for t, j in enumerate(idx):
            if skip[t] and not accepted.any():
                continue
            rho, unfooled, accepted[t] = self._one_step(images, labels, j, rho, xi, eps, cell)
            was_fooled[t] = not unfooled
        return rho, was_fooled, accepted

    def fooled(self, images, labels, idx, rho, cell: Cell) -> np.ndarray:
        pred = self._predict(self._perturbed(images[idx] + rho))
        return np.asarray(succeeded_for(cell.target, pred, compared_labels(cell.target, labels[idx])), bool)

    def accepted(self, images, labels, idx, rho, eps, cell: Cell) -> np.ndarray:
        x, y = images[idx], compared_labels(cell.target, labels[idx])
        _, g = self._model.log_probs_and_gradient(self._perturbed(x + rho), np.asarray(y))
        x_adv = self._perturbed(x + (rho + self._step(eps, g, cell)))
        return np.asarray(succeeded_for(cell.target, self._predict(x_adv), y), bool)

    def scan(self, images, labels, idx, rho, eps, probe, cell: Cell):
        is_fooled = self.fooled(images, labels, idx, rho, cell)
        candidates = np.flatnonzero(~is_fooled)[:probe]
        accepted = (self.accepted(images, labels, idx[candidates], rho, eps, cell) if len(candidates)
                    else np.zeros(0, bool))
        return is_fooled, candidates, accepted

    def sgd_step(self, images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum, cell: Cell):
        x, y = images[idx], compared_labels(cell.target, labels[idx])
        v = x + rho
        log_probs, g = self._model.log_probs_and_gradient(self._perturbed(v), y)
        ce = -log_probs[np.arange(len(y)), y]
        targeted = cell.target >= 0
        weight = np.full(len(y), -1.0, np.float32) if targeted else (ce <= loss_cap).astype(np.float32)
        if self._clip:  # clip_by_value passes the gradient on [0, 1], bounds included
            g = g * ((v >= 0) & (v <= 1))
        grad = np.tensordot(weight / np.float32(len(y)), g, axes=1)
        velocity = momentum * velocity + grad / np.maximum(np.max(np.abs(grad)), self._floor)
        direction = self._direction(velocity, self._norm)
        was_fooled = succeeded_for(cell.target, np.argmax(log_probs, axis=1), y)
        return project(rho + alpha * direction, self._norm, xi), velocity, was_fooled
