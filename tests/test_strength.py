"""Attack-strength checks: an attack that did not work makes a rule INCONCLUSIVE (exit 4, a JUnit error), never PASS."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.strength import paired_p_value, strength_of
from auditkit.uap.base import AttackSettings

runner = CliRunner()


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def policy(path: Path, *, eps: float = 0.05, zetas=(0.1, 0.2)) -> Path:
    """A tiny-model policy whose rule passes on the limit alone: a nontargeted L-inf grid and one max rule."""
    path.write_text(f"""version: 1
seed: 5
data:
  classes: [normal, pneumonia, COVID-19]
  preprocess: {{crop_top: 0.16666667}}
  max_images: {{train: 60, test: 30}}
attacks:
  - kinds: [nontargeted]
    norms: [inf]
    zetas: [{', '.join(map(str, zetas))}]
    eps: {eps}
    max_iter: 3
random_controls: {{draws: 2}}
strength: {{reach_zeta: 0.6}}
thresholds:
  - name: fooling rate
    metric: fooling_rate
    split: test
    max: 1.0
report: {{title: "strength", formats: [html, json, junit]}}
""")
    return path


def test_paired_p_value_is_the_one_sided_exact_mcnemar_test():
    uap = np.array([1] * 8 + [0] * 2, bool)
    control = np.zeros(10, bool)
    assert paired_p_value(uap, [control]) == pytest.approx(0.5**8)  # 8 discordant pairs, all for the UAP
    assert paired_p_value(control, [uap]) == 1.0
    assert paired_p_value(uap, [uap]) == 1.0  # no discordant pair: no evidence
    # draws are averaged per image, not pooled as extra pairs: two draws that agree count as one
    assert paired_p_value(uap, [control, control]) == paired_p_value(uap, [control])


@pytest.mark.slow
def test_a_working_attack_passes_every_check(tmp_path, tiny_model, phantom_manifest):
    code, output = run_cli("run", "--model", tiny_model, "--policy", policy(tmp_path / "p.yaml"),
                           "--data", phantom_manifest, "--out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and results["verdict"] == "PASS", output
    small, large = results["cells"]
    for cell in results["cells"]:
        checks = cell["strength"]
        assert checks["moved"] and checks["beats_noise"] and checks["reachable"], checks
        assert checks["reach_zeta"] == 0.6 and checks["reach_rate"] >= 0.9
    assert small["strength"]["monotone"] is None and large["strength"]["monotone"] is True
    assert "Can this audit be trusted?" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
def test_an_inert_attack_is_inconclusive_exit_4_and_a_junit_error(tmp_path, tiny_model, phantom_manifest):
    args = ("run", "--model", tiny_model, "--policy", policy(tmp_path / "p.yaml", eps=1e-9),
            "--data", phantom_manifest, "--out", tmp_path / "out")
    code, output = run_cli(*args)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert code == 4, output
    assert results["verdict"] == "INCONCLUSIVE"
    rule = results["rules"][0]
    assert rule["passed"] and "nontargeted_inf_z0.1: moved" in rule["failed_checks"]
    assert all(not c["strength"]["moved"] and not c["strength"]["reachable"] for c in results["cells"])
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    error = suite.find("testcase/error")
    assert error is not None and "moved" in error.get("message") and suite.find("testcase/failure") is None
    assert "INCONCLUSIVE" in (out / "report.html").read_text()
    assert run_cli(*args, "--allow-inconclusive")[0] == 0


def test_a_broken_limit_is_a_failure_even_where_a_check_fails():
    from auditkit.results import RuleResult
    from auditkit.rules import verdict

    def rule(passed, failed_checks=()):
        return RuleResult(name="r", metric="fooling_rate", split="test", selectors={}, bound="max", limit=0.2,
                          measured=0.1 if passed else 0.3, worst_cell="c", cells=["c"], passed=passed,
                          failed_checks=list(failed_checks))

    assert verdict([rule(True), rule(True)]) == "PASS"
    assert verdict([rule(True), rule(True, ["c: moved"])]) == "INCONCLUSIVE"
    assert verdict([rule(False), rule(True, ["c: moved"])]) == "FAIL"
    assert rule(False, ["c: moved"]).status == "FAIL"


def masked_twin(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with its logits multiplied by 1e4 before the softmax: float32 cross-entropy gradients
    underflow to zero (the defensive-distillation effect), its predictions unchanged."""
    import keras

    model = keras.saving.load_model(tiny_model, safe_mode=True)
    head = model.layers[-1]
    x = model.layers[-2].output
    logits = keras.layers.Dense(head.units, name="logits")(x)
    out = keras.layers.Softmax()(keras.layers.Rescaling(1e4)(logits))
    masked = keras.Model(model.inputs, out)
    masked.get_layer("logits").set_weights(head.get_weights())
    masked.save(folder / "masked.keras")
    (folder / "masked.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return folder / "masked.keras"


@pytest.mark.slow
def test_masked_gradients_fail_reachability_and_never_pass(tmp_path, tiny_model, phantom_manifest):
    masked = masked_twin(tiny_model, tmp_path)
    code, output = run_cli("run", "--model", masked, "--policy", policy(tmp_path / "p.yaml"),
                           "--data", phantom_manifest, "--out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 4 and results["verdict"] == "INCONCLUSIVE", output
    assert all(c["strength"]["reachable"] is False for c in results["cells"])
    assert any(check.endswith(": reachable") for check in results["rules"][0]["failed_checks"])


@pytest.mark.slow
def test_a_grid_with_two_algorithms_crafts_each_cell_twice_and_rules_judge_the_worst(tmp_path, tiny_model,
                                                                                     phantom_manifest):
    path = policy(tmp_path / "p.yaml", zetas=(0.1,))
    path.write_text(path.read_text().replace("    max_iter: 3\n", "    max_iter: 3\n    algorithms: [paper, sgd]\n")
                    .replace("    max: 1.0\n", "    max: 1.0\n  - name: paper only\n    metric: fooling_rate\n"
                             "    split: test\n    algorithm: paper\n    max: 1.0\n"))
    code, output = run_cli("run", "--model", tiny_model, "--policy", path, "--data", phantom_manifest,
                           "--out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {c["attack"]["algorithm"]: c for c in results["cells"]}
    assert sorted(cells) == ["paper", "sgd"] and cells["sgd"]["key"] == "nontargeted_inf_z0.1_sgd", output
    rates = {a: c["evals"]["test"]["fooling_rate"]["value"] for a, c in cells.items()}
    worst, paper_only = results["rules"]
    assert worst["measured"] == max(rates.values()) and len(worst["cells"]) == 2
    assert paper_only["measured"] == rates["paper"] and paper_only["cells"] == ["nontargeted_inf_z0.1"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Rules judge the worst" in html


def test_nontargeted_reach_counts_the_images_a_one_class_uap_can_flip():
    from auditkit.strength import reach_rate

    clean = np.array([0, 0, 1, 1, 2, 2])
    assert reach_rate(np.full(6, 2), clean, None) == 1.0  # everything sent to class 2: its own images excepted
    assert reach_rate(np.array([2, 0, 2, 1, 2, 2]), clean, None) == 0.5
    assert reach_rate(clean, clean, None) == 0.0
    assert reach_rate(np.full(6, 2), clean, 2) == 1.0 and reach_rate(clean, clean, 2) == pytest.approx(1 / 3)


def test_moved_means_half_the_budget_or_every_crafting_image_already_fooled():
    cell = AttackSettings(kind="nontargeted", norm="inf", zeta=0.02)
    small = np.full((4, 4), 0.01, np.float32)
    assert not strength_of(cell, small, 0.1, [0.3, 0.5], {}, 0.01).moved  # stopped short of xi/2 and of success
    assert strength_of(cell, small, 0.1, [0.5, 1.0], {}, 0.01).moved  # did all there was to do, with less
    assert strength_of(cell, small * 6, 0.1, [0.2], {}, 0.01).moved


def test_a_black_box_craft_beating_every_gradient_craft_of_its_cell_marks_them_suspect(tmp_path):
    import dataclasses

    from auditkit.metrics import rate
    from auditkit.rules import apply_rules
    from auditkit.policy import Threshold
    from auditkit.results import StrengthChecks
    from auditkit.strength import check_white_box
    from test_report import make_result

    base = make_result(tmp_path).cells[0]

    def crafted(algorithm: str, fooled: int, restart: int = 0):
        attack = base.attack.model_copy(update={"algorithm": algorithm, "restart": restart})
        evals = {s: dataclasses.replace(e, fooling_rate=rate(fooled, 100)) for s, e in base.evals.items()}
        return dataclasses.replace(base, key=attack.key, attack=attack, evals=evals,
                                   strength=StrengthChecks(uap_norm=1.0, moved=True, noise_p_values={},
                                                           beats_noise=True))

    weak = [crafted("paper", 20), crafted("sgd", 25), crafted("sgd", 30, restart=1), crafted("blackbox", 60)]
    check_white_box(weak, ["train", "test"])
    assert [c.strength.white_box_strongest for c in weak] == [False, False, False, None]
    rule = apply_rules([Threshold(metric="fooling_rate", split="test", max=0.9)], weak, {})[0]
    assert rule.passed and rule.status == "INCONCLUSIVE" and "nontargeted_inf_z0.02_sgd_r1: white_box_strongest" \
        in rule.failed_checks
    # one gradient craft as strong as the black-box one (within its interval) clears every gradient craft
    strong = [crafted("paper", 20), crafted("sgd", 55), crafted("blackbox", 60)]
    check_white_box(strong, ["train", "test"])
    assert [c.strength.white_box_strongest for c in strong] == [True, True, None]
    alone = [crafted("paper", 20)]
    check_white_box(alone, ["train", "test"])
    assert alone[0].strength.white_box_strongest is None
