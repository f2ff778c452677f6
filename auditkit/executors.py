"""Where an audit's cells run: here (audit.AuditRun's own loop), or as Ray tasks on a cluster (`--executor ray`).

Cells are independent and each draws from its own seeded stream, so a cell gives the same bytes on any worker of
the same platform. The Ray executor puts the prepared run (decoded splits, clean predictions, settings) into the
object store once, and the models as their files' bytes (a zoo model by name); every worker checks each file's
sha256 before loading it. One task per cell, retried by Ray if its worker dies; each result comes back to this
process, which writes its files and keeps its checkpoint (so a driver that dies loses no finished cell either).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .audit import AuditRun, Progress
from .errors import AuditkitError
from .models import ModelAdapter, load_model
from .models.registry import ZOO_NAMES
from .results import CellResult
from .supervisor import phase
from .uap.base import AttackSettings

EXECUTORS = ("local", "ray")
TASK_RETRIES = 3  # reruns of a cell whose worker died (not of a cell that raised)
POLL_S = 1.0


@dataclass(frozen=True)
class ModelPackage:
    """A model as it travels to a worker: its files' bytes and digests, or a zoo name; and its resolved spec."""

    name: str
    zoo: str | None
    entry: str  # the file or folder load_model is given, relative to the package root
    files: dict[str, bytes]
    sha256: dict[str, str]
    spec: dict[str, Any]

    @classmethod
    def of(cls, model: ModelAdapter, ref: str | Path | None = None) -> ModelPackage:
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.spec).items()}
        if ref is not None and str(ref) in ZOO_NAMES and not Path(str(ref)).exists():
            return cls(model.name, str(ref), "", {}, model.sha256(), spec)
        if model.path is None:
            raise AuditkitError("a model held only in memory cannot travel to Ray workers", model.name)
        prefix = model.path.name + "/" if model.path.is_dir() else ""  # a SavedModel's files are named inside it
        files = {}
        for name, path in model.files().items():  # a spec file outside the model's folder has an absolute name
            files[f"spec/{Path(name).name}" if Path(name).is_absolute() else prefix + name] = path.read_bytes()
        return cls(model.name, None, model.path.name, files,
                   {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}, spec)

    def load(self, folder: Path) -> ModelAdapter:
        """The model, rebuilt under `folder` after checking every file's sha256 (AuditkitError if one differs)."""
        if self.zoo is not None:
            model = load_model(self.zoo, self.spec)
            if model.sha256() != self.sha256:
                raise AuditkitError("this worker's zoo weights differ from the driver's (another auditkit "
                                    "version?)", f"zoo model {self.zoo}")
        else:
            for name, data in self.files.items():
                if hashlib.sha256(data).hexdigest() != self.sha256[name]:
                    raise AuditkitError("arrived with another sha256 than it left with", f"{self.name}: {name}")
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            model = load_model(folder / self.entry, self.spec)
        model.name = self.name
        return model


@dataclass(frozen=True)
class _Packages:
    model: ModelPackage
    crafter: ModelPackage | None  # None: the audited model crafts
    others: tuple[ModelPackage, ...]


class RayExecutor:
    """Each cell one Ray task (audit.CellExecutor). `address`: a running cluster (default: RAY_ADDRESS, else a
    Ray started on this machine for the run)."""

    def __init__(self, address: str | None, refs: Mapping[str, str | Path | None]):
        self.address, self.refs = address, refs

    def run(self, run: AuditRun, cells: Sequence[AttackSettings], progress: Progress,
            finished: Callable[[CellResult], None]) -> list[CellResult]:
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            _connect(ray, self.address)
        try:
            return self._run(ray, run, cells, progress, finished)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, run: AuditRun, cells, progress, finished) -> list[CellResult]:
        packages = _Packages(ModelPackage.of(run.model, self.refs.get("model")),
                             None if run.crafter is run.model else
                             ModelPackage.of(run.crafter, self.refs.get("crafter")),
                             tuple(ModelPackage.of(m) for m in run.others.values()))
        shared = ray.put(dataclasses.replace(run, model=None, crafter=None, others={}, out_dir=Path(".")))
        packages_ref = ray.put(packages)
        board = ray.remote(_Board).options(num_cpus=0).remote()
        task = ray.remote(_cell_task).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)
        pending = {task.remote(shared, packages_ref, cell, board): cell for cell in cells}
        results: dict[str, CellResult] = {}
        progress.start(f"{len(cells)} cells as Ray tasks", len(cells))
        phase("craft")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    del pending[ref]
                    result, files = _get(ray, ref)
                    for rel, data in files.items():
                        (run.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                        (run.out_dir / rel).write_bytes(data)
                    finished(result)
                    results[result.key] = result
                progress.update(len(results), f"{len(cells)} cells as Ray tasks; {ray.get(board.latest.remote())}")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        progress.done()
        return [results[cell.key] for cell in cells]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise AuditkitError("needs Ray: pip install \"auditkit[ray]\"", "--executor ray") from None
    return ray


def _connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS; else start one here), without Ray's own chatter on stderr."""
    import logging

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise AuditkitError(f"cannot start or join the Ray cluster ({str(exc).splitlines()[0]})",
                            f"--ray-address {where}") from None


def _get(ray, ref):
    """A task's value; a task that raised re-raises its own error here (a bad input stays one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class _Board:
    """The latest progress line any worker reported (a Ray actor): the driver shows it beside the cell count."""

    def __init__(self):
        self.line = ""

    def report(self, line: str) -> None:
        self.line = line

    def latest(self) -> str:
        return self.line


class _BoardProgress:
    """audit.Progress on a worker: its label and counts sent to the board, at most once a second."""

    def __init__(self, board):
        self.board, self.label, self.total, self.sent = board, "", 0, 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.update(0)

    def update(self, completed: int, label: str | None = None, total: int | None = None) -> None:
        self.label, self.total = label or self.label, self.total if total is None else total
        if time.monotonic() - self.sent >= POLL_S:
            self.sent = time.monotonic()
            self.board.report.remote(f"{self.label}: {completed}/{self.total}")

    def done(self) -> None: ...


_LOADED: dict[str, tuple[Any, Path]] = {}  # per worker process: the models of the runs it has served


def _cell_task(shared: AuditRun, packages: _Packages, settings: AttackSettings, board,
               ) -> tuple[CellResult, dict[str, bytes]]:
    """One cell on a worker: the run rebuilt around models loaded from their checked bytes (kept for the next
    task of the same run), the cell run into a scratch folder, its result and files sent back."""
    key = hashlib.sha256(repr([p.sha256 for p in (packages.model, packages.crafter, *packages.others)
                               if p is not None]).encode()).hexdigest()
    if key not in _LOADED:
        folder = Path(tempfile.mkdtemp(prefix="auditkit-models-"))
        model = packages.model.load(folder / "model")
        crafter = packages.crafter.load(folder / "crafter") if packages.crafter else model
        others = {p.name: p.load(folder / f"other-{i}") for i, p in enumerate(packages.others)}
        _LOADED[key] = ((model, crafter, others), folder)
    (model, crafter, others), _ = _LOADED[key]
    scratch = Path(tempfile.mkdtemp(prefix="auditkit-cell-"))
    try:
        run = dataclasses.replace(shared, model=model, crafter=crafter, others=others, out_dir=scratch)
        result = run.run_cell(settings, _BoardProgress(board))
        files = {p.relative_to(scratch).as_posix(): p.read_bytes() for p in scratch.rglob("*") if p.is_file()}
        return result, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def make_executor(name: str, address: str | None, refs: Mapping[str, str | Path | None]) -> RayExecutor | None:
    """The executor `--executor` names (None: the audit's own, here)."""
    if name not in EXECUTORS:
        raise AuditkitError(f"unknown executor {name!r} (choose from {', '.join(EXECUTORS)})", "--executor")
    if address is not None and name != "ray":
        raise AuditkitError("only applies with --executor ray", "--ray-address")
    if name == "ray" and refs.get("model") is None:
        raise AuditkitError("Ray workers load the model from its files: give a file or zoo name, not an object",
                            "executor")
    return RayExecutor(address, refs) if name == "ray" else None
