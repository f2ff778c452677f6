"""Finished cells kept across a killed run, so that rerunning the same command resumes after them.

A run's staging folder goes when the run fails, so the checkpoints live in their own folder beside --out,
`.<out>.resume/`, which only a finished run removes. The folder is made at the first write, not at open: a run
refused or killed before finishing anything leaves nothing beside --out. `inputs.json` there names what the
cells were computed from (model, crafting and evaluation models, data content and splits, policy, seed, auditkit
version); a rerun with anything different starts afresh and says which input changed. Each finished cell is one
JSON record (its results: UAP norms, crafting record, evaluations, controls, strength fields) written last and
atomically after the files it wrote (its UAP, its example image), which are kept by content digest: a record
present means the cell is complete, whatever moment the previous run was killed at.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .fileio import atomic_write_bytes, atomic_write_text
from .messages import quote
from .results import CellResult, cell_from_dict, cell_to_dict

INPUTS = "inputs.json"


def resume_dir(out_dir: Path) -> Path:
    """Where a run writing `out_dir` keeps its checkpoints."""
    out_dir = Path(out_dir)
    return out_dir.resolve().parent / f".{out_dir.name}.resume"


def dataset_digest(content_sha256: str, splits: Iterable[str], ids: Iterable[str]) -> str:
    """The data as the cells see it: image content and labels, and which split and id each row has."""
    listing = json.dumps([content_sha256, [str(s) for s in splits], list(ids)])
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


class CellStore:
    """The checkpoints of one audit's cells (thread-safe: every write is a fresh atomic file, and the folder is
    made once, under a lock)."""

    def __init__(self, folder: Path, fresh_inputs: Mapping[str, Any] | None = None):
        self.folder = Path(folder)
        self._fresh = fresh_inputs  # not None: the folder holds nothing of these inputs (yet)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, inputs: Mapping[str, Any], log: Callable[[str], None]) -> CellStore:
        """The store in `folder` when it holds checkpoints of the same `inputs`; else an empty one (and a log
        line naming the first input that changed), which replaces the folder when it first writes."""
        inputs = json.loads(json.dumps(dict(inputs)))  # as it reads back
        recorded = _read_json(folder / INPUTS)
        if recorded is not None and recorded != inputs:
            changed = next((k for k in inputs if recorded.get(k) != inputs[k]), "record")
            log(f"starting afresh: the {changed} differs from the interrupted run's ({quote(folder.name)})")
        return cls(folder, None if recorded == inputs else inputs)

    def _writable(self) -> Path:
        """The folder, made (an outdated one removed first) by the first write."""
        with self._lock:
            if self._fresh is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                atomic_write_text(self.folder / INPUTS, json.dumps(self._fresh, indent=2) + "\n")
                self._fresh = None
        return self.folder

    def _read(self, path: Path) -> Any:
        """A record this store wrote (or an interrupted run of the same inputs did); None when absent."""
        return None if self._fresh is not None else _read_json(path)

    def restore(self, key: str, out_dir: Path) -> CellResult | None:
        """The finished cell `key`, its files put back under `out_dir`; None if it is not (wholly) here."""
        record = self._read(self.folder / "cells" / f"{_name(key)}.json")
        if record is None:
            return None
        blobs = {rel: self.folder / "files" / sha for rel, sha in record["files"].items()}
        if not all(blob.is_file() and _sha256(blob.read_bytes()) == blob.name for blob in blobs.values()):
            return None
        for rel, blob in blobs.items():
            atomic_write_bytes(out_dir / rel, blob.read_bytes())
        return cell_from_dict(record["result"])

    def save(self, result: CellResult, out_dir: Path) -> None:
        """Keep a finished cell: its files first, then its record."""
        folder, files = self._writable(), {}
        for rel in [result.uap_file, *(f"samples/{e.sample}.npy" for e in result.examples)]:
            data = (out_dir / rel).read_bytes()
            files[rel] = _sha256(data)
            atomic_write_bytes(folder / "files" / files[rel], data)
        record = {"key": result.key, "files": files, "result": cell_to_dict(result)}
        atomic_write_text(folder / "cells" / f"{_name(result.key)}.json", json.dumps(record) + "\n")

    def remembered(self, name: str, compute: Callable[[], float]) -> float:
        """A number computed once (a reachability craft's rate) and kept."""
        path = Path("values") / f"{_name(name)}.json"
        value = self._read(self.folder / path)
        if value is None:
            value = compute()
            atomic_write_text(self._writable() / path, json.dumps(value) + "\n")
        return value

    def remove(self) -> None:
        """The run finished: nothing left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _name(key: str) -> str:
    """A file name for a cell key (keys are filename-safe; the digest keeps look-alikes apart)."""
    return f"{key}-{_sha256(key.encode())[:8]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
