"""Sweeps: the smallest zeta at which a UAP's rate reaches a level, by bisection, judged by critical_zeta rules."""
import json

import pytest

from auditkit.errors import AuditkitError
from auditkit.metrics import rate
from auditkit.policy import Sweep, parse_policy
from auditkit.results import SweepPoint
from auditkit.sweep import bisect, sweep_key

from test_strength import policy, run_cli


def step_at(critical: float):
    """A model that breaks (rate 0.9) from `critical` on and not below it (rate 0.1); records the zetas tried."""
    tried = []

    def measure(zeta: float) -> SweepPoint:
        tried.append(zeta)
        return SweepPoint(zeta=zeta, xi=zeta, rate=rate(90 if zeta >= critical else 10, 100), control=None,
                          uap_norm=zeta, seconds=0.0)
    return measure, tried


def test_bisection_brackets_the_critical_zeta_geometrically():
    measure, tried = step_at(0.013)
    points, critical, below = bisect(measure, Sweep(low=0.001, high=0.1, steps=6))
    assert tried[:3] == [0.1, 0.001, pytest.approx(0.01)] and len(points) == 8
    assert below < 0.013 <= critical and critical / below == pytest.approx(100 ** (1 / 64))


def test_a_level_reached_at_low_or_not_at_high_ends_the_sweep():
    measure, tried = step_at(0.0001)
    assert bisect(measure, Sweep(low=0.001, high=0.1))[1:] == (0.001, None) and tried == [0.1, 0.001]
    measure, tried = step_at(0.5)
    assert bisect(measure, Sweep(low=0.001, high=0.1))[1:] == (None, 0.1) and tried == [0.1]


def test_sweep_keys_drop_the_zeta_only():
    assert sweep_key("targeted-a_z0.1_b_2_z0.1_sgd_r1", 0.1) == "targeted-a_z0.1_b_2_sgd_r1"


def test_critical_zeta_rules_are_bounded_below_and_select_a_sweep():
    grid = {"kinds": ["nontargeted"], "norms": ["inf"], "zetas": [0.02], "sweep": {"low": 0.01, "high": 0.05}}
    rule = {"metric": "critical_zeta", "split": "test", "min": 0.01}
    parse_policy({"version": 1, "attacks": [grid], "thresholds": [rule]})
    with pytest.raises(AuditkitError, match="bound it with min"):
        parse_policy({"version": 1, "attacks": [grid], "thresholds": [rule | {"min": None, "max": 0.1}]})
    with pytest.raises(AuditkitError, match="selects no sweep"):
        parse_policy({"version": 1, "attacks": [grid], "thresholds": [rule | {"norm": 2}]})
    with pytest.raises(AuditkitError, match="attacks.0.sweep.low: must be below high"):
        parse_policy({"version": 1, "attacks": [grid | {"sweep": {"low": 0.05, "high": 0.05}}]})


@pytest.mark.slow
def test_a_sweep_finds_where_the_tiny_model_breaks_and_a_rule_judges_it(tmp_path, tiny_model, phantom_manifest):
    path = policy(tmp_path / "p.yaml", zetas=(0.3,))
    path.write_text(path.read_text()
                    .replace("    max_iter: 3\n", "    max_iter: 3\n    sweep: {low: 0.02, high: 0.3, steps: 2}\n")
                    .replace("    max: 1.0\n", "    max: 1.0\n  - name: breaks late\n    metric: critical_zeta\n"
                             "    split: test\n    min: 0.01\n"))
    code, output = run_cli("run", "--model", tiny_model, "--policy", path, "--data", phantom_manifest,
                           "--out", tmp_path / "out")
    assert code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (sweep,) = results["sweeps"]
    assert sweep["key"] == "nontargeted_inf" and sweep["reachable"] is True
    top = sweep["points"][0]
    assert top["zeta"] == 0.3 and top["rate"] == results["cells"][0]["evals"]["test"]["fooling_rate"]
    rates = {p["zeta"]: p["rate"]["value"] for p in sweep["points"]}
    assert rates[sweep["critical_zeta"]] >= 0.5 and (sweep["below"] is None or rates[sweep["below"]] < 0.5)
    rule = results["rules"][1]
    assert rule["measured"] == sweep["critical_zeta"] and rule["cells"] == ["nontargeted_inf"]
    assert rule["passed"] == (sweep["critical_zeta"] >= 0.01)
    assert "The ζ at which the model breaks" in (tmp_path / "out" / "report.html").read_text()
