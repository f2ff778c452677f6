"""Adversarial retraining on the tiny phantom CNN: robustness gain, artefacts, ONNX parity, resume, refusals."""
import dataclasses
import json

import numpy as np
import pytest

from auditkit import metrics as M
from auditkit.errors import AuditkitError
from auditkit.harden import harden
from auditkit.models import keras_adapter, load_model
from auditkit.policy import AttackGrid, Hardening, HardeningAttack
from auditkit.uap.base import SGDSettings
from auditkit.uap.geometry import perturb, xi_for
from auditkit.uap.paper import PaperUAP

from conftest import CLASSES, attack_settings

SIZE = 32
CENTRES = ((9, 9), (9, 22), (23, 16))  # each class: one bright blob at its own place
TARGET = 2  # COVID-19
# Targeted: retraining against one target direction reliably removes it within 2 short rounds. Nontargeted
# UAPs of a tiny model collapse onto whichever class is weakest, which moves from round to round.
SETTINGS = Hardening(enabled=True, rounds=2, uaps_per_round=2, epochs=1, learning_rate=2e-3, batch_size=16,
                     attack=HardeningAttack(kind="targeted", target=CLASSES[TARGET], zeta=0.1, eps=0.05, max_iter=3))
UAP = dict(eps=0.05, max_iter=3)
SEED = 11


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Separable synthetic images: a Gaussian blob at the class's place (jittered) on a noisy background."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.arange(n) % 3
    images = 0.45 + 0.03 * rng.standard_normal((n, SIZE, SIZE))
    for i, c in enumerate(labels):
        cy, cx = np.array(CENTRES[c]) + rng.integers(-2, 3, 2)
        images[i] += rng.uniform(0.4, 0.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
    return np.clip(images, 0, 1).astype(np.float32), labels


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(3)
    return (*blobs(120, rng), *blobs(60, rng))


def tiny_cnn():
    import keras

    keras.utils.set_random_seed(3)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    return keras.Model(image, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))


@pytest.fixture(scope="module")
def base(splits):
    """A tiny CNN trained briefly: accurate, but a targeted UAP moves nearly every image to COVID-19."""
    import keras

    model = tiny_cnn()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(splits[0][..., None], splits[1], epochs=3, batch_size=16, verbose=0)
    return keras_adapter(model, "tiny", {"classes": list(CLASSES)})


@pytest.fixture(scope="module")
def untrained():
    """The same CNN, not trained: enough where hardening refuses before it retrains (the fast suite)."""
    return keras_adapter(tiny_cnn(), "tiny", {"classes": list(CLASSES)})


@pytest.fixture(scope="module")
def hardened(base, splits, tmp_path_factory):
    """One uninterrupted run: (weights of the original before, hardened adapter, record, out_dir, log lines)."""
    before = [w.copy() for w in base.model.get_weights()]
    out, lines = tmp_path_factory.mktemp("hardened"), []
    adapter, record = harden(base, *splits, SETTINGS, seed=SEED, out_dir=out, log=lines.append)
    return before, adapter, record, out, lines


def fresh_uap_success(model, images) -> float:
    """R_s on `images` of a targeted UAP crafted against `model` on them, with a fixed visiting order."""
    zeta = SETTINGS.attack.zeta
    xi, _ = xi_for(images, "inf", zeta)
    attack = PaperUAP(attack_settings("inf", CLASSES[TARGET], zeta=zeta, **UAP))
    rho = attack.craft(model, images, xi, np.random.default_rng(0)).rho
    return M.targeted_success_rate(model.predict(perturb(images, rho, True)), TARGET).value


@pytest.mark.slow
def test_hardening_lowers_fresh_uap_success_and_leaves_the_original_alone(base, hardened, splits):
    before, adapter, _, _, _ = hardened
    assert all(np.array_equal(a, b) for a, b in zip(before, base.model.get_weights(), strict=True))
    assert adapter.model is not base.model
    r_before, r_after = fresh_uap_success(base, splits[0]), fresh_uap_success(adapter, splits[0])
    assert r_before > 0.8 and r_after < r_before - 0.3, (r_before, r_after)


@pytest.mark.slow
def test_record_rounds_and_artefacts(hardened, splits):
    _, adapter, record, out, lines = hardened
    test_x, test_y = splits[2:]
    assert [r.round for r in record.rounds] == [0, 1, 2]
    assert record.rounds[0].train_loss == [] and all(len(r.train_loss) == SETTINGS.epochs for r in record.rounds[1:])
    assert record.metric == "targeted_success_rate"
    assert record.rounds[-1].attack_rate.count == np.array(record.final_confusion)[:, TARGET].sum()
    assert np.array(record.final_confusion).sum() == len(test_y)
    assert record.rounds[-1].clean_accuracy == M.accuracy(test_y, adapter.predict(test_x))
    assert record.settings["eps"] == UAP["eps"] and record.settings["seed"] == SEED
    assert [line.split(":")[0] for line in lines] == ["round 0/2 (before retraining)", "round 1/2", "round 2/2"]
    json.dumps(dataclasses.asdict(record), allow_nan=False)  # JSON-friendly
    reloaded = load_model(out / record.keras_file)
    assert reloaded.classes == CLASSES
    np.testing.assert_array_equal(reloaded.predict_proba(test_x), adapter.predict_proba(test_x))
    assert (out / "hardening" / "round-2.weights.h5").is_file()


@pytest.mark.slow
def test_onnx_export_matches_keras(hardened, splits):
    _, adapter, record, out, _ = hardened
    test_x = splits[2]
    assert record.onnx_file == "hardened.onnx"
    assert record.parity["passed"] and record.parity["max_abs_prob_diff"] <= 1e-4
    assert record.parity["argmax_agreement"] == 1.0 and record.parity["n"] == len(test_x)
    onnx = load_model(out / record.onnx_file)
    assert onnx.format == "onnx" and onnx.classes == CLASSES
    np.testing.assert_allclose(onnx.predict_proba(test_x), adapter.predict_proba(test_x), atol=1e-4)


@pytest.mark.slow
def test_resume_after_an_interrupted_round_gives_the_same_weights(base, hardened, splits, tmp_path):
    _, reference, record, _, _ = hardened

    def interrupt_after_round_1(line: str) -> None:
        if line.startswith("round 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harden(base, *splits, SETTINGS, seed=SEED, out_dir=tmp_path, log=interrupt_after_round_1)
    assert not (tmp_path / "hardened.keras").exists()
    state = json.loads((tmp_path / "hardening" / "state.json").read_text())
    assert [e["record"]["round"] for e in state["rounds"]] == [0, 1]

    lines = []
    resumed, again = harden(base, *splits, SETTINGS, seed=SEED, out_dir=tmp_path, log=lines.append)
    assert lines[0].startswith("resuming after round 1/2")
    assert not any(line.startswith(("round 0/2", "round 1/2")) for line in lines)
    for a, b in zip(resumed.model.get_weights(), reference.model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert [(r.attack_rate, r.clean_accuracy, r.train_loss) for r in again.rounds] == \
        [(r.attack_rate, r.clean_accuracy, r.train_loss) for r in record.rounds]


@pytest.mark.slow
def test_nontargeted_round_records_the_fooling_rate(base, splits, tmp_path):
    settings = SETTINGS.model_copy(update={"rounds": 1, "uaps_per_round": 1,
                                           "attack": HardeningAttack(zeta=SETTINGS.attack.zeta, **UAP)})
    _, record = harden(base, *splits, settings, seed=SEED, out_dir=tmp_path)
    assert record.metric == "fooling_rate" and [r.round for r in record.rounds] == [0, 1]
    conf = np.array(record.final_confusion)
    assert record.rounds[-1].attack_rate.count == conf.sum() - np.trace(conf)  # R_f: prediction != true label


@pytest.mark.slow
def test_sgd_hardening_on_subsets_lowers_fresh_uap_success(base, splits, tmp_path):
    attack = SETTINGS.attack.model_copy(update={"algorithm": "sgd", "max_iter": 20, "craft_images": 60,
                                                "sgd": SGDSettings(batch_size=16)})
    settings = SETTINGS.model_copy(update={"attack": attack})
    adapter, record = harden(base, *splits, settings, seed=SEED, out_dir=tmp_path)
    assert record.settings["algorithm"] == "sgd" and record.settings["sgd"]["batch_size"] == 16
    assert record.settings["attack"]["craft_images"] == 60 and record.settings["max_iter"] == 20
    first, last = record.rounds[0].attack_rate.value, record.rounds[-1].attack_rate.value
    assert last < first - 0.2, (first, last)
    assert fresh_uap_success(adapter, splits[0]) < fresh_uap_success(base, splits[0])


def test_unset_crafting_settings_come_from_the_first_grid():
    grid = AttackGrid(kinds=["nontargeted"], norms=["2"], zetas=[0.01], eps=0.004, max_iter=7, delta=0.1, clip=False,
                      algorithm="blackbox")
    cell = HardeningAttack(max_iter=2).settings(grid)
    assert (cell.eps, cell.max_iter, cell.delta, cell.clip, cell.norm, cell.zeta) == (0.004, 2, 0.1, False, "inf", 0.02)
    # a black-box grid lends no algorithm to retraining
    assert cell.algorithm == "paper" and cell.algorithm_settings is None
    sgd = HardeningAttack(algorithm="sgd").settings(AttackGrid(kinds=["nontargeted"], norms=["inf"], zetas=[0.02]))
    assert sgd.algorithm == "sgd" and sgd.sgd.batch_size == 32 and sgd.max_iter == 15
    with pytest.raises(ValueError, match="sgd settings are given but algorithm is None"):
        HardeningAttack(sgd={"batch_size": 8})


@pytest.mark.slow
def test_a_model_that_cannot_be_trained_is_refused(hardened, splits, tmp_path):
    onnx = load_model(hardened[3] / "hardened.onnx")
    with pytest.raises(AuditkitError, match="hardening needs a Keras model .* hardened is onnx"):
        harden(onnx, *splits, SETTINGS, seed=0, out_dir=tmp_path)


def test_unknown_target_class_is_refused(untrained, splits, tmp_path):
    settings = SETTINGS.model_copy(update={"attack": HardeningAttack(kind="targeted", target="covid")})
    with pytest.raises(AuditkitError, match="unknown class 'covid'") as err:
        harden(untrained, *splits, settings, seed=0, out_dir=tmp_path)
    assert err.value.where == "hardening.attack.target"
