"""The model's own preprocessing (model.yaml: crop_top, resize) is used by default, recorded, and overriding it warns."""
import json

import pytest
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.models.spec import ModelSpec, resolve_preprocessing
from test_model_identity import save_linear_onnx

runner = CliRunner()


def test_policy_model_means_the_models_own_values():
    prep = resolve_preprocessing(ModelSpec(crop_top=0.0, resize="bicubic"), "model", "model")
    assert (prep.crop_top, prep.resize, prep.crop_top_from, prep.warnings) == (0.0, "bicubic", "model", ())


def test_a_policy_value_unlike_the_models_is_used_with_a_warning():
    prep = resolve_preprocessing(ModelSpec(crop_top=0.0), 0.25, "model")
    assert prep.crop_top == 0.25 and prep.crop_top_from == "policy"
    assert len(prep.warnings) == 2  # crop_top overridden; resize not stated by the model
    assert "preprocess.crop_top 0.25 but the model declares 0" in prep.warnings[0]


def test_a_policy_value_equal_to_the_models_gives_no_warning():
    prep = resolve_preprocessing(ModelSpec(crop_top=1 / 6, resize="bilinear"), 0.16666667, "bilinear")
    assert prep.warnings == () and prep.crop_top_from == "policy"


def test_a_model_stating_nothing_gets_the_old_default_and_a_warning():
    prep = resolve_preprocessing(ModelSpec(), "model", "model")
    assert prep.crop_top == pytest.approx(1 / 6) and prep.resize == "bilinear"
    assert prep.crop_top_from == "auditkit default" and len(prep.warnings) == 2


POLICY = """version: 1
seed: 1
data:
  classes: [a, b, c]
  aliases: {{normal: a, pneumonia: b, COVID-19: c}}
  preprocess: {{crop_top: {crop_top}}}
  max_images: {{train: 12, test: 12}}
attacks:
  - kinds: [nontargeted]
    norms: [inf]
    zetas: [0.1]
    eps: 0.05
    max_iter: 1
random_controls: {{draws: 1}}
thresholds:
  - metric: fooling_rate
    split: test
    max: 1.0
report: {{title: t, formats: [html, json]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("crop_top, used, warned", [("model", 0.0, False), ("0.25", 0.25, True)])
def test_the_run_records_and_reports_the_preprocessing_used(tmp_path, crop_top, used, warned):
    model = save_linear_onnx(tmp_path / "m.onnx", external=False)
    (tmp_path / "model.yaml").write_text("classes: [a, b, c]\noutput: logits\ncrop_top: 0\nresize: bilinear\n")
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.format(crop_top=crop_top))
    res = runner.invoke(app, ["run", "-m", str(model), "-p", str(policy), "-o", str(tmp_path / "out")])
    assert res.exit_code in (0, 1, 4), res.output  # the verdict is not what this test is about
    data = json.loads((tmp_path / "out" / "results.json").read_text())["data"]
    assert data["preprocess"]["crop_top"] == used
    assert data["preprocess"]["crop_top_from"] == ("policy" if warned else "model")
    assert bool(data["warnings"]) == warned
    html = (tmp_path / "out" / "report.html").read_text()
    assert ("but the model declares 0" in html) == warned
    assert ("warning: the policy sets preprocess.crop_top" in res.output) == warned
