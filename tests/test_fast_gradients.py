"""The UAP loop's cheaper convolution input gradients: the right convolutions are rewritten, the forward pass is
unchanged, and the gradients equal TF's own."""
import numpy as np
import pytest

from auditkit.models import keras as auditkit_keras
from auditkit.models import keras_adapter
from auditkit.models.fast_gradients import FLIPPED, MATMUL, PATCHES, with_fast_input_gradients
from auditkit.models.tf_runtime import configure_tensorflow, freeze

# layer name -> the input gradient it should get (None: TF's own)
EXPECTED = {"patches": PATCHES, "pointwise": MATMUL, "square": FLIPPED, "oblong": FLIPPED, "strided": None,
            "leftover": None, "even": None, "dilated": None, "valid3": None}


@pytest.fixture(scope="module")
def convnet():
    """Every kind of Conv2D the rewrite must take or leave, in one small model."""
    configure_tensorflow()
    import keras
    from keras import layers

    image = keras.Input((32, 32, 1), name="image")
    x = layers.Conv2D(6, 4, strides=4, name="patches")(image)  # 8x8
    x = layers.Conv2D(6, 1, activation="relu", name="pointwise")(x)
    x = layers.Conv2D(6, 3, padding="same", name="square")(x)
    x = layers.Conv2D(6, (3, 5), padding="same", activation="tanh", name="oblong")(x)
    x = layers.Conv2D(6, 2, padding="same", name="even")(x)
    x = layers.Conv2D(6, 3, padding="same", dilation_rate=2, name="dilated")(x)
    x = layers.Conv2D(6, 3, name="valid3")(x)  # 6x6
    x = layers.Conv2D(6, 3, strides=2, padding="same", name="strided")(x)  # 3x3
    x = layers.Conv2D(6, 2, strides=2, name="leftover")(x)  # 1x1: a row and a column of 3x3 left over
    x = layers.GlobalAveragePooling2D()(layers.Concatenate()([x, x]))
    probs = layers.Dense(3, activation="softmax")(x)
    return keras.Model(image, probs)


def _frozen(tf, model):
    spec = tf.TensorSpec((None, 32, 32, 1), tf.float32)
    traced = tf.function(lambda x: model(x, training=False), autograph=False).get_concrete_function(spec)
    return freeze(traced)


def _input_gradient(tf, forward, x, labels):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = -tf.math.log(tf.gather(forward(x), labels, axis=1, batch_dims=1))
    return tape.gradient(loss, x).numpy()


def test_eligible_convolutions_get_cheaper_gradients_equal_to_tfs(convnet):
    tf = configure_tensorflow()
    frozen = _frozen(tf, convnet)
    fast, kinds = with_fast_input_gradients(frozen, tf)
    by_layer = {name.split("/")[-2].rsplit("_", 1)[0]: kind for name, kind in kinds.items()}
    assert by_layer == {layer: kind for layer, kind in EXPECTED.items() if kind}

    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((5, 32, 32, 1), dtype=np.float32))
    labels = tf.constant([0, 1, 2, 0, 1])
    np.testing.assert_array_equal(fast(x)[0].numpy(), frozen(x)[0].numpy())  # the forward pass is untouched
    reference = _input_gradient(tf, lambda v: convnet(v, training=False), x, labels)
    np.testing.assert_allclose(_input_gradient(tf, lambda v: fast(v)[0], x, labels), reference,
                               rtol=1e-4, atol=1e-6 * np.abs(reference).max())


def test_the_adapter_loop_runs_the_rewritten_model(convnet, monkeypatch):
    tf = configure_tensorflow()
    seen = []

    def spy(frozen, tf_module):
        function, kinds = with_fast_input_gradients(frozen, tf_module)
        seen.append(kinds)
        return function, kinds

    monkeypatch.setattr(auditkit_keras, "with_fast_input_gradients", spy)
    adapter = keras_adapter(convnet, spec_overrides={"classes": ["a", "b", "c"]})
    _, log_probs = adapter.loop_log_probs()
    assert len(seen) == 1 and len(seen[0]) == sum(kind is not None for kind in EXPECTED.values())

    images = tf.constant(np.random.default_rng(1).random((4, 32, 32), dtype=np.float32))
    labels = tf.constant([2, 1, 0, 2])
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = -tf.gather(log_probs(images), labels, axis=1, batch_dims=1)
    loop_gradient = tape.gradient(loss, images).numpy()
    np.testing.assert_allclose(loop_gradient, adapter.loss_gradient(images.numpy(), labels.numpy()),
                               rtol=1e-4, atol=1e-6 * np.abs(loop_gradient).max())


def test_a_model_whose_frozen_graph_cannot_be_differentiated_runs_unfrozen_in_the_loop():
    """Keras' grouped convolution is an XLA-compiled function call, which TF cannot differentiate once the model is
    frozen: the loop then runs the model as it is, with the same gradients as the adapter's."""
    tf = configure_tensorflow()
    import keras
    from keras import layers

    image = keras.Input((16, 16, 1), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="widen")(image)
    x = layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)
    probs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    adapter = keras_adapter(keras.Model(image, probs), spec_overrides={"classes": ["a", "b", "c"]})
    images = tf.constant(np.random.default_rng(2).random((3, 16, 16), dtype=np.float32))
    labels = tf.constant([0, 2, 1])
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = -tf.gather(adapter.loop_log_probs()[1](images), labels, axis=1, batch_dims=1)
    np.testing.assert_allclose(tape.gradient(loss, images).numpy(),
                               adapter.loss_gradient(images.numpy(), labels.numpy()), rtol=1e-5, atol=1e-7)
