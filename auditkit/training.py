"""Training: the zoo's deterministic recipe (`auditkit zoo train`), a command, not a model."""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from .data import Preprocess, load_dataset
from .errors import AuditkitError
from .fileio import sha256_file
from .models import zoo
from .models.registry import ZOO_CLASSES
from .models.tf_runtime import configure_tensorflow
from .phantoms import DEFAULT_PARAMS, PHANTOM_GENERATOR, default_phantom_manifest
from .supervisor import phase

TRAIN_PREPROCESS = {"size": 224, "crop_top": 1 / 6, "resize": "bilinear"}


def _augment(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Seeded light augmentation: integer shifts (edge-padded), brightness and contrast changes."""
    n, h, w = x.shape
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)), mode="edge")
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    out = np.stack([padded[i, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])
    contrast = rng.uniform(0.85, 1.15, (n, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-0.06, 0.06, (n, 1, 1)).astype(np.float32)
    mean = out.mean(axis=(1, 2), keepdims=True)
    return np.clip((out - mean) * contrast + mean + brightness, 0.0, 1.0)


def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y) or len(x) == 0:
        raise AuditkitError(f"expected images (N, H, W) and N labels, got {x.shape} and {y.shape}", where=what)
    if y.min() < 0 or y.max() >= len(ZOO_CLASSES):
        raise AuditkitError(f"labels must be in 0..{len(ZOO_CLASSES) - 1}", where=what)
    return x, y


def train_model(model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                epochs: int, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
                augment: bool = True, progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train in place with Adam and a cosine-decayed learning rate; returns the per-epoch history.

    Deterministic for a given seed: Keras/TF seeds and op determinism are set, and shuffling and
    augmentation draw from a numpy Generator seeded with `seed`. The validation set is only monitored.
    """
    tf = configure_tensorflow()
    import keras

    x_train, y_train = _check_xy(x_train, y_train, "x_train")
    x_val, y_val = _check_xy(x_val, y_val, "x_val")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise AuditkitError(f"epochs must be a positive integer, got {epochs!r}", where="epochs")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    steps = math.ceil(len(x_train) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epochs * steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    for epoch in range(1, epochs + 1):
        phase("train")
        order = rng.permutation(len(x_train))
        xb, yb = x_train[order], y_train[order]
        if augment:
            xb = _augment(xb, rng, max_shift=max(1, x_train.shape[1] // 28))
        train = _run_batches(model.train_on_batch, xb, yb, batch_size)
        val = _run_batches(model.test_on_batch, x_val, y_val, 64)
        logs = {"loss": train["loss"], "accuracy": train["accuracy"],
                "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        for k, v in logs.items():
            history[k].append(v)
        if progress is not None:
            progress(epoch, logs)
    return history


def _run_batches(step, x: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, float]:
    """Apply a Keras *_on_batch step over all batches in order; the epoch's mean loss and accuracy."""
    totals = {"loss": 0.0, "accuracy": 0.0}
    for start in range(0, len(x), batch_size):
        xb, yb = x[start: start + batch_size, ..., None], y[start: start + batch_size]
        logs = step(xb, yb, return_dict=True)
        for k in totals:
            totals[k] += float(logs[k]) * len(yb)
    return {k: v / len(x) for k, v in totals.items()}


def train_zoo_weights(name: str, *, epochs: int = 30, seed: int = 0, learning_rate: float = 2e-3,
                      batch_size: int = 32, manifest: Path | None = None, out_dir: Path | None = None,
                      progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train a zoo model on a manifest (default: the built-in phantom set) and write its weights and metadata.

    Uses the manifest's train split for training and its test split for the reported accuracy (no model
    selection on it: fixed epochs). Writes <out_dir or auditkit/weights>/<name>.weights.h5 and <name>.json,
    and with out_dir also <name>.keras + <name>.yaml (auditable with --model); returns the metadata.
    """
    entry = zoo.zoo_entry(name)
    default_set = manifest is None
    manifest = default_phantom_manifest() if default_set else Path(manifest)
    data = load_dataset(manifest, entry.classes, preprocess=Preprocess(**TRAIN_PREPROCESS))
    train, test = data.subset("train"), data.subset("test")
    model = zoo.build_model(name, seed=seed)
    history = train_model(model, train.floats(), train.labels, test.floats(), test.labels, epochs=epochs,
                          batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress)
    probs = model.predict(test.floats()[..., None], batch_size=64, verbose=0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == test.labels))

    out = Path(out_dir) if out_dir is not None else zoo.WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.weights.h5"
    model.save_weights(weights)
    counts = data.class_counts()
    sizes = f"train {sum(counts['train'].values())} / test {sum(counts['test'].values())}"
    if default_set:
        trained_on = (f"{PHANTOM_GENERATOR} synthetic phantoms (not patient data), {sizes}, "
                      f"default set {json.dumps(DEFAULT_PARAMS, sort_keys=True)}")
    else:
        trained_on = f"{manifest} (manifest sha256 {data.manifest_sha256[:16]}), {sizes}"
    if out_dir is not None:  # a trained model others can audit directly: --model <out>/<name>.keras
        model.save(out / f"{name}.keras")
        (out / f"{name}.yaml").write_text(yaml.safe_dump({"classes": list(entry.classes), "channels": 1,
                                                          "output": "softmax"}, sort_keys=False))
    info = {
        "name": name,
        "trained_on": trained_on,
        "recipe": (f"auditkit.training.train_zoo_weights: preprocess crop_top=1/6, bilinear resize to 224; "
                   f"Adam lr {learning_rate:g} with cosine decay, batch {batch_size}, {epochs} epochs, "
                   f"seeded shuffling and augmentation (shifts up to 8 px, brightness +-0.06, "
                   f"contrast x0.85-1.15); fixed epochs, no selection on the test split"),
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": accuracy,
        "history": history,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "sha256": sha256_file(weights),
    }
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
