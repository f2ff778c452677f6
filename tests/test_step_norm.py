"""The inner step's norm (`step_norm`) is independent of the budget's: both loop backends against a plain numpy
oracle of METHOD.md's loop, and the L2 cell that the normalised step left inert."""
import numpy as np
import pytest

from auditkit.uap.base import AttackSettings
from auditkit.uap.geometry import xi_for
from auditkit.uap.paper import PaperUAP

from oracle import SoftmaxRegression, oracle_uap

SIZE = 16
CLASSES = ["a", "b", "c"]


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


@pytest.fixture(scope="module")
def reg():
    from auditkit.models import keras_adapter

    oracle = SoftmaxRegression(1, SIZE, scale=0.3)
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
    expected = oracle_uap(oracle, X.astype(np.float64), norm, xi, eps, 4, 0.0, True,
                          None if target is None else CLASSES.index(target), np.random.default_rng(7), step_norm)
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


@pytest.mark.slow
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
