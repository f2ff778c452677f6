"""The audit policy: a YAML file saying what to attack, how, and which thresholds a model must meet.

Every problem with a policy becomes one AuditkitError naming the file and the key path, e.g.
`paper.yaml: attacks.0.zetas.1: must be in (0, 1], got 1.5`.
"""
from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import math
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from .errors import AuditkitError
from .models.registry import ZOO_CLASSES, ZOO_NAMES
from .uap.base import Algorithm, AttackSettings, Crafting, Kind, Norm, SGDSettings, Zeta
from .messages import quote, shown
from .yaml_budget import check_expanded_size, read_text

DEFAULT_CLASSES = ZOO_CLASSES
Metric = Literal["fooling_rate", "flip_rate", "targeted_success_rate", "targeted_induced_rate", "clean_accuracy",
                 "uap_over_random", "critical_zeta"]
TARGETED_METRICS = ("targeted_success_rate", "targeted_induced_rate")
ReportFormat = Literal["html", "pdf", "json", "junit"]


class _At(ValueError):
    """A validation problem at `loc`, a key path below the model or field that raised it."""

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def _unique(values: list) -> list:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise _At((i,), f"duplicate entry {shown(v)}")
        seen.add(v)
    return values


def _targets(v: Any) -> Any:
    """'all', one class name, or a list of class names."""
    if v == "all":
        return v
    if isinstance(v, str) and v:
        return [v]
    if isinstance(v, list) and v and all(isinstance(t, str) and t for t in v):
        return _unique(v)
    raise ValueError(f"must be 'all' or a non-empty list of class names, got {shown(v)}")


Name = Annotated[str, StringConstraints(min_length=1)]


T = TypeVar("T")
UniqueList = Annotated[list[T], Field(min_length=1), AfterValidator(_unique)]  # non-empty, no repeats


class _Model(BaseModel):
    # strict: a YAML string such as "0.02" or "yes" is a mistake in a policy, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _crop_top(v: Any) -> Any:
    if v == "model" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 0.5):
        return v if v == "model" else float(v)
    raise ValueError(f"must be 'model' (the model's own) or a fraction in [0, 0.5), got {v!r}")


class Preprocess(_Model):
    """How images are cropped and resized; "model" (the default) means as the model's spec states."""

    size: int | None = Field(None, ge=8, le=1024)  # None: the model's own input size
    crop_top: Annotated[float | Literal["model"], BeforeValidator(_crop_top)] = "model"
    resize: Literal["bilinear", "bicubic", "nearest", "lanczos", "area", "model"] = "model"


class DataConfig(_Model):
    manifest: Name | None = None  # None: built-in synthetic phantoms
    format: Literal["auto", "csv", "jsonl", "covidx", "folders"] = "auto"
    image_root: Name | None = None
    classes: Annotated[UniqueList[Name], Field(min_length=2)] = list(DEFAULT_CLASSES)
    aliases: dict[Name, Name] = {}
    preprocess: Preprocess = Field(default_factory=Preprocess)
    craft_split: Name = "train"
    eval_splits: UniqueList[Name] = ["train", "test"]
    max_images: dict[Name, Annotated[int, Field(gt=0)]] = {}

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        splits = [self.craft_split, *self.eval_splits]
        for split in self.max_images:
            if split not in splits:
                raise _At(("max_images", split), f"split {quote(split)} is neither craft_split nor in eval_splits")
        for alias, target in self.aliases.items():
            if alias in self.classes and alias != target:
                raise _At(("aliases", alias), f"{quote(alias)} is itself a class; it cannot be an alias of {quote(target)}")
        return self


class Sweep(_Model):
    """The smallest zeta at which the headline rate on `split` reaches `level`, found by bisection (geometric, as
    zetas span orders of magnitude) between `low` and `high`, `steps` times: its interval narrows to a ratio of
    (high / low) ** (1 / 2 ** steps)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    level: float = Field(0.5, gt=0, lt=1)
    split: Name = "test"
    low: Zeta = 0.0025
    high: Zeta = 0.1
    steps: int = Field(5, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        if self.low >= self.high:
            raise _At(("low",), f"must be below high ({self.high:g}), got {self.low:g}")
        return self


class AttackGrid(Crafting):
    """Cells to craft: every kind x target x norm x zeta, all crafted the same way (the Crafting fields)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    kinds: UniqueList[Kind]
    targets: Annotated[Literal["all"] | list[str], BeforeValidator(_targets)] = "all"
    norms: UniqueList[Norm]
    zetas: UniqueList[Zeta]
    # every cell crafted with each of these (rules then judge the worst); unset: `algorithm` alone
    algorithms: Annotated[UniqueList[Algorithm], Field(min_length=1)] | None = None
    # independent crafts of every cell from their own seeded streams (the paper loop's result depends on the order
    # it visits images in); rules judge the worst
    restarts: int = Field(1, ge=1, le=100)
    # per kind x target x norm x algorithm, the zeta at which the model breaks (restart 0's stream at each zeta)
    sweep: Sweep | None = None

    @property
    def crafted_with(self) -> list[str]:
        return list(self.algorithms) if self.algorithms is not None else [self.algorithm]

    @model_validator(mode="after")
    def _check(self) -> AttackGrid:
        if "targets" in self.model_fields_set and "targeted" not in self.kinds:
            raise _At(("targets",), "targets is set but kinds has no 'targeted'")
        if self.algorithms is not None and "algorithm" in self.model_fields_set:
            raise _At(("algorithms",), "give algorithm or algorithms, not both")
        for name in ("sgd", "blackbox"):
            if name in self.model_fields_set and name not in self.crafted_with:
                raise _At((name,), f"{name} settings are given but algorithm is {self.algorithm!r}; "
                                   f"set algorithm: {name} or drop them")
        return self

    def expand(self, classes: Sequence[str]) -> list[AttackSettings]:
        """Cells in order kind, target, norm, zeta, algorithm, restart; targets 'all' means every class in
        `classes`."""
        targets = list(classes) if self.targets == "all" else self.targets
        crafting = dict(self.crafting())
        return [
            AttackSettings(kind=kind, target=target, norm=norm, zeta=zeta, restart=restart,
                           **(crafting | {"algorithm": algorithm}))
            for kind in self.kinds
            for target in ([None] if kind == "nontargeted" else targets)
            for norm in self.norms
            for zeta in self.zetas
            for algorithm in self.crafted_with
            for restart in range(self.restarts)
        ]

    def sweeps(self, classes: Sequence[str]) -> list[AttackSettings]:
        """One cell per sweep (kind, target, norm, algorithm), at the sweep's high zeta; none without `sweep`."""
        if self.sweep is None:
            return []
        return self.model_copy(update={"zetas": [self.sweep.high], "restarts": 1}).expand(classes)


class RandomControls(_Model):
    draws: int = Field(5, ge=0)


class Threshold(_Model):
    """A pass/fail rule on one metric of one split, for every cell its selectors pick (unset = any)."""

    name: Name | None = None
    metric: Metric
    split: Name
    kind: Kind | None = None
    target: Name | None = None
    norm: Norm | None = None
    zeta: Zeta | None = None
    algorithm: Algorithm | None = None  # unset: the worst over every algorithm a cell was crafted with
    max: float | None = None
    min: float | None = None
    max_increase: float | None = Field(None, ge=0, le=1)  # the most the metric may rise since --baseline's audit

    @property
    def per_cell(self) -> bool:
        """False for clean_accuracy, measured once per split, and critical_zeta, measured per sweep (selects() is
        False for both)."""
        return self.metric not in ("clean_accuracy", "critical_zeta")

    @property
    def effective_kind(self) -> Kind | None:
        """The kind selector, with targeted implied by a targeted metric or a target."""
        if self.kind is None and (self.metric in TARGETED_METRICS or self.target is not None):
            return "targeted"
        return self.kind

    @property
    def limit(self) -> float:
        return self.max if self.max is not None else self.min

    def selects(self, cell: AttackSettings) -> bool:
        return self.per_cell and self._selects(cell)

    def selects_sweep(self, cell: AttackSettings, split: str) -> bool:
        """Whether a critical_zeta rule judges the sweep of `cell` measured on `split` (it must be the rule's)."""
        return self.metric == "critical_zeta" and split == self.split and self._selects(cell)

    def _selects(self, cell: AttackSettings) -> bool:
        kind = self.effective_kind
        return (
            (kind is None or cell.kind == kind)
            and (self.target is None or cell.target == self.target)
            and (self.norm is None or cell.norm == self.norm)
            and (self.zeta is None or math.isclose(cell.zeta, self.zeta, rel_tol=1e-9))
            and (self.algorithm is None or cell.algorithm == self.algorithm)
        )

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if (self.max is None) == (self.min is None):
            raise _At((), "give exactly one of max or min")
        bound = "max" if self.max is not None else "min"
        low = -1.0 if self.metric == "uap_over_random" else 0.0
        if not low <= self.limit <= 1:
            raise _At((bound,), f"must be in [{low:g}, 1] for {self.metric}, got {self.limit!r}")
        if self.metric == "clean_accuracy":
            for key in ("kind", "target", "norm", "zeta", "algorithm"):
                if getattr(self, key) is not None:
                    raise _At((key,), "clean_accuracy is measured on clean images; remove this attack selector")
        if self.metric == "critical_zeta":
            if self.max is not None:
                raise _At(("max",), "critical_zeta is the zeta at which the model breaks: bound it with min")
            if self.zeta is not None:
                raise _At(("zeta",), "critical_zeta is found over zeta by a sweep; remove the zeta selector")
        if self.kind == "nontargeted" and self.metric in TARGETED_METRICS:
            raise _At(("kind",), f"{self.metric} applies to targeted attacks only")
        if self.kind == "nontargeted" and self.target is not None:
            raise _At(("target",), "nontargeted attacks have no target; drop target or set kind: targeted")
        if self.max_increase is not None and (not self.per_cell or self.max is None):
            raise _At(("max_increase",), "bounds the rise of an attack metric; give it with max, on a metric other "
                                         "than clean_accuracy and critical_zeta")
        if self.name is None:
            self.name = self._default_name()
        return self

    def _default_name(self) -> str:
        parts = [self.effective_kind, self.target and f"to {self.target}",
                 self.norm and f"L{self.norm}", self.zeta is not None and f"zeta={self.zeta:g}"]
        sel = ", ".join(p for p in parts if p) or "all cells"
        where = self.split if self.metric == "clean_accuracy" else f"{self.split}, {sel}"
        rise = "" if self.max_increase is None else f", rise <= {self.max_increase:g}"
        return f"{self.metric} ({where}) {'<=' if self.max is not None else '>='} {self.limit:g}{rise}"


class HardeningAttack(_Model):
    """The attack that drives retraining. Crafting settings left unset are the first attack grid's."""

    kind: Kind = "nontargeted"
    target: Name | None = None
    norm: Norm = "inf"
    zeta: Zeta = 0.02
    algorithm: Literal["paper", "sgd"] | None = None
    eps: float | None = Field(None, gt=0)
    max_iter: int | None = Field(None, ge=1)
    sgd: SGDSettings | None = None
    # Each UAP is crafted on a fresh seeded subset of this many crafting images (None: all of them, the paper's).
    craft_images: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> HardeningAttack:
        if self.kind == "targeted" and self.target is None:
            raise _At(("target",), "a targeted hardening attack needs a target class")
        if self.kind == "nontargeted" and self.target is not None:
            raise _At(("target",), "nontargeted attacks have no target; drop target or set kind: targeted")
        if self.sgd is not None and self.algorithm != "sgd":
            raise _At(("sgd",), f"sgd settings are given but algorithm is {self.algorithm!r}; "
                                "set algorithm: sgd or drop them")
        return self

    def settings(self, grid: AttackGrid | None = None) -> AttackSettings:
        """This attack as a cell, unset crafting settings taken from `grid` (default: the library defaults).

        A black-box grid lends no algorithm: hardening retrains a Keras model, which has gradients.
        """
        crafting = grid.crafting() if grid is not None else Crafting()
        algorithm = self.algorithm or (crafting.algorithm if crafting.algorithm != "blackbox" else "paper")
        overrides = {k: v for k, v in (("eps", self.eps), ("max_iter", self.max_iter), ("sgd", self.sgd))
                     if v is not None}
        return AttackSettings(kind=self.kind, target=self.target, norm=self.norm, zeta=self.zeta,
                              **(dict(crafting) | overrides | {"algorithm": algorithm}))


class Hardening(_Model):
    """Adversarial retraining (paper section 2.4)."""

    enabled: bool = False
    rounds: int = Field(5, ge=1)
    uaps_per_round: int = Field(10, ge=1)
    epochs: int = Field(5, ge=1)
    perturbed_fraction: float = Field(0.5, gt=0, lt=1)
    attack: HardeningAttack = Field(default_factory=HardeningAttack)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    seed: int | None = Field(None, ge=0)


def _iso_date(v: Any) -> Any:
    """A YAML date (2025-03-01 unquoted) or the same as a string: kept as 'YYYY-MM-DD'."""
    if isinstance(v, datetime.date) and not isinstance(v, datetime.datetime):
        return v.isoformat()
    if isinstance(v, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        try:
            return datetime.date.fromisoformat(v).isoformat()
        except ValueError:
            pass
    raise ValueError(f"must be a date written YYYY-MM-DD, got {v!r}")


class Signatory(_Model):
    """A person who signs the report: prepared by, reviewed by, approved by (their `role`)."""

    name: Name
    role: Name
    date: Annotated[str, BeforeValidator(_iso_date)] | None = None  # None: dated by hand when signing


class ReportConfig(_Model):
    title: Name = "UAP robustness audit"
    organisation: str = ""
    intended_use: str = ""
    formats: UniqueList[ReportFormat] = ["html", "pdf", "json", "junit"]
    signatories: list[Signatory] = []  # the report's signature block; empty lines to sign by hand when none


class Strength(_Model):
    """Attack-strength checks (auditkit.strength): a rule whose cells fail one is INCONCLUSIVE, never PASS."""

    alpha: float = Field(0.01, gt=0, lt=1)  # beats noise: paired exact test's one-sided p below this
    reach_zeta: Zeta = 0.10  # reachability: a UAP crafted at this budget...
    reach_rate: float = Field(0.9, gt=0, le=1)  # ...must reach this rate on the crafting set


class Policy(_Model):
    version: Literal[1]
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    attacks: Annotated[list[AttackGrid], Field(min_length=1)]
    random_controls: RandomControls = Field(default_factory=RandomControls)
    strength: Strength = Field(default_factory=Strength)
    thresholds: list[Threshold] = []
    hardening: Hardening = Field(default_factory=Hardening)
    transfer: list[Name] = []  # other models (zoo names or paths) every UAP is also evaluated on
    report: ReportConfig = Field(default_factory=ReportConfig)
    _source: str = PrivateAttr("<policy>")

    @model_validator(mode="after")
    def _check(self) -> Policy:
        names: dict[str, int] = {}
        for i, grid in enumerate(self.attacks):
            if grid.sweep is not None and grid.sweep.split not in self.data.eval_splits:
                raise _At(("attacks", i, "sweep", "split"), f"split {quote(grid.sweep.split)} is not evaluated "
                                                            f"(data.eval_splits: {', '.join(self.data.eval_splits)})")
        for i, t in enumerate(self.thresholds):
            if t.split not in self.data.eval_splits:
                raise _At(("thresholds", i, "split"),
                          f"split {quote(t.split)} is not evaluated (data.eval_splits: {', '.join(self.data.eval_splits)})")
            if t.metric == "uap_over_random" and self.random_controls.draws == 0:
                raise _At(("thresholds", i, "metric"), "uap_over_random needs random_controls.draws >= 1")
            if t.name in names:
                raise _At(("thresholds", i, "name"), f"name {quote(t.name)} is already used by thresholds.{names[t.name]}")
            names[t.name] = i
        return self

    def cells(self, classes: Sequence[str]) -> list[AttackSettings]:
        """The attack grid expanded in policy order; unknown target classes or repeated cells raise AuditkitError."""
        out: list[AttackSettings] = []
        origin: dict[str, int] = {}
        for i, grid in enumerate(self.attacks):
            if grid.targets != "all":
                for j, target in enumerate(grid.targets):
                    _check_class(target, classes, self._where(f"attacks.{i}.targets.{j}"))
            for cell in grid.expand(classes):
                if cell.key in origin:
                    raise AuditkitError(
                        f"cell {cell.key!r} is already produced by attacks.{origin[cell.key]}; "
                        "each (kind, target, norm, zeta) may appear once", where=self._where(f"attacks.{i}"))
                origin[cell.key] = i
                out.append(cell)
        return out

    def sweeps(self, classes: Sequence[str]) -> list[tuple[AttackSettings, Sweep]]:
        """Every grid's sweeps in policy order: the cell at the sweep's high zeta, and the sweep."""
        return [(cell, grid.sweep) for grid in self.attacks for cell in grid.sweeps(classes)]

    def sha256(self) -> str:
        """Hash of the canonical JSON of the validated policy (defaults filled in, paths resolved)."""
        return canonical_sha256(self.model_dump(mode="json"))

    def _where(self, path: str) -> str:
        return f"{self._source}: {path}"


def canonical_sha256(policy_dump: dict[str, Any]) -> str:
    """A policy's digest from its JSON form: results.json and evidence.json record that form, so a reviewer
    can recompute the digest from either without the policy file."""
    text = json.dumps(policy_dump, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_against_classes(policy: Policy, classes: Sequence[str]) -> None:
    """Check every class name in the policy against `classes`, the grid for repeated cells, and that every
    per-cell threshold selects at least one cell. Raises AuditkitError naming the key path."""
    classes = list(classes)
    for alias, target in policy.data.aliases.items():
        _check_class(target, classes, policy._where(f"data.aliases.{alias}"))
    cells, sweeps = policy.cells(classes), policy.sweeps(classes)
    for i, t in enumerate(policy.thresholds):
        if t.target is not None:
            _check_class(t.target, classes, policy._where(f"thresholds.{i}.target"))
        if t.per_cell and not any(t.selects(c) for c in cells):
            keys = ", ".join(c.key for c in cells[:8]) + (", ..." if len(cells) > 8 else "")
            raise AuditkitError(f"selects no cell of the attack grid (cells: {keys})",
                                where=policy._where(f"thresholds.{i}"))
        if t.metric == "critical_zeta" and not any(t.selects_sweep(c, sweep.split) for c, sweep in sweeps):
            raise AuditkitError(f"selects no sweep measured on {t.split} (give a grid `sweep:` with split: "
                                f"{t.split})", where=policy._where(f"thresholds.{i}"))
    if policy.hardening.attack.target is not None:
        _check_class(policy.hardening.attack.target, classes, policy._where("hardening.attack.target"))


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate a policy mapping (as loaded from YAML) and check it against its own data.classes."""
    if not isinstance(data, dict):
        raise AuditkitError(f"a policy must be a mapping of keys, got {type(data).__name__}", where=source)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        raise _to_auditkit_error(err, source) from None
    policy._source = source
    validate_against_classes(policy, policy.data.classes)
    return policy


def policy_from_record(dump: dict[str, Any], source: str) -> Policy:
    """The policy recorded in results.json (its JSON form, defaults filled in) as a Policy again. A grid's
    settings were dumped with their defaults, and validation would read them as set (e.g. sgd settings beside
    another algorithm), so every grid key that holds its default is dropped first."""
    data = json.loads(json.dumps(dump))
    defaults = {name: field.get_default(call_default_factory=True) for name, field in AttackGrid.model_fields.items()
                if not field.is_required()}
    defaults = {name: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for name, v in defaults.items()}
    for grid in data.get("attacks", []) if isinstance(data, dict) else []:
        for key, default in defaults.items():
            if isinstance(grid, dict) and key in grid and grid[key] == default:
                del grid[key]
    return parse_policy(data, source)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; relative data paths are resolved against the file's folder."""
    path = Path(path)
    source = str(path)
    policy = parse_policy(_load_yaml(read_text(path, "policy file"), source), source)
    base = path.resolve().parent
    resolved = {key: str(base / Path(value).expanduser()) for key in ("manifest", "image_root")
                if (value := getattr(policy.data, key)) is not None}
    policy.data = policy.data.model_copy(update=resolved)
    policy.transfer = [t if t in ZOO_NAMES else str(base / Path(t).expanduser()) for t in policy.transfer]
    return policy


def _check_class(name: str, classes: Sequence[str], where: str) -> None:
    if name not in classes:
        by_lower = {c.lower(): c for c in classes}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
        hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
        raise AuditkitError(f"unknown class {quote(name)}{hint}; classes are: {', '.join(classes)}", where=where)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects repeated keys and reads 1e-6 as a float (YAML 1.2), not as a string."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base constructor reports it
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {quote(key)} (first given on line {first_line[key]})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        loader = _Loader(text)  # its reader refuses control characters already here
    except yaml.YAMLError as err:
        raise AuditkitError(f"invalid YAML: {str(err).splitlines()[0]}", where=source) from None
    try:
        node = loader.get_single_node()
        check_expanded_size(node, source)
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = " ".join(p for p in (err.context, err.problem) if p) or str(err)
        raise AuditkitError(f"invalid YAML: {problem}", where=where) from None
    except yaml.YAMLError as err:
        raise AuditkitError(f"invalid YAML: {err}", where=source) from None
    except RecursionError:
        raise AuditkitError("YAML nested too deeply", where=source) from None
    finally:
        loader.dispose()
    if node is None:
        raise AuditkitError("policy file is empty", where=source)
    if not isinstance(data, dict):
        raise AuditkitError(f"the top level must be a mapping of keys (version, data, attacks, ...), "
                            f"got a {type(data).__name__}", where=f"{source}:{node.start_mark.line + 1}")
    return data


def _to_auditkit_error(err: ValidationError, source: str) -> AuditkitError:
    """The first pydantic error as one line: '<source>: <key.path>: <what is wrong>, got <value>'."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    cause = first.get("ctx", {}).get("error")
    kind = first["type"]
    if isinstance(cause, _At):
        loc += cause.loc
        message = cause.message
    elif isinstance(cause, ValueError):
        message = str(cause)
    elif kind == "extra_forbidden":
        message = _unknown_key(loc)
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "too_short":
        at_least = first["ctx"]["min_length"]
        message = f"must have at least {at_least} entr{'y' if at_least == 1 else 'ies'}, got {shown(first['input'])}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"must be a mapping of keys, got {shown(first['input'])}"
    else:
        message = f"{first['msg'].replace('Input should be', 'must be', 1)}, got {shown(first['input'])}"
    if len(errors) > 1:
        message += f" (+{len(errors) - 1} more)"
    path = ".".join(str(part) for part in loc)
    return AuditkitError(message, where=f"{source}: {path}" if path else source)


def _unknown_key(loc: tuple) -> str:
    key = str(loc[-1])
    allowed = sorted(_model_at(loc[:-1]).model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"unknown key {quote(key)}" + (f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(allowed)}")


def _model_at(loc: tuple) -> type[BaseModel]:
    """The model class found at a key path of Policy (list indices skipped)."""
    model: type[BaseModel] = Policy
    for part in loc:
        if isinstance(part, str) and part in model.model_fields:
            model = _find_model(model.model_fields[part].annotation) or model
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := _find_model(arg):
            return found
    return None

