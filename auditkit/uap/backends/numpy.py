"""The loop operations in numpy, over a model that gives log-probabilities and loss gradients as arrays (ONNX)."""
from __future__ import annotations

import numpy as np

from ..criteria import Criterion
from ..geometry import GRAD_NORM_FLOOR, project


class ArrayLoop:
    """LoopOps (see backends) with the TF backend's semantics, image by image where it steps one image."""

    def __init__(self, model, norm: str, clip: bool, criterion: Criterion, step_norm: str):
        self._model, self._norm, self._clip, self._criterion = model, norm, clip, criterion
        self._step_norm = step_norm
        self._floor = np.float32(GRAD_NORM_FLOOR)

    def hold(self, *arrays):
        return tuple(np.asarray(a) for a in arrays)

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

    def _step(self, eps, g):
        """The FGSM step (targeted steps descend the target's cross-entropy)."""
        return (-eps if self._criterion.targeted else eps) * self._direction(g, self._step_norm)

    def _one_step(self, images, labels, j, rho, xi, eps):
        """Check, gradient, step, check, project for one visited image -> (rho, was unfooled, accepted)."""
        succeeded = self._criterion.succeeded
        x, y = images[j], int(labels[j])
        xr = self._perturbed(x + rho)[None]
        if succeeded(int(self._predict(xr)[0]), y):
            return rho, False, False
        _, g = self._model.log_probs_and_gradient(xr, np.asarray([y]))
        # x + (rho + step): the order TF's graph optimizer gives the traced loop, so the two agree bit for bit
        x_adv = self._perturbed(x + (rho + self._step(eps, g[0])))
        success = bool(succeeded(int(self._predict(x_adv[None])[0]), y))
        return (project(x_adv - x, self._norm, xi) if success else rho), True, success

    def walk(self, images, labels, idx, skip, rho, xi, eps):
        was_fooled, accepted = np.ones(len(idx), bool), np.zeros(len(idx), bool)
        for t, j in enumerate(idx):
            if skip[t] and not accepted.any():
                continue
            rho, unfooled, accepted[t] = self._one_step(images, labels, j, rho, xi, eps)
            was_fooled[t] = not unfooled
        return rho, was_fooled, accepted

    def fooled_batch(self, images, labels, idx, rho) -> np.ndarray:
        pred = self._predict(self._perturbed(images[idx] + rho))
        return np.asarray(self._criterion.succeeded(pred, labels[idx]), bool)

    def accepted_batch(self, images, labels, idx, rho, eps) -> np.ndarray:
        x, y = images[idx], labels[idx]
        _, g = self._model.log_probs_and_gradient(self._perturbed(x + rho), np.asarray(y))
        x_adv = self._perturbed(x + (rho + self._step(eps, g)))
        return np.asarray(self._criterion.succeeded(self._predict(x_adv), y), bool)

    def scan(self, images, labels, idx, rho, eps, probe):
        is_fooled = self.fooled_batch(images, labels, idx, rho)
        candidates = np.flatnonzero(~is_fooled)[:probe]
        accepted = (self.accepted_batch(images, labels, idx[candidates], rho, eps) if len(candidates)
                    else np.zeros(0, bool))
        return is_fooled, candidates, accepted

    def sgd_step(self, images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum):
        x, y = images[idx], labels[idx]
        v = x + rho
        log_probs, g = self._model.log_probs_and_gradient(self._perturbed(v), y)
        ce = -log_probs[np.arange(len(y)), y]
        targeted = self._criterion.targeted
        weight = np.full(len(y), -1.0, np.float32) if targeted else (ce <= loss_cap).astype(np.float32)
        if self._clip:  # clip_by_value passes the gradient on [0, 1], bounds included
            g = g * ((v >= 0) & (v <= 1))
        grad = np.tensordot(weight / np.float32(len(y)), g, axes=1)
        velocity = momentum * velocity + grad / np.maximum(np.max(np.abs(grad)), self._floor)
        direction = self._direction(velocity, self._norm)
        was_fooled = self._criterion.succeeded(np.argmax(log_probs, axis=1), y)
        return project(rho + alpha * direction, self._norm, xi), velocity, was_fooled
