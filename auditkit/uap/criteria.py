"""Whether an attack succeeded on an image: the one place that decides it (for numpy arrays and TF tensors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import AttackSettings


@dataclass(frozen=True)
class Nontargeted:
    """Success: the prediction leaves the clean prediction."""

    targeted = False

    def labels(self, clean_pred: np.ndarray) -> np.ndarray:
        """What predictions are compared with: the clean predictions."""
        return clean_pred

    def succeeded(self, pred, labels):
        return pred != labels


@dataclass(frozen=True)
class Targeted:
    """Success: the prediction is `target`."""

    target: int
    targeted = True

    def labels(self, clean_pred: np.ndarray) -> np.ndarray:
        return np.full_like(clean_pred, self.target)

    def succeeded(self, pred, labels):
        return pred == labels


Criterion = Nontargeted | Targeted


def succeeded_for(target, pred, labels):
    """The criterion of a cell given by `target` (the target's index, -1 for a nontargeted attack), for loops that
    craft several cells at once: `labels` are the target (targeted) or the clean predictions (nontargeted)."""
    return (pred == labels) == (target >= 0)


def criterion_for(settings: AttackSettings, classes: Sequence[str]) -> Criterion:
    """The criterion a cell's settings name, the target looked up among the model's classes."""
    return Nontargeted() if settings.target is None else Targeted(list(classes).index(settings.target))
