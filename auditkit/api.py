"""The Python API: everything the CLI does, callable without it."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .audit import Progress, load_policy_data, run_audit
from .data import Dataset, Preprocess, load_dataset
from .errors import AuditkitError
from .models import ModelAdapter, load_model
from .policy import Policy, load_policy
from .results import AuditResult, read_json

__all__ = ["run", "rerender", "load_model", "load_dataset", "load_policy", "Preprocess", "Dataset", "ModelAdapter",
           "Policy", "AuditResult"]


def run(model: str | Path | ModelAdapter, policy: str | Path | Policy, out_dir: str | Path, *,
        data: str | Path | None = None, formats: Sequence[str] | None = None, seed: int | None = None,
        spec_overrides: Mapping[str, Any] | None = None, command: str = "", progress: Progress | None = None,
        log: Callable[[str], None] = lambda _msg: None) -> AuditResult:
    """Audit `model` under `policy` and write results, UAPs and reports into `out_dir`.

    Everything is written to a temporary sibling folder first and moved into place at the end, so a run
    that fails leaves no half-written output.
    """
    policy_path = "" if isinstance(policy, Policy) else str(policy)
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    if seed is not None:
        policy = policy.model_copy(update={"seed": seed})
    adapter = model if isinstance(model, ModelAdapter) else load_model(model, spec_overrides)
    adapter.require_gradients()
    size = policy.data.preprocess.size or adapter.spec.input_size
    dataset, fmt, synthetic = load_policy_data(policy, size, data, progress)
    formats = list(formats or policy.report.formats)
    out_dir = Path(out_dir)
    work = _staging_dir(out_dir)
    try:
        result = run_audit(policy, adapter, dataset, synthetic=synthetic, data_format=fmt, out_dir=work,
                           command=command, policy_path=policy_path, progress=progress, log=log)
        from .report import write_reports

        write_reports(result, work, formats)
        _publish(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def rerender(results_json: str | Path, out_dir: str | Path | None = None,
             formats: Sequence[str] = ("html", "pdf", "junit")) -> dict[str, Path]:
    """Rebuild the reports from results.json (and the UAPs beside it) without recomputing anything."""
    from .report import write_reports

    results_json = Path(results_json)
    result = read_json(results_json)
    run_dir = results_json.parent
    target = Path(out_dir) if out_dir else run_dir
    if target.resolve() != run_dir.resolve():
        for sub in ("uaps", "samples"):
            if (run_dir / sub).is_dir():
                shutil.copytree(run_dir / sub, target / sub, dirs_exist_ok=True)
    return write_reports(result, target, formats)


def _staging_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise AuditkitError("exists and is not a directory", str(out_dir))
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditkitError(f"cannot create the output folder ({exc.strerror})", str(out_dir)) from None
    work = parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    return work


def _publish(work: Path, out_dir: Path) -> None:
    """Move a finished run into `out_dir`, replacing the outputs of an earlier run there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("uaps", "samples"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)
    for item in work.iterdir():
        item.replace(out_dir / item.name)
