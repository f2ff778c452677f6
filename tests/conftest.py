"""Shared fixtures: a small phantom dataset and a tiny trained CNN (32x32), built once per session."""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("normal", "pneumonia", "COVID-19")
TINY_SIZE = 32


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's ~/.cache/auditkit."""
    monkeypatch.setenv("AUDITKIT_CACHE", str(tmp_path_factory.getbasetemp() / "auditkit-cache"))


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    from auditkit.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms") / "set", n_train=120, n_test=60, size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, phantom_manifest) -> Path:
    """A 32x32 CNN trained for a few epochs on the phantoms, saved as .keras with its model.yaml."""
    import keras

    from auditkit.data import Preprocess, load_dataset

    data = load_dataset(phantom_manifest, CLASSES, preprocess=Preprocess(size=TINY_SIZE, crop_top=1 / 6),
                        cache_dir=False).subset("train")
    keras.utils.set_random_seed(0)
    inp = keras.Input((TINY_SIZE, TINY_SIZE, 1), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(data.floats()[..., None], data.labels, epochs=4, batch_size=32, verbose=0)
    d = tmp_path_factory.mktemp("tiny")
    model.save(d / "tiny.keras")
    (d / "tiny.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return d / "tiny.keras"


def write_policy(path: Path, *, thresholds: str = "", extra_data: str = "", classes=CLASSES) -> Path:
    """A quick policy for a tiny model: small subsets, 2 passes, 2 random draws."""
    cls = ", ".join(f'"{c}"' for c in classes)
    path.write_text(f"""version: 1
seed: 5
data:
  classes: [{cls}]
  preprocess: {{crop_top: 0.16666667}}
  max_images: {{train: 60, test: 30}}
{extra_data}
attacks:
  - kinds: [nontargeted, targeted]
    targets: ["{classes[2]}"]
    norms: [inf, 2]
    zetas: [0.04]
    eps: 0.01
    max_iter: 2
random_controls: {{draws: 2}}
thresholds:
{thresholds or '''  - metric: fooling_rate
    split: test
    max: 1.0'''}
report: {{title: "test audit", formats: [html, json, junit]}}
""")
    return path


def json_without_times(path: Path) -> dict:
    import json

    data = json.loads(path.read_text())
    prov = data["provenance"]
    for k in ("started", "finished", "seconds", "command"):
        prov.pop(k)
    for cell in data["cells"]:
        cell.pop("seconds")
    return data


np.set_printoptions(precision=4)
