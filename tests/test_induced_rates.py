"""Rates that say what the attack itself changed, beside the paper's rates that include clean errors."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit import metrics as M
from auditkit.cli import app
from auditkit.policy import load_policy
from test_model_identity import save_linear_onnx

runner = CliRunner()


def test_targeted_induced_rate_leaves_out_images_already_predicted_as_the_target():
    clean = np.array([2, 2, 0, 1, 0, 1])
    adv = np.array([2, 2, 2, 1, 0, 2])
    assert M.targeted_success_rate(adv, 2).value == pytest.approx(4 / 6)
    induced = M.targeted_induced_rate(clean, adv, 2)
    assert (induced.count, induced.n) == (2, 4)


def test_release_gate_judges_induced_change_and_paper_keeps_the_papers_metrics():
    gate = {t.metric for t in load_policy("policies/release-gate.yaml").thresholds}
    assert gate == {"clean_accuracy", "flip_rate", "targeted_induced_rate", "uap_over_random"}
    paper = {t.metric for t in load_policy("policies/paper.yaml").thresholds}
    assert paper == {"fooling_rate", "targeted_success_rate"}


@pytest.mark.slow
def test_the_console_names_each_rate_and_the_rules_use_induced_lift(tmp_path):
    model = save_linear_onnx(tmp_path / "m.onnx", spec="classes: [a, b, c]\noutput: logits\ncrop_top: 0\n"
                                                        "resize: bilinear\n")
    policy = tmp_path / "p.yaml"
    policy.write_text("""version: 1
seed: 3
data:
  classes: [a, b, c]
  aliases: {normal: a, pneumonia: b, COVID-19: c}
  max_images: {train: 24, test: 24}
attacks:
  - kinds: [nontargeted, targeted]
    targets: [c]
    norms: [inf]
    zetas: [0.2]
    eps: 0.05
    max_iter: 2
random_controls: {draws: 2}
thresholds:
  - metric: uap_over_random
    split: test
    max: 1.0
  - metric: targeted_induced_rate
    split: test
    max: 1.0
report: {title: t, formats: [json]}
""")
    res = runner.invoke(app, ["run", "-m", str(model), "-p", str(policy), "-o", str(tmp_path / "out"),
                              "--allow-inconclusive"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for name in ("flip rate", "R_f (paper)", "R_s induced", "R_s (paper)"):
        assert name in res.output
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {c["attack"]["kind"]: c for c in result["cells"]}
    lift = result["rules"][0]
    test_ev = {k: c["evals"]["test"] for k, c in cells.items()}
    test_ctrl = {k: c["controls"]["test"] for k, c in cells.items()}
    lifts = [test_ev["nontargeted"]["flip_rate"]["value"] - test_ctrl["nontargeted"]["flip_rate"]["value"],
             test_ev["targeted"]["targeted_induced_rate"]["value"]
             - test_ctrl["targeted"]["targeted_induced_rate"]["value"]]
    assert lift["measured"] == pytest.approx(max(lifts))
    assert result["rules"][1]["cells"] == [cells["targeted"]["key"]]
