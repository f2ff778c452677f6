"""The zoo's names and classes, without TensorFlow: the policy checks `transfer:` entries against them."""
from __future__ import annotations

from ..phantoms import PHANTOM_CLASSES

ZOO_NAMES = ("covidnet_small", "covidnet_large")
ZOO_CLASSES = PHANTOM_CLASSES  # the shipped weights were trained on the phantoms
