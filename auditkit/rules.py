"""Threshold rules: each policy threshold judged on the cells it selects, and the verdict they give."""
from __future__ import annotations

from typing import Sequence

from .policy import Threshold
from .results import CellResult, RuleResult, SplitEval


def apply_rules(thresholds: Sequence[Threshold], cells: Sequence[CellResult],
                clean: dict[str, SplitEval]) -> list[RuleResult]:
    return [_apply(rule, cells, clean) for rule in thresholds]


def verdict(rules: Sequence[RuleResult]) -> str:
    return "PASS" if all(r.passed for r in rules) else "FAIL"


def _apply(rule: Threshold, cells: Sequence[CellResult], clean: dict[str, SplitEval]) -> RuleResult:
    """The rule's metric over its cells, the worst of them against its limit."""
    bound = "max" if rule.max is not None else "min"
    if rule.metric == "clean_accuracy":
        measured, keys, worst = clean[rule.split].accuracy.value, [], None
    else:
        chosen = [c for c in cells if rule.selects(c.attack)]
        values = [(_value(rule.metric, c, rule.split), c.key) for c in chosen]
        measured, worst = (max if bound == "max" else min)(values)
        keys = [c.key for c in chosen]
    passed = measured <= rule.limit if bound == "max" else measured >= rule.limit
    selectors = {k: v for k, v in (("kind", rule.effective_kind), ("target", rule.target), ("norm", rule.norm),
                                   ("zeta", rule.zeta)) if v is not None}
    return RuleResult(name=rule.name, metric=rule.metric, split=rule.split, selectors=selectors, bound=bound,
                      limit=rule.limit, measured=float(measured), worst_cell=worst, cells=keys, passed=bool(passed))


def _value(metric: str, cell: CellResult, split: str) -> float:
    ev = cell.evals[split]
    if metric == "uap_over_random":  # the lift of what the attack changed, clean errors left out
        return cell.induced(split).value - cell.control_induced(split).value
    return getattr(ev, metric).value
