"""Whether an attack succeeded on an image: the one place that decides it (for numpy arrays and TF tensors).

A criterion is given by `target`: the target class's index, or -1 for a nontargeted attack. The loops that craft
several cells at once carry that index per cell; the classes below name it for everything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import AttackSettings


def compared_labels(target: int, clean_pred: np.ndarray) -> np.ndarray:
    """What predictions are compared with: the target, or the clean predictions."""
    return np.full_like(clean_pred, target) if target >= 0 else clean_pred


def succeeded_for(target, pred, labels):
    """Success against `labels` (compared_labels): the prediction is the target (targeted), or leaves the clean
    prediction (nontargeted)."""
    return (pred == labels) == (target >= 0)


class _ByTarget:
    target: int

    def labels(self, clean_pred: np.ndarray) -> np.ndarray:
        return compared_labels(self.target, clean_pred)

    def succeeded(self, pred, labels):
        return succeeded_for(self.target, pred, labels)


@dataclass(frozen=True)
class Nontargeted(_ByTarget):
    """Success: the prediction leaves the clean prediction."""

    target = -1
    targeted = False


@dataclass(frozen=True)
class Targeted(_ByTarget):
    """Success: the prediction is `target`."""

    target: int
    targeted = True


Criterion = Nontargeted | Targeted


def criterion_for(settings: AttackSettings, classes: Sequence[str]) -> Criterion:
    """The criterion a cell's settings name, the target looked up among the model's classes."""
    return Nontargeted() if settings.target is None else Targeted(list(classes).index(settings.target))
