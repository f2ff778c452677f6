"""Typed audit results and their one serialisation to and from results.json."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import AuditkitError
from .fileio import atomic_write_text
from .metrics import Rate
from .uap.base import AttackSettings

SCHEMA_VERSION = "2.0"  # 2.0: a cell's settings are one "attack" object


@dataclass
class SplitEval:
    """Predictions on one split with one perturbation added (or none, for the clean baseline)."""

    split: str
    n: int
    accuracy: Rate
    fooling_rate: Rate  # prediction != true label (the paper's R_f)
    flip_rate: Rate  # prediction != clean prediction
    targeted_success_rate: Rate | None  # prediction == target, over all images (targeted cells only)
    confusion: list[list[int]]  # true label (rows) x prediction (columns)
    sensitivity: list[float | None]
    ppv: list[float | None]
    dominant_label: str | None  # class absorbing most flipped images
    dominant_share: float | None
    flipped: int
    psnr: float | None = None  # mean over images, dB (None for the clean baseline)
    ssim: float | None = None
    targeted_induced_rate: Rate | None = None  # prediction == target, over images not predicted so when clean


@dataclass
class ControlSummary:
    """Random controls of the same norm as a UAP, on one split: pooled rates and spread over draws."""

    split: str
    draws: int
    fooling_rate: Rate  # pooled over draws
    fooling_rate_std: float
    flip_rate: Rate
    targeted_success_rate: Rate | None
    targeted_success_rate_std: float | None
    targeted_induced_rate: Rate | None = None


@dataclass
class Example:
    """One image shown in the report's UAP figure; its pixels are in samples/<sample>.npy."""

    sample: str
    id: str
    true_label: str
    clean_prediction: str
    adversarial_prediction: str


@dataclass
class TransferEval:
    """A UAP evaluated on another model (deployed twin or transfer target), on one split."""

    headline: Rate  # R_f (nontargeted) or R_s (targeted) on that model
    flip_rate: Rate  # vs that model's own clean predictions
    argmax_agreement: float  # share of images where it predicts what the audited model predicts under the UAP
    max_abs_prob_diff: float


@dataclass
class StrengthChecks:
    """Whether a cell's UAP shows the attack worked (see auditkit.strength); None: the check did not run."""

    uap_norm: float  # in the budget's norm
    moved: bool  # uap_norm >= xi / 2
    noise_p_values: dict[str, float]  # split -> one-sided exact McNemar p, UAP vs its random controls
    beats_noise: bool | None  # p < alpha on every split (None: no random controls)
    monotone: bool | None = None  # None: no cell differing only by a smaller zeta
    reach_zeta: float | None = None
    reach_rate: float | None = None  # crafting-set rate of a UAP crafted at reach_zeta
    reachable: bool | None = None
    white_box_strongest: bool | None = None  # None: no black-box craft of the same cell to compare with

    def failed(self) -> list[str]:
        """Names of the checks that ran and failed."""
        names = ("moved", "beats_noise", "monotone", "reachable", "white_box_strongest")
        return [n for n in names if getattr(self, n) is False]


@dataclass
class CellResult:
    """One UAP of the attack grid: settings, crafting record and evaluation."""

    key: str
    attack: AttackSettings
    xi: float
    mean_image_norm: float
    seed: int
    uap_file: str  # relative to the run directory
    uap_norm_l2: float
    uap_norm_linf: float
    passes: int
    crafting_rates: list[float]  # flip rate (nontargeted) or R_s (targeted) on the crafting set after each pass
    visited: int  # images visited by the loop
    seconds: float
    evals: dict[str, SplitEval]
    controls: dict[str, ControlSummary]
    examples: list[Example] = field(default_factory=list)
    gradient_steps: int = 0  # per-image (paper) or mini-batch (sgd) gradient steps
    transfer: dict[str, dict[str, TransferEval]] = field(default_factory=dict)  # model name -> split -> eval
    queries: int | None = None  # model queries spent (black-box crafting only)
    strength: StrengthChecks | None = None

    def headline(self, split: str) -> Rate:
        """R_f for nontargeted cells, R_s for targeted ones (the paper's rates: clean errors included)."""
        return self._rate(self.evals[split], "targeted_success_rate", "fooling_rate")

    def metric_value(self, metric: str, split: str) -> float:
        """A threshold metric of this cell on one split (uap_over_random: the lift of what the attack changed over
        its random control's, clean errors left out)."""
        if metric == "uap_over_random":
            return self.induced(split).value - self.control_induced(split).value
        return getattr(self.evals[split], metric).value

    def control_headline(self, split: str) -> Rate | None:
        return self._rate(self.controls.get(split), "targeted_success_rate", "fooling_rate")

    def induced(self, split: str) -> Rate | None:
        """What the UAP itself changed, clean errors left out: the flip rate (nontargeted), or R_s over the images
        not predicted as the target when clean (targeted)."""
        return self._rate(self.evals[split], "targeted_induced_rate", "flip_rate")

    def control_induced(self, split: str) -> Rate | None:
        return self._rate(self.controls.get(split), "targeted_induced_rate", "flip_rate")

    def _rate(self, record: SplitEval | ControlSummary | None, targeted: str, nontargeted: str) -> Rate | None:
        if record is None:
            return None
        return getattr(record, targeted if self.attack.kind == "targeted" else nontargeted)


@dataclass
class SweepPoint:
    """One craft of a sweep: the UAP at one zeta (not saved), its headline rate on the sweep's split and its random
    controls' (pooled)."""

    zeta: float
    xi: float
    rate: Rate
    control: Rate | None
    uap_norm: float  # in the budget's norm
    seconds: float


@dataclass
class SweepResult:
    """The zeta at which the model breaks for one kind, target, norm and algorithm (auditkit.sweep)."""

    key: str  # the cells' key without zeta, e.g. "nontargeted_inf" or "targeted-COVID-19_2_sgd"
    attack: AttackSettings  # at the sweep's high zeta
    split: str
    level: float  # the headline rate (R_f or R_s) that counts as broken
    low: float  # the zetas searched
    high: float
    points: list[SweepPoint]  # in the order crafted
    critical_zeta: float | None  # the smallest zeta measured at or above level (None: not reached at high)
    below: float | None  # the largest zeta measured below level under it (None: critical_zeta is low itself)
    reach_zeta: float | None = None
    reach_rate: float | None = None
    reachable: bool | None = None  # as a cell's reachability check; False makes its rules INCONCLUSIVE

    @property
    def measured(self) -> float:
        """What a critical_zeta rule judges: critical_zeta, or `high` where the level was not reached (a lower
        bound: the model breaks, if at all, above it)."""
        return self.high if self.critical_zeta is None else self.critical_zeta


@dataclass
class RuleResult:
    name: str
    metric: str
    split: str
    selectors: dict[str, Any]
    bound: str  # "max" | "min"
    limit: float
    measured: float  # the worst value over the selected cells
    worst_cell: str | None
    cells: list[str]
    passed: bool  # the measured value is within the limit
    max_increase: float | None = None  # the rule also bounds the rise since a baseline audit
    increase: float | None = None  # the largest rise over the selected cells (None: no baseline given)
    increase_cell: str | None = None
    failed_checks: list[str] = field(default_factory=list)  # "<cell>: <check>" for selected cells

    @property
    def status(self) -> str:
        """FAIL where the limit is broken; INCONCLUSIVE where it holds but a selected cell's attack did not show
        that it worked; else PASS."""
        return "FAIL" if not self.passed else "INCONCLUSIVE" if self.failed_checks else "PASS"


@dataclass
class ModelInfo:
    name: str
    format: str
    path: str
    sha256: dict[str, str]  # file (relative to the model path) -> sha256
    classes: list[str]
    input_size: int
    channels: int
    parameters: int | None
    description: str = ""
    gradients: str | None = None  # how input gradients were obtained; None where none were needed
    digest: str = ""  # one SHA-256 over every file in sha256 (models.identity.digest)
    spec_file: str = ""  # the model.yaml the spec was read from ("" where none)
    spec: dict[str, Any] = field(default_factory=dict)  # the complete spec the inputs were fed with


@dataclass
class DataInfo:
    source: str
    format: str
    synthetic: bool
    manifest_sha256: str
    content_sha256: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    craft_split: str
    eval_splits: list[str]
    preprocess: dict[str, Any]  # what was used: size, crop_top, resize (and where each came from), max_images
    notice: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. a policy preprocessing unlike the model's own


@dataclass
class Provenance:
    auditkit: str
    python: str
    tensorflow: str
    onnxruntime: str
    numpy: str
    platform: str
    command: str
    seed: int
    policy_path: str
    policy_sha256: str
    policy: dict[str, Any]
    started: str
    finished: str
    seconds: float
    # wall seconds per phase: clean predictions, crafting (reachability checks and sweeps included), evaluation
    # (UAPs), controls (random draws); cells crafted side by side are evaluated while the others craft on
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class HardeningRound:
    """One round on the test split: the new UAP's R_f (nontargeted) or R_s (targeted), and clean accuracy.

    Round 0 is the model before retraining (train_loss empty).
    """

    round: int
    attack_rate: Rate
    clean_accuracy: Rate
    train_loss: list[float]  # mean training loss per fine-tuning epoch
    seconds: float


@dataclass
class HardeningRecord:
    settings: dict[str, Any]  # the policy's hardening block + eps, max_iter, delta, clip, seed and xi used
    metric: str  # "fooling_rate" | "targeted_success_rate"
    rounds: list[HardeningRound]  # round 0 first
    final_confusion: list[list[int]]  # test split, true label x prediction under the last round's UAP
    keras_file: str  # relative to the output directory
    onnx_file: str | None  # None if the ONNX export failed
    parity: dict[str, Any] | None  # max_abs_prob_diff, argmax_agreement, n, tolerance, passed
    seconds: float  # all rounds (including those of an interrupted earlier run) plus export


@dataclass
class DeployParity:
    """The audited model against the file that is deployed (e.g. its ONNX export), on clean images."""

    model: ModelInfo
    n: int
    max_abs_prob_diff: float
    argmax_agreement: float
    tolerance: float
    passed: bool


@dataclass
class CellDelta:
    """One cell's headline rate (R_f or R_s) on one split, in the baseline audit and in this one."""

    key: str
    split: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class BaselineComparison:
    """This audit against an earlier one under the same policy (the last released model's)."""

    source: str  # the baseline results.json as given
    model: ModelInfo
    verdict: str
    started: str
    deltas: list[CellDelta]


@dataclass
class AuditResult:
    title: str
    organisation: str
    intended_use: str
    verdict: str  # PASS | FAIL | INCONCLUSIVE
    model: ModelInfo
    data: DataInfo
    clean: dict[str, SplitEval]
    cells: list[CellResult]
    rules: list[RuleResult]
    provenance: Provenance
    schema_version: str = SCHEMA_VERSION
    hardening: HardeningRecord | None = None  # adversarial retraining, when the policy enables it
    hardened: AuditResult | None = None  # the same policy re-run on the hardened model
    crafted_on: ModelInfo | None = None  # the surrogate the UAPs were crafted on (None: the audited model)
    deploy: DeployParity | None = None
    transfer_models: list[ModelInfo] = field(default_factory=list)  # deploy + transfer targets, in cell.transfer
    baseline: BaselineComparison | None = None  # --baseline: per-cell change since an earlier audit
    sweeps: list[SweepResult] = field(default_factory=list)  # critical zeta per grid `sweep:`

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if r.status == "FAIL"]

    @property
    def inconclusive_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if r.status == "INCONCLUSIVE"]

    def cell(self, key: str) -> CellResult:
        for c in self.cells:
            if c.key == key:
                return c
        raise KeyError(key)


def to_dict(result: AuditResult) -> dict[str, Any]:
    return _clean_floats(dataclasses.asdict(result))


def from_dict(data: dict[str, Any], where: str = "results.json") -> AuditResult:
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise AuditkitError(f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})", where)
    try:
        return _build(AuditResult, data)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise AuditkitError(f"malformed results: {exc}", where) from None


def cell_to_dict(cell: CellResult) -> dict[str, Any]:
    """One cell in its results.json form (a checkpoint of a finished cell)."""
    return _clean_floats(dataclasses.asdict(cell))


def cell_from_dict(data: dict[str, Any]) -> CellResult:
    return _build(CellResult, data)


def write_json(result: AuditResult, path: Path) -> None:
    text = json.dumps(to_dict(result), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: Path) -> AuditResult:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditkitError("file not found", str(path)) from None
    except OSError as exc:
        raise AuditkitError(f"cannot read ({exc.strerror or exc})", str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditkitError(f"not valid JSON ({exc})", str(path)) from None
    return from_dict(data, str(path))


def _clean_floats(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as null (an undefined rate) or a string (infinite PSNR)."""
    if isinstance(obj, float):
        if obj != obj:
            return None
        if obj in (float("inf"), float("-inf")):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, BaseModel):
        return _clean_floats(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def _build(tp: Any, value: Any) -> Any:
    """Rebuild a typed value from its JSON form, following the dataclass annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner[0], value)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp.model_validate(value, strict=False)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_build(arg, v) for v in value]
    if origin is dict:
        _, arg = typing.get_args(tp)
        return {k: _build(arg, v) for k, v in value.items()}
    if tp is float:
        if value is None:
            return float("nan")
        return float(value)
    return value
