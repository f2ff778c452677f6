"""The inner step's norm (`step_norm`) is independent of the budget's: both loop backends against a plain numpy
oracle of METHOD.md's loop, and the L2 cell that the normalised step left inert."""
import numpy as np
import pytest

from auditkit.uap.base import AttackSettings
from auditkit.uap.geometry import xi_for
from auditkit.uap.paper import PaperUAP

SIZE, K = 16, 3
CLASSES = ["a", "b", "c"]


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class SoftmaxRegression:
    """p = softmax(W x + b) with analytic input gradients: the oracle's model."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.W = rng.normal(0, 0.3, (SIZE * SIZE, K))
        self.b = rng.normal(0, 0.1, K)

    def probs(self, x):
        return softmax(x.reshape(len(x), -1) @ self.W + self.b)

    def predict(self, x):
        return self.probs(x).argmax(axis=1)

    def ce_grads(self, x, y):
        p = self.probs(x)
        p[np.arange(len(x)), y] -= 1.0
        return (p @ self.W.T).reshape(x.shape)

    def keras(self):
        import keras

        inp = keras.Input((SIZE, SIZE, 1), name="image")
        out = keras.layers.Dense(K, activation="softmax")(keras.layers.Flatten()(inp))
        model = keras.Model(inp, out)
        model.layers[-1].set_weights([self.W.astype(np.float32), self.b.astype(np.float32)])
        return model


class ArrayModel:
    """The oracle's model behind the array interface the numpy loop backend (ONNX's) uses."""

    classes = CLASSES

    def __init__(self, oracle):
        self.oracle = oracle

    def require_gradients(self):
        pass

    def check_images(self, images):
        return np.asarray(images, np.float32)

    def predict(self, x):
        return self.oracle.predict(np.asarray(x, np.float64))

    def log_probs(self, x):
        return np.log(self.oracle.probs(np.asarray(x, np.float64))).astype(np.float32)

    def log_probs_and_gradient(self, x, y):
        x = np.asarray(x, np.float64)
        return self.log_probs(x), self.oracle.ce_grads(x, np.asarray(y)).astype(np.float32)


def oracle_uap(model, X, norm, step_norm, xi, eps, max_iter, clip, target, rng):
    """METHOD.md's loop, literally, one image at a time: the step along step_norm, the projection onto norm's ball."""
    clipf = (lambda v: np.clip(v, 0, 1)) if clip else (lambda v: v)
    y0 = model.predict(X)
    rho = np.zeros(X.shape[1:])

    def fooled(pred, i):
        return pred == target if target is not None else pred != y0[i]

    for _ in range(max_iter):
        for i in rng.permutation(len(X)):
            x = X[i]
            if fooled(model.predict(clipf(x + rho)[None])[0], i):
                continue
            g = model.ce_grads(clipf(x + rho)[None], [target if target is not None else y0[i]])[0]
            d = np.sign(g) if step_norm == "inf" else g / np.linalg.norm(g)
            x_adv = clipf(x + rho + (-eps if target is not None else eps) * d)
            if fooled(model.predict(x_adv[None])[0], i):
                v = x_adv - x
                rho = np.clip(v, -xi, xi) if norm == "inf" else v * min(1.0, xi / np.linalg.norm(v))
    return rho


@pytest.fixture(scope="module")
def reg():
    from auditkit.models import keras_adapter

    oracle = SoftmaxRegression(1)
    adapter = keras_adapter(oracle.keras(), "softmax-regression",
                            {"classes": CLASSES, "channels": 1, "output": "softmax"})
    X = np.random.default_rng(2).random((40, SIZE, SIZE)).astype(np.float32)
    return oracle, adapter, X


@pytest.mark.parametrize("norm,step_norm,eps", [("2", "inf", 0.01), ("inf", "2", 0.1), ("2", "2", 0.1)])
@pytest.mark.parametrize("target", [None, "b"])
@pytest.mark.parametrize("backend", ["tf", "numpy"])
def test_both_backends_match_the_oracle_with_the_step_along_its_own_norm(reg, norm, step_norm, eps, target, backend):
    oracle, adapter, X = reg
    model = adapter if backend == "tf" else ArrayModel(oracle)
    xi, _ = xi_for(X, norm, 0.05)
    expected = oracle_uap(oracle, X.astype(np.float64), norm, step_norm, xi, eps, 4, True,
                          None if target is None else CLASSES.index(target), np.random.default_rng(7))
    settings = AttackSettings(kind="nontargeted" if target is None else "targeted", target=target, norm=norm,
                              zeta=0.05, eps=eps, step_norm=step_norm, max_iter=4, delta=0.0)
    for speculative in (False, True):
        result = PaperUAP(settings, speculative=speculative, stop_at_fixed_point=False).craft(
            model, X, xi, np.random.default_rng(7))
        assert np.abs(result.rho).max() > 0, "the attack moved nothing: the comparison would be vacuous"
        np.testing.assert_allclose(result.rho, expected, atol=1e-5)


def test_the_step_norm_is_in_the_cell_key_only_where_it_is_not_the_default():
    cell = dict(kind="nontargeted", norm="2", zeta=0.02)
    assert AttackSettings(**cell).key == "nontargeted_2_z0.02"
    assert AttackSettings(**cell, step_norm="2").key == "nontargeted_2_z0.02_step2"
    assert AttackSettings(**cell, step_norm="L2").step_norm == "2"


def test_the_default_l2_cell_moves_and_beats_random_where_the_normalised_step_stays_inert():
    """policies/quick.yaml's sizes on the built-in default model: the paper's eps 0.001 with a normalised step never
    flips an image (rho stays 0); the authors' signed step does, and beats a random vector of the same norm."""
    from auditkit.models import load_model
    from auditkit.phantoms import default_phantom_manifest
    from auditkit.data import Preprocess, load_dataset
    from auditkit.uap.base import cell_rng
    from auditkit.uap.geometry import perturb, random_control

    model = load_model("covidnet_small")
    size = model.spec.input_size
    data = load_dataset(default_phantom_manifest(), model.classes, preprocess=Preprocess(size=size, crop_top=1 / 6))
    rng = np.random.default_rng(0)
    train, test = data.subset("train"), data.subset("test")
    X = train.take(np.sort(rng.choice(len(train), 96, replace=False))).floats()
    T = test.take(np.sort(rng.choice(len(test), 48, replace=False))).floats()
    xi, _ = xi_for(X, "2", 0.02)
    rates = {}
    for step_norm in ("2", "inf"):
        settings = AttackSettings(kind="nontargeted", norm="2", zeta=0.02, step_norm=step_norm, max_iter=3)
        rho = PaperUAP(settings).craft(model, X, xi, cell_rng(0, settings.key)).rho
        rates[step_norm] = float(np.linalg.norm(rho)), np.mean(model.predict(perturb(T, rho, True)) != model.predict(T))
    noise = random_control(X.shape[1:], "2", xi, np.random.default_rng(1))
    noise_rate = np.mean(model.predict(perturb(T, noise, True)) != model.predict(T))
    assert rates["2"][0] == 0.0
    assert rates["inf"][0] >= xi / 2
    assert rates["inf"][1] > noise_rate + 0.1
