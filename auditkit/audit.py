"""Run a policy against a model and a dataset: clean baseline, UAP cells, random controls, thresholds."""
from __future__ import annotations

import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from . import __version__
from . import metrics as M
from . import perceptibility as P
from .checkpoints import CellStore
from .data import Dataset, Preprocess, load_dataset
from .errors import AuditkitError
from .models import ModelAdapter
from .models.spec import ModelSpec, resolve_preprocessing
from .policy import DataConfig, Policy, Strength, Sweep, validate_against_classes
from .results import (AuditResult, CellResult, ControlSummary, DataInfo, DeployParity, Example, ModelInfo,
                      Provenance, SplitEval, SweepPoint, SweepResult, TransferEval)
from .rules import apply_rules, verdict
from .strength import (check_monotone, check_reachability, check_white_box, headline_success, paired_p_value,
                       reach_rate, reach_settings, strength_of)
from .supervisor import phase
from .sweep import bisect, sweep_key
from .uap import make_attack
from .uap.backends import craft_side_by_side, groupable
from .uap.base import AttackSettings, CraftResult, cell_rng
from .uap.criteria import criterion_for
from .uap.geometry import image_norms, perturb, random_control, xi_for

DEPLOY_TOLERANCE = 1e-4  # max |Δprob| between the audited model and its deployed twin


class Progress(Protocol):
    """What the audit reports while it works (the CLI draws it with rich)."""

    def start(self, label: str, total: int) -> None: ...
    def update(self, completed: int, label: str | None = None, total: int | None = None) -> None: ...
    def done(self) -> None: ...


class CellExecutor(Protocol):
    """Runs cells of an AuditRun somewhere (executors: Ray tasks); `finished` is called in this process with each
    result as it arrives, its files already under run.out_dir."""

    def run(self, run: AuditRun, cells: Sequence[AttackSettings], progress: Progress,
            finished: Callable[[CellResult], None]) -> list[CellResult]: ...


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


def load_policy_data(policy: Policy, spec: ModelSpec, manifest: str | Path | None = None,
                     progress: Progress | None = None,
                     image_root: str | Path | None = None) -> tuple[Dataset, str, bool]:
    """The policy's dataset (or `manifest` instead, under `image_root` instead of the policy's data.image_root),
    preprocessed as the policy and the model's spec say: (dataset, format, synthetic)."""
    from .phantoms import default_phantom_manifest

    cfg = policy.data
    source = manifest if manifest is not None else cfg.manifest
    synthetic = source is None
    if synthetic:
        source = default_phantom_manifest()
    progress = progress or SilentProgress()
    phase("decode")
    progress.start("loading images", 1)
    prep = resolve_preprocessing(spec, cfg.preprocess.crop_top, cfg.preprocess.resize)
    dataset = load_dataset(source, cfg.classes, aliases=cfg.aliases, fmt=cfg.format,
                           image_root=cfg.image_root if image_root is None else image_root,
                           preprocess=Preprocess(size=cfg.preprocess.size or spec.input_size,
                                                 crop_top=prep.crop_top, resize=prep.resize),
                           progress=lambda done, total: progress.update(done, total=total))
    progress.done()
    return dataset, cfg.format, synthetic


def run_audit(policy: Policy, model: ModelAdapter, dataset: Dataset, *, synthetic: bool, data_format: str,
              out_dir: Path, command: str = "", policy_path: str = "", progress: Progress | None = None,
              log: Callable[[str], None] = lambda _msg: None, surrogate: ModelAdapter | None = None,
              deploy: ModelAdapter | None = None, transfer: Sequence[ModelAdapter] = (),
              jobs: int | None = None, store: CellStore | None = None,
              executor: CellExecutor | None = None) -> AuditResult:
    """Craft and evaluate every cell of the policy; write UAPs and example images under `out_dir`.

    Cells are independent (each draws from its own seeded stream): those that share the norms of budget and step
    and clip are crafted side by side, `jobs` at a time (default: all of them); the results do not depend on
    `jobs`.

    `surrogate` crafts the UAPs instead of `model` (transfer attack on a model without usable gradients);
    `deploy` (the file a team ships, e.g. ONNX) and `transfer` models are evaluated under every UAP too.
    `store` keeps every finished cell (and reachability craft) and gives back those an interrupted run finished;
    `executor` runs the cells elsewhere (default: here, side by side).
    """
    progress = progress or SilentProgress()
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    data_info = _data_info(policy.data, model.spec, dataset, data_format, synthetic)
    run = AuditRun.prepare(policy, model, dataset, out_dir, progress, surrogate=surrogate, deploy=deploy,
                           transfer=transfer)
    cells = run.run_cells(policy.cells(run.classes), progress, log, jobs, store, executor)
    check_monotone(cells, run.eval_splits)
    if surrogate is None:
        check_white_box(cells, run.eval_splits)
    reach = run.reach if store is None else lambda s: store.remembered(f"reach:{s.key}", lambda: run.reach(s))
    check_reachability(cells, reach, policy.strength.reach_zeta, policy.strength.reach_rate)
    sweeps = [run.run_sweep(cell, sweep, policy.strength, progress, log) for cell, sweep in policy.sweeps(run.classes)]
    rules = apply_rules(policy.thresholds, cells, run.clean, sweeps)
    for warning in data_info.warnings:  # after the work, so that an error stays the only line on stderr
        log(f"warning: {warning}")
    finished = datetime.now(timezone.utc)
    return AuditResult(
        title=policy.report.title, organisation=policy.report.organisation, intended_use=policy.report.intended_use,
        verdict=verdict(rules), model=model_info(model), data=data_info,
        clean=run.clean, cells=cells, rules=rules,
        provenance=_provenance(policy, policy_path, command, started, finished, time.perf_counter() - t0,
                               run.phases),
        crafted_on=model_info(surrogate) if surrogate else None,
        deploy=_deploy_parity(model, deploy, run.splits, run.eval_splits) if deploy else None,
        transfer_models=[model_info(m) for m in run.others.values()], sweeps=sweeps,
    )


@dataclass
class AuditRun:
    """What one audit's cells share: the models, the prepared splits, the clean baseline and where UAPs go."""

    model: ModelAdapter  # the audited model: every evaluation runs on it
    crafter: ModelAdapter  # the model UAPs are crafted on (the audited one, or a surrogate)
    classes: list[str]
    splits: dict[str, Split]
    craft: Split  # the crafting split, with the crafter's clean predictions
    eval_splits: list[str]
    seed: int
    control_draws: int
    alpha: float  # beats-noise significance level
    out_dir: Path
    clean: dict[str, SplitEval] = field(default_factory=dict)
    others: dict[str, ModelAdapter] = field(default_factory=dict)  # deployed twin and transfer targets, by name
    other_clean: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # their clean predictions
    reached: dict[AttackSettings, float] = field(default_factory=dict)  # reachability crafts done, by settings
    # wall seconds spent in each phase of the audit (evaluations overlap the crafting of cells side by side)
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def prepare(cls, policy: Policy, model: ModelAdapter, dataset: Dataset, out_dir: Path, progress: Progress, *,
                surrogate: ModelAdapter | None = None, deploy: ModelAdapter | None = None,
                transfer: Sequence[ModelAdapter] = ()) -> AuditRun:
        """Check the models against each other and the policy, then predict the clean splits."""
        classes = _check_classes(model, dataset)
        for other in (surrogate, deploy, *transfer):
            if other is not None:
                _check_compatible(model, other)
        crafter = surrogate or model
        validate_against_classes(policy, classes)
        if any(a != "blackbox" for g in policy.attacks for a in g.crafted_with):
            crafter.require_gradients()
        cfg = policy.data
        start = time.perf_counter()
        splits = prepare_splits(cfg, policy.seed, model, dataset, progress)
        craft = splits[cfg.craft_split]
        if surrogate is not None:  # the loop's clean predictions C(x) are the crafting model's
            craft = Split(craft.name, craft.images, craft.labels, craft.ids, surrogate.predict(craft.images))
        others = {m.name: m for m in ([deploy] if deploy else []) + list(transfer)}
        run = cls(model=model, crafter=crafter, classes=classes, splits=splits, craft=craft,
                  eval_splits=list(cfg.eval_splits), seed=policy.seed, control_draws=policy.random_controls.draws,
                  alpha=policy.strength.alpha, out_dir=out_dir,
                  clean={name: evaluate(splits[name], None, classes) for name in cfg.eval_splits}, others=others,
                  other_clean={name: {s: m.predict(splits[s].images) for s in cfg.eval_splits}
                               for name, m in others.items()})
        run._timed("clean predictions", start)
        return run

    @property
    def example_split(self) -> Split:
        """Where the report's example image comes from: the first evaluated split other than the crafting one."""
        held_out = [s for s in self.eval_splits if s != self.craft.name]
        return self.splits[(held_out or self.eval_splits)[0]]

    def run_cells(self, cells: Sequence[AttackSettings], progress: Progress, log: Callable[[str], None],
                  jobs: int | None, store: CellStore | None = None,
                  executor: CellExecutor | None = None) -> list[CellResult]:
        """Every cell: those `store` holds from an interrupted run restored, the others run by `executor` (default:
        here, side by side), each kept in `store` as it finishes."""
        reused = {}
        for cell in cells if store is not None else ():
            if (result := store.restore(cell.key, self.out_dir)) is not None:
                reused[cell.key] = result
        if reused:
            log(f"resumed: {len(reused)} of {len(cells)} cells reused from an interrupted run")

        def finished(result: CellResult) -> None:
            log(f"{result.key}: " + ", ".join(f"{s} {result.headline(s).value:.1%}" for s in self.eval_splits))
            if store is not None:
                store.save(result, self.out_dir)

        todo = [cell for cell in cells if cell.key not in reused]
        fresh = (executor.run(self, todo, progress, finished) if executor is not None
                 else self._run_here(todo, progress, finished, jobs)) if todo else []
        by_key = reused | {result.key: result for result in fresh}
        return [by_key[cell.key] for cell in cells]

    def _run_here(self, cells: Sequence[AttackSettings], progress: Progress,
                  finished: Callable[[CellResult], None], jobs: int | None) -> list[CellResult]:
        """Cells in this process, crafted side by side in groups of at most `jobs` (default: every cell that can)."""
        return [result for group in side_by_side_groups(cells, jobs)
                for result in self.run_group(group, progress, finished)]

    def _craft(self, cells: Sequence[AttackSettings], progress: Progress | None = None, purpose: str = "",
               crafted: Callable[[int, tuple], None] | None = None,
               ) -> list[tuple[CraftResult, float, float, np.random.Generator]]:
        """UAPs crafted side by side, each from its cell's seeded stream (+ `purpose`): per cell (result, xi, mean
        image norm, the stream left to draw from), also handed to `crafted` with the cell's position as soon as
        that cell's crafting ends."""
        phase("craft")
        start = time.perf_counter()
        streams = [settings.stream(self.seed, purpose) for settings in cells]
        budgets = [xi_for(self.craft.images, settings.norm, settings.zeta) for settings in cells]
        shown = progress and _PassProgress(cells, progress)
        attacks = [make_attack(settings, shown and shown.of(k)) for k, settings in enumerate(cells)]

        def done(k: int, result: CraftResult) -> None:
            if shown:
                shown.finished += 1
            if crafted is not None:
                crafted(k, (result, *budgets[k], streams[k]))

        if len(cells) == 1:  # also an algorithm that crafts alone (black-box)
            results = [attacks[0].craft(self.crafter, self.craft.images, budgets[0][0], streams[0],
                                        clean_pred=self.craft.clean_pred)]
            done(0, results[0])
        else:
            results = craft_side_by_side(self.crafter, self.craft.images,
                                         [(a, xi, rng) for a, (xi, _), rng in zip(attacks, budgets, streams)],
                                         clean_pred=self.craft.clean_pred, finished=done)
            if shown:
                shown.done()
        self._timed("crafting", start)
        return [(c, xi, mean_norm, rng) for c, (xi, mean_norm), rng in zip(results, budgets, streams)]

    def _timed(self, phase: str, start: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def run_cell(self, settings: AttackSettings, progress: Progress) -> CellResult:
        """Craft one UAP from the cell's seeded stream, save it, evaluate it and its random controls."""
        return self.run_group([settings], progress)[0]

    def run_group(self, cells: Sequence[AttackSettings], progress: Progress,
                  finished: Callable[[CellResult], None] | None = None) -> list[CellResult]:
        """Cells crafted side by side (see side_by_side_groups); each one's UAP saved, evaluated with its random
        controls and handed to `finished` as soon as its crafting ends. Beside others, a cell is evaluated in a
        second thread while the others craft on: evaluation is mostly numpy work (PSNR, SSIM) on one core, which the
        crafting's graph calls leave free, and it does not change any UAP."""
        if len(cells) == 1:
            result = self._cell_result(cells[0], *self._craft(cells, progress)[0], progress)
            if finished is not None:
                finished(result)
            return [result]

        def evaluate(k: int, craft: tuple) -> CellResult:
            result = self._cell_result(cells[k], *craft, SilentProgress())  # the group's bar stays on
            if finished is not None:
                finished(result)
            return result

        evaluations: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            try:
                self._craft(cells, progress, crafted=lambda k, craft: evaluations.update({k: pool.submit(evaluate, k,
                                                                                                         craft)}))
                return [evaluations[k].result() for k in range(len(cells))]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a failed or interrupted craft: no queued evaluation starts
                raise

    def _cell_result(self, settings: AttackSettings, crafted: CraftResult, xi: float, mean_norm: float,
                     rng: np.random.Generator, progress: Progress) -> CellResult:
        """A crafted cell's UAP saved, then evaluated with its random controls (drawn from `rng`)."""
        rho = crafted.rho
        uap_file = f"uaps/{settings.key}.npy"
        _save_npy(self.out_dir / uap_file, rho)
        evals, controls, p_values = self._evaluate(settings, rho, xi, rng, progress)
        start = time.perf_counter()
        result = CellResult(
            key=settings.key, attack=settings, xi=xi, mean_image_norm=mean_norm, seed=self.seed, uap_file=uap_file,
            uap_norm_l2=float(np.linalg.norm(rho)), uap_norm_linf=float(np.abs(rho).max()),
            passes=crafted.passes, crafting_rates=crafted.rates, visited=crafted.visited,
            gradient_steps=crafted.steps, seconds=crafted.seconds, queries=crafted.queries,
            evals=evals, controls=controls, examples=self._examples(settings, rho),
            strength=strength_of(settings, rho, xi, crafted.rates, p_values, self.alpha))
        result.transfer = {name: self._transfer_evals(settings, rho, m) for name, m in self.others.items()}
        self._timed("evaluation", start)
        return result

    def _target(self, settings: AttackSettings) -> int | None:
        return None if settings.target is None else self.classes.index(settings.target)

    def _evaluate(self, settings: AttackSettings, rho: np.ndarray, xi: float, rng: np.random.Generator,
                  progress: Progress, splits: Sequence[str] | None = None,
                  ) -> tuple[dict[str, SplitEval], dict[str, ControlSummary], dict[str, float]]:
        """The UAP and its random controls (drawn from the cell's stream after crafting) on every evaluated split
        (or `splits`), and per split the paired test's p that the UAP succeeds on more of the same images than the
        controls."""
        phase("evaluate")
        target = self._target(settings)
        splits = self.eval_splits if splits is None else splits
        progress.start(f"{settings.key}: evaluating", len(splits) * (1 + self.control_draws))
        evals, controls, p_values, done = {}, {}, {}, 0
        controls_rho = [random_control(rho.shape, settings.norm, xi, rng) for _ in range(self.control_draws)]
        for name in splits:
            split = self.splits[name]
            start = time.perf_counter()
            pred = self.model.predict(perturb(split.images, rho, settings.clip))
            evals[name] = evaluate(split, rho, self.classes, model=self.model, clip=settings.clip, target=target,
                                   adv_pred=pred)
            self._timed("evaluation", start)
            done += 1
            progress.update(done)
            draws, control_success = [], []
            phase("controls")
            start = time.perf_counter()
            for r in controls_rho:
                control_pred = self.model.predict(perturb(split.images, r, settings.clip))
                control_success.append(headline_success(control_pred, split.labels, target))
                draws.append(evaluate(split, r, self.classes, model=self.model, clip=settings.clip, target=target,
                                      adv_pred=control_pred, perceptibility=False))
                done += 1
                progress.update(done)
            if draws:
                controls[name] = _summarise_controls(name, draws)
            self._timed("controls", start)
            p_values[name] = paired_p_value(headline_success(pred, split.labels, target), control_success)
        progress.done()
        return evals, controls, p_values

    def reach(self, settings: AttackSettings) -> float:
        """The reachability check's craft: a UAP crafted with `settings` from its own seeded stream, and the rate
        it reaches on the crafting set (see strength.reach_rate); crafted once per settings."""
        if settings not in self.reached:
            crafted = self._craft([settings], purpose=":reach")[0][0]
            pred = self.crafter.predict(perturb(self.craft.images, crafted.rho, settings.clip))
            self.reached[settings] = reach_rate(pred, self.craft.clean_pred, self._target(settings))
        return self.reached[settings]

    def run_sweep(self, settings: AttackSettings, sweep: Sweep, strength: Strength, progress: Progress,
                  log: Callable[[str], None]) -> SweepResult:
        """The critical zeta of one kind, target, norm and algorithm (auditkit.sweep.bisect): each zeta crafted
        from the stream a cell of that zeta draws from, its UAP evaluated on the sweep's split only, with the
        family's reachability check."""

        def measure(zeta: float) -> SweepPoint:
            at = settings.model_copy(update={"zeta": zeta})
            crafted, xi, _, rng = self._craft([at], progress)[0]
            evals, controls, _ = self._evaluate(at, crafted.rho, xi, rng, progress, [sweep.split])
            metric = "targeted_success_rate" if at.target is not None else "fooling_rate"
            control = controls.get(sweep.split)
            return SweepPoint(zeta=zeta, xi=xi, rate=getattr(evals[sweep.split], metric),
                              control=control and getattr(control, metric), seconds=crafted.seconds,
                              uap_norm=float(image_norms(crafted.rho[None], at.norm)[0]))

        points, critical, below = bisect(measure, sweep)
        reach_zeta = max(strength.reach_zeta, sweep.high)
        reached = self.reach(reach_settings(settings, reach_zeta, strength.reach_rate))
        result = SweepResult(key=sweep_key(settings.key, settings.zeta), attack=settings, split=sweep.split,
                             level=sweep.level, low=sweep.low, high=sweep.high, points=points, critical_zeta=critical,
                             below=below, reach_zeta=reach_zeta, reach_rate=reached,
                             reachable=reached >= strength.reach_rate)
        found = f"{critical:.3%}" if critical is not None else f"not reached up to {sweep.high:.1%}"
        log(f"{result.key}: critical zeta {found} ({sweep.split} rate >= {sweep.level:.0%})")
        return result

    def _transfer_evals(self, settings: AttackSettings, rho: np.ndarray, other: ModelAdapter,
                        ) -> dict[str, TransferEval]:
        """The UAP evaluated on another model: its headline rate, and agreement with the audited model."""
        target = self._target(settings)
        out = {}
        for name in self.eval_splits:
            split = self.splits[name]
            adv = perturb(split.images, rho, settings.clip)
            p_other, p_model = other.predict_proba(adv), self.model.predict_proba(adv)
            pred = p_other.argmax(1)
            out[name] = TransferEval(
                headline=(M.targeted_success_rate(pred, target) if target is not None
                          else M.fooling_rate(split.labels, pred)),
                flip_rate=M.flip_rate(self.other_clean[other.name][name], pred),
                argmax_agreement=float(np.mean(pred == p_model.argmax(1))),
                max_abs_prob_diff=float(np.abs(p_other - p_model).max()))
        return out

    def _examples(self, settings: AttackSettings, rho: np.ndarray) -> list[Example]:
        """One image for the report's figure: from the held-out split, clean-correct and moved by the UAP if any."""
        split = self.example_split
        criterion = criterion_for(settings, self.classes)
        adv_pred = self.model.predict(perturb(split.images, rho, settings.clip))
        correct = split.clean_pred == split.labels
        moved = criterion.succeeded(adv_pred, criterion.labels(split.clean_pred))
        candidates = np.flatnonzero(correct & moved) if np.any(correct & moved) else np.flatnonzero(correct)
        i = int(candidates[0]) if len(candidates) else 0
        sample = f"{split.name}-{i}"
        path = self.out_dir / "samples" / f"{sample}.npy"
        if not path.exists():
            _save_npy(path, split.images[i])
        return [Example(sample=sample, id=split.ids[i], true_label=self.classes[split.labels[i]],
                        clean_prediction=self.classes[split.clean_pred[i]],
                        adversarial_prediction=self.classes[adv_pred[i]])]


class _PassProgress:
    """Attacks' per-pass progress calls: one bar per pass for a cell crafted alone, one bar of passes for cells
    crafted side by side."""

    def __init__(self, cells: Sequence[AttackSettings], progress: Progress):
        self.cells, self.progress = cells, progress
        self.passes = self.finished = 0  # passes over, cells whose crafting ended
        if len(cells) > 1:
            progress.start(self._group_label(), sum(s.max_iter for s in cells))

    def _group_label(self) -> str:
        norm = self.cells[0].norm
        return (f"crafting {len(self.cells)} cells side by side (L{'∞' if norm == 'inf' else norm}), "
                f"{self.finished} done")

    def of(self, k: int):
        settings = self.cells[k]
        rate_name = "flip rate" if settings.target is None else "R_s"

        def on_pass(pass_no: int, done: int, total: int, rate: float | None) -> None:
            if len(self.cells) > 1:
                if rate is not None:
                    self.passes += 1
                    self.progress.update(self.passes, f"{self._group_label()}: {settings.key} pass {pass_no}: "
                                                      f"{rate_name} {rate:.1%}")
                return
            label = f"{settings.key} pass {pass_no}/{settings.max_iter}"
            if done == 0 and rate is None:
                self.progress.start(label, total)
            elif rate is None:
                self.progress.update(done)
            else:
                self.progress.update(total, f"{label}: {rate_name} {rate:.1%}")
                self.progress.done()

        return on_pass

    def done(self) -> None:
        self.progress.update(self.passes, self._group_label())
        self.progress.done()


def side_by_side_groups(cells: Sequence[AttackSettings], most: int | None = None) -> list[list[AttackSettings]]:
    """Cells that can be crafted side by side (same norms of budget and step, clip; not black-box), in groups of at
    most `most` (default: all of them), in the order the cells come."""
    groups: dict[object, list[list[AttackSettings]]] = {}
    for k, settings in enumerate(cells):
        key = groupable(settings)
        runs = groups.setdefault(key if key is not None else ("alone", k), [[]])
        if most is not None and len(runs[-1]) >= most:
            runs.append([])
        runs[-1].append(settings)
    return [group for runs in groups.values() for group in runs]


def _check_compatible(model: ModelAdapter, other: ModelAdapter) -> None:
    if tuple(other.classes) != tuple(model.classes) or other.spec.input_size != model.spec.input_size:
        raise AuditkitError(
            f"takes {other.spec.input_size}x{other.spec.input_size} images with classes {list(other.classes)}; "
            f"the audited model takes {model.spec.input_size}x{model.spec.input_size} with {list(model.classes)}",
            other.name)


def _deploy_parity(model: ModelAdapter, deploy: ModelAdapter, splits: dict[str, Split], eval_splits: Sequence[str],
                   ) -> DeployParity:
    """Clean agreement of the audited model and the deployed file on every evaluated split."""
    diffs, agree, n = [], [], 0
    for name in eval_splits:
        a, b = model.predict_proba(splits[name].images), deploy.predict_proba(splits[name].images)
        diffs.append(float(np.abs(a - b).max()))
        agree.append(int(np.sum(a.argmax(1) == b.argmax(1))))
        n += len(a)
    max_diff, agreement = max(diffs), sum(agree) / n
    return DeployParity(model=model_info(deploy), n=n, max_abs_prob_diff=max_diff, argmax_agreement=agreement,
                        tolerance=DEPLOY_TOLERANCE, passed=max_diff <= DEPLOY_TOLERANCE and agreement == 1.0)


def model_info(model: ModelAdapter) -> ModelInfo:
    """The model as the record identifies it: every file's digest and one over all, and the spec it was fed by."""
    return ModelInfo(name=model.name, format=model.format, path=str(model.path or ""), sha256=model.sha256(),
                     classes=list(model.classes), input_size=model.spec.input_size, channels=model.spec.channels,
                     parameters=model.parameters, gradients=model.gradient_source(), digest=model.digest(),
                     spec_file=str(model.spec_file or ""),
                     spec={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.spec).items()})


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
        psnr = float(np.mean(P.psnr(split.images, adv))) if perceptibility else None
        ssim = P.mean_ssim(split.images, adv) if perceptibility else None
    conf = M.confusion_matrix(split.labels, pred, k)
    sens, ppv = M.sensitivity_ppv(conf)
    dom, share, flipped = M.dominant_label(split.clean_pred, pred, k)
    return SplitEval(
        split=split.name, n=len(pred), accuracy=M.accuracy(split.labels, pred),
        fooling_rate=M.fooling_rate(split.labels, pred), flip_rate=M.flip_rate(split.clean_pred, pred),
        targeted_success_rate=None if target is None else M.targeted_success_rate(pred, target),
        targeted_induced_rate=None if target is None else M.targeted_induced_rate(split.clean_pred, pred, target),
        confusion=conf.tolist(), sensitivity=sens, ppv=ppv,
        dominant_label=None if dom is None else classes[dom], dominant_share=share, flipped=flipped,
        psnr=psnr, ssim=ssim)


def _check_classes(model: ModelAdapter, dataset: Dataset) -> list[str]:
    if tuple(model.classes) != tuple(dataset.classes):
        looked = ", ".join(str(p) for p in model.spec_looked_for)
        source = f" (no spec file found: looked for {looked}; or use --classes)" if looked else ""
        raise AuditkitError(
            f"the model's classes {list(model.classes)} differ from the policy's data.classes "
            f"{list(dataset.classes)}; list the classes in the model's output order{source}", model.name)
    return list(dataset.classes)


def prepare_splits(cfg: DataConfig, seed: int, model: ModelAdapter, dataset: Dataset, progress: Progress,
                   ) -> dict[str, Split]:
    """The crafting and evaluated splits, each subset to `max_images` by a seeded draw, with clean predictions."""
    phase("clean")
    names = list(dict.fromkeys([cfg.craft_split, *cfg.eval_splits]))
    out = {}
    for name in names:
        part = dataset.subset(name)
        limit = cfg.max_images.get(name)
        if limit is not None and limit < len(part):
            rng = cell_rng(seed, f"subset:{name}")
            part = part.take(np.sort(rng.choice(len(part), size=limit, replace=False)))
        images = part.floats()
        progress.start(f"clean predictions ({name})", 1)
        clean_pred = model.predict(images)
        progress.done()
        out[name] = Split(name, images, part.labels.astype(np.int64), list(part.ids), clean_pred)
    return out


def _summarise_controls(split: str, draws: list[SplitEval]) -> ControlSummary:
    targeted = draws[0].targeted_success_rate is not None
    return ControlSummary(
        split=split, draws=len(draws),
        fooling_rate=M.pooled_rate([d.fooling_rate for d in draws]),
        fooling_rate_std=float(np.std([d.fooling_rate.value for d in draws])),
        flip_rate=M.pooled_rate([d.flip_rate for d in draws]),
        targeted_success_rate=M.pooled_rate([d.targeted_success_rate for d in draws]) if targeted else None,
        targeted_success_rate_std=float(np.std([d.targeted_success_rate.value for d in draws])) if targeted else None,
        targeted_induced_rate=M.pooled_rate([d.targeted_induced_rate for d in draws]) if targeted else None,
    )


def _data_info(cfg: DataConfig, spec: ModelSpec, dataset: Dataset, fmt: str, synthetic: bool) -> DataInfo:
    from .phantoms import PHANTOM_NOTICE

    prep = resolve_preprocessing(spec, cfg.preprocess.crop_top, cfg.preprocess.resize)
    return DataInfo(
        source=dataset.source, format=fmt, synthetic=synthetic, manifest_sha256=dataset.manifest_sha256,
        content_sha256=dataset.content_sha256, classes=list(dataset.classes), counts=dataset.class_counts(),
        craft_split=cfg.craft_split, eval_splits=list(cfg.eval_splits),
        preprocess={"size": int(dataset.images.shape[1]), "crop_top": prep.crop_top,
                    "crop_top_from": prep.crop_top_from, "resize": prep.resize, "resize_from": prep.resize_from,
                    "max_images": dict(cfg.max_images)},
        notice=PHANTOM_NOTICE if synthetic else "", warnings=list(prep.warnings))


def _provenance(policy: Policy, policy_path: str, command: str, started, finished, seconds,
                phases: dict[str, float]) -> Provenance:
    import numpy
    import onnxruntime
    import tensorflow as tf

    return Provenance(
        auditkit=__version__, python=sys.version.split()[0], tensorflow=tf.__version__,
        onnxruntime=onnxruntime.__version__, numpy=numpy.__version__, platform=platform.platform(),
        command=command, seed=policy.seed, policy_path=policy_path, policy_sha256=policy.sha256(),
        policy=policy.model_dump(mode="json"), started=started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds"), seconds=round(seconds, 3),
        phases={phase: round(t, 3) for phase, t in phases.items()})


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array, np.float32), allow_pickle=False)

