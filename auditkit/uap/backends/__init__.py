"""Loop operations: what the UAP algorithms ask of a model, implemented once per kind of model.

`tf` compiles them into TensorFlow graphs (Keras, SavedModel, TF1 models); `numpy` runs them over a model that
gives log-probabilities and input gradients as arrays (ONNX through onnxruntime). Both have the same semantics,
so the algorithms never ask which one they run on.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Protocol

import numpy as np

from ...models.base import ModelAdapter, TFAdapter
from ..base import AttackSettings, CraftResult, ProgressFn
from ..criteria import Criterion, criterion_for
from ..geometry import check_budget

EVAL_BATCH = 128  # most images per batched status check


class LoopOps(Protocol):
    """Every call takes the whole crafting set as held (`hold`) and the indices of the images it works on."""

    def hold(self, *arrays: np.ndarray) -> tuple: ...

    def walk(self, images, labels, idx, skip, rho, xi, eps) -> tuple:
        """The plain loop over images `idx` in order, passing over those `skip` says are fooled until rho moves:
        (rho, whether each image was fooled when visited, whether each one's step was accepted)."""

    def fooled_batch(self, images, labels, idx, rho) -> Any: ...

    def accepted_batch(self, images, labels, idx, rho, eps) -> Any:
        """For images not yet fooled: whether each one's step from this rho would be accepted (batched)."""

    def scan(self, images, labels, idx, rho, eps, probe) -> tuple:
        """Statuses of a window, and acceptance of the steps of its first `probe` unfooled images."""

    def sgd_step(self, images, labels, idx, rho, velocity, alpha, xi, loss_cap, momentum) -> tuple:
        """One projected step along the momentum of the batch-mean (capped) cross-entropy's gradients w.r.t. rho:
        (rho, velocity, whether each image was fooled before the step)."""


def loop_ops(model: ModelAdapter, norm: str, clip: bool, criterion: Criterion, step_norm: str) -> LoopOps:
    """The loop for `model`: projection onto the `norm` ball; the paper loop's FGSM step along `step_norm`'s
    direction (sign or unit L2); SGD steps along the budget norm's."""
    if isinstance(model, TFAdapter):
        from .tf import compiled_loop

        return compiled_loop(model, norm, clip, criterion, step_norm)
    from .numpy import ArrayLoop

    return ArrayLoop(model, norm, clip, criterion, step_norm)


class _HeldSets:
    """Crafting sets held for loop calls, shared by concurrent crafts on one array (an audit's cells) and dropped
    when the last of them ends: a 224 px training set is hundreds of MB as a tensor."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[tuple[int, type], list] = {}  # (id of the array, loop kind) -> [held copy, users]

    @contextlib.contextmanager
    def use(self, loop: LoopOps, images: np.ndarray) -> Iterator[Any]:
        key = (id(images), type(loop))
        with self._lock:
            entry = self._held.get(key)
            if entry is None:
                entry = self._held[key] = [loop.hold(images)[0], 0]
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._held[key]


_HELD = _HeldSets()


@contextlib.contextmanager
def prepared(model: ModelAdapter, images: np.ndarray, criterion: Criterion, clean_pred: np.ndarray | None,
             norm: str, clip: bool, step_norm: str):
    """(the loop ops; the checked images and the labels the criterion compares predictions with, held for its calls;
    the number of images; a zero rho) for one crafting run."""
    model.require_gradients()
    images = model.check_images(images)
    if clean_pred is None:
        clean_pred = model.predict(images)
    loop = loop_ops(model, norm, clip, criterion, step_norm)
    labels = criterion.labels(np.asarray(clean_pred)).astype(np.int32)
    with _HELD.use(loop, images) as held_images:
        yield loop, (held_images, *loop.hold(labels)), len(images), np.zeros(images.shape[1:], np.float32)


def fooled(loop: LoopOps, images, labels, idx: np.ndarray, rho) -> np.ndarray:
    """Whether each image `idx` of the held crafting set counts as fooled with rho added, in equal batches of at most
    EVAL_BATCH (see docs/engine.md)."""
    cuts = np.linspace(0, len(idx), -(-len(idx) // EVAL_BATCH) + 1).astype(int)
    out = [np.asarray(loop.fooled_batch(images, labels, idx[a:b], rho)) for a, b in zip(cuts[:-1], cuts[1:])]
    return np.concatenate(out) if out else np.zeros(0, bool)


class LoopAttack:
    """An algorithm written over loop operations: `craft` checks the budget, prepares the ops for the model and the
    cell's criterion, and hands them to the algorithm's `_craft`."""

    def __init__(self, settings: AttackSettings, progress: ProgressFn | None = None):
        self.settings, self.progress = settings, progress

    def craft(self, model: ModelAdapter, images: np.ndarray, xi: float, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); every random draw from `rng`."""
        s = self.settings
        criterion = criterion_for(s, model.classes)
        with prepared(model, images, criterion, clean_pred, s.norm, s.clip, s.step_norm) as (loop, held, n, rho):
            return self._craft(loop, held, n, rho, check_budget(xi), rng)

    def _craft(self, loop: LoopOps, held: tuple, n: int, rho: np.ndarray, budget: float,
               rng: np.random.Generator) -> CraftResult:
        raise NotImplementedError
