"""TensorFlow 1 meta-graph checkpoints (`model.meta` + `model-N.index` / `.data-*`), the format COVIDNet-CXR
Small/Large were released in, as white-box models.

Nothing in the files is executed as Python, and no op of the checkpoint's graph runs before the audit's own
forward pass: the meta graph is parsed as a protocol buffer, the variables' values are read from the checkpoint
with TF's checkpoint reader, each variable (or each read of a resource variable) becomes a constant, and the
graph is cut down to what the named output needs from the named input. Python-callback and file ops in that
part are refused. The result is an ordinary TF function, so gradients come from TF's own differentiation of the
imported graph and the UAP loop runs in the same TF backend as Keras models.

Tensor names come from model.yaml: `input`, and `logits` (preferred for gradients) or `probabilities`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditkitError
from .base import TFAdapter, complete_spec, infer_spec
from .spec import TENSOR_FIELDS, ModelSpec
from .tf_runtime import configure_tensorflow, function_from_graph_def

# Ops the audited part of a graph may not contain: Python callbacks (which auditkit never runs) and file access.
REFUSED_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "ReadFile", "WriteFile", "MatchingFiles", "Save",
               "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints"}
VARIABLE_OPS = ("VariableV2", "Variable")


class TF1CheckpointAdapter(TFAdapter):
    format = "tf1-checkpoint"

    def __init__(self, name: str, meta_path: Path, spec_overrides: dict[str, Any], where: str):
        tf = configure_tensorflow()
        self.meta_path = meta_path
        self.prefix = checkpoint_prefix(meta_path)
        names = ModelSpec().merged({k: v for k, v in spec_overrides.items() if k in TENSOR_FIELDS}, where)
        input_name, output_name = names.input, names.logits or names.probabilities
        if not input_name or not output_name:
            raise AuditkitError("a TF1 checkpoint needs its tensor names in model.yaml: `input` and `logits` or "
                                "`probabilities` (e.g. input: input_1:0, logits: dense_3/MatMul:0)", where)
        graph_def, parameters = frozen_graph_def(tf, meta_path, self.prefix, [input_name, output_name], where)
        try:
            pruned = function_from_graph_def(tf, graph_def, [input_name], [output_name])
        except (KeyError, ValueError, TypeError) as exc:
            raise AuditkitError(f"cannot run the graph from {input_name} to {output_name} "
                                f"({str(exc).splitlines()[0]})", where) from None
        graph = infer_spec(pruned.inputs[0].shape.as_list(), "logits" if names.logits else "softmax",
                           pruned.outputs[0].shape.as_list()[-1])
        spec = complete_spec(graph.merged(spec_overrides | {"output": graph.output}, where), name, graph)
        super().__init__(name, meta_path, spec, lambda x: pruned(x)[0], parameters)

    def model_files(self) -> list[Path]:
        """The meta graph, the checkpoint's index and data shards, and the `checkpoint` state file if any."""
        folder = self.meta_path.parent
        shards = sorted(folder.glob(glob_escape(self.prefix.name) + ".data-*"))
        state = [folder / "checkpoint"] if (folder / "checkpoint").is_file() else []
        return [self.meta_path, self.prefix.with_name(self.prefix.name + ".index"), *shards, *state]


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def find_meta(path: Path) -> Path:
    """`path` itself (a .meta file), or the one .meta file in the directory `path`."""
    if path.is_file():
        return path
    metas = sorted(path.glob("*.meta"))
    if len(metas) != 1:
        raise AuditkitError(f"expected one .meta file in the directory, found {len(metas)}", str(path))
    return metas[0]


def checkpoint_prefix(meta_path: Path) -> Path:
    """The checkpoint that goes with the meta graph: the folder's `checkpoint` state file names it; else the meta
    file's own prefix (model.meta -> model.index); else the folder's only `.index` file."""
    folder = meta_path.parent
    configure_tensorflow()
    import tensorflow as tf

    looked = []
    state = folder / "checkpoint"
    if state.is_file():
        latest = tf.train.latest_checkpoint(str(folder))
        if latest and Path(latest).parent.resolve() == folder.resolve():
            return folder / Path(latest).name
        looked.append("the checkpoint in the folder's `checkpoint` file")
    own = meta_path.with_suffix("")
    if own.with_name(own.name + ".index").is_file():
        return own
    looked.append(own.name + ".index")
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    looked.append(f"a single *.index file (found {len(indexes)})")
    raise AuditkitError(f"no checkpoint found beside the meta graph (looked for {', '.join(looked)})", str(meta_path))


def frozen_graph_def(tf, meta_path: Path, prefix: Path, tensors: list[str], where: str):
    """(the graph that computes `tensors`, its variables replaced by their checkpoint values; number of weights)."""
    meta = tf.compat.v1.MetaGraphDef()
    try:
        meta.ParseFromString(meta_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise AuditkitError(f"not a TF1 meta graph ({type(exc).__name__})", str(meta_path)) from None
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad checkpoint
        raise AuditkitError(f"cannot read the checkpoint ({str(exc).splitlines()[0]})", str(prefix)) from None
    nodes = {n.name for n in meta.graph_def.node}
    missing = [t for t in tensors if t.split(":")[0] not in nodes]
    if missing:
        raise AuditkitError(f"the graph has no tensor {', '.join(missing)}", where)
    graph_def = needed_nodes(tf, meta.graph_def, [t.split(":")[0] for t in tensors])
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    handles = {n.name: n for n in graph_def.node if n.op == "VarHandleOp"}
    sizes: dict[str, int] = {}  # variable -> weights (a variable read twice counts once)
    functions = [n for f in graph_def.library.function for n in f.node_def]
    for node in [*graph_def.node, *functions]:
        if node.op in REFUSED_OPS:
            raise AuditkitError(f"the graph computes its output with a {node.op} op ({node.name}), which auditkit "
                                "does not run", where)
    for node in graph_def.node:
        new = out.node.add()
        variable = None
        if node.op in VARIABLE_OPS:
            variable = node.name
        elif node.op == "ReadVariableOp" and node.input[0].split(":")[0] in handles:
            handle = handles[node.input[0].split(":")[0]]
            variable = handle.attr["shared_name"].s.decode() or handle.name
        if variable is None:
            new.CopyFrom(node)
            new.device = ""
            continue
        if not reader.has_tensor(variable):
            raise AuditkitError(f"the checkpoint has no value for variable {variable!r}", str(prefix))
        value = np.asarray(reader.get_tensor(variable))
        sizes[variable] = int(value.size)
        new.name, new.op = node.name, "Const"
        new.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
        new.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    frozen = needed_nodes(tf, out, [t.split(":")[0] for t in tensors])
    left = [n.name for n in frozen.node if n.op == "VarHandleOp"]  # handles no longer read drop out above
    if left:
        raise AuditkitError(f"resource variable {left[0]} is used other than by reading it", where)
    return frozen, sum(sizes.values())


def needed_nodes(tf, graph_def, outputs: list[str]):
    """The part of the graph the output nodes depend on (data and control inputs), nodes in their order."""
    nodes = {n.name: n for n in graph_def.node}
    keep, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name not in keep:
            if name not in nodes:
                raise AuditkitError(f"the graph names an input {name!r} it does not contain", "meta graph")
            keep.add(name)
            stack += [i.lstrip("^").split(":")[0] for i in nodes[name].input]
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name in keep)
    return out
