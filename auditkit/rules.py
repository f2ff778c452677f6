"""Threshold rules: each policy threshold judged on the cells it selects, and the verdict they give."""
from __future__ import annotations

from typing import Sequence

from .policy import Threshold
from .results import CellResult, RuleResult, SplitEval, SweepResult


def apply_rules(thresholds: Sequence[Threshold], cells: Sequence[CellResult], clean: dict[str, SplitEval],
                sweeps: Sequence[SweepResult] = ()) -> list[RuleResult]:
    return [_apply(rule, cells, clean, sweeps) for rule in thresholds]


def verdict(rules: Sequence[RuleResult]) -> str:
    """FAIL if any rule failed, else INCONCLUSIVE if any rule's attack did not show it worked, else PASS."""
    statuses = {r.status for r in rules}
    return next((s for s in ("FAIL", "INCONCLUSIVE") if s in statuses), "PASS")


def _apply(rule: Threshold, cells: Sequence[CellResult], clean: dict[str, SplitEval],
           sweeps: Sequence[SweepResult]) -> RuleResult:
    """The rule's metric over its cells (or sweeps), the worst of them against its limit."""
    bound = "max" if rule.max is not None else "min"
    failed_checks: list[str] = []
    if rule.metric == "clean_accuracy":
        measured, keys, worst, chosen = clean[rule.split].accuracy.value, [], None, []
    elif rule.metric == "critical_zeta":
        chosen = []
        swept = [s for s in sweeps if rule.selects_sweep(s.attack, s.split)]
        measured, worst = min((s.measured, s.key) for s in swept)
        keys = [s.key for s in swept]
        failed_checks = [f"{s.key}: reachable" for s in swept if s.reachable is False]
    else:
        chosen = [c for c in cells if rule.selects(c.attack)]
        values = [(c.metric_value(rule.metric, rule.split), c.key) for c in chosen]
        measured, worst = (max if bound == "max" else min)(values)
        keys = [c.key for c in chosen]
    passed = measured <= rule.limit if bound == "max" else measured >= rule.limit
    selectors = {k: v for k, v in (("kind", rule.effective_kind), ("target", rule.target), ("norm", rule.norm),
                                   ("zeta", rule.zeta), ("algorithm", rule.algorithm)) if v is not None}
    return RuleResult(name=rule.name, metric=rule.metric, split=rule.split, selectors=selectors, bound=bound,
                      limit=rule.limit, measured=float(measured), worst_cell=worst, cells=keys, passed=bool(passed),
                      failed_checks=failed_checks + [f"{c.key}: {name}" for c in chosen if c.strength
                                                     for name in c.strength.failed()])

