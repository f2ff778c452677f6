"""TensorFlow SavedModel directories (their serving signature)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditkitError
from .checks import check_input_rank, check_input_shape
from .base import TFAdapter, complete_spec, detect_output, infer_spec, model_input, probe_images
from .tf_runtime import configure_tensorflow


class SavedModelAdapter(TFAdapter):
    format = "savedmodel"

    def __init__(self, name: str, path: Path, spec_overrides: dict[str, Any], where: str):
        tf = configure_tensorflow()
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad SavedModel
            raise AuditkitError(f"not a loadable TF SavedModel ({type(exc).__name__}: {exc})".splitlines()[0],
                                str(path)) from None
        signature = getattr(loaded, "signatures", {}).get("serving_default")
        if signature is None:
            raise AuditkitError("SavedModel has no 'serving_default' signature", str(path))
        args, kwargs = signature.structured_input_signature
        if args or len(kwargs) != 1:
            raise AuditkitError("the serving signature must take exactly one named input", str(path))
        (input_name, input_spec), = kwargs.items()
        outputs = signature.structured_outputs
        if len(outputs) != 1:
            raise AuditkitError(f"the serving signature must have one output, has {sorted(outputs)}", str(path))
        (output_name, output_spec), = outputs.items()
        self._loaded = loaded  # keeps the signature's variables alive
        check_input_rank(input_spec.shape, str(path))
        graph = infer_spec(input_spec.shape, None, output_spec.shape[-1])

        def forward(x):
            return signature(**{input_name: x})[output_name]

        spec = complete_spec(graph.merged(spec_overrides, where), name, graph)
        check_input_shape(input_spec.shape, spec, str(path))
        if spec.output is None:
            probe = tf.constant(model_input(probe_images(spec), spec, np), tf.float32)
            spec = dataclasses.replace(spec, output=detect_output(forward(probe).numpy()))
        super().__init__(name, path, spec, forward, None)


