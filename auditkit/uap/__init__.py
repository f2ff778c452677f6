"""The attack engine: universal adversarial perturbations crafted by one of three algorithms.

Import the parts directly (`auditkit.uap.base` holds the settings and is free of TensorFlow); `make_attack`
builds the algorithm a cell's settings name.
"""
from __future__ import annotations

from typing import Callable

from .base import Attack, AttackSettings, ProgressFn


def make_attack(settings: AttackSettings, progress: ProgressFn | None = None) -> Attack:
    """The crafting algorithm `settings.algorithm` names, configured by `settings` as they are."""
    from .blackbox import BlackBoxUAP
    from .paper import PaperUAP
    from .sgd import SGDUAP

    algorithms: dict[str, Callable[..., Attack]] = {"paper": PaperUAP, "sgd": SGDUAP, "blackbox": BlackBoxUAP}
    return algorithms[settings.algorithm](settings, progress=progress)
