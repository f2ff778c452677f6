"""Model adapters: Keras, SavedModel and ONNX agree; specs are read and validated; bad models give one line."""
import numpy as np
import pytest

from auditkit.errors import AuditkitError
from auditkit.models import load_model

SIZE = 32


def tiny_cnn(channels=3, softmax=True, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, channels), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax" if softmax else None)(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((10, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def keras_and_onnx(tmp_path_factory):
    import tensorflow as tf
    import tf2onnx

    d = tmp_path_factory.mktemp("m")
    model = tiny_cnn(channels=3)
    model.save(d / "cnn.keras")
    (d / "cnn.yaml").write_text("classes: [normal, pneumonia, COVID-19]\nscale: 255.0\nmean: [120.0]\nstd: [60.0]\n")
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(d / "cnn.onnx"))
    return d


def test_keras_and_its_onnx_export_agree_through_the_adapters(keras_and_onnx, images):
    k = load_model(keras_and_onnx / "cnn.keras")
    o = load_model(keras_and_onnx / "cnn.onnx")
    assert k.classes == o.classes == ("normal", "pneumonia", "COVID-19")
    assert (k.spec.scale, k.spec.mean, k.spec.std) == (255.0, (120.0,), (60.0,))
    assert k.spec.channels == o.spec.channels == 3 and o.spec.output == "softmax"
    pk, po = k.predict_proba(images), o.predict_proba(images)
    np.testing.assert_allclose(pk, po, atol=1e-4)
    assert pk.shape == (10, 3) and np.allclose(pk.sum(1), 1, atol=1e-5)
    assert k.can_craft and o.can_craft  # ONNX through onnx-ad gradients, self-checked on load


def test_preprocessing_is_applied_as_declared(keras_and_onnx, images):
    import keras

    k = load_model(keras_and_onnx / "cnn.keras")
    raw = keras.saving.load_model(keras_and_onnx / "cnn.keras", safe_mode=True)
    manual = (np.repeat(images[..., None], 3, axis=-1) * 255.0 - 120.0) / 60.0
    np.testing.assert_allclose(k.predict_proba(images), raw.predict(manual, verbose=0), atol=1e-5)


def test_image_space_gradient_matches_finite_differences(images):
    from auditkit.models import keras_adapter

    m = keras_adapter(tiny_cnn(channels=1, softmax=False, seed=3), "logits-cnn",
                      {"classes": ["a", "b", "c"], "scale": 2.0, "mean": [0.5]})
    assert m.spec.output == "logits" and m.spec.channels == 1
    x, y = images[:2].astype(np.float64), np.array([0, 2])
    g = m.loss_gradient(x, y)
    rng = np.random.default_rng(1)
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        d /= np.linalg.norm(d)
        h = 1e-2

        def loss(z):
            p = m.predict_proba(z.astype(np.float32))
            return -np.log(p[np.arange(2), y]).sum()

        fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
        assert np.sum(g * d) == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_savedmodel_export_matches_keras(tmp_path, images):
    from auditkit.models import keras_adapter

    model = tiny_cnn(channels=1, softmax=False, seed=4)
    model.export(tmp_path / "sm", verbose=False)
    (tmp_path / "sm" / "model.yaml").write_text("classes: [a, b, c]\n")
    sm = load_model(tmp_path / "sm")
    assert sm.format == "savedmodel" and sm.spec.output == "logits" and sm.spec.input_size == SIZE
    k = keras_adapter(model, "k", {"classes": ["a", "b", "c"]})
    np.testing.assert_allclose(sm.predict_proba(images), k.predict_proba(images), atol=1e-5)
    np.testing.assert_allclose(sm.loss_gradient(images[:3], [0, 1, 2]), k.loss_gradient(images[:3], [0, 1, 2]),
                               atol=1e-5)


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "missing.keras", "no such model file"),
    (lambda d: (d / "junk.keras").write_bytes(b"not a zip") and d / "junk.keras", "not a model file"),
    (lambda d: (d / "junk.onnx").write_bytes(b"\x00garbage") and d / "junk.onnx", "not a model file: not an ONNX protobuf"),
    (lambda d: (d / "m.h5").write_bytes(b"x") and d / "m.h5", "legacy HDF5"),
    (lambda d: (d / "m.pt").write_bytes(b"x") and d / "m.pt", "unknown model format"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "not a TF SavedModel"),
])
def test_bad_models_give_one_clear_line(tmp_path, setup, message):
    with pytest.raises(AuditkitError, match=message) as err:
        load_model(setup(tmp_path))
    assert "\n" not in str(err.value)


def test_bad_spec_values_name_the_key(keras_and_onnx, tmp_path):
    with pytest.raises(AuditkitError, match=r"channels: must be 1 or 3, got 2"):
        load_model(keras_and_onnx / "cnn.keras", {"channels": 2})
    with pytest.raises(AuditkitError, match=r"unknown model spec key 'colour'"):
        load_model(keras_and_onnx / "cnn.keras", {"colour": "red"})


@pytest.mark.parametrize("name", ["cnn.keras", "cnn.onnx"])
@pytest.mark.parametrize("override, message", [
    ({"classes": ["a", "b"]}, r"number of classes 2, but the model's graph has 3"),
    ({"input_size": 64}, r"input size 64, but the model's graph has 32"),
])
def test_a_spec_that_contradicts_the_graph_is_refused(keras_and_onnx, name, override, message):
    with pytest.raises(AuditkitError, match=message):
        load_model(keras_and_onnx / name, override)


def test_unsafe_keras_lambda_is_refused(tmp_path):
    import keras

    inp = keras.Input((SIZE, SIZE, 1), name="image")
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2)(inp)))
    keras.Model(inp, out).save(tmp_path / "lambda.keras")
    with pytest.raises(AuditkitError, match="cannot load Keras model"):
        load_model(tmp_path / "lambda.keras", {"classes": ["a", "b", "c"]})


def test_a_graph_function_is_traced_once_and_computes_what_its_function_does():
    from auditkit.models.tf_runtime import GraphFunction, configure_tensorflow

    tf = configure_tensorflow()
    traces = []

    def scaled_sum(x, k):
        traces.append(1)  # runs only while tracing
        return tf.reduce_sum(x, axis=1) * k

    fn = GraphFunction(tf, scaled_sum, [tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([], tf.float32)])
    for rows in (1, 4, 7):  # different batch sizes fit the one signature
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        np.testing.assert_array_equal(fn(x, np.float32(2)).numpy(), x.sum(axis=1) * 2)
    assert len(traces) == 1
    with pytest.raises((TypeError, ValueError)):
        fn(np.zeros((2, 4), np.float32), np.float32(1))  # outside the signature: refused, not retraced
