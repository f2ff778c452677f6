"""--baseline: every cell compared with the last released model's audit; max_increase fails a worse model."""
import json

import pytest
from typer.testing import CliRunner

from auditkit import api
from auditkit.cli import app
from conftest import write_policy

runner = CliRunner()
RULE = """  - name: fooling may not rise
    metric: fooling_rate
    split: test
    kind: nontargeted
    max: 1.0
    max_increase: 0.05"""


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_model, phantom_manifest):
    """The 'last release': an audit under a policy with a max_increase rule, and that policy."""
    d = tmp_path_factory.mktemp("released")
    policy = write_policy(d / "gate.yaml", thresholds=RULE)
    result = api.run(tiny_model, policy, d / "out", data=phantom_manifest, formats=["json"])
    rule = result.rules[0]
    assert rule.passed and rule.max_increase == 0.05 and rule.increase is None  # no baseline: rise not checked
    return d / "out" / "results.json", policy


@pytest.mark.slow
def test_a_model_worse_than_the_release_fails_under_its_absolute_limit(released, tmp_path, tiny_model,
                                                                         phantom_manifest):
    results_json, policy = released
    baseline = json.loads(results_json.read_text())
    cell = baseline["cells"][0]  # the nontargeted L-inf cell: the release was 20 points more robust there
    before = cell["evals"]["test"]["fooling_rate"]["value"] - 0.2
    cell["evals"]["test"]["fooling_rate"]["value"] = before
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    code, output = cli("run", "--model", tiny_model, "--policy", policy, "--data", phantom_manifest,
                       "--out", tmp_path / "out", "--formats", "html,json,junit", "--baseline",
                       tmp_path / "baseline.json", "--summary-md", tmp_path / "summary.md")
    assert code == 1, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rule = results["rules"][0]
    assert results["verdict"] == "FAIL" and not rule["passed"] and rule["measured"] <= 1.0
    assert rule["increase"] == pytest.approx(0.2) and rule["increase_cell"] == cell["key"]
    deltas = {(d["key"], d["split"]): d["after"] - d["before"] for d in results["baseline"]["deltas"]}
    assert len(deltas) == 8  # 4 cells x 2 splits
    assert deltas.pop((cell["key"], "test")) == pytest.approx(0.2)
    assert all(d == pytest.approx(0.0) for d in deltas.values())  # the same model and seed: the same rates
    summary = (tmp_path / "summary.md").read_text()
    assert "| fooling may not rise |" in summary and "(rise +20.0 pp)" in summary and "rise ≤ +5.0 pp" in summary
    assert f"| {cell['key']} | {100 * before:.1f}% |" in summary and "+20.0 pp |" in summary
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Change since the baseline audit" in html and "rise since the baseline +20.0 pp &gt; +5.0 pp" in html
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert "rise since the baseline +20.0 pp &gt; +5.0 pp" in junit


def test_a_baseline_under_another_policy_is_refused_before_the_audit(tmp_path, tiny_model, phantom_manifest):
    """Any earlier results.json will do (test_report's, made without an audit): the policies' digests differ."""
    from auditkit import report
    from test_report import make_result

    report.write_reports(make_result(tmp_path / "last"), tmp_path / "last", ["json"])
    results_json = tmp_path / "last" / "results.json"
    other = write_policy(tmp_path / "other.yaml")
    code, output = cli("run", "--model", tiny_model, "--policy", other, "--data", phantom_manifest,
                       "--out", tmp_path / "out", "--baseline", results_json)
    assert code == 2 and "was audited under another policy" in output and str(results_json) in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
