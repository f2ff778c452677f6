"""A model's identity covers every file that defines it: external ONNX weights and the spec sidecar included."""
from pathlib import Path

import numpy as np
import pytest

from auditkit.audit import model_info
from auditkit.errors import AuditkitError
from auditkit.models import load_model
from auditkit.models.identity import digest


SPEC = "classes: [a, b, c]\noutput: logits\n"


def save_linear_onnx(path: Path, seed: int = 0, external: bool = True, spec: str | None = SPEC,
                     dynamic_size: bool = False) -> Path:
    """A 16x16 grayscale NCHW linear classifier, its weights in `<name>.data` beside it when `external`, its
    `spec` in model.yaml beside it (None: no spec file); `dynamic_size`: the input's height and width unnamed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(256, 3)).astype(np.float32)
    shape = ["N", 1, "H", "W"] if dynamic_size else ["N", 1, 16, 16]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data",
                    size_threshold=0)
    if spec is not None:
        (path.parent / "model.yaml").write_text(spec)
    return path


def test_tampering_with_external_onnx_weights_changes_the_recorded_digest(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx")
    before = model_info(load_model(path))
    assert sorted(before.sha256) == ["m.onnx", "m.onnx.data", "model.yaml"]
    assert before.digest == digest(before.sha256)

    data = tmp_path / "m.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x80  # one sign bit of one weight
    data.write_bytes(bytes(raw))
    after = model_info(load_model(path))
    assert after.sha256["m.onnx"] == before.sha256["m.onnx"]
    assert after.sha256["m.onnx.data"] != before.sha256["m.onnx.data"]
    assert after.digest != before.digest


def test_the_spec_sidecar_is_part_of_the_identity(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx", external=False)
    before = model_info(load_model(path))
    (tmp_path / "model.yaml").write_text("classes: [c, b, a]\noutput: logits\n")
    after = model_info(load_model(path))
    assert after.spec_file.endswith("model.yaml") and after.spec["classes"] == ["c", "b", "a"]
    assert after.sha256["m.onnx"] == before.sha256["m.onnx"]
    assert after.digest != before.digest


def test_a_spec_file_given_elsewhere_is_hashed_too(tmp_path):
    path = save_linear_onnx(tmp_path / "m.onnx", external=False)
    other = tmp_path / "specs" / "linear.yaml"
    other.parent.mkdir()
    other.write_text("classes: [x, y, z]\noutput: logits\n")
    info = model_info(load_model(path, spec_file=other))
    assert info.classes == ["x", "y", "z"]
    assert "specs/linear.yaml" in info.sha256


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    import onnx

    path = save_linear_onnx(tmp_path / "m.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    (tmp_path.parent / "elsewhere.data").write_bytes((tmp_path / "m.onnx.data").read_bytes())
    onnx.save_model(proto, str(path))
    with pytest.raises(AuditkitError):
        model_info(load_model(path))


def test_savedmodel_variables_are_hashed(tmp_path):
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.ones((256, 3)))

        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 1], tf.float32)])
        def __call__(self, x):
            return {"probs": tf.nn.softmax(tf.reshape(x, (-1, 256)) @ self.w)}

    module = Linear()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures=module.__call__)
    (tmp_path / "sm" / "model.yaml").write_text("classes: [a, b, c]\n")
    files = model_info(load_model(tmp_path / "sm")).sha256
    assert "saved_model.pb" in files and "model.yaml" in files
    assert any(name.startswith("variables/variables.data") for name in files)
