"""Loop operations: what the UAP algorithms ask of a model, implemented once per kind of model, for several cells
at a time.

An algorithm is written as a generator that yields one `Call` at a time and receives its outputs. `side_by_side`
advances the generators of several cells together: each round, the Calls of one operation from every cell go to
the model in one graph call. `tf` compiles the operations into TensorFlow graphs (Keras, SavedModel, TF1 models),
whose loop over the cells runs each cell's images through the same single-cell ops as a cell crafted alone, so
every cell's UAP is the same byte for byte whatever it was crafted beside; `numpy` runs them over a model that
gives log-probabilities and input gradients as arrays (ONNX through onnxruntime), one cell after another. Both
have the same semantics, so the algorithms never ask which one they run on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Literal, Protocol, Sequence

import numpy as np

from ...models.base import ModelAdapter, TFAdapter
from ..base import AttackSettings, CraftResult, ProgressFn
from ..criteria import criterion_for
from ..geometry import check_budget

EVAL_BATCH = 128  # most images per batched status check
Op = Literal["walk", "fooled", "accepted", "scan", "sgd"]


@dataclass(frozen=True)
class Cell:
    """What a cell's loop calls keep from its settings: budget, inner step, criterion (`target`: the target's index,
    -1 for a nontargeted attack) and the SGD algorithm's knobs."""

    xi: float
    eps: float
    target: int
    loss_cap: float
    momentum: float


@dataclass
class Call:
    """One cell's request for one loop operation on the images `idx` of the crafting set, under `rho`:

    - walk: the plain loop over `idx` in order, passing over those `skip` says are fooled until rho moves
      -> (rho, whether each image was fooled when visited, whether each one's step was accepted);
    - fooled: whether each image is fooled -> statuses;
    - accepted: for images not yet fooled, whether each one's step from rho would be accepted (batched) -> verdicts;
    - scan: statuses of a window, and acceptance of the steps of its first `probe` unfooled images -> (statuses,
      positions of the probed images in the window, verdicts);
    - sgd: one projected step of size `alpha` along the momentum (`velocity`) of the batch-mean (capped)
      cross-entropy's gradients w.r.t. rho -> (rho, velocity, whether each image was fooled before the step).
    """

    op: Op
    cell: Cell
    idx: np.ndarray
    rho: np.ndarray
    skip: np.ndarray | None = None
    probe: int = 0
    velocity: np.ndarray | None = None
    alpha: float = 0.0


Crafting = Generator[Call, Any, CraftResult]


class LoopOps(Protocol):
    """Runs one operation for several cells' Calls in one model call; the crafting set (images, and the crafting
    model's clean predictions) held for the craft (`hold`)."""

    def hold(self, *arrays: np.ndarray) -> tuple: ...

    def run(self, op: Op, images, labels, calls: Sequence[Call]) -> list:
        """Each Call's outputs (a tuple, or one array for `fooled` and `accepted`), in the order of `calls`."""


def loop_ops(model: ModelAdapter, norm: str, clip: bool, step_norm: str) -> LoopOps:
    """The loop for `model`: projection onto the `norm` ball; the paper loop's FGSM step along `step_norm`'s
    direction (sign or unit L2); SGD steps along the budget norm's."""
    if isinstance(model, TFAdapter):
        from .tf import compiled_loop

        return compiled_loop(model, norm, clip, step_norm)
    from .numpy import ArrayLoop

    return ArrayLoop(model, norm, clip, step_norm)


def statuses(cell: Cell, idx: np.ndarray, rho: np.ndarray) -> Generator[Call, Any, np.ndarray]:
    """Whether each image `idx` counts as fooled with rho added, in equal batches of at most EVAL_BATCH (see
    docs/engine.md): a cell's batches are the same beside other cells as alone."""
    cuts = np.linspace(0, len(idx), -(-len(idx) // EVAL_BATCH) + 1).astype(int)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.append(np.asarray((yield Call("fooled", cell, idx[a:b], rho))))
    return np.concatenate(out) if out else np.zeros(0, bool)


def side_by_side(loop: LoopOps, held: tuple, craftings: Sequence[Crafting],
                 finished: Callable[[int, Any], None] | None = None) -> list[CraftResult]:
    """Advance every cell's crafting together; each round makes one call per operation asked for. `finished` gets
    each cell's position and result as soon as its crafting ends."""
    results: list[Any] = [None] * len(craftings)
    pending: dict[int, Call] = {}

    def advance(k: int, outputs: Any) -> None:
        try:
            pending[k] = craftings[k].send(outputs)
        except StopIteration as stop:
            results[k] = stop.value
            pending.pop(k, None)
            if finished is not None:
                finished(k, stop.value)

    for k in range(len(craftings)):
        advance(k, None)
    while pending:
        by_op: dict[str, list[int]] = {}
        for k, call in pending.items():
            by_op.setdefault(call.op, []).append(k)
        for op, cells in by_op.items():
            for k, outputs in zip(cells, loop.run(op, *held, [pending[k] for k in cells])):
                advance(k, outputs)
    return results


def groupable(settings: AttackSettings) -> tuple | None:
    """What cells must share to be crafted side by side (one loop: norms of budget and step, clip); None for an
    algorithm that crafts alone."""
    if settings.algorithm == "blackbox":
        return None
    return settings.norm, settings.step_norm, settings.clip


def craft_side_by_side(model: ModelAdapter, images: np.ndarray, crafts: Sequence[tuple[LoopAttack, float,
                       np.random.Generator]], clean_pred: np.ndarray | None = None,
                       finished: Callable[[int, CraftResult], None] | None = None) -> list[CraftResult]:
    """UAPs of several cells on one crafting set, each (attack, xi, rng) crafted as it would be alone; `finished`
    as in side_by_side."""
    keys = {groupable(attack.settings) for attack, _, _ in crafts}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"cells crafted side by side must share norm, step_norm and clip, got {sorted(keys)}")
    norm, step_norm, clip = keys.pop()
    model.require_gradients()
    images = model.check_images(images)
    if clean_pred is None:
        clean_pred = model.predict(images)
    loop = loop_ops(model, norm, clip, step_norm)
    held = loop.hold(images, np.asarray(clean_pred).astype(np.int32))
    zero = np.zeros(images.shape[1:], np.float32)
    craftings = []
    for attack, xi, rng in crafts:
        s = attack.settings
        criterion = criterion_for(s, model.classes)
        cell = Cell(xi=check_budget(xi), eps=s.eps, target=criterion.target,
                    loss_cap=s.sgd.loss_cap, momentum=s.sgd.momentum)
        craftings.append(attack.crafting(cell, len(images), zero, rng))
    return side_by_side(loop, held, craftings, finished)


class LoopAttack:
    """An algorithm written over loop operations: `crafting` is its loop as a generator of Calls; `craft` runs it
    for one cell alone."""

    def __init__(self, settings: AttackSettings, progress: ProgressFn | None = None):
        self.settings, self.progress = settings, progress

    def craft(self, model: ModelAdapter, images: np.ndarray, xi: float, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """Craft one UAP on `images` (float32 N x H x W in [0, 1]); every random draw from `rng`."""
        return craft_side_by_side(model, images, [(self, xi, rng)], clean_pred)[0]

    def crafting(self, cell: Cell, n: int, rho: np.ndarray, rng: np.random.Generator) -> Crafting:
        raise NotImplementedError
