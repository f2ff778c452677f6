"""Training a classifier (the zoo's weights): deterministic for a seed, and it learns."""
import numpy as np
import pytest

from auditkit.errors import AuditkitError
from auditkit.training import train_model

keras = pytest.importorskip("keras")


def _tiny_model(seed):
    """A few-layer 3-class CNN: train_model works on any such model, and it traces fast."""
    init = keras.initializers.GlorotUniform
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", kernel_initializer=init(seed))(inp)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization()(x))
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", kernel_initializer=init(seed + 1))(x))


@pytest.mark.slow
def test_train_model_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    x = rng.random((30, 32, 32), dtype=np.float32) * 0.2
    y = np.arange(30) % 3
    x[y == 1] += 0.4  # an easy, learnable cue per class
    x[y == 2, :, 16:] += 0.7
    runs = []
    for _ in range(2):
        model = _tiny_model(1)
        seen = []
        hist = train_model(model, x, y, x, y, epochs=4, batch_size=8, learning_rate=2e-2, seed=5,
                           progress=lambda epoch, logs: seen.append(epoch))
        runs.append((hist, model.get_weights()))
        assert seen == [1, 2, 3, 4] and set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))
    assert runs[0][0]["loss"][-1] < runs[0][0]["loss"][0]
    with pytest.raises(AuditkitError, match="labels"):
        train_model(model, x, y + 3, x, y, epochs=1)
    with pytest.raises(AuditkitError, match="epochs"):
        train_model(model, x, y, x, y, epochs=0)
