"""The Python API: everything the CLI does, callable without it."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .audit import Progress, SilentProgress, load_policy_data, run_audit
from .baseline import apply_change_bounds, read_baseline
from .checkpoints import CellStore, dataset_digest, resume_dir
from .data import Dataset, Preprocess, load_dataset
from .errors import AuditkitError
from .fileio import atomic_write_text
from .evidence import OUTPUTS as EVIDENCE_OUTPUTS
from .evidence import load_private_key, write_evidence, write_sbom
from .executors import make_executor
from .models import ModelAdapter, load_model
from .policy import Policy, load_policy
from .results import AuditResult, HardeningRecord, read_json
from .staging import LOCK_NAME, staging_dir
from .supervisor import phase, publishing

AFTER_DIR = "after-hardening"  # the hardened model's audit: its UAPs and samples

__all__ = ["run", "harden", "harden_model", "train_zoo", "rerender", "load_policy_data", "load_model", "load_dataset",
           "load_policy", "Preprocess", "Dataset", "ModelAdapter", "Policy", "AuditResult"]


def run(model: str | Path | ModelAdapter, policy: str | Path | Policy, out_dir: str | Path, *,
        data: str | Path | None = None, image_root: str | Path | None = None, formats: Sequence[str] | None = None,
        seed: int | None = None, spec_overrides: Mapping[str, Any] | None = None, spec_file: str | Path | None = None,
        harden: bool | None = None,
        surrogate: str | Path | None = None, deploy: str | Path | None = None, transfer: Sequence[str | Path] = (),
        jobs: int | None = None, command: str = "", sign_key: str | Path | None = None, sbom: bool = False,
        baseline: str | Path | None = None, resume: bool = True, executor: str = "local",
        ray_address: str | None = None,
        progress: Progress | None = None, log: Callable[[str], None] = lambda _msg: None) -> AuditResult:
    """Audit `model` under `policy` and write results, UAPs and reports into `out_dir`.

    `image_root` is the dataset root every image must lie in (default: the policy's data.image_root, else the
    manifest's folder). `spec_file` is the model's model.yaml when not beside it; `spec_overrides` override it (CLI
    flags). `surrogate` crafts the UAPs on another (white-box) model; `deploy` is the file actually shipped (e.g. the
    ONNX export), evaluated under every UAP with a parity check; `transfer` models (plus the policy's
    `transfer:` list) are evaluated under every UAP for a transferability matrix. At most `jobs` cells are
    crafted side by side (default: every cell that shares norms and clip), with the same results.

    Every run writes evidence.json (an in-toto statement over all outputs; a DSSE envelope signed with the
    Ed25519 key in `sign_key` when given) and, with `sbom`, a CycloneDX SBOM of the environment.
    `baseline` is an earlier audit's results.json under the same policy: every cell is compared with it, and
    rules with `max_increase` fail where a cell got worse by more than that.

    `executor="ray"` runs each cell as a Ray task on the cluster at `ray_address` (default: RAY_ADDRESS, else a
    Ray started here), with the same results. With `resume`, every finished cell is kept beside `out_dir` (checkpoints.resume_dir) until the run
    finishes: rerunning the same call after a kill reuses them (a changed model, data or policy starts afresh).

    With hardening (the policy's `hardening.enabled`, or `harden=True`) the model is then retrained against
    UAPs and the whole policy is re-run on the hardened model (`result.hardened`). Everything but the
    hardening checkpoints (out_dir/hardening/, kept so a killed run resumes) is written to a temporary
    sibling folder first and moved into place at the end, so a run that fails leaves no half-written output.
    """
    phase("load")
    policy_path = "" if isinstance(policy, Policy) else str(policy)
    policy = _with_seed(policy if isinstance(policy, Policy) else load_policy(policy), seed)
    policy_as_written = policy_text(policy, policy_path)
    signing_key = load_private_key(sign_key) if sign_key is not None else None
    previous = read_baseline(baseline, policy) if baseline is not None else None
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise AuditkitError(f"must be a positive integer, got {jobs!r}", "jobs")
    cell_executor = make_executor(executor, ray_address, {"model": None if isinstance(model, ModelAdapter) else model,
                                                          "crafter": surrogate})
    adapter = model if isinstance(model, ModelAdapter) else load_model(model, spec_overrides, spec_file)
    surrogate_model = load_model(surrogate) if surrogate is not None else None
    if any(a != "blackbox" for g in policy.attacks for a in g.crafted_with):
        (surrogate_model or adapter).require_gradients()
    hardening = policy.hardening.enabled if harden is None else harden
    if hardening:  # refuse before hours of auditing, not after
        from .harden import check_trainable

        check_trainable(adapter)
    deploy_model = load_model(deploy) if deploy is not None else None
    transfer_models = [load_model(t) for t in [*policy.transfer, *transfer]]
    dataset, fmt, synthetic = load_policy_data(policy, adapter.spec, data, progress, image_root)
    formats = list(formats or policy.report.formats)
    out_dir = Path(out_dir)
    with staging_dir(out_dir, log) as work:
        store = _cell_store(out_dir, policy, dataset, [adapter, surrogate_model, deploy_model, *transfer_models],
                            log) if resume and not isinstance(model, ModelAdapter) else None
        audit_args = dict(synthetic=synthetic, data_format=fmt, command=command, policy_path=policy_path,
                          progress=progress, log=log, jobs=jobs)
        result = run_audit(policy, adapter, dataset, out_dir=work, surrogate=surrogate_model, deploy=deploy_model,
                           transfer=transfer_models, store=store, executor=cell_executor, **audit_args)
        apply_change_bounds(result, policy, previous, str(baseline or ""))
        if hardening:
            hardened, result.hardening = harden_model(policy, adapter, dataset, work, progress=progress, log=log,
                                                      checkpoint_dir=out_dir / "hardening")
            # here, not on Ray: the hardened model exists only in this process's memory
            result.hardened = run_audit(policy, hardened, dataset, out_dir=work / AFTER_DIR, **audit_args)
            apply_change_bounds(result.hardened, policy, previous, str(baseline or ""))
        from .report import write_reports

        write_reports(result, work, formats)
        if sbom:
            write_sbom(work)
        write_evidence(result, work, policy_as_written, signing_key)
        _publish(work, out_dir)
    if store is not None:
        store.remove()
    return result


def _cell_store(out_dir: Path, policy: Policy, dataset: Dataset, models: Sequence[ModelAdapter | None],
                log: Callable[[str], None]) -> CellStore | None:
    """The checkpoints of this audit's cells beside `out_dir`, keyed by everything the cells depend on (not for a
    model given as an object: its weights in memory may differ from its files)."""
    from . import __version__

    inputs = {"model": [None if m is None else [m.digest(), dataclasses.asdict(m.spec)] for m in models],
              "data": dataset_digest(dataset.content_sha256, dataset.splits, dataset.ids),
              "policy": policy.sha256(), "seed": policy.seed, "auditkit version": __version__}
    return CellStore.open(resume_dir(out_dir), inputs, log)


def harden(model: str | Path | ModelAdapter, policy: str | Path | Policy, out_dir: str | Path, *,
           data: str | Path | None = None, image_root: str | Path | None = None, seed: int | None = None,
           spec_overrides: Mapping[str, Any] | None = None, spec_file: str | Path | None = None,
           progress: Progress | None = None, log: Callable[[str], None] = lambda _msg: None) -> HardeningRecord:
    """Adversarial retraining alone: hardened.keras, hardened.onnx (parity-checked), hardened.yaml and
    hardening.json in `out_dir`, written through a staging folder as `run` writes; the round checkpoints in
    out_dir/hardening/ stay, so rerunning the same call resumes after the last finished round."""
    phase("load")
    policy = _with_seed(policy if isinstance(policy, Policy) else load_policy(policy), seed)
    adapter = model if isinstance(model, ModelAdapter) else load_model(model, spec_overrides, spec_file)
    from .harden import check_trainable

    check_trainable(adapter)
    dataset, _, _ = load_policy_data(policy, adapter.spec, data, progress, image_root)
    out_dir = Path(out_dir)
    with staging_dir(out_dir, log) as work:
        _, record = harden_model(policy, adapter, dataset, work, progress=progress, log=log,
                                 checkpoint_dir=out_dir / "hardening")
        atomic_write_text(work / "hardening.json", json.dumps(dataclasses.asdict(record), indent=2) + "\n")
        _publish(work, out_dir, replaces_run=False)
    return record


def _with_seed(policy: Policy, seed: int | None) -> Policy:
    if seed is None:
        return policy
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AuditkitError(f"must be a non-negative integer, got {seed!r}", "seed")
    return policy.model_copy(update={"seed": seed})


def harden_model(policy: Policy, model: ModelAdapter, dataset: Dataset, out_dir: Path, *,
                 progress: Progress | None = None, log: Callable[[str], None] = lambda _msg: None,
                 checkpoint_dir: Path | None = None):
    """Adversarial retraining per the policy's hardening block: (hardened adapter, HardeningRecord).

    Trains on the crafting split, measures on the first other evaluated split; crafting settings that the
    hardening attack leaves unset (algorithm, eps, max_iter, delta, clip) come from the policy's first attack grid.
    Checkpoints go to `checkpoint_dir` (default out_dir/hardening/).
    """
    from .audit import prepare_splits
    from .harden import harden

    cfg = policy.data
    splits = prepare_splits(cfg, policy.seed, model, dataset, progress or SilentProgress())
    held_out = [s for s in cfg.eval_splits if s != cfg.craft_split]
    if not held_out:
        raise AuditkitError("hardening needs a held-out split in data.eval_splits besides the crafting split",
                            "hardening")
    train, test = splits[cfg.craft_split], splits[held_out[0]]
    settings = policy.hardening
    return harden(model, train.images, train.labels, test.images, test.labels, settings,
                  seed=policy.seed if settings.seed is None else settings.seed, out_dir=out_dir,
                  defaults=policy.attacks[0], progress=_StepProgress(progress), log=log, checkpoint_dir=checkpoint_dir)


class _StepProgress:
    """Adapts harden's progress(label, done, total) calls to one Progress bar per label."""

    def __init__(self, progress: Progress | None):
        self.progress, self.label = progress or SilentProgress(), None

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self.label:
            self.progress.start(label, total)
            self.label = label
        self.progress.update(done)


def train_zoo(name: str, *, data: str | Path | None = None, out_dir: str | Path | None = None, epochs: int = 30,
              seed: int = 0, progress: Callable[[int, dict], None] | None = None,
              log: Callable[[str], None] = lambda _msg: None) -> dict:
    """Train a zoo model with the deterministic recipe behind the shipped weights (see training). Into `out_dir`
    through a staging folder, as `run` writes; without it, into the package's own weights folder."""
    from .training import train_zoo_weights

    if out_dir is None:
        return train_zoo_weights(name, epochs=epochs, seed=seed, manifest=data, progress=progress)
    out_dir = Path(out_dir)
    with staging_dir(out_dir, log) as work:
        info = train_zoo_weights(name, epochs=epochs, seed=seed, manifest=data, out_dir=work, progress=progress)
        _publish(work, out_dir, replaces_run=False)
    return info


def rerender(results_json: str | Path, out_dir: str | Path | None = None,
             formats: Sequence[str] = ("html", "pdf", "junit")) -> dict[str, Path]:
    """Rebuild the reports from results.json (and the UAPs beside it) without recomputing anything; a run
    directory stands for the results.json in it."""
    from .report import write_reports

    results_json = Path(results_json)
    if results_json.is_dir():
        results_json = results_json / "results.json"
    result = read_json(results_json)
    run_dir = results_json.parent
    target = Path(out_dir) if out_dir else run_dir
    if target.resolve() != run_dir.resolve():
        for sub in ("uaps", "samples", AFTER_DIR):
            if (run_dir / sub).is_dir():
                shutil.copytree(run_dir / sub, target / sub, dirs_exist_ok=True)
    return write_reports(result, target, formats)


def policy_text(policy: Policy, policy_path: str) -> str:
    """The policy as its author wrote it (the file), or its JSON form when it was given as an object."""
    if policy_path:
        try:
            return Path(policy_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditkitError(f"cannot read policy file: {exc}", policy_path) from None
    return json.dumps(policy.model_dump(mode="json"), indent=2, ensure_ascii=False)


def _publish(work: Path, out_dir: Path, *, replaces_run: bool = True) -> None:
    """Move finished outputs into `out_dir`. An audit (`replaces_run`) replaces the outputs of an earlier audit
    there (also the reports of formats this run did not write, so no stale report sits beside the new results);
    hardening alone only replaces its own files, so an audit's results in the same folder survive it."""
    from .report import FILENAMES

    with publishing():
        out_dir.mkdir(parents=True, exist_ok=True)
        if replaces_run:
            for sub in ("uaps", "samples", AFTER_DIR):
                if (out_dir / sub).is_dir():
                    shutil.rmtree(out_dir / sub)
            for name in [*FILENAMES.values(), *EVIDENCE_OUTPUTS]:
                (out_dir / name).unlink(missing_ok=True)
        for item in work.iterdir():
            if item.name != LOCK_NAME:
                item.replace(out_dir / item.name)
