"""The perturbation's geometry: norms of the grayscale plane, the budget xi, projection, random controls."""
from __future__ import annotations

import numpy as np

NORMS = ("2", "inf")
GRAD_NORM_FLOOR = 1e-12  # a zero gradient gives a zero normalised step, not a division by zero


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


def check_budget(xi: float) -> float:
    if not xi >= 0:
        raise ValueError(f"xi must be >= 0, got {xi!r}")
    return float(xi)
