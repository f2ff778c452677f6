"""Run a policy against a model and a dataset: clean baseline, UAP cells, random controls, thresholds."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from . import __version__
from . import metrics as M
from .attacks import Nontargeted, SGDUAPAttack, Targeted, UAPAttack, perturb, random_control, xi_for
from .data import Dataset, Preprocess, load_dataset
from .errors import AuditkitError
from .models import ModelAdapter, configure_tensorflow
from .models.adapters import GraphFunction
from .policy import Cell, Policy, Threshold, validate_against_classes
from .results import (AuditResult, CellResult, ControlSummary, DataInfo, DeployParity, Example, ModelInfo,
                      Provenance, RuleResult, SplitEval, TransferEval)

SSIM_BATCH = 64
DEPLOY_TOLERANCE = 1e-4  # max |Δprob| between the audited model and its deployed twin


class Progress(Protocol):
    """What the audit reports while it works (the CLI draws it with rich)."""

    def start(self, label: str, total: int) -> None: ...
    def update(self, completed: int, label: str | None = None, total: int | None = None) -> None: ...
    def done(self) -> None: ...


class SilentProgress:
    def start(self, label: str, total: int) -> None: ...
    def update(self, completed: int, label: str | None = None, total: int | None = None) -> None: ...
    def done(self) -> None: ...


@dataclass
class Split:
    """One split as the audit uses it: images in [0, 1], true labels, clean predictions."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    clean_pred: np.ndarray


def cell_rng(seed: int, key: str) -> np.random.Generator:
    """Independent stream per cell, from the policy seed and the cell key: cells can run in any order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def load_policy_data(policy: Policy, size: int, manifest: str | Path | None = None,
                     progress: Progress | None = None) -> tuple[Dataset, str, bool]:
    """The policy's dataset (or `manifest` instead): (dataset, format, synthetic)."""
    from .phantoms import default_phantom_manifest

    cfg = policy.data
    source = manifest if manifest is not None else cfg.manifest
    synthetic = source is None
    if synthetic:
        source = default_phantom_manifest()
    progress = progress or SilentProgress()
    progress.start("loading images", 1)
    dataset = load_dataset(source, cfg.classes, aliases=cfg.aliases, fmt=cfg.format, image_root=cfg.image_root,
                           preprocess=Preprocess(size=size, crop_top=cfg.preprocess.crop_top,
                                                 resize=cfg.preprocess.resize),
                           progress=lambda done, total: progress.update(done, total=total))
    progress.done()
    return dataset, cfg.format, synthetic


def run_audit(policy: Policy, model: ModelAdapter, dataset: Dataset, *, synthetic: bool, data_format: str,
              out_dir: Path, command: str = "", policy_path: str = "", progress: Progress | None = None,
              log: Callable[[str], None] = lambda _msg: None, surrogate: ModelAdapter | None = None,
              deploy: ModelAdapter | None = None, transfer: Sequence[ModelAdapter] = (),
              jobs: int | None = None) -> AuditResult:
    """Craft and evaluate every cell of the policy; write UAPs and example images under `out_dir`.

    Cells are independent (each draws from its own seeded stream), so `jobs` of them (default: one per CPU core)
    run at a time in threads; the results do not depend on `jobs`.

    `surrogate` crafts the UAPs instead of `model` (transfer attack on a model without usable gradients);
    `deploy` (the file a team ships, e.g. ONNX) and `transfer` models are evaluated under every UAP too.
    """
    progress = progress or SilentProgress()
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    classes = _check_classes(model, dataset)
    for other in (surrogate, deploy, *transfer):
        if other is not None:
            _check_compatible(model, other)
    crafter = surrogate or model
    validate_against_classes(policy, classes)
    if any(g.algorithm != "blackbox" for g in policy.attacks):
        crafter.require_gradients()
    splits = prepare_splits(policy, model, dataset, progress)
    craft = splits[policy.data.craft_split]
    if surrogate is not None:  # the loop's clean predictions C(x) are the crafting model's
        craft = Split(craft.name, craft.images, craft.labels, craft.ids, surrogate.predict(craft.images))
    clean = {name: evaluate(splits[name], None, classes) for name in policy.data.eval_splits}
    others = {m.name: m for m in ([deploy] if deploy else []) + list(transfer)}
    other_clean = {name: {s: m.predict(splits[s].images) for s in policy.data.eval_splits}
                   for name, m in others.items()}

    def run_cell(cell: Cell, cell_progress: Progress) -> CellResult:
        result = _run_cell(policy, cell, model, crafter, craft, splits, classes, out_dir, cell_progress)
        result.transfer = {name: _transfer_evals(result, m, model, splits, other_clean[name], policy, classes,
                                                 out_dir) for name, m in others.items()}
        return result

    def logged(result: CellResult) -> CellResult:
        log(f"{result.key}: " + ", ".join(f"{s} {result.headline(s).value:.1%}" for s in policy.data.eval_splits))
        return result

    todo = policy.cells(classes)
    jobs = min(len(todo), jobs or os.cpu_count() or 1)
    if jobs <= 1:
        cells = [logged(run_cell(cell, progress)) for cell in todo]
    else:  # one bar for the whole grid: the cells' own passes interleave
        progress.start(f"crafting and evaluating {len(todo)} cells, {jobs} at a time", len(todo))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_cell, cell, SilentProgress()) for cell in todo]
            try:
                for done, future in enumerate(as_completed(futures), start=1):
                    logged(future.result())
                    progress.update(done)
            except BaseException:
                for future in futures:  # a failed cell stops the grid: nothing queued starts
                    future.cancel()
                raise
        progress.done()
        cells = [f.result() for f in futures]
    rules = [_apply_rule(i, t, policy, cells, clean) for i, t in enumerate(policy.thresholds)]
    finished = datetime.now(timezone.utc)
    return AuditResult(
        title=policy.report.title, organisation=policy.report.organisation, intended_use=policy.report.intended_use,
        verdict="PASS" if all(r.passed for r in rules) else "FAIL",
        model=model_info(model), data=_data_info(policy, dataset, data_format, synthetic),
        clean=clean, cells=cells, rules=rules,
        provenance=_provenance(policy, policy_path, command, started, finished, time.perf_counter() - t0),
        crafted_on=model_info(surrogate) if surrogate else None,
        deploy=_deploy_parity(model, deploy, splits, policy) if deploy else None,
        transfer_models=[model_info(m) for m in others.values()],
    )


def _check_compatible(model: ModelAdapter, other: ModelAdapter) -> None:
    if tuple(other.classes) != tuple(model.classes) or other.spec.input_size != model.spec.input_size:
        raise AuditkitError(
            f"takes {other.spec.input_size}x{other.spec.input_size} images with classes {list(other.classes)}; "
            f"the audited model takes {model.spec.input_size}x{model.spec.input_size} with {list(model.classes)}",
            other.name)


def _transfer_evals(cell: CellResult, other: ModelAdapter, model: ModelAdapter, splits: dict[str, Split],
                    other_clean: dict[str, np.ndarray], policy: Policy, classes, out_dir: Path) -> dict[str, TransferEval]:
    """The UAP of `cell` evaluated on another model: its headline rate, and agreement with the audited model."""
    rho = np.load(out_dir / cell.uap_file, allow_pickle=False)
    target = None if cell.target is None else classes.index(cell.target)
    out = {}
    for name in policy.data.eval_splits:
        split = splits[name]
        adv = perturb(split.images, rho, cell.clip)
        p_other, p_model = other.predict_proba(adv), model.predict_proba(adv)
        pred = p_other.argmax(1)
        out[name] = TransferEval(
            headline=M.targeted_success_rate(pred, target) if target is not None else M.fooling_rate(split.labels, pred),
            flip_rate=M.flip_rate(other_clean[name], pred),
            argmax_agreement=float(np.mean(pred == p_model.argmax(1))),
            max_abs_prob_diff=float(np.abs(p_other - p_model).max()))
    return out


def _deploy_parity(model: ModelAdapter, deploy: ModelAdapter, splits: dict[str, Split], policy: Policy) -> DeployParity:
    """Clean agreement of the audited model and the deployed file on every evaluated split."""
    diffs, agree, n = [], [], 0
    for name in policy.data.eval_splits:
        a, b = model.predict_proba(splits[name].images), deploy.predict_proba(splits[name].images)
        diffs.append(float(np.abs(a - b).max()))
        agree.append(int(np.sum(a.argmax(1) == b.argmax(1))))
        n += len(a)
    max_diff, agreement = max(diffs), sum(agree) / n
    return DeployParity(model=model_info(deploy), n=n, max_abs_prob_diff=max_diff, argmax_agreement=agreement,
                        tolerance=DEPLOY_TOLERANCE, passed=max_diff <= DEPLOY_TOLERANCE and agreement == 1.0)


def model_info(model: ModelAdapter) -> ModelInfo:
    return ModelInfo(name=model.name, format=model.format, path=str(model.path or ""), sha256=model.sha256(),
                     classes=list(model.classes), input_size=model.spec.input_size, channels=model.spec.channels,
                     parameters=model.parameters, gradients=model.gradient_source())


def evaluate(split: Split, rho: np.ndarray | None, classes, *, model: ModelAdapter | None = None,
             clip: bool = True, target: int | None = None, adv_pred: np.ndarray | None = None,
             perceptibility: bool = True) -> SplitEval:
    """Metrics of one split under perturbation `rho` (None: the clean baseline, from the clean predictions).

    PSNR/SSIM are skipped with perceptibility=False (random controls: the report shows them for UAPs only)."""
    k = len(classes)
    if rho is None:
        pred, psnr, ssim = split.clean_pred, None, None
    else:
        adv = perturb(split.images, rho, clip)
        pred = model.predict(adv) if adv_pred is None else adv_pred
        psnr = float(np.mean(M.psnr(split.images, adv))) if perceptibility else None
        ssim = mean_ssim(split.images, adv) if perceptibility else None
    conf = M.confusion_matrix(split.labels, pred, k)
    sens, ppv = M.sensitivity_ppv(conf)
    dom, share, flipped = M.dominant_label(split.clean_pred, pred, k)
    return SplitEval(
        split=split.name, n=len(pred), accuracy=M.accuracy(split.labels, pred),
        fooling_rate=M.fooling_rate(split.labels, pred), flip_rate=M.flip_rate(split.clean_pred, pred),
        targeted_success_rate=None if target is None else M.targeted_success_rate(pred, target),
        confusion=conf.tolist(), sensitivity=sens, ppv=ppv,
        dominant_label=None if dom is None else classes[dom], dominant_share=share, flipped=flipped,
        psnr=psnr, ssim=ssim)


def mean_ssim(clean: np.ndarray, adv: np.ndarray) -> float:
    """Mean SSIM of attacked vs clean images: tf.image.ssim's definition (Gaussian window of 11 px, sigma 1.5,
    valid padding, max_val 1), with the window applied as two 1-D passes (tf.image.ssim's 2-D window took
    75 ms per 224x224 image here, the largest cost of an audit; this takes a few)."""
    fn = _ssim_fn(clean.shape[1])
    vals = [fn(clean[i:i + SSIM_BATCH], adv[i:i + SSIM_BATCH]).numpy() for i in range(0, len(clean), SSIM_BATCH)]
    return float(np.mean(np.concatenate(vals)))


@functools.cache
def _ssim_fn(size: int):
    tf = configure_tensorflow()
    k = min(11, size)
    g = np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2) / 1.5) ** 2)
    g = (g / g.sum()).astype(np.float32)
    band = np.zeros((size, size - k + 1), np.float32)  # the 1-D window as a banded matrix: a matmul is 20x faster
    for j in range(size - k + 1):                       # here than TF's conv2d with one channel
        band[j:j + k, j] = g
    band = tf.constant(band)
    c1, c2 = 0.01**2, 0.03**2

    def window(m):
        return tf.einsum("nhw,hu,wv->nuv", m, band, band)

    def ssim(x, y):
        mean_x, mean_y = window(x), window(y)
        num0 = mean_x * mean_y * 2.0
        den0 = tf.square(mean_x) + tf.square(mean_y)
        luminance = (num0 + c1) / (den0 + c1)
        cs = (window(x * y) * 2.0 - num0 + c2) / (window(tf.square(x) + tf.square(y)) - den0 + c2)
        return tf.reduce_mean(luminance * cs, axis=[1, 2])

    return GraphFunction(tf, ssim, [tf.TensorSpec([None, size, size], tf.float32)] * 2)


def _check_classes(model: ModelAdapter, dataset: Dataset) -> list[str]:
    if tuple(model.classes) != tuple(dataset.classes):
        raise AuditkitError(
            f"the model's classes {list(model.classes)} differ from the policy's data.classes "
            f"{list(dataset.classes)}; list the classes in the model's output order", model.name)
    return list(dataset.classes)


def prepare_splits(policy: Policy, model: ModelAdapter, dataset: Dataset, progress: Progress) -> dict[str, Split]:
    cfg = policy.data
    names = list(dict.fromkeys([cfg.craft_split, *cfg.eval_splits]))
    out = {}
    for name in names:
        part = dataset.subset(name)
        limit = cfg.max_images.get(name)
        if limit is not None and limit < len(part):
            rng = cell_rng(policy.seed, f"subset:{name}")
            part = part.take(np.sort(rng.choice(len(part), size=limit, replace=False)))
        images = part.floats()
        progress.start(f"clean predictions ({name})", 1)
        clean_pred = model.predict(images)
        progress.done()
        out[name] = Split(name, images, part.labels.astype(np.int64), list(part.ids), clean_pred)
    return out


def build_attack(cell: Cell, xi: float, progress: Callable[[int, int, int, float | None], None] | None = None):
    """The crafting algorithm a cell names, with its settings and budget xi."""
    if cell.algorithm == "blackbox":
        from .blackbox import BlackBoxUAPAttack

        b = cell.blackbox
        return BlackBoxUAPAttack(norm=cell.norm, xi=xi, epochs=cell.max_iter, batch_size=b.batch_size,
                                 samples=b.samples, sigma=b.sigma, step_size=b.step_size, low_res=b.low_res,
                                 estimator=b.estimator, clip=cell.clip, delta=cell.delta, progress=progress)
    if cell.algorithm == "sgd":
        return SGDUAPAttack(norm=cell.norm, xi=xi, epochs=cell.max_iter, batch_size=cell.sgd.batch_size,
                            step_size=cell.sgd.step_size, loss_cap=cell.sgd.loss_cap, momentum=cell.sgd.momentum,
                            delta=cell.delta, clip=cell.clip, progress=progress)
    return UAPAttack(norm=cell.norm, xi=xi, eps=cell.eps, max_iter=cell.max_iter, delta=cell.delta,
                     clip=cell.clip, progress=progress)


def _run_cell(policy: Policy, cell: Cell, model, crafter, craft: Split, splits: dict[str, Split], classes,
              out_dir: Path, progress: Progress) -> CellResult:
    rng = cell_rng(policy.seed, cell.key)
    xi, mean_norm = xi_for(craft.images, cell.norm, cell.zeta)
    target = None if cell.target is None else classes.index(cell.target)
    criterion = Nontargeted() if target is None else Targeted(target)

    def on_progress(pass_no: int, done: int, total: int, rate: float | None) -> None:
        if done == 0 and rate is None:
            progress.start(f"{cell.key} pass {pass_no}/{cell.max_iter}", total)
        elif rate is None:
            progress.update(done)
        else:
            name = "flip rate" if target is None else "R_s"
            progress.update(total, f"{cell.key} pass {pass_no}/{cell.max_iter}: {name} {rate:.1%}")
            progress.done()

    attack = build_attack(cell, xi, on_progress)
    crafted = attack.craft(crafter, craft.images, criterion, rng, clean_pred=craft.clean_pred)
    rho = crafted.rho
    uap_file = f"uaps/{cell.key}.npy"
    _save_npy(out_dir / uap_file, rho)

    progress.start(f"{cell.key}: evaluating", len(policy.data.eval_splits) * (1 + policy.random_controls.draws))
    evals, controls, done = {}, {}, 0
    controls_rho = [random_control(rho.shape, cell.norm, xi, rng) for _ in range(policy.random_controls.draws)]
    for name in policy.data.eval_splits:
        split = splits[name]
        evals[name] = evaluate(split, rho, classes, model=model, clip=cell.clip, target=target)
        done += 1
        progress.update(done)
        draws = []
        for r in controls_rho:
            draws.append(evaluate(split, r, classes, model=model, clip=cell.clip, target=target,
                                  perceptibility=False))
            done += 1
            progress.update(done)
        if draws:
            controls[name] = _summarise_controls(name, draws)
    progress.done()
    return CellResult(
        key=cell.key, kind=cell.kind, target=cell.target, norm=cell.norm, zeta=cell.zeta, xi=xi,
        mean_image_norm=mean_norm, eps=cell.eps, max_iter=cell.max_iter, delta=cell.delta, clip=cell.clip,
        algorithm=cell.algorithm, algorithm_settings=(cell.sgd or cell.blackbox).model_dump()
        if cell.sgd or cell.blackbox else {}, queries=getattr(crafted, "queries", None),
        seed=policy.seed, uap_file=uap_file,
        uap_norm_l2=float(np.linalg.norm(rho)), uap_norm_linf=float(np.abs(rho).max()),
        passes=crafted.passes, crafting_rates=crafted.rates, visited=crafted.visited, gradient_steps=crafted.steps,
        seconds=crafted.seconds,
        evals=evals, controls=controls,
        examples=_examples(cell, model, splits, policy, rho, classes, target, out_dir),
    )


def _summarise_controls(split: str, draws: list[SplitEval]) -> ControlSummary:
    targeted = draws[0].targeted_success_rate is not None
    return ControlSummary(
        split=split, draws=len(draws),
        fooling_rate=M.pooled_rate([d.fooling_rate for d in draws]),
        fooling_rate_std=float(np.std([d.fooling_rate.value for d in draws])),
        flip_rate=M.pooled_rate([d.flip_rate for d in draws]),
        targeted_success_rate=M.pooled_rate([d.targeted_success_rate for d in draws]) if targeted else None,
        targeted_success_rate_std=float(np.std([d.targeted_success_rate.value for d in draws])) if targeted else None,
    )


def _examples(cell: Cell, model, splits: dict[str, Split], policy: Policy, rho, classes, target, out_dir: Path,
              ) -> list[Example]:
    """One image for the report's figure: from the held-out split, clean-correct and moved by the UAP if any."""
    held_out = [s for s in policy.data.eval_splits if s != policy.data.craft_split]
    split = splits[(held_out or policy.data.eval_splits)[0]]
    adv_pred = model.predict(perturb(split.images, rho, cell.clip))
    correct = split.clean_pred == split.labels
    moved = (adv_pred == target) if target is not None else (adv_pred != split.clean_pred)
    candidates = np.flatnonzero(correct & moved) if np.any(correct & moved) else np.flatnonzero(correct)
    i = int(candidates[0]) if len(candidates) else 0
    sample = f"{split.name}-{i}"
    path = out_dir / "samples" / f"{sample}.npy"
    if not path.exists():
        _save_npy(path, split.images[i])
    return [Example(sample=sample, id=split.ids[i], true_label=classes[split.labels[i]],
                    clean_prediction=classes[split.clean_pred[i]], adversarial_prediction=classes[adv_pred[i]])]


def _apply_rule(index: int, rule: Threshold, policy: Policy, cells: list[CellResult],
                clean: dict[str, SplitEval]) -> RuleResult:
    bound = "max" if rule.max is not None else "min"
    if rule.metric == "clean_accuracy":
        measured, keys, worst = clean[rule.split].accuracy.value, [], None
    else:
        chosen = [c for c in cells if rule.selects(_as_cell(c))]
        values = [(c.metric_value(rule.metric, rule.split), c.key) for c in chosen]
        measured, worst = (max if bound == "max" else min)(values)
        keys = [c.key for c in chosen]
    passed = measured <= rule.limit if bound == "max" else measured >= rule.limit
    selectors = {k: v for k, v in (("kind", rule.effective_kind), ("target", rule.target), ("norm", rule.norm),
                                   ("zeta", rule.zeta)) if v is not None}
    return RuleResult(name=rule.name, metric=rule.metric, split=rule.split, selectors=selectors, bound=bound,
                      limit=rule.limit, measured=float(measured), worst_cell=worst, cells=keys, passed=bool(passed))


def _as_cell(c: CellResult) -> Cell:
    return Cell(kind=c.kind, target=c.target, norm=c.norm, zeta=c.zeta, eps=c.eps, max_iter=c.max_iter,
                delta=c.delta, clip=c.clip, algorithm=c.algorithm)  # selectors never look at sgd settings


def _data_info(policy: Policy, dataset: Dataset, fmt: str, synthetic: bool) -> DataInfo:
    from .phantoms import PHANTOM_NOTICE

    return DataInfo(
        source=dataset.source, format=fmt, synthetic=synthetic, manifest_sha256=dataset.manifest_sha256,
        content_sha256=dataset.content_sha256, classes=list(dataset.classes), counts=dataset.class_counts(),
        craft_split=policy.data.craft_split, eval_splits=list(policy.data.eval_splits),
        preprocess={"size": int(dataset.images.shape[1]), "crop_top": policy.data.preprocess.crop_top,
                    "resize": policy.data.preprocess.resize, "max_images": dict(policy.data.max_images)},
        notice=PHANTOM_NOTICE if synthetic else "")


def _provenance(policy: Policy, policy_path: str, command: str, started, finished, seconds) -> Provenance:
    import numpy
    import onnxruntime
    import tensorflow as tf

    return Provenance(
        auditkit=__version__, python=sys.version.split()[0], tensorflow=tf.__version__,
        onnxruntime=onnxruntime.__version__, numpy=numpy.__version__, platform=platform.platform(),
        command=command, seed=policy.seed, policy_path=policy_path, policy_sha256=policy.sha256(),
        policy=policy.model_dump(mode="json"), started=started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds"), seconds=round(seconds, 3))


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array, np.float32), allow_pickle=False)

