"""The small cxr3 CNN shared by tests/test_cxr3.py and benchmarks/bench_uap.py: trained once, cached on disk.

Not part of the package: a test/benchmark fixture. The benchmark imports it by putting tests/ on sys.path.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np

from auditkit.data import Dataset, Preprocess, default_cache_dir, load_dataset
from auditkit.models import keras_adapter
from auditkit.models.tf_runtime import configure_tensorflow, op_determinism

CXR3 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr3"
CLASSES = ("normal", "pneumonia", "COVID-19")
RECIPE = {"size": 64, "crop_top": 1 / 6, "filters": [16, 32, 64, 64], "dense": 32, "epochs": 10, "batch_size": 32,
          "learning_rate": 2e-3, "seed": 0}
PREPROCESS = Preprocess(size=RECIPE["size"], crop_top=RECIPE["crop_top"])


def cxr3_missing_reason() -> str | None:
    """Why the cxr3 tests/benchmark cannot run here, or None."""
    if not (CXR3 / "manifest.csv").is_file():
        return f"real chest X-ray set not found at {CXR3} (expected ../shared/data/cxr3 next to the repo)"
    return None


def load_cxr3(preprocess: Preprocess = PREPROCESS, cache_dir=None) -> Dataset:
    """cxr3 preprocessed at `preprocess` (default 64x64, top 1/6 cropped), through auditkit's disk cache."""
    return load_dataset(CXR3 / "manifest.csv", CLASSES, preprocess=preprocess, cache_dir=cache_dir)


def build_cnn(recipe: dict = RECIPE):
    """Functional CNN: named input "image" (size, size, 1) in [0, 1] -> softmax over the 3 classes.

    Strided conv + batch norm blocks and a flatten head, as in COVID-Net; global pooling instead of flatten gives
    a model that resists universal perturbations far more at 64x64 (a fixed pattern meets varying positions).
    """
    configure_tensorflow()
    import keras
    from keras import layers

    size = recipe["size"]
    image = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(2.0, offset=-1.0)(image)
    for i, filters in enumerate(recipe["filters"]):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(layers.BatchNormalization(name=f"bn{i}")(x))
    x = layers.Flatten()(x)
    x = layers.Dense(recipe["dense"], activation="relu")(x)
    out = layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
    return keras.Model(image, out, name="cxr3_cnn")


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seeded, deterministic TF ops for the duration; op determinism is switched back off afterwards."""
    import keras

    configure_tensorflow()
    keras.utils.set_random_seed(seed)
    with op_determinism():
        yield


def train_cnn(train: Dataset, recipe: dict = RECIPE):
    """A freshly built CNN fitted on `train` (deterministic for a given recipe and data)."""
    import keras

    with _deterministic(recipe["seed"]):
        model = build_cnn(recipe)
        model.compile(optimizer=keras.optimizers.Adam(recipe["learning_rate"]),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(train.floats()[..., None], train.labels, batch_size=recipe["batch_size"],
                  epochs=recipe["epochs"], shuffle=True, verbose=0)
    return model


def recipe_key(dataset: Dataset, recipe: dict = RECIPE) -> str:
    """Hash of everything that decides the trained weights: recipe, the code above, the manifest and the decoded
    pixels, Keras version."""
    import keras

    code = inspect.getsource(build_cnn) + inspect.getsource(train_cnn)
    blob = json.dumps({"recipe": recipe, "code": code, "manifest": dataset.manifest_sha256,
                       "content": dataset.content_sha256, "keras": keras.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_cnn(dataset: Dataset, cache_dir: str | Path | None = None) -> tuple[object, Path, float | None]:
    """(keras model, its .keras file, training seconds or None if it came from the cache).

    Trains on the dataset's train split on the first call and saves the model under
    `cache_dir` ($AUDITKIT_CACHE or ~/.cache/auditkit by default); later calls reload it.
    """
    import keras

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"cxr3-cnn-{recipe_key(dataset)}.keras"
    if path.is_file():
        configure_tensorflow()
        return keras.saving.load_model(path, compile=False, safe_mode=True), path, None
    start = time.perf_counter()
    model = train_cnn(dataset.subset("train"))
    seconds = time.perf_counter() - start
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.keras")  # Keras insists on the .keras suffix
    model.save(tmp)
    os.replace(tmp, path)
    return model, path, seconds


def cnn_adapter(model):
    """The trained CNN behind auditkit's adapter, with the cxr3 class names."""
    return keras_adapter(model, "cxr3_cnn", {"classes": list(CLASSES)})


def crafting_subset(train: Dataset, n: int, seed: int = 0) -> Dataset:
    """n train images drawn without replacement (seeded): the UAP crafting set."""
    rng = np.random.default_rng(seed)
    return train.take(np.sort(rng.choice(len(train), min(n, len(train)), replace=False)))


def art_uap(keras_model, images: np.ndarray, *, xi: float, eps: float, max_iter: int, clip: bool,
            target: int | None = None, seed: int = 0, norm: float = np.inf) -> tuple[np.ndarray, float]:
    """(rho (H, W), seconds): ART 1.20.1's UniversalPerturbation, or TargetedUniversalPerturbation when `target`
    is given, with the FGSM inner step, set up to match auditkit's PaperUAP (eps, max_iter, clip) at xi.
    `norm` is the projection's (2 or inf); the FGSM step keeps its L-inf norm whatever it is, as the authors'
    code called it (attacker_params with eps only), which is auditkit's default step_norm: inf.

    Matched: ART's `eps` is our xi (projection radius) and its FGSM `eps` our step; delta=1e-6 so that, like
    ours, it runs every pass unless the crafting set is fully flipped (ART's default delta=0.2 stops at 80%);
    its stopping rate is the flip rate (labels = clean predictions) or R_s, as ours; clip_values=(0, 1) when
    clipping, so the FGSM output and the end-of-pass evaluation are clipped.
    Not matched (ART's code): it checks C(x + noise) *unclipped* before each step (we clip x + rho first);
    its loss is Keras' CategoricalCrossentropy on the softmax, which clips p to [1e-7, 1 - 1e-7] so the
    gradient vanishes for extremely confident images (ours floors p at 1e-30); its visiting order comes from
    Python's global `random` (seeded here, state restored), ours from a numpy Generator, so the two UAPs
    differ and only their rates can be compared.
    """
    import random

    import tensorflow as tf
    from art.attacks.evasion import TargetedUniversalPerturbation, UniversalPerturbation
    from art.estimators.classification import TensorFlowV2Classifier

    size = images.shape[1]
    classifier = TensorFlowV2Classifier(keras_model, nb_classes=len(CLASSES), input_shape=(size, size, 1),
                                        loss_object=tf.keras.losses.CategoricalCrossentropy(),
                                        clip_values=(0.0, 1.0) if clip else None)
    fgsm = {"eps": eps, "eps_step": eps, "norm": np.inf}
    x = np.asarray(images, np.float32)[..., None]  # NHWC, the Keras model's own layout
    state = random.getstate()
    random.seed(seed)
    try:
        start = time.perf_counter()
        if target is None:
            attack = UniversalPerturbation(classifier, attacker="fgsm", attacker_params=fgsm, delta=1e-6,
                                           max_iter=max_iter, eps=xi, norm=norm, verbose=False)
            attack.generate(x)
        else:
            # The targeted wrapper does not switch FGSM to targeted mode itself, and needs one-hot targets.
            attack = TargetedUniversalPerturbation(classifier, attacker="fgsm",
                                                   attacker_params=fgsm | {"targeted": True}, delta=1e-6,
                                                   max_iter=max_iter, eps=xi, norm=norm)
            attack.generate(x, y=np.eye(len(CLASSES), dtype=np.float32)[np.full(len(x), target)])
        seconds = time.perf_counter() - start
    finally:
        random.setstate(state)
    return np.asarray(attack.noise, np.float32)[0, ..., 0], seconds
