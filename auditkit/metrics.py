"""Rates with Wilson intervals, confusion matrices, sensitivity/PPV and PSNR (pure numpy, per METHOD.md).

Bad arguments here are programmer errors, so they raise ValueError, not AuditkitError.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Rate:
    """A proportion count / n with its Wilson 95% interval; value, low and high are nan when n == 0."""

    value: float
    count: int
    n: int
    low: float
    high: float


def wilson_interval(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for count successes out of n; (nan, nan) when n == 0."""
    count, n = _check_count(count, n)
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    if n == 0:
        return math.nan, math.nan
    p = count / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    low = 0.0 if count == 0 else max(0.0, centre - half)
    high = 1.0 if count == n else min(1.0, centre + half)
    return low, high


def rate(count: int, n: int) -> Rate:
    """Rate(count / n) with its Wilson 95% interval."""
    count, n = _check_count(count, n)
    low, high = wilson_interval(count, n)
    return Rate(value=count / n if n else math.nan, count=count, n=n, low=low, high=high)


def pooled_rate(rates: Sequence[Rate]) -> Rate:
    """One rate over the union of several draws (sums counts and n), e.g. for pooling random controls."""
    return rate(sum(r.count for r in rates), sum(r.n for r in rates))


def fooling_rate(true_labels, adv_pred) -> Rate:
    """R_f (the paper's definition): share of images predicted, under attack, as anything but their TRUE label.

    Counts images that were already misclassified when clean.
    """
    true_labels, adv_pred = _labels(true_labels=true_labels, adv_pred=adv_pred)
    return rate(int(np.count_nonzero(true_labels != adv_pred)), true_labels.size)


def flip_rate(clean_pred, adv_pred) -> Rate:
    """Share of images whose prediction under attack differs from their CLEAN prediction."""
    clean_pred, adv_pred = _labels(clean_pred=clean_pred, adv_pred=adv_pred)
    return rate(int(np.count_nonzero(clean_pred != adv_pred)), clean_pred.size)


def targeted_success_rate(adv_pred, target: int) -> Rate:
    """R_s: share of ALL images predicted as `target` under attack (images of class target included)."""
    (adv_pred,) = _labels(adv_pred=adv_pred)
    target = _class_index(target, "target")
    return rate(int(np.count_nonzero(adv_pred == target)), adv_pred.size)


def targeted_induced_rate(clean_pred, adv_pred, target: int) -> Rate:
    """What a targeted UAP did: share of the images NOT predicted as `target` when clean that are under attack."""
    clean_pred, adv_pred = _labels(clean_pred=clean_pred, adv_pred=adv_pred)
    target = _class_index(target, "target")
    moved = clean_pred != target
    return rate(int(np.count_nonzero(adv_pred[moved] == target)), int(np.count_nonzero(moved)))


def accuracy(true_labels, pred) -> Rate:
    """Share of images predicted as their true label."""
    true_labels, pred = _labels(true_labels=true_labels, pred=pred)
    return rate(int(np.count_nonzero(true_labels == pred)), true_labels.size)


def confusion_matrix(true_labels, pred, num_classes: int) -> np.ndarray:
    """Counts (int64, num_classes x num_classes): rows are true labels, columns predictions."""
    num_classes = _num_classes(num_classes)
    true_labels, pred = _labels(num_classes, true_labels=true_labels, pred=pred)
    flat = np.bincount(true_labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.astype(np.int64).reshape(num_classes, num_classes)


def row_normalise(conf) -> np.ndarray:
    """Each row divided by its sum (float64); rows with no images stay all zero."""
    conf = _square(conf)
    totals = conf.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(conf, totals, out=np.zeros(conf.shape, dtype=np.float64), where=totals > 0)


def sensitivity_ppv(conf) -> tuple[list[float | None], list[float | None]]:
    """Per-class sensitivity (diagonal / row sum) and PPV (diagonal / column sum); None where the sum is 0."""
    conf = _square(conf)
    diag = np.diag(conf)

    def ratios(totals: np.ndarray) -> list[float | None]:
        return [float(d / t) if t > 0 else None for d, t in zip(diag, totals)]

    return ratios(conf.sum(axis=1)), ratios(conf.sum(axis=0))


def dominant_label(clean_pred, adv_pred, num_classes: int) -> tuple[int | None, float | None, int]:
    """Among images whose prediction flipped: the class most of them went to, its share, and how many flipped.

    (None, None, 0) when nothing flipped; ties go to the lowest class index.
    """
    num_classes = _num_classes(num_classes)
    clean_pred, adv_pred = _labels(num_classes, clean_pred=clean_pred, adv_pred=adv_pred)
    flipped = adv_pred[clean_pred != adv_pred]
    if flipped.size == 0:
        return None, None, 0
    counts = np.bincount(flipped, minlength=num_classes)
    winner = int(np.argmax(counts))
    return winner, float(counts[winner] / flipped.size), int(flipped.size)


def _check_count(count, n) -> tuple[int, int]:
    for name, v in (("count", count), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    count, n = int(count), int(n)
    if not 0 <= count <= n:
        raise ValueError(f"need 0 <= count <= n, got count={count}, n={n}")
    return count, n


def _class_index(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer class index, got {v!r}")
    return int(v)


def _num_classes(num_classes) -> int:
    k = _class_index(num_classes, "num_classes")
    if k < 1:
        raise ValueError(f"num_classes must be >= 1, got {k}")
    return k


def _labels(num_classes: int | None = None, **arrays) -> tuple[np.ndarray, ...]:
    """Named label arrays as 1-D int64, checked for equal length and (if num_classes is given) range."""
    out = []
    for name, values in arrays.items():
        a = np.asarray(values)
        if a.size == 0:
            a = a.astype(np.int64)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D class indices, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        a = a.astype(np.int64, copy=False)
        high = np.iinfo(np.int64).max if num_classes is None else num_classes
        bad = a[(a < 0) | (a >= high)]
        if bad.size:
            bound = ">= 0" if num_classes is None else f"in [0, {num_classes})"
            raise ValueError(f"{name} holds label {int(bad[0])}; labels must be {bound}")
        out.append(a)
    lengths = {name: a.size for name, a in zip(arrays, out)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"label arrays differ in length: {lengths}")
    return tuple(out)


def _square(conf) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    if conf.size and conf.min() < 0:
        raise ValueError("confusion matrix holds negative counts")
    return conf
