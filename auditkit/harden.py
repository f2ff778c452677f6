"""Adversarial retraining (paper section 2.4): fine-tune on UAP-perturbed training images, round by round.

Each round crafts `uaps_per_round` UAPs against the current model, fine-tunes on a training set whose random
half carries one of them each, then crafts a fresh UAP against the fine-tuned model and measures it on the
test split. Every random draw comes from (seed, round, purpose), and each finished round is checkpointed, so
an interrupted run resumes to the same weights. The result is exported as .keras and ONNX with a parity check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from . import metrics as M
from .metrics import Rate
from .errors import AuditkitError
from .models import keras_adapter, load_model
from .models.base import ModelAdapter, model_input
from .models.keras import KerasAdapter
from .models.tf_runtime import op_determinism
from .policy import AttackGrid, Hardening
from .supervisor import phase
from .uap import make_attack
from .uap.base import AttackSettings, cell_rng
from .uap.geometry import perturb, xi_for
from .fileio import atomic_write_bytes, atomic_write_text
from .results import HardeningRecord, HardeningRound

STATE_VERSION = 1
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17


def harden(model: ModelAdapter, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
           test_labels: np.ndarray, settings: Hardening, *, seed: int, out_dir: Path,
           defaults: AttackGrid | None = None, progress: Callable[[str, int, int], None] | None = None,
           log: Callable[[str], None] | None = None,
           checkpoint_dir: Path | None = None) -> tuple[KerasAdapter, HardeningRecord]:
    """Retrain a clone of `model` against UAPs; write checkpoints under `checkpoint_dir` (default
    out_dir/hardening) and the hardened model as out_dir/hardened.keras, hardened.onnx (+ hardened.yaml).
    Crafting settings the hardening attack leaves unset come from `defaults` (the policy's first attack grid).
    The caller's model is left untouched."""
    check_trainable(model)
    progress = progress or (lambda _label, _done, _total: None)
    log = log or (lambda _msg: None)
    out_dir = Path(out_dir)
    train_images, train_labels = _check_split("train", model, train_images, train_labels)
    test_images, test_labels = _check_split("test", model, test_images, test_labels)
    cell = settings.attack.settings(defaults)
    if cell.target is not None and cell.target not in model.classes:
        raise AuditkitError(f"unknown class {cell.target!r}; the model's classes are "
                            f"{', '.join(model.classes)}", "hardening.attack.target")
    target = None if cell.target is None else model.classes.index(cell.target)
    xi, mean_norm = xi_for(train_images, cell.norm, cell.zeta)
    record_settings = settings.model_dump(mode="json") | dict(
        eps=cell.eps, max_iter=cell.max_iter, delta=cell.delta, clip=cell.clip, algorithm=cell.algorithm,
        sgd=cell.sgd.model_dump() if cell.algorithm == "sgd" else None, seed=seed, xi=xi, mean_image_norm=mean_norm)
    run = _Run(
        model=_clone(model), settings=settings, seed=seed, cell=cell, xi=xi,
        target=target,
        train=(train_images, train_labels), test=(test_images, test_labels),
        state_dir=Path(checkpoint_dir) if checkpoint_dir else out_dir / "hardening", progress=progress, log=log)
    fingerprint = _fingerprint(model, record_settings, train_images, train_labels, test_images, test_labels)

    with op_determinism():
        done = run.resume(fingerprint)
        for k in range(len(done), settings.rounds + 1):
            phase("harden")
            done.append(run.run_round(k))
            run.checkpoint(fingerprint, done)
            log(_round_line(done[-1][0], settings.rounds, target is not None))
            progress("hardening rounds", k, settings.rounds)

    start = time.perf_counter()
    phase("export")
    keras_file, onnx_file, parity = _export(run.model, out_dir, test_images, log)
    rounds = [r for r, _ in done]
    return run.model, HardeningRecord(
        settings=record_settings, metric="fooling_rate" if target is None else "targeted_success_rate",
        rounds=rounds, final_confusion=done[-1][1], keras_file=keras_file, onnx_file=onnx_file, parity=parity,
        seconds=sum(r.seconds for r in rounds) + time.perf_counter() - start)


def check_trainable(model: ModelAdapter) -> None:
    """Hardening fine-tunes weights: only a Keras model (a .keras file or a zoo name) can be retrained."""
    if not isinstance(model, KerasAdapter):
        raise AuditkitError(f"hardening needs a Keras model (.keras or a zoo name); {model.name} is {model.format}",
                            model.name)


@dataclass
class _Run:
    """The state of one hardening run: the model being fine-tuned and everything a round needs."""

    model: KerasAdapter
    settings: Hardening
    seed: int
    cell: AttackSettings  # the crafting attack
    xi: float
    target: int | None
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    state_dir: Path
    progress: Callable[[str, int, int], None]
    log: Callable[[str], None]

    def rng(self, k: int, purpose: str) -> np.random.Generator:
        return cell_rng(self.seed, f"harden:{k}:{purpose}")

    def run_round(self, k: int) -> tuple[HardeningRound, list[list[int]]]:
        """Round k (0: the baseline before retraining): retrain (k >= 1), then measure a fresh UAP."""
        import keras

        start = time.perf_counter()
        keras.utils.set_random_seed(int(self.rng(k, "keras").integers(2**31)))
        losses = self.retrain(k) if k > 0 else []
        images, labels = self.test
        rho = self.craft(k, "eval", f"round {k}/{self.settings.rounds}: new UAP")
        adv_pred = self.model.predict(perturb(images, rho, self.cell.clip))
        rate = (M.fooling_rate(labels, adv_pred) if self.target is None
                else M.targeted_success_rate(adv_pred, self.target))
        accuracy = M.accuracy(labels, self.model.predict(images))
        confusion = M.confusion_matrix(labels, adv_pred, len(self.model.classes)).tolist()
        return HardeningRound(k, rate, accuracy, losses, time.perf_counter() - start), confusion

    def craft(self, k: int, purpose: str, label: str, clean_pred: np.ndarray | None = None) -> np.ndarray:
        """One UAP against the current model on the training set (or a seeded subset of it), from its own
        seeded stream."""
        max_iter, rng = self.cell.max_iter, self.rng(k, purpose)

        def on_pass(pass_no: int, done: int, total: int, _rate: float | None) -> None:
            self.progress(f"{label}, pass {pass_no}/{max_iter}", done, total)

        phase("craft")
        images, subset = self.train[0], self.settings.attack.craft_images
        if subset is not None and subset < len(images):
            chosen = np.sort(rng.permutation(len(images))[:subset])
            images, clean_pred = images[chosen], None if clean_pred is None else clean_pred[chosen]
        return make_attack(self.cell, on_pass).craft(self.model, images, self.xi, rng, clean_pred).rho

    def retrain(self, k: int) -> list[float]:
        """Steps 1-3 of the round: craft UAPs, perturb a random part of the training set, fine-tune."""
        images, labels = self.train
        s, n = self.settings, len(images)
        clean_pred = self.model.predict(images)
        uaps = np.stack([self.craft(k, f"uap:{j}", f"round {k}/{s.rounds}: UAP {j + 1}/{s.uaps_per_round}",
                                    clean_pred) for j in range(s.uaps_per_round)])
        mix = self.rng(k, "mix")
        chosen = mix.permutation(n)[: int(round(n * s.perturbed_fraction))]
        which = mix.integers(s.uaps_per_round, size=len(chosen))
        x = images.copy()
        x[chosen] = perturb(images[chosen], uaps[which], self.cell.clip)
        return self.fine_tune(k, x, labels)

    def fine_tune(self, k: int, x: np.ndarray, y: np.ndarray) -> list[float]:
        import keras

        s, net, spec = self.settings, self.model.model, self.model.spec
        optimizer = (keras.optimizers.Adam(s.learning_rate) if s.optimizer == "adam"
                     else keras.optimizers.SGD(s.learning_rate))
        net.compile(optimizer=optimizer, jit_compile=False,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=spec.output == "logits"))
        shuffle = self.rng(k, "shuffle")
        losses = []
        phase("fine-tune")
        for epoch in range(1, s.epochs + 1):
            order = shuffle.permutation(len(x))
            total = 0.0
            for b in range(0, len(x), s.batch_size):
                idx = order[b : b + s.batch_size]
                batch_loss = net.train_on_batch(model_input(x[idx], spec, np).astype(np.float32), y[idx],
                                                return_dict=True)["loss"]
                total += float(batch_loss) * len(idx)
            losses.append(total / len(x))
            self.progress(f"round {k}/{s.rounds}: fine-tuning", epoch, s.epochs)
        return losses

    def checkpoint(self, fingerprint: str, done: list[tuple[HardeningRound, list[list[int]]]]) -> None:
        """Weights of the last finished round, then the state that points at them (both written atomically)."""
        k = done[-1][0].round
        if k > 0:
            path = self.weights_path(k)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".round-{k}.tmp{os.getpid()}.weights.h5")  # Keras insists on the suffix
            self.model.model.save_weights(tmp)
            os.replace(tmp, path)
        state = {"version": STATE_VERSION, "fingerprint": fingerprint,
                 "rounds": [{"record": dataclasses.asdict(r), "confusion": c} for r, c in done]}
        atomic_write_text(self.state_dir / "state.json", json.dumps(state, indent=1, allow_nan=False) + "\n")

    def resume(self, fingerprint: str) -> list[tuple[HardeningRound, list[list[int]]]]:
        """Rounds finished by an earlier run with the same fingerprint, their last weights loaded; else []."""
        path = self.state_dir / "state.json"
        if not path.is_file():
            return []
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            same = state.get("version") == STATE_VERSION and state.get("fingerprint") == fingerprint
            done = [(_round_from_dict(e["record"]), e["confusion"]) for e in state["rounds"]] if same else []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.log(f"{path}: unreadable hardening state; starting over")
            return []
        if not same:
            self.log(f"{path}: state of a different hardening run (settings, seed, model or data); starting over")
            return []
        done = done[: self.settings.rounds + 1]
        last = done[-1][0].round if done else 0
        if last > 0:
            if not self.weights_path(last).is_file():
                self.log(f"{self.weights_path(last)} is missing; starting over")
                return []
            self.model.model.load_weights(self.weights_path(last))
        if done:
            self.log(f"resuming after round {last}/{self.settings.rounds} ({path})")
        return done

    def weights_path(self, k: int) -> Path:
        return self.state_dir / f"round-{k}.weights.h5"


def _check_split(name: str, model: ModelAdapter, images, labels) -> tuple[np.ndarray, np.ndarray]:
    images = model.check_images(images)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise AuditkitError(f"{name} labels must be one per image ({len(images)}), got shape {labels.shape}")
    if len(images) == 0:
        raise AuditkitError(f"the {name} split is empty; hardening needs {name} images")
    k = len(model.classes)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= k:
        raise AuditkitError(f"{name} labels must be class indices in [0, {k}), got {labels.dtype} values "
                            f"{labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def _clone(model: KerasAdapter) -> KerasAdapter:
    """A copy of the Keras model with the same weights, behind an adapter with the same spec."""
    import keras

    try:
        net = keras.models.clone_model(model.model)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for models it cannot rebuild
        message = f"cannot copy the Keras model for retraining ({type(exc).__name__}: {exc})"
        raise AuditkitError(message.splitlines()[0], model.name) from None
    net.set_weights(model.model.get_weights())
    return keras_adapter(net, f"{model.name}-hardened", _spec_dict(model))


def _spec_dict(model: ModelAdapter) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.spec).items()}


def _fingerprint(model: KerasAdapter, settings: dict[str, Any], *arrays: np.ndarray) -> str:
    """What decides the rounds' results: settings (except the number of rounds), seed, model and data."""
    h = hashlib.sha256()
    fixed = {k: v for k, v in settings.items() if k not in ("rounds", "enabled")}
    h.update(json.dumps({"settings": fixed, "spec": _spec_dict(model)}, sort_keys=True).encode())
    h.update(model.model.to_json().encode())
    for w in model.model.get_weights():
        h.update(repr((w.dtype.str, w.shape)).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _round_from_dict(d: dict[str, Any]) -> HardeningRound:
    return HardeningRound(round=int(d["round"]), attack_rate=Rate(**d["attack_rate"]),
                          clean_accuracy=Rate(**d["clean_accuracy"]), train_loss=[float(v) for v in d["train_loss"]],
                          seconds=float(d["seconds"]))


def _round_line(r: HardeningRound, rounds: int, targeted: bool) -> str:
    a = r.attack_rate
    head = f"round {r.round}/{rounds}" + (" (before retraining)" if r.round == 0 else "")
    return (f"{head}: {'R_s' if targeted else 'R_f'} {a.value:.1%} [{a.low:.1%}, {a.high:.1%}], "
            f"clean acc {r.clean_accuracy.value:.1%}, {r.seconds:.0f} s")


def _export(model: KerasAdapter, out_dir: Path, test_images: np.ndarray,
            log: Callable[[str], None]) -> tuple[str, str | None, dict[str, Any] | None]:
    """hardened.keras, hardened.onnx and their hardened.yaml spec; parity of ONNX vs Keras on the test split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path, onnx_path = out_dir / "hardened.keras", out_dir / "hardened.onnx"
    atomic_write_text(out_dir / "hardened.yaml", yaml.safe_dump(_spec_dict(model), sort_keys=False))
    tmp = out_dir / f".hardened.tmp{os.getpid()}.keras"  # Keras insists on the .keras suffix
    model.model.save(tmp)
    os.replace(tmp, keras_path)
    try:
        atomic_write_bytes(onnx_path, _to_onnx(model).SerializeToString())
    except Exception as exc:  # noqa: BLE001 - tf2onnx fails in many ways; the .keras model is still usable
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        log(f"ONNX export failed ({reason}); only hardened.keras was written")
        onnx_path.unlink(missing_ok=True)
        return keras_path.name, None, None
    onnx_model = load_model(onnx_path)
    keras_probs, onnx_probs = model.predict_proba(test_images), onnx_model.predict_proba(test_images)
    max_diff = float(np.abs(keras_probs - onnx_probs).max())
    agreement = float(np.mean(keras_probs.argmax(axis=1) == onnx_probs.argmax(axis=1)))
    parity = {"max_abs_prob_diff": max_diff, "argmax_agreement": agreement, "n": len(test_images),
              "tolerance": PARITY_TOLERANCE, "passed": max_diff <= PARITY_TOLERANCE and agreement == 1.0}
    if not parity["passed"]:
        log(f"ONNX parity failed: max |Δprob| {max_diff:.2e} (tolerance {PARITY_TOLERANCE:g}), "
            f"argmax agreement {agreement:.2%}")
    return keras_path.name, onnx_path.name, parity


def _to_onnx(model: KerasAdapter):
    """The Keras model as an ONNX ModelProto (opset 17) through a tf.function: tf2onnx.convert.from_keras
    does not handle every Keras 3 model, tracing the inference call does. The input keeps the Keras name."""
    import tf2onnx

    tf, net = model.tf, model.model
    spec = tf.TensorSpec((None, *net.inputs[0].shape[1:]), tf.float32, name=net.inputs[0].name)
    fn = tf.function(lambda x: net(x, training=False), input_signature=[spec], autograph=False)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=[spec], opset=ONNX_OPSET)
    return proto
