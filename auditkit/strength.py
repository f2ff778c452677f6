"""Attack-strength checks: whether a cell's UAP is evidence about the model, or only about a weak attack.

A low attack success rate passes a threshold; it must not pass one because the attack never worked (a UAP that
never moved, gradients that are masked or quantised away, a step too small to flip any image). Each check that
fails makes a rule selecting that cell INCONCLUSIVE instead of PASS. Free of TensorFlow: crafting is passed in.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .results import CellResult, StrengthChecks
from .uap.base import AttackSettings


def headline_success(pred: np.ndarray, labels: np.ndarray, target: int | None) -> np.ndarray:
    """Per image, whether the headline metric counts it: R_f (prediction != true label) or R_s (== target)."""
    return np.asarray(pred == target if target is not None else pred != labels, bool)


def paired_p_value(uap: np.ndarray, controls: Sequence[np.ndarray]) -> float:
    """One-sided exact McNemar test that the UAP succeeds on more of the same images than random controls do.

    Discordant pairs are counted against each image's mean control outcome over the draws (the expected counts of
    one draw, rounded), so pooling draws does not count one image several times."""
    if not len(controls):
        return math.nan
    u, c = np.asarray(uap, float), np.mean(np.asarray(controls, float), axis=0)
    only_uap, only_control = round(float(np.sum(u * (1 - c)))), round(float(np.sum((1 - u) * c)))
    n = only_uap + only_control
    return sum(math.comb(n, k) for k in range(only_uap, n + 1)) / 2**n if n else 1.0


def reach_rate(pred: np.ndarray, clean_pred: np.ndarray, target: int | None) -> float:
    """R_s for a targeted UAP; for a nontargeted one the flip rate among images whose clean prediction is not the
    class it sends most flipped images to: a UAP that sends everything to one class cannot flip that class's own
    images, so on three balanced classes a perfect one flips 2/3 of them."""
    if target is not None:
        return float(np.mean(pred == target))
    flipped = pred != clean_pred
    if not flipped.any():
        return 0.0
    dominant = np.bincount(pred[flipped]).argmax()
    return float(np.mean(flipped[clean_pred != dominant]))


def strength_of(settings: AttackSettings, rho: np.ndarray, xi: float, crafting_rates: list[float],
                p_values: dict[str, float], alpha: float) -> StrengthChecks:
    """The checks one cell decides alone: moved (norm >= xi / 2, or the craft already succeeded on its whole
    crafting set, where a smaller UAP did all there was to do) and beats noise (p < alpha on every split)."""
    norm = float(np.abs(rho).max() if settings.norm == "inf" else np.linalg.norm(rho))
    done = bool(crafting_rates) and crafting_rates[-1] >= 1.0 - settings.delta
    beats = None if any(math.isnan(p) for p in p_values.values()) else all(p < alpha for p in p_values.values())
    return StrengthChecks(uap_norm=norm, moved=bool(norm >= xi / 2 or done), noise_p_values=p_values,
                          beats_noise=beats)


def _family(settings: AttackSettings, **fixed) -> str:
    """The settings with some fields fixed: cells equal in all the others share a family."""
    return settings.model_copy(update=fixed).model_dump_json()


def check_monotone(cells: Sequence[CellResult], splits: Sequence[str]) -> None:
    """Among cells that differ only in zeta, a larger zeta's rate may not fall below the next smaller one's by more
    than its Wilson interval (its upper bound under the smaller one's value) on any split."""
    families: dict[str, list[CellResult]] = {}
    for cell in cells:
        families.setdefault(_family(cell.attack, zeta=1.0), []).append(cell)
    for family in families.values():
        family.sort(key=lambda c: c.attack.zeta)
        for smaller, larger in zip(family, family[1:]):
            larger.strength.monotone = all(larger.headline(s).high >= smaller.headline(s).value for s in splits)


def check_white_box(cells: Sequence[CellResult], splits: Sequence[str]) -> None:
    """Where one cell (kind, target, norm, zeta, clipping) was crafted both with the model's gradients and from
    queries alone (`blackbox`): the strongest gradient craft (over algorithms and restarts) must reach the
    black-box rate on every split within its Wilson interval (its upper bound at least the black-box value). An
    attacker with less access doing better means the gradients are suspect, and every gradient craft of that cell
    fails the check. (A `--surrogate` run crafts every cell on the surrogate: it has no white-box cell to compare.)
    """
    threats: dict[tuple, list[CellResult]] = {}
    for cell in cells:
        a = cell.attack
        threats.setdefault((a.kind, a.target, a.norm, a.zeta, a.clip), []).append(cell)
    for threat in threats.values():
        white = [c for c in threat if c.attack.algorithm != "blackbox"]
        black = [c for c in threat if c.attack.algorithm == "blackbox"]
        if not (white and black):
            continue
        strongest = {s: max((c.headline(s) for c in white), key=lambda r: r.value) for s in splits}
        holds = all(strongest[s].high >= max(c.headline(s).value for c in black) for s in splits)
        for cell in white:
            cell.strength.white_box_strongest = holds


def reach_settings(settings: AttackSettings, zeta: float, rate: float) -> AttackSettings:
    """The reachability craft of a family: its restart 0 at `zeta`, stopping once it reaches `rate`."""
    return settings.model_copy(update={"zeta": zeta, "restart": 0, "delta": max(settings.delta, 1.0 - rate)})


def check_reachability(cells: Sequence[CellResult], reach: Callable[[AttackSettings], float], zeta: float,
                       rate: float) -> None:
    """Once per family of cells differing only in zeta (and restart): a UAP crafted at a large budget (`zeta`, or the family's
    largest zeta where that is larger) must reach `rate` on the crafting set; if not, the gradients are suspect
    (masked, quantised input, a broken path)."""
    budget: dict[str, float] = {}
    for cell in cells:
        family = _family(cell.attack, zeta=zeta, restart=0)
        budget[family] = max(budget.get(family, zeta), cell.attack.zeta)
    reached: dict[str, float] = {}
    for cell in cells:
        family = _family(cell.attack, zeta=zeta, restart=0)
        if family not in reached:
            reached[family] = reach(reach_settings(cell.attack, budget[family], rate))
        checks = cell.strength
        checks.reach_zeta, checks.reach_rate = budget[family], reached[family]
        checks.reachable = bool(reached[family] >= rate)
