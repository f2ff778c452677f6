"""Release over release: compare an audit with the last released model's audit under the same policy.

A rule with `max_increase` fails when any of its cells got worse by more than that since the baseline, even
where the new value stays under the rule's absolute limit. No TensorFlow here: the baseline is a results.json.
"""
from __future__ import annotations

from pathlib import Path

from .errors import AuditkitError
from .policy import Policy
from .results import AuditResult, BaselineComparison, CellDelta, read_json


def read_baseline(path: str | Path, policy: Policy) -> AuditResult:
    """The earlier audit in `path`; refused unless it ran the same policy (same digest), so cells compare."""
    previous = read_json(Path(path))
    theirs, ours = previous.provenance.policy_sha256, policy.sha256()
    if theirs != ours:
        raise AuditkitError(f"was audited under another policy (sha256 {theirs[:16]}…, this run's {ours[:16]}…); "
                            "a baseline must come from the same policy", str(path))
    return previous


def apply_change_bounds(result: AuditResult, policy: Policy, previous: AuditResult | None = None,
                        source: str = "") -> None:
    """Record each rule's max_increase and, given the baseline audit, the per-cell changes; a rule whose cells
    rose by more than its max_increase fails, and so does the verdict."""
    for rule, threshold in zip(result.rules, policy.thresholds):
        rule.max_increase = threshold.max_increase
    if previous is None:
        return
    before = {c.key: c for c in previous.cells}
    missing = [c.key for c in result.cells if c.key not in before]
    if missing:
        raise AuditkitError(f"has no cell {missing[0]!r}; it does not match this audit", source)
    result.baseline = BaselineComparison(
        source=source, model=previous.model, verdict=previous.verdict, started=previous.provenance.started,
        deltas=[CellDelta(key=c.key, split=split, before=before[c.key].headline(split).value,
                          after=c.headline(split).value)
                for c in result.cells for split in c.evals if split in before[c.key].evals])
    for rule in result.rules:
        if rule.max_increase is None or not rule.cells:
            continue
        rises = [(result.cell(key).metric_value(rule.metric, rule.split)
                  - before[key].metric_value(rule.metric, rule.split), key) for key in rule.cells]
        rule.increase, rule.increase_cell = max(rises)
        rule.passed = rule.passed and rule.increase <= rule.max_increase
    if not all(r.passed for r in result.rules):
        result.verdict = "FAIL"
