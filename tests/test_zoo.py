import json
import shutil

import numpy as np
import pytest

from auditkit.data import Preprocess, load_dataset
from auditkit.errors import AuditkitError
from auditkit.models import zoo
from auditkit.phantoms import DEFAULT_PARAMS, generate_phantoms
from auditkit.training import TRAIN_PREPROCESS

keras = pytest.importorskip("keras")


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_models_build_with_image_input_and_softmax_output(name):
    model = zoo.build_model(name)
    assert model.inputs[0].name == "image"
    assert tuple(model.input_shape) == (None, 224, 224, 1)
    assert tuple(model.output_shape) == (None, 3)
    probs = np.asarray(model(np.random.default_rng(0).random((2, 224, 224, 1), dtype=np.float32)))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (probs >= 0).all()
    assert zoo.ZOO[name].classes == ("normal", "pneumonia", "COVID-19")


def test_initialisation_is_fixed_by_the_seed():
    a, b, c = (zoo.build_model("covidnet_small", input_size=64, seed=s) for s in (3, 3, 4))
    wa, wb, wc = (m.get_weights() for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc))


def test_count_flops_matches_a_hand_count():
    inp = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)  # 8*8 positions * 3*3*2 * 4 = 4608 MACs
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(x)  # 4*4 * 3*3 * 4*2 = 1152
    x = keras.layers.Dense(3)(x)  # per position: 4*4 * 8*3 = 384
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(5)(x)  # 48 * 5 = 240
    assert zoo.count_flops(keras.Model(inp, out)) == 2 * (4608 + 1152 + 384 + 240)
    small, large = (zoo.count_flops(zoo.build_model(n)) for n in ("covidnet_small", "covidnet_large"))
    assert 0 < small < large


def test_unknown_name_lists_the_zoo():
    for call in (zoo.build_model, zoo.load_zoo_model, zoo.weights_path, zoo.weights_info):
        with pytest.raises(AuditkitError, match="covidnet_small, covidnet_large"):
            call("resnet")


@pytest.fixture(scope="module")
def first_test_phantoms(tmp_path_factory):
    """The first 90 images of the default test split (a smaller balanced split is a prefix of a larger one)."""
    params = DEFAULT_PARAMS | {"n_train": 0, "n_test": 90}
    return generate_phantoms(tmp_path_factory.mktemp("zoo") / "ph", **params)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_shipped_weights_classify_the_phantom_test_split(name, first_test_phantoms):
    info = zoo.weights_info(name)
    assert {"trained_on", "recipe", "epochs", "seed", "test_accuracy", "date", "sha256"} <= set(info)
    assert "phantom" in info["trained_on"]
    data = load_dataset(first_test_phantoms, zoo.ZOO[name].classes, preprocess=Preprocess(**TRAIN_PREPROCESS),
                        cache_dir=False)
    model = zoo.load_zoo_model(name)
    pred = np.argmax(model.predict(data.floats()[..., None], batch_size=45, verbose=0), axis=1)
    assert np.mean(pred == data.labels) >= 0.9


def test_load_checks_weights_exist_and_match_their_sha256(tmp_path, monkeypatch):
    shipped = zoo.WEIGHTS_DIR
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(AuditkitError, match="auditkit zoo train covidnet_small"):
        zoo.load_zoo_model("covidnet_small")
    assert zoo.weights_info("covidnet_small") == {}
    shutil.copy(shipped / "covidnet_small.weights.h5", tmp_path)
    info = json.loads((shipped / "covidnet_small.json").read_text()) | {"sha256": "0" * 64}
    (tmp_path / "covidnet_small.json").write_text(json.dumps(info))
    with pytest.raises(AuditkitError, match="sha256"):
        zoo.load_zoo_model("covidnet_small")


@pytest.mark.slow
def test_quick_policy_runs_end_to_end_on_the_builtin_default(tmp_path):
    """The out-of-the-box command: a zoo model, the shipped quick.yaml, no --data (the built-in phantoms)."""
    from pathlib import Path

    from typer.testing import CliRunner

    from auditkit.cli import app

    policy = Path(__file__).resolve().parents[1] / "policies" / "quick.yaml"
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["run", "--model", "covidnet_small", "--policy", str(policy), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    data = json.loads((out / "results.json").read_text())
    assert data["data"]["synthetic"] is True
    assert data["verdict"] == ("PASS" if result.exit_code == 0 else "FAIL")
    assert {c["attack"]["kind"] for c in data["cells"]} == {"nontargeted", "targeted"}
    html = (out / "report.html").read_text()
    assert "synthetic" in html.lower() and data["verdict"] in html
    assert (out / "junit.xml").is_file()
