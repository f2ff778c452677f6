"""What every attack shares: its settings (one type from the policy to the results), its result, its contract.

Free of TensorFlow: the policy parses these settings and results.json embeds them.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Protocol

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..messages import shown

Kind = Literal["nontargeted", "targeted"]
Algorithm = Literal["paper", "sgd", "blackbox"]
# (pass or epoch, images done, images in all, crafting rate once the pass is over or None)
ProgressFn = Callable[[int, int, int, "float | None"], None]


def parse_norm(v: Any) -> str:
    """2 / "2" / "L2" -> "2"; inf / .inf / "inf" / "Linf" -> "inf"."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v == 2:
            return "2"
        if v == math.inf:
            return "inf"
    elif isinstance(v, str):
        s = v.strip().lower().removeprefix("l").removeprefix("_").removeprefix(".")
        if s == "2":
            return "2"
        if s in ("inf", "infinity"):
            return "inf"
    raise ValueError(f"must be 2 or inf (also accepted: L2, Linf), got {shown(v)}")


def _zeta(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"must be in (0, 1], got {v!r}")
    return v


Norm = Annotated[Literal["2", "inf"], BeforeValidator(parse_norm)]
Zeta = Annotated[float, AfterValidator(_zeta)]


class Settings(BaseModel):
    # strict: a YAML string such as "0.02" or "yes" is a mistake in a policy, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class SGDSettings(Settings):
    """Stochastic PGD on mini-batches (Shafahi et al. 2020), `algorithm: sgd`; max_iter counts epochs."""

    batch_size: int = Field(32, ge=1)
    step_size: float = Field(0.5, gt=0, le=1)  # first step as a fraction of xi; cosine-decayed to 1% of it
    loss_cap: float = Field(3.0, gt=0)  # per-image cross-entropy is clipped here, so fooled images stop pulling
    momentum: float = Field(0.9, ge=0, lt=1)  # steps follow the running sum of scale-free mini-batch gradients


class BlackBoxSettings(Settings):
    """Query-only crafting (`algorithm: blackbox`): NES/SPSA gradient estimates in a low-resolution plane; max_iter
    counts epochs. Slower and weaker than white-box crafting: a lower bound on what an API-only attacker gets."""

    batch_size: int = Field(32, ge=1)
    samples: int = Field(10, ge=1)  # antithetic pairs per step: 2 x samples x batch_size queries
    sigma: float = Field(0.5, gt=0)  # exploration radius, a fraction of xi
    step_size: float = Field(0.2, gt=0, le=1)
    low_res: int = Field(32, ge=1, le=1024)
    estimator: Literal["nes", "spsa"] = "nes"


class Crafting(Settings):
    """How a UAP is crafted: the algorithm and its knobs (an attack grid shares them among its cells)."""

    algorithm: Algorithm = "paper"
    eps: float = Field(0.001, gt=0)  # the paper loop's inner FGSM step
    # The inner step's norm, independent of the budget's: eps*sign(grad) as the authors' code (ART's FGSM default)
    # for both budgets; "2" is the paper prose's normalised step, which at eps 0.001 never moves an L2 UAP.
    step_norm: Norm = "inf"
    max_iter: int = Field(15, ge=1)  # passes (paper) or epochs (sgd, blackbox)
    delta: float = Field(1e-6, ge=0, lt=1)  # stop once the crafting rate reaches 1 - delta
    clip: bool = True  # x + rho clipped to [0, 1]; the paper did not clip
    sgd: SGDSettings = Field(default_factory=SGDSettings)
    blackbox: BlackBoxSettings = Field(default_factory=BlackBoxSettings)

    def crafting(self) -> Crafting:
        """Just the crafting part (of a grid or a cell's settings)."""
        return Crafting(**{name: getattr(self, name) for name in Crafting.model_fields})


class AttackSettings(Crafting):
    """One cell: what is attacked (kind, target, budget norm and zeta) and how it is crafted."""

    kind: Kind
    target: str | None = None
    norm: Norm
    zeta: Zeta
    restart: int = Field(0, ge=0)  # which of a grid's `restarts` independent crafts of this cell

    @model_validator(mode="after")
    def _check_target(self) -> AttackSettings:
        if (self.kind == "targeted") != (self.target is not None):
            raise ValueError("a targeted attack needs a target class, a nontargeted one has none")
        return self

    @property
    def key(self) -> str:
        """Stable, filename-safe id, e.g. "nontargeted_inf_z0.02" or "targeted-COVID-19_2_z0.01" (+ "_sgd", and
        "_step2" where the inner step's norm is not the default, "_r1" for restart 1)."""
        head = self.kind if self.target is None else f"targeted-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.target)}"
        tail = "" if self.algorithm == "paper" else f"_{self.algorithm}"
        if self.step_norm != Crafting.model_fields["step_norm"].default:
            tail += f"_step{self.step_norm}"
        if self.restart:
            tail += f"_r{self.restart}"
        return f"{head}_{self.norm}_z{float(self.zeta)!r}{tail}"

    def stream(self, seed: int, purpose: str = "") -> np.random.Generator:
        """The cell's seeded stream (`purpose` appended for other draws, e.g. ":reach"). Restart 0 draws from the
        cell's key as a grid without restarts does; restart r from "<key of restart 0>:restart<r>"."""
        base = self.model_copy(update={"restart": 0}).key
        return cell_rng(seed, (f"{base}:restart{self.restart}" if self.restart else base) + purpose)

    @property
    def algorithm_settings(self) -> BaseModel | None:
        """The settings block of the algorithm in use (None for the paper loop, which has none of its own)."""
        return {"sgd": self.sgd, "blackbox": self.blackbox}.get(self.algorithm)


def cell_rng(seed: int, key: str) -> np.random.Generator:
    """An independent stream per cell (or other purpose), from the policy seed and the cell's key: cells can run
    in any order, side by side or elsewhere, and draw the same numbers."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass
class CraftResult:
    rho: np.ndarray  # float32 (H, W)
    passes: int
    rates: list[float]  # flip rate (nontargeted) or R_s (targeted) on the crafting set after each pass
    visited: int  # images visited
    steps: int  # gradient steps taken (images that were not yet fooled), or mini-batch steps
    seconds: float
    queries: int | None = None  # model queries spent (black-box crafting only)


class Attack(Protocol):
    """One algorithm's contract: settings in, one UAP out."""

    settings: AttackSettings

    def craft(self, model: Any, images: np.ndarray, xi: float, rng: np.random.Generator,
              clean_pred: np.ndarray | None = None) -> CraftResult:
        """A UAP of norm at most `xi` on `images` (float32 N x H x W in [0, 1]); every random draw from `rng`."""
        ...
