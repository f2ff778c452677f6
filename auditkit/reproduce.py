"""`auditkit verify --recompute`: re-craft cells of a finished run from what it recorded (model files, data,
policy, seed) and compare. On the platform that made the run the UAPs must match byte for byte; elsewhere
kernels round differently, so the rates are compared with the recorded Wilson intervals instead."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AuditkitError
from .models import ZOO_NAMES
from .policy import AttackGrid, Policy, policy_from_record
from .results import AuditResult, ModelInfo, read_json
from .supervisor import scratch_folder

PLATFORM_FIELDS = ("platform", "python", "tensorflow", "onnxruntime", "numpy")


@dataclass
class Recomputation:
    platform_note: str
    lines: list[str] = field(default_factory=list)  # one per cell (and split, on another platform)
    problem: str | None = None  # the first cell or input that was not reproduced


def recompute_cells(run_dir: str | Path, which: str, progress=None) -> Recomputation:
    """Re-run the cells named by `which` (a cell key, or "all") of the run in `run_dir` and compare."""
    from . import api

    run_dir = Path(run_dir)
    recorded = read_json(run_dir / "results.json")
    policy = policy_from_record(recorded.provenance.policy, f"{run_dir / 'results.json'}: provenance.policy")
    keys = [c.key for c in recorded.cells] if which == "all" else [which]
    known = {c.key for c in recorded.cells}
    if which != "all" and which not in known:
        raise AuditkitError(f"no cell {which!r} in this run (cells: {', '.join(sorted(known))}, or all)",
                            "--recompute")
    model = api.load_model(_model_ref(recorded.model), {"classes": recorded.model.classes})
    result = Recomputation(f"recorded on {_platform(recorded)}")
    if model.sha256() != recorded.model.sha256:
        result.problem = f"model {recorded.model.name}: its files' sha256 differ from the recorded ones"
        return result
    surrogate = _model_ref(recorded.crafted_on) if recorded.crafted_on else None
    with scratch_folder(Path(tempfile.gettempdir()), "auditkit-recompute-") as tmp:
        again = api.run(model, _policy_for(policy, keys, recorded.model.classes), Path(tmp) / "out",
                        data=None if recorded.data.synthetic else recorded.data.source, formats=["json"],
                        surrogate=surrogate, progress=progress)
        if again.data.content_sha256 != recorded.data.content_sha256:
            result.problem = (f"data {recorded.data.source}: the decoded images' sha256 {again.data.content_sha256[:16]}… "
                              f"differs from the recorded {recorded.data.content_sha256[:16]}…")
            return result
        same_platform = _same_platform(recorded, again)
        result.platform_note = (f"same platform as the recorded run ({_platform(again)}): the UAPs must match byte "
                                "for byte" if same_platform else
                                f"another platform: recorded on {_platform(recorded)}, recomputed on "
                                f"{_platform(again)}; kernels may round differently, so the rates are compared "
                                "with the recorded Wilson 95% intervals")
        for key in keys:
            _compare_cell(recorded, again, key, run_dir, Path(tmp) / "out", same_platform, result)
    return result


def _model_ref(info: ModelInfo) -> str:
    """What load_model needs to load the recorded model again: a zoo name or the recorded path."""
    if info.name in ZOO_NAMES and info.path.endswith(".weights.h5"):
        return info.name
    if not info.path:
        raise AuditkitError("was audited from memory, without a file: it cannot be loaded again", info.name)
    return info.path


def _policy_for(policy: Policy, keys: list[str], classes: list[str]) -> Policy:
    """The recorded policy reduced to the cells in `keys`, one grid per cell and algorithm (crafting its restarts up
    to the last one asked for), without sweeps, rules or hardening: each cell draws from its own stream (policy
    seed, cell key, restart), so it crafts the same UAP alone as in the grid."""
    grids: dict[str, AttackGrid] = {}
    for grid in policy.attacks:
        for cell in grid.expand(classes):
            first = cell.model_copy(update={"restart": 0}).key
            if cell.key in keys and (first not in grids or grids[first].restarts <= cell.restart):
                grids[first] = grid.model_copy(update={
                    "kinds": [cell.kind], "targets": "all" if cell.target is None else [cell.target],
                    "norms": [cell.norm], "zetas": [cell.zeta], "algorithms": None, "algorithm": cell.algorithm,
                    "restarts": cell.restart + 1, "sweep": None})
    return policy.model_copy(update={"attacks": list(grids.values()), "thresholds": [], "transfer": [],
                                     "hardening": policy.hardening.model_copy(update={"enabled": False})})


def _same_platform(recorded: AuditResult, again: AuditResult) -> bool:
    return all(getattr(recorded.provenance, f) == getattr(again.provenance, f) for f in PLATFORM_FIELDS)


def _platform(result: AuditResult) -> str:
    prov = result.provenance
    return (f"{prov.platform}, Python {prov.python}, TensorFlow {prov.tensorflow}, onnxruntime {prov.onnxruntime}, "
            f"NumPy {prov.numpy}")


def _compare_cell(recorded: AuditResult, again: AuditResult, key: str, run_dir: Path, new_dir: Path,
                  same_platform: bool, result: Recomputation) -> None:
    old, new = recorded.cell(key), again.cell(key)
    rho_old = np.load(run_dir / old.uap_file, allow_pickle=False)
    rho_new = np.load(new_dir / new.uap_file, allow_pickle=False)
    identical = (rho_old.dtype == rho_new.dtype and rho_old.shape == rho_new.shape
                 and rho_old.tobytes() == rho_new.tobytes())
    if same_platform:
        if identical:
            result.lines.append(f"{key}: UAP identical byte for byte ({old.uap_file})")
        else:
            diff = float(np.abs(rho_old.astype(np.float64) - rho_new).max()) if rho_old.shape == rho_new.shape \
                else float("nan")
            result.lines.append(f"{key}: UAP differs (max |Δ| {diff:.3g})")
            result.problem = result.problem or (f"{key}: the recomputed UAP differs from {old.uap_file} on the "
                                                f"same platform (max |Δ| {diff:.3g})")
        return
    result.lines.append(f"{key}: other platform; UAP {'identical' if identical else 'differs in its bits'}")
    for split, ev in old.evals.items():
        was, now = old.headline(split), new.headline(split).value
        inside = was.low <= now <= was.high
        result.lines.append(f"  {split}: recorded {was.value:.1%} [{was.low:.1%}, {was.high:.1%}], recomputed "
                            f"{now:.1%} — {'within' if inside else 'OUTSIDE'} the interval")
        if not inside:
            result.problem = result.problem or (f"{key} ({split}): recomputed rate {now:.1%} lies outside the "
                                                f"recorded interval [{was.low:.1%}, {was.high:.1%}]")
