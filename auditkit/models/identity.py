"""A model's identity: every file that defines it, each file's SHA-256, and one digest over all of them.

A model is more than the file named on the command line: an ONNX graph may keep its weights in external data
files, a SavedModel in variables/, a TF1 checkpoint in index and data shards, and the spec sidecar decides how
inputs are fed. Changing any of them changes what was audited, so all of them are hashed.

The one digest is the SHA-256 of the `sha256sum`-style listing "<hex>  <name>\\n" of every file, sorted by name:
`sha256sum FILES | sort -k2 | sha256sum` (names as listed) recomputes it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import AuditkitError
from ..fileio import sha256_file


def digest(sha256: dict[str, str]) -> str:
    """One SHA-256 over the files' own digests and names."""
    listing = "".join(f"{sha}  {name}\n" for name, sha in sorted(sha256.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def hash_files(files: dict[str, Path]) -> dict[str, str]:
    """name -> SHA-256 of each file, sorted by name."""
    return {name: sha256_file(files[name]) for name in sorted(files)}


def named_files(paths: list[Path], base: Path) -> dict[str, Path]:
    """Each file under a name relative to `base` (the model's folder), or its path as given when outside it."""
    base = base.resolve()
    out = {}
    for p in paths:
        try:
            name = p.resolve().relative_to(base).as_posix()
        except ValueError:
            name = str(p)
        out[name] = p
    return out


def tree_files(root: Path) -> list[Path]:
    """Every file below a directory (a SavedModel: saved_model.pb, variables/*, assets/*)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and every external data file its tensors name (initializers, constants, subgraphs)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise AuditkitError(f"not a loadable ONNX model ({str(exc).splitlines()[0] if str(exc) else exc})",
                            str(path)) from None
    folder = path.parent.resolve()
    locations = sorted({loc for t in _tensors(proto.graph) for loc in _external_location(t)})
    files = [path]
    for loc in locations:
        target = (folder / loc).resolve()
        if not target.is_relative_to(folder):
            raise AuditkitError(f"external data location {loc!r} points outside the model's folder", str(path))
        if not target.is_file():
            raise AuditkitError(f"external data file {loc!r} named by the model is missing", str(path))
        files.append(folder / loc)
    return files


def _external_location(tensor) -> list[str]:
    if tensor.data_location != tensor.EXTERNAL:
        return []
    return [e.value for e in tensor.external_data if e.key == "location"]


def _tensors(graph):
    """Every tensor stored in a graph: initializers, sparse initializers, attribute tensors, subgraphs'."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
