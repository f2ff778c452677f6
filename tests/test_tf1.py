"""TF1 meta-graph checkpoints (COVIDNet-CXR's release format) as white-box models."""
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.errors import AuditkitError
from auditkit.models import load_model

SPEC = "classes: [normal, pneumonia, COVID-19]\ninput: input_1:0\nlogits: dense_3/MatMul:0\n"
runner = CliRunner()


def save_tf1_checkpoint(folder: Path, *, use_resource: bool = True, py_func: bool = False) -> Path:
    """A small TF1 graph (two convolutions, a dense layer; 16x16x3 input) saved as COVID-Net was released:
    model.meta beside model-7.index / model-7.data-*, and a model.yaml naming its tensors."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        init = tf.compat.v1.glorot_uniform_initializer(seed=0)

        def var(name, shape):
            return tf.compat.v1.get_variable(name, shape, initializer=init, use_resource=use_resource)

        x = tf.compat.v1.placeholder(tf.float32, [None, 16, 16, 3], name="input_1")
        h = tf.nn.relu(tf.nn.conv2d(x, var("conv1/kernel", [3, 3, 3, 8]), strides=2, padding="SAME")
                       + var("conv1/bias", [8]))
        h = tf.nn.relu(tf.nn.conv2d(h, var("conv2/kernel", [3, 3, 8, 8]), strides=2, padding="SAME"))
        flat = tf.reshape(h, [-1, 128])
        if py_func:
            flat = tf.compat.v1.py_func(lambda a: a, [flat], tf.float32)
            flat.set_shape([None, 128])
        logits = tf.matmul(flat, var("dense_3/kernel", [128, 3]), name="dense_3/MatMul")
        tf.nn.softmax(logits, name="dense_3/Softmax")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(folder / "model"), global_step=7, write_meta_graph=False)
            saver.export_meta_graph(str(folder / "model.meta"))
    (folder / "model.yaml").write_text(SPEC)
    return folder / "model.meta"


def session_softmax(meta: Path, images: np.ndarray) -> np.ndarray:
    """The reference: the checkpoint run the TF1 way, in a session with the saver's restore."""
    import tensorflow as tf

    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        saver = tf.compat.v1.train.import_meta_graph(str(meta))
        saver.restore(sess, str(meta.parent / "model-7"))
        return sess.run("dense_3/Softmax:0", {"input_1:0": np.repeat(images[..., None], 3, axis=-1)})


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((5, 16, 16), dtype=np.float32)


@pytest.mark.parametrize("use_resource", [True, False], ids=["resource-variables", "ref-variables"])
def test_a_tf1_checkpoint_predicts_as_the_session_does(tmp_path, images, use_resource):
    meta = save_tf1_checkpoint(tmp_path / "ckpt", use_resource=use_resource)
    model = load_model(meta)
    assert model.format == "tf1-checkpoint" and model.can_craft
    assert model.spec.input_size == 16 and model.spec.channels == 3 and model.spec.output == "logits"
    assert model.parameters == 3 * 3 * 3 * 8 + 8 + 3 * 3 * 8 * 8 + 128 * 3
    np.testing.assert_allclose(model.predict_proba(images), session_softmax(meta, images), atol=1e-6)
    assert sorted(model.sha256()) == ["checkpoint", "model-7.data-00000-of-00001", "model-7.index", "model.meta",
                                      "model.yaml"]


def test_gradients_through_the_imported_graph_match_finite_differences(tmp_path, images):
    model = load_model(save_tf1_checkpoint(tmp_path / "ckpt"))  # the directory stands for its .meta file
    labels = np.array([0, 1, 2, 0, 1])
    grad = model.loss_gradient(images, labels)
    rng = np.random.default_rng(0)
    for _ in range(3):
        i, r, c = rng.integers(5), rng.integers(16), rng.integers(16)
        h = 1e-2
        up, down = images.copy(), images.copy()
        up[i, r, c] += h
        down[i, r, c] -= h

        def loss(x):
            return -np.log(model.predict_proba(x)[i, labels[i]])

        assert grad[i, r, c] == pytest.approx((loss(up) - loss(down)) / (2 * h), rel=0.05, abs=1e-4)


def test_a_python_callback_in_the_graph_is_refused(tmp_path):
    meta = save_tf1_checkpoint(tmp_path / "ckpt", py_func=True)
    with pytest.raises(AuditkitError, match="PyFunc op"):
        load_model(meta)


def test_missing_tensor_names_say_which_keys_to_set(tmp_path):
    meta = save_tf1_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.yaml").write_text("classes: [a, b, c]\n")
    with pytest.raises(AuditkitError, match="`input` and `logits` or `probabilities`"):
        load_model(meta)
    (tmp_path / "ckpt" / "model.yaml").write_text("classes: [a, b, c]\ninput: input_1:0\nlogits: nope:0\n")
    with pytest.raises(AuditkitError, match="no tensor nope:0"):
        load_model(meta)


@pytest.mark.slow
def test_a_tf1_checkpoint_audits_through_the_cli(tmp_path):
    meta = save_tf1_checkpoint(tmp_path / "ckpt")
    policy = tmp_path / "p.yaml"
    policy.write_text("""version: 1
seed: 2
data:
  max_images: {train: 24, test: 24}
attacks:
  - kinds: [nontargeted, targeted]
    targets: [COVID-19]
    norms: [inf]
    zetas: [0.1]
    eps: 0.01
    max_iter: 2
random_controls: {draws: 1}
thresholds:
  - metric: flip_rate
    split: test
    max: 1.0
report: {title: tf1, formats: [json]}
""")
    res = runner.invoke(app, ["run", "-m", str(meta), "-p", str(policy), "-o", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res.exit_code == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 4}[result["verdict"]], res.output
    assert result["model"]["format"] == "tf1-checkpoint"
    assert result["model"]["spec"]["logits"] == "dense_3/MatMul:0"
    assert "model-7.index" in result["model"]["sha256"]
    assert all(cell["gradient_steps"] > 0 for cell in result["cells"])
