"""Where a model's spec is looked for, what an error says when a value is missing, the spec flags, ONNX sizes."""

import pytest
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.errors import AuditkitError
from auditkit.models import load_model
from test_model_identity import SPEC, save_linear_onnx

runner = CliRunner()


@pytest.mark.parametrize("name", ["m.yaml", "m.onnx.yaml", "model.yaml"])
def test_the_spec_beside_the_model_is_found_under_each_name(tmp_path, name):
    path = save_linear_onnx(tmp_path / "m.onnx", spec=None)
    (tmp_path / name).write_text(SPEC)
    model = load_model(path)
    assert model.classes == ("a", "b", "c") and model.spec_file == tmp_path / name


def test_two_spec_files_for_one_model_are_refused(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx", spec=None)
    (tmp_path / "m.yaml").write_text(SPEC)
    (tmp_path / "m.onnx.yaml").write_text(SPEC)
    with pytest.raises(AuditkitError, match="two spec files"):
        load_model(path)


def test_a_missing_value_names_the_files_looked_for_and_the_flag(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx", spec=None, dynamic_size=True)
    res = runner.invoke(app, ["inspect", "-m", str(path)])
    assert res.exit_code == 2
    line = " ".join(res.output.split())
    assert "cannot tell the model's input_size" in line
    for looked in ("m.yaml", "m.onnx.yaml", "model.yaml", "--input-size"):
        assert looked in line
    res = runner.invoke(app, ["inspect", "-m", str(path), "--input-size", "16"])
    assert res.exit_code == 0, res.output


def test_generic_class_names_say_where_a_spec_was_looked_for(tmp_path, phantom_manifest):
    """The classes are checked against the data's once it is loaded: a small set here, not the built-in one."""
    path = save_linear_onnx(tmp_path / "m.onnx", spec=None)
    res = runner.invoke(app, ["run", "-m", str(path), "-p", "policies/quick.yaml", "-o", str(tmp_path / "out"),
                              "--data", str(phantom_manifest)])
    assert res.exit_code == 2
    line = " ".join(res.output.split())
    assert "['class0', 'class1', 'class2']" in line and "m.onnx.yaml" in line and "--classes" in line


def test_layout_mean_and_std_flags_set_the_spec(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx")
    res = runner.invoke(app, ["inspect", "-m", str(path), "--layout", "NCHW", "--mean", "0.5", "--std", "0.25"])
    assert res.exit_code == 0, res.output
    assert "mean [0.5], std [0.25]" in res.output and "NCHW" in res.output
    res = runner.invoke(app, ["inspect", "-m", str(path), "--mean", "half"])
    assert res.exit_code == 2 and "--mean" in res.output


def test_onnx_parameters_are_the_initializers_sizes(tmp_path):
    assert load_model(save_linear_onnx(tmp_path / "m.onnx")).parameters == 256 * 3
