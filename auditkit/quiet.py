"""Third-party chatter kept off stderr outside --debug: auditkit's stderr is its progress and one-line errors.

pydicom, TensorFlow, Keras, absl and onnxruntime warn through Python warnings, logging and their own C++
loggers; any of them would put extra lines around (or inside) a one-line error in a CI log.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

from .errors import AuditkitWarning

LOGGERS = ("pydicom", "tensorflow", "absl", "keras", "h5py", "tf2onnx", "onnx", "onnxruntime", "PIL",
           "matplotlib", "weasyprint", "fontTools", "jax")
ORT_ERRORS_ONLY = 3  # onnxruntime's severity levels: 0 verbose ... 3 error, 4 fatal
STATE = {"silent": False}


def silence_third_party(show: Callable[[str], None]) -> None:
    """Drop every warning and log record that is not auditkit's own; auditkit's warnings go to `show` as one
    line each. Called once by the CLI when --debug is off."""
    STATE["silent"] = True
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TF's C++ logging: read when TF is first imported
    warnings.simplefilter("ignore")
    warnings.simplefilter("default", AuditkitWarning)
    warnings.showwarning = lambda message, *_args, **_kw: show(f"warning: {message}")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def quiet_onnxruntime(ort) -> None:
    """onnxruntime's C++ warnings (e.g. unused initializers) written to fd 2: errors only, unless --debug."""
    if STATE["silent"]:
        ort.set_default_logger_severity(ORT_ERRORS_ONLY)
