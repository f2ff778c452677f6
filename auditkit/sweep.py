"""The zeta at which a model breaks: bisection on zeta for the smallest budget whose UAP's headline rate reaches a
level. One number per attack that a reviewer can compare across model versions. Free of TensorFlow: crafting and
evaluating one zeta is passed in.
"""
from __future__ import annotations

import math
from typing import Callable

from .policy import Sweep
from .results import SweepPoint


def bisect(measure: Callable[[float], SweepPoint], sweep: Sweep,
           ) -> tuple[list[SweepPoint], float | None, float | None]:
    """(points, critical zeta, the zeta below it): `high` first (not reached there: no critical zeta), then
    `low` (reached already: low is critical), then `steps` geometric midpoints, each replacing the end of the
    bracket on its side of the level. Each zeta is a fresh craft from its own stream, so the rate need not rise
    with zeta; the bracket still ends between a zeta measured below the level and one measured at or above it."""
    points = [measure(sweep.high)]
    if points[-1].rate.value < sweep.level:
        return points, None, sweep.high
    points.append(measure(sweep.low))
    if points[-1].rate.value >= sweep.level:
        return points, sweep.low, None
    below, above = sweep.low, sweep.high
    for _ in range(sweep.steps):
        mid = math.sqrt(below * above)
        points.append(measure(mid))
        if points[-1].rate.value >= sweep.level:
            above = mid
        else:
            below = mid
    return points, above, below


def sweep_key(key: str, zeta: float) -> str:
    """A cell's key without its zeta: "nontargeted_inf_z0.1_sgd" -> "nontargeted_inf_sgd"."""
    head, _, tail = key.rpartition(f"_z{float(zeta)!r}")
    return head + tail
