"""A corpus of hostile, broken and odd inputs, as a new user would meet them, run through the real CLI.

Every bad case must give exit code 2 (or the signal's), exactly one line on stderr that names the file, row or
key, no traceback and no object repr, and nothing in or beside --out (no staging or resume folder either). The
CLI runs in a process of its own with stderr going to a file, not a terminal, so leftover progress lines would
show. The cases run side by side once per session (each is a short process that fails before any TensorFlow
import); each test then checks its own case's record.
A fresh interpreter spends most of such a case importing what auditkit.api needs (numpy, pydantic, onnxruntime)
before the error, so the cases run as `python -m auditkit` would in processes forked from a server that imported
those once. A sample of cases also runs in fresh interpreters and must give the same records.
Odd-but-valid inputs are loaded in-process and checked to load right. Keras and SavedModel cases run in-process
(CliRunner) because their loaders import TensorFlow, which costs seconds per process.
"""
from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from test_data import _dicom

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "pneumonia", "COVID-19")
SIZE = 16
BOMB = "\n".join(["lol: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)])


# --------------------------------------------------------------------------- the shared world
def linear_onnx(path: Path, shape: list, inputs: int = 1) -> Path:
    """A softmax regression over the flattened input: a tiny model of any input rank, made with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    feat = int(np.prod([d for d in shape[1:]]))
    weights = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (feat, 3)).astype(np.float32), "W")
    names = [f"x{i}" for i in range(inputs)]
    nodes = [helper.make_node("Flatten", [names[0]], ["f"]), helper.make_node("MatMul", ["f", "W"], ["l"]),
             helper.make_node("Softmax", ["l"], ["p"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    path.with_suffix(".yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return path


def png(path: Path, seed: int = 0, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def dataset(d: Path, extra: list[str] = (), name: str = "m.csv") -> Path:
    """ds/ with six good images (three per split) and a CSV manifest; `extra` rows are appended."""
    ds = d / "ds"
    rows = ["path,label,split"]
    for i in range(6):
        png(ds / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,{CLASSES[i % 3]},{'train' if i < 3 else 'test'}")
    (ds / name).write_text("\n".join(rows + list(extra)) + "\n")
    return ds / name


POLICY = """version: 1
seed: 1
data:
  classes: [normal, pneumonia, COVID-19]
  preprocess: {crop_top: 0}
attacks:
  - kinds: [nontargeted]
    norms: [inf]
    zetas: [0.1]
    max_iter: 1
    algorithm: blackbox
    blackbox: {batch_size: 3, samples: 1, low_res: 4}
random_controls: {draws: 0}
report: {formats: [json]}
"""


@dataclass
class World:
    root: Path
    model: Path
    policy: Path

    def run(self, d: Path, manifest: Path | str | None = None, *extra, model=None, policy=None) -> list[str]:
        """`auditkit run` on the tiny ONNX model (black-box crafting, so no TensorFlow on the way to an error)."""
        args = ["run", "--model", model or self.model, "--policy", policy or self.policy, "--out", d / "out"]
        return [str(a) for a in args + (["--data", manifest if manifest is not None else dataset(d)])
                + list(extra)]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("corpus-world")
    (root / "p.yaml").write_text(POLICY)
    return World(root, linear_onnx(root / "m.onnx", ["N", 1, SIZE, SIZE]), root / "p.yaml")


# --------------------------------------------------------------------------- the cases
@dataclass
class Case:
    family: str
    name: str
    build: Callable[[Path, World], list[str]]  # makes the case's files in its folder; the CLI arguments
    expect: tuple[str, ...]  # what the one line must name (file, row, key, what is wrong); {d}: the case's folder
    code: int = 2


def csv_rows(*rows: str, header: str = "path,label,split"):
    def build(d: Path, w: World) -> list[str]:
        m = dataset(d)
        (m.parent / "bad.csv").write_text("\n".join([header, *rows]) + "\n")
        return w.run(d, m.parent / "bad.csv")
    return build


def raw_manifest(name: str, content: bytes):
    def build(d: Path, w: World) -> list[str]:
        m = dataset(d)
        (m.parent / name).write_bytes(content)
        return w.run(d, m.parent / name)
    return build


def with_image(name: str, write: Callable[[Path], object], label: str = "normal"):
    """A good dataset plus one image row written by `write` (at ds/<name>), as row 8 of the manifest."""
    def build(d: Path, w: World) -> list[str]:
        m = dataset(d, [f"{name},{label},train"])
        write(m.parent / name)
        return w.run(d, m)
    return build


def policy_text(text: str | bytes, command: str = "check"):
    def build(d: Path, w: World) -> list[str]:
        p = d / "bad.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["policy", "check", str(p)] if command == "check" else w.run(d, policy=p)
    return build


def policy_edit(old: str, new: str, command: str = "check"):
    return policy_text(POLICY.replace(old, new, 1), command)


def options(*args: str):
    def build(d: Path, w: World) -> list[str]:
        return [a.format(model=w.model, policy=w.policy, out=d / "out", d=d) for a in args]
    return build


def onnx_model(shape: list, inputs: int = 1, role: str = "--model"):
    def build(d: Path, w: World) -> list[str]:
        m = linear_onnx(d / "odd.onnx", shape, inputs)
        return w.run(d, None, role, m) if role != "--model" else w.run(d, model=m)
    return build


def model_file(name: str, content: bytes, sidecar: str | None = None):
    def build(d: Path, w: World) -> list[str]:
        (d / name).write_bytes(content)
        if sidecar is not None:
            (d / name).with_suffix(".yaml").write_text(sidecar)
        return w.run(d, model=d / name)
    return build


def sidecar(text: str):
    def build(d: Path, w: World) -> list[str]:
        m = linear_onnx(d / "s.onnx", ["N", 1, SIZE, SIZE])
        m.with_suffix(".yaml").write_text(text)
        return w.run(d, model=m)
    return build


def link(target: Callable[[Path], str], name: str = "img/link.png"):
    """A symlink inside the dataset root at `name`, pointing at target(case folder)."""
    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target(path.parents[len(Path(name).parts)]), path)
    return with_image(name, write)


def escape_dir(d: Path, w: World) -> list[str]:
    m = dataset(d, ["linked/o.png,normal,train"])
    png(d / "outside" / "o.png")
    os.symlink(d / "outside", m.parent / "linked")
    return w.run(d, m)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def png_bytes(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: PIL's decompression-bomb check reads only the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def truncated(path: Path, keep: int, suffix: str = ".png") -> None:
    tmp = path.with_name("full" + suffix)
    if suffix == ".png":
        png(tmp)
    else:
        Image.fromarray(np.full((20, 20), 99, np.uint8)).save(tmp, quality=90)
    path.write_bytes(tmp.read_bytes()[:keep])
    tmp.unlink()


def dicom_without_pixels(path: Path) -> None:
    _dicom(path, np.zeros((4, 4), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def dicom_palette(path: Path) -> None:
    _dicom(path, np.zeros((4, 4), np.uint16), photometric="PALETTE COLOR")


def dicom_magic_garbage(path: Path) -> None:
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 8)


def covidx(lines: str):
    def build(d: Path, w: World) -> list[str]:
        dataset(d)
        (d / "ds" / "train.txt").write_text(lines)
        return w.run(d, d / "ds" / "train.txt")
    return build


def folders_with(make: Callable[[Path], object]):
    def build(d: Path, w: World) -> list[str]:
        root = d / "tree"
        png(root / "train" / "normal" / "a.png")
        png(root / "test" / "normal" / "b.png")
        make(root)
        return w.run(d, root)
    return build


CASES = [
    # ---- manifests
    Case("manifest", "missing-column", csv_rows("img/0.png,normal", header="path,label"), ("bad.csv:1", "'split'")),
    Case("manifest", "duplicate-column", csv_rows("img/0.png,normal,train,x", header="path,label,split,path"),
         ("bad.csv:1", "duplicate column")),
    Case("manifest", "short-row", csv_rows("img/0.png,normal,train", "img/1.png,normal"), ("bad.csv:3", "fields")),
    Case("manifest", "unknown-label", csv_rows("img/0.png,flu,train"), ("bad.csv:2", "'flu'")),
    Case("manifest", "ansi-label", csv_rows("img/0.png,\x1b[2Jflu,train"), ("bad.csv:2", "\\x1b[2Jflu")),
    Case("manifest", "empty-label", csv_rows("img/0.png,,train"), ("bad.csv:2", "'label'")),
    Case("manifest", "header-only", csv_rows(), ("bad.csv", "no image rows")),
    Case("manifest", "empty-file", raw_manifest("e.csv", b""), ("e.csv", "empty manifest")),
    Case("manifest", "whitespace-only", raw_manifest("w.csv", b"  \n\n \n"), ("w.csv", "empty manifest")),
    Case("manifest", "latin1", raw_manifest("l.csv", b"path,label,split\nimg/\xe9.png,normal,train\n"),
         ("l.csv:2", "UTF-8")),
    Case("manifest", "utf16", raw_manifest("u.csv", "path,label,split\n".encode("utf-16")), ("u.csv", "UTF-8")),
    Case("manifest", "duplicate-row", csv_rows("img/0.png,normal,train", "./img/0.png,normal,test"),
         ("bad.csv:3", "duplicate", "bad.csv:2")),
    Case("manifest", "dotdot-escape", csv_rows("../../etc/hostname,normal,train"),
         ("bad.csv:2", "outside the dataset root", "set --image-root (or data.image_root) to '")),
    Case("manifest", "absolute-path", csv_rows("/etc/hostname,normal,train"),
         ("bad.csv:2", "outside", "set --image-root (or data.image_root) to allow it")),  # not to '/'
    Case("manifest", "nul-in-path", csv_rows("img/0\0.png,normal,train"), ("bad.csv:2", "NUL", "\\x00")),
    Case("manifest", "newline-in-path", csv_rows('"img/a\nb.png",normal,train'), ("bad.csv:2", "a\\nb.png")),
    Case("manifest", "ansi-in-path", csv_rows("img/\x1b[2J\x1b[31mred.png,normal,train"),
         ("bad.csv:2", "\\x1b[2J")),
    Case("manifest", "bidi-in-path", csv_rows("img/\u202egnp.exe,normal,train"), ("bad.csv:2", "\\u202e")),
    Case("manifest", "empty-path", csv_rows(" ,normal,train"), ("bad.csv:2", "'path'")),
    Case("manifest", "unterminated-quote", csv_rows('"img/0.png,normal,train'), ("bad.csv", "fields")),
    Case("manifest", "jsonl-invalid", raw_manifest("m.jsonl", b'{"path": "img/0.png"\n'), ("m.jsonl:1", "JSON")),
    Case("manifest", "jsonl-not-object", raw_manifest("m.jsonl", b'["img/0.png", "normal", "train"]\n'),
         ("m.jsonl:1", "JSON object")),
    Case("manifest", "jsonl-path-number", raw_manifest("m.jsonl", b'{"path": 3, "label": "normal", "split": "x"}\n'),
         ("m.jsonl:1", "'path'")),
    Case("manifest", "jsonl-missing-label", raw_manifest("m.jsonl", b'{"path": "img/0.png", "split": "train"}\n'),
         ("m.jsonl:1", "'label'")),
    Case("manifest", "covidx-short-line", covidx("p1 img/0.png\n"), ("train.txt:1", "patient_id")),
    Case("manifest", "covidx-escape", covidx("p1 ../../x.png normal src\n"), ("train.txt:1", "outside")),
    Case("manifest", "folders-symlinked-split", folders_with(
        lambda root: os.symlink(png(root.parent / "elsewhere" / "normal" / "x.png").parents[1], root / "val")),
        ("x.png", "outside the dataset root")),
    Case("manifest", "not-found", lambda d, w: w.run(d, d / "nope.csv"), ("nope.csv", "not found")),
    Case("manifest", "unknown-suffix", raw_manifest("m.xml", b"<x/>"), ("m.xml", "unknown manifest format")),
    Case("manifest", "empty-folder", lambda d, w: (d / "empty").mkdir() or w.run(d, d / "empty"),
         ("empty", "cannot detect")),
    Case("manifest", "image-root-missing", lambda d, w: w.run(d, None, "--image-root", d / "nowhere"),
         ("nowhere", "image root is not a directory")),
    Case("manifest", "empty-split", csv_rows("img/0.png,normal,train", "img/1.png,pneumonia,train"),
         ("bad.csv", "empty split 'test'")),  # found after start-up, when the run has begun
    # ---- paths: where a manifest's file really is
    Case("paths", "symlink-out-file", link(lambda d: str(png(d / "outside.png"))), ("m.csv:8", "symbolic link")),
    Case("paths", "symlink-etc-hostname", link(lambda d: "/etc/hostname"), ("m.csv:8", "outside the dataset root")),
    Case("paths", "symlink-dir-out", escape_dir, ("m.csv:8", "symbolic link")),
    Case("paths", "symlink-chain-out", link(lambda d: os.symlink(png(d / "far.png"), d / "ds" / "hop.png")
                                            or str(d / "ds" / "hop.png")), ("m.csv:8", "outside")),
    Case("paths", "symlink-relative-dotdot", link(lambda d: (png(d / "o.png"), "../../o.png")[1]),
         ("m.csv:8", "outside")),
    Case("paths", "symlink-dangling", link(lambda d: str(d / "gone.png")), ("m.csv:8", "outside")),
    Case("paths", "symlink-dangling-inside", link(lambda d: "gone.png"), ("m.csv:8", "not found")),
    Case("paths", "symlink-loop", link(lambda d: "link.png"), ("m.csv:8",)),
    Case("paths", "symlink-dev-zero", link(lambda d: "/dev/zero"), ("m.csv:8", "outside")),
    Case("paths", "fifo", with_image("img/f.png", fifo), ("m.csv:8", "a FIFO")),
    Case("paths", "socket", with_image("img/s.png", unix_socket), ("m.csv:8", "a socket")),
    Case("paths", "directory", with_image("img/d.png", lambda p: p.mkdir()), ("m.csv:8", "a directory")),
    Case("paths", "manifest-as-image", csv_rows("bad.csv,normal,train"), ("bad.csv:2", "cannot decode")),
    Case("paths", "missing-image", csv_rows("img/gone.png,normal,train"), ("bad.csv:2", "gone.png", "not found")),
    Case("paths", "subfolder-manifest-without-root", lambda d, w: (
        dataset(d), (d / "ds" / "manifests").mkdir(),
        (d / "ds" / "manifests" / "x.csv").write_text("path,label,split\n../img/0.png,normal,train\n"),
        w.run(d, d / "ds" / "manifests" / "x.csv"))[-1],
         ("x.csv:2", "outside the dataset root", "manifests'; set --image-root (or data.image_root) to '",
          "{d}/ds' to allow it")),
    # ---- images
    Case("images", "png-truncated", with_image("img/t.png", lambda p: truncated(p, 60)), ("m.csv:8", "t.png")),
    Case("images", "png-zero-bytes", with_image("img/z.png", lambda p: p.write_bytes(b"")),
         ("m.csv:8", "z.png", "not a readable PNG/JPEG/DICOM image")),
    Case("images", "png-text", with_image("img/x.png", png_bytes(b"hello, not an image\n")),
         ("m.csv:8", "x.png", "not a readable PNG/JPEG/DICOM image")),
    Case("images", "png-bad-signature", with_image("img/b.png", png_bytes(b"\x89PNG but not really")),
         ("m.csv:8", "b.png", "cannot decode image: not a readable PNG/JPEG/DICOM image")),
    Case("images", "png-bomb-header", with_image("img/bomb.png", png_bytes(png_header_only(40000, 40000))),
         ("m.csv:8", "bomb.png")),
    Case("images", "png-zero-size", with_image("img/zero.png", png_bytes(png_header_only(0, 0))),
         ("m.csv:8", "zero.png")),
    Case("images", "jpeg-truncated", with_image("img/t.jpg", lambda p: truncated(p, 30, ".jpg")),
         ("m.csv:8", "t.jpg")),
    Case("images", "jpeg-garbage", with_image("img/g.jpg", png_bytes(b"\xff\xd8\xff\xe0garbage" * 4)),
         ("m.csv:8", "g.jpg")),
    Case("images", "dicom-text", with_image("img/n.dcm", png_bytes(b"not a dicom file at all\n" * 8)),
         ("m.csv:8", "n.dcm", "cannot decode image: not a DICOM file")),
    Case("images", "dicom-no-pixels", with_image("img/np.dcm", dicom_without_pixels), ("m.csv:8", "no pixel data")),
    Case("images", "dicom-palette", with_image("img/pal.dcm", dicom_palette), ("m.csv:8", "PALETTE COLOR")),
    Case("images", "dicom-magic-garbage", with_image("img/mg.png", dicom_magic_garbage), ("m.csv:8", "mg.png")),
    # ---- policies
    Case("policy", "alias-bomb-targets-check", policy_text(BOMB + "\n" + POLICY.replace(
        "kinds: [nontargeted]", "kinds: [targeted]\n    targets: *a8")), ("bad.yaml", "alias")),
    Case("policy", "alias-bomb-targets-run", policy_text(BOMB + "\n" + POLICY.replace(
        "kinds: [nontargeted]", "kinds: [targeted]\n    targets: *a8"), "run"), ("bad.yaml", "alias")),
    Case("policy", "alias-bomb-title", policy_text(BOMB + "\n" + POLICY.replace(
        "report: {formats: [json]}", "report: {formats: [json], title: *a8}"), "run"), ("bad.yaml", "alias")),
    Case("policy", "alias-recursive", policy_text("version: 1\nx: &r [*r]\n" + POLICY.split("\n", 1)[1]),
         ("bad.yaml",)),
    Case("policy", "oversize", policy_text(POLICY + "#" + "x" * (1 << 20) + "\n"), ("bad.yaml", "1 MiB")),
    Case("policy", "not-utf8", policy_text(b"version: 1\ntitle: \xff\n"), ("bad.yaml:2", "UTF-8")),
    Case("policy", "empty", policy_text(""), ("bad.yaml", "empty")),
    Case("policy", "top-level-list", policy_text("- version: 1\n"), ("bad.yaml:1", "mapping")),
    Case("policy", "duplicate-key", policy_text(POLICY + "seed: 2\n"), ("bad.yaml", "duplicate key 'seed'")),
    Case("policy", "unknown-key", policy_edit("seed: 1", "seed: 1\ncolour: red"), ("bad.yaml", "colour")),
    Case("policy", "python-tag", policy_edit("seed: 1", "seed: !!python/object/apply:os.system [ls]"),
         ("bad.yaml",)),
    Case("policy", "string-number", policy_edit("zetas: [0.1]", 'zetas: ["0.1"]'), ("attacks.0.zetas.0",)),
    Case("policy", "tab-indent", policy_edit("  classes:", "\tclasses:"), ("bad.yaml:",)),
    Case("policy", "deep-nesting", policy_text("version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n"), ("bad.yaml",)),
    Case("policy", "control-char-key", policy_edit("seed: 1", "seed: 1\n\"\\e[2Jbad\": 1"), ("\\x1b[2Jbad",)),
    Case("policy", "huge-string-value", policy_edit("seed: 1", "seed: " + "9" * 5000 + "x"),
         ("bad.yaml: seed", "5001 characters")),
    Case("policy", "huge-list-value", policy_edit("seed: 1", "seed: [" + ", ".join(["1"] * 3000) + "]"),
         ("bad.yaml: seed", "3000 items")),
    Case("policy", "unknown-class", policy_edit("kinds: [nontargeted]", "kinds: [targeted]\n    targets: [flu]"),
         ("attacks.0.targets.0", "'flu'")),
    Case("policy", "rule-selects-nothing", policy_text(POLICY + "thresholds:\n  - {metric: fooling_rate, split: "
                                                                 "test, norm: 2, max: 0.5}\n"), ("thresholds.0",)),
    Case("policy", "version-2", policy_edit("version: 1", "version: 2"), ("bad.yaml: version",)),
    Case("policy", "missing-attacks", policy_text("version: 1\n"), ("attacks", "required")),
    Case("policy", "nul-char", policy_text("version: 1\nseed: \0\n"), ("bad.yaml", "#x0000")),
    Case("policy", "directory", options("policy", "check", "{d}"), ("{d}", "cannot read")),
    Case("policy", "not-found", options("policy", "check", "{d}/nope.yaml"), ("nope.yaml", "not found")),
    # ---- models (ONNX and files that are not models; Keras and SavedModel in-process below)
    Case("models", "onnx-junk", model_file("j.onnx", b"\0garbage"), ("j.onnx", "not a model file")),
    Case("models", "onnx-empty", model_file("e.onnx", b""), ("e.onnx",)),
    Case("models", "onnx-rank3", onnx_model(["N", SIZE, SIZE]), ("odd.onnx", "rank 3", "[N, 16, 16]")),
    Case("models", "onnx-rank2", onnx_model(["N", SIZE * SIZE]), ("odd.onnx", "rank 2", "[N, 256]")),
    Case("models", "onnx-rank2-deploy", onnx_model(["N", SIZE * SIZE], role="--deploy"), ("odd.onnx", "rank 2")),
    Case("models", "onnx-rank3-transfer", onnx_model(["N", SIZE, SIZE], role="--transfer"), ("odd.onnx", "rank 3")),
    Case("models", "onnx-two-inputs", onnx_model(["N", 1, SIZE, SIZE], inputs=2), ("odd.onnx", "one input")),
    Case("models", "onnx-five-channels", onnx_model(["N", 5, SIZE, SIZE]), ("odd: ", "channels")),
    Case("models", "classes-differ-from-policy", sidecar("classes: [COVID-19, normal, pneumonia]\n"),
         ("error: s: ", "differ from the policy's data.classes")),  # found after start-up, as empty-split
    Case("models", "spec-contradicts-graph", sidecar("classes: [normal, pneumonia, COVID-19]\nchannels: 3\n"),
         ("channels",)),
    Case("models", "spec-alias-bomb", sidecar(BOMB + "\nclasses: *a8\n"), ("s.yaml", "alias")),
    Case("models", "spec-not-mapping", sidecar("- a\n- b\n"), ("s.yaml", "mapping")),
    Case("models", "spec-bad-layout", sidecar("classes: [normal, pneumonia, COVID-19]\nlayout: \"\\e[2J\"\n"),
         ("layout", "\\x1b[2J")),
    Case("models", "keras-junk", model_file("j.keras", b"not a zip"), ("j.keras", "not a model file")),
    Case("models", "h5-legacy", model_file("m.h5", b"x"), ("m.h5", "legacy HDF5")),
    Case("models", "unknown-format", model_file("m.pt", b"x"), ("m.pt", "unknown model format")),
    Case("models", "missing", options("run", "--model", "{d}/none.onnx", "--policy", "{policy}", "--out", "{out}"),
         ("none.onnx", "no such model")),
    Case("models", "savedmodel-no-pb", lambda d, w: (d / "sm").mkdir() or w.run(d, model=d / "sm"),
         ("sm", "saved_model.pb")),
    # ---- CLI options
    Case("options", "unknown-option", options("run", "--bogus"), ("--bogus", "--help")),
    Case("options", "jobs-negative", options("run", "--model", "{model}", "--policy", "{policy}", "--jobs", "-1"),
         ("--jobs", "--help")),
    Case("options", "jobs-word", options("run", "--model", "{model}", "--policy", "{policy}", "--jobs", "many"),
         ("--jobs", "--help")),
    Case("options", "jobs-zero", options("run", "--model", "{model}", "--policy", "{policy}", "--jobs", "0"),
         ("--jobs",)),
    Case("options", "seed-negative", options("run", "--model", "{model}", "--policy", "{policy}", "--seed", "-5"),
         ("--seed", "--help")),
    Case("options", "missing-model", options("run", "--policy", "{policy}"), ("--model", "--help")),
    Case("options", "missing-policy", options("run", "--model", "{model}"), ("--policy", "--help")),
    Case("options", "formats-bogus", options("run", "--model", "{model}", "--policy", "{policy}", "--out", "{out}",
                                             "--formats", "html,docx"), ("--formats", "docx")),
    Case("options", "unknown-command", options("audit"), ("audit", "--help")),
    Case("options", "policy-check-no-arg", options("policy", "check"), ("policy", "--help")),
    Case("options", "report-missing", options("report", "{d}/none.json"), ("none.json",)),
    Case("options", "out-is-a-file", lambda d, w: (d / "out").write_text("x") and w.run(d), ("out", "not a directory")),
]


# The fork server: reads one JSON request a line ({"args", "stdout", "stderr"}), forks, and in the child runs
# auditkit's __main__ as `python -m auditkit ARGS` does (stdin /dev/null, stdout and stderr to the files named, exit
# handlers run at the end); it answers the child's pid, then its exit code, a line each.
SERVER = r"""
import atexit, json, os, runpy, sys
import auditkit.api, auditkit.cli  # noqa: F401 - what every case imports before its error, once

WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], WRITE),
                                    (2, request["stderr"], WRITE)):
                opened = os.open(path, flags, 0o644)
                os.dup2(opened, fd)
                os.close(opened)
            sys.argv = ["auditkit", *request["args"]]
            try:
                runpy.run_module("auditkit", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
CASE_TIMEOUT_S = 120
# Run in fresh interpreters too (as `python -m auditkit`), one per family, chosen to get furthest before the error
# (policy read, model loaded, data decoded): their records must equal the fork server's.
FRESH = ("manifest-unknown-label", "paths-fifo", "images-dicom-no-pixels", "policy-alias-bomb-targets-run",
         "models-onnx-rank3", "models-classes-differ-from-policy", "options-jobs-zero")


class ForkServer:
    def __init__(self, env: dict, err: Path):
        self.err = err
        with open(err, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, env=env)

    def _line(self, deadline: float) -> int:
        fd, line = self.proc.stdout.fileno(), b""
        while not line.endswith(b"\n"):
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"no answer from the fork server in {CASE_TIMEOUT_S} s")
            byte = os.read(fd, 1)  # a byte at a time: never past the line
            assert byte, f"the fork server died: {self.err.read_text()}"
            line += byte
        return int(line)

    def run(self, args: list[str], stdout: Path, stderr: Path) -> int:
        deadline = time.monotonic() + CASE_TIMEOUT_S
        self.proc.stdin.write((json.dumps({"args": args, "stdout": str(stdout), "stderr": str(stderr)}) + "\n")
                              .encode())
        self.proc.stdin.flush()
        pid = self._line(deadline)
        try:
            return self._line(deadline)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise

    def close(self) -> str:
        """Ends the server; what it wrote on stderr itself (its imports: they must be silent)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return self.err.read_text(errors="replace")


def prepare(case: Case, d: Path) -> tuple[list[str], list[str]]:
    """Makes the case's files in `d`: (the CLI arguments, `d`'s listing before the run)."""
    d.mkdir(parents=True)
    args = [str(a) for a in case.build(d, _WORLD[0])]
    return args, os.listdir(d)


def run_case(d: Path, args: list[str], env: dict, server: ForkServer | None) -> dict:
    """The record of the CLI run on a prepared case: through `server`, or with None in a fresh interpreter."""
    out_file, err_file = d.parent / f"{d.name}.stdout", d.parent / f"{d.name}.stderr"
    if server is not None:
        code = server.run(args, out_file, err_file)
    else:
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            code = subprocess.run([sys.executable, "-m", "auditkit", *args], stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, timeout=CASE_TIMEOUT_S, env=env).returncode
    return {"code": code, "stdout": out_file.read_text(errors="replace"),
            "stderr": err_file.read_text(errors="replace")}


_WORLD: list[World] = []


@pytest.fixture(scope="session")
def corpus(world, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every subprocess case, run side by side; case id -> (its folder, its record). The FRESH sample's records in
    fresh interpreters are under "<case id>:fresh"."""
    base = tmp_path_factory.mktemp("c")
    _WORLD.append(world)
    env = dict(os.environ, PYTHONPATH=str(REPO), AUDITKIT_CACHE=str(base / "cache"), COLUMNS="100")
    workers = 2
    servers: queue.Queue[ForkServer] = queue.Queue()
    started = [ForkServer(env, base / f"server-{i}.stderr") for i in range(workers)]
    for server in started:
        servers.put(server)

    def served(d: Path, args: list[str]) -> dict:
        server = servers.get()
        try:
            return run_case(d, args, env, server)
        finally:
            servers.put(server)

    # The cases' files are made here, one after another (building some imports pydicom, which two threads must not
    # import at once); only the runs go side by side. Folders are numbered, not named: a message quotes the first 80
    # characters of a path, and the file's name must be among them (under pytest-xdist's longer temporary paths too).
    prepared = {}
    for n, c in enumerate(CASES):
        key = f"{c.family}-{c.name}"
        prepared[key] = (base / f"{n:03d}", *prepare(c, base / f"{n:03d}"))
        if key in FRESH:
            prepared[f"{key}:fresh"] = (base / f"{n:03d}f", *prepare(c, base / f"{n:03d}f"))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {key: (d, before, pool.submit(served, d, args) if not key.endswith(":fresh")
                             else pool.submit(run_case, d, args, env, None))
                       for key, (d, args, before) in prepared.items()}
            records = {key: (d, f.result() | {"before": before}) for key, (d, before, f) in futures.items()}
    finally:
        said = [server.close() for server in started]
    assert said == [""] * workers, said  # an import that printed would have printed in every case
    return records


def assert_one_line_error(record: dict, expect: tuple[str, ...], code: int = 2) -> str:
    err = record["stderr"]
    assert record["code"] == code, err
    assert "Traceback" not in err and "\x1b" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("error: "), err
    for text in expect:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def assert_nothing_left(d: Path, before: list[str] | None = None) -> None:
    """Nothing in --out (`d`/out) and no staging folder; given `d`'s listing from before the run, nothing new
    beside --out at all (no resume folder either)."""
    assert not (d / "out").is_dir() or not any((d / "out").iterdir())
    assert not list(d.glob(".out.partial-*")), list(d.glob(".out*"))
    if before is not None:
        assert set(os.listdir(d)) - set(before) <= {"out"}, sorted(set(os.listdir(d)) - set(before))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family}-{c.name}")
def test_bad_input_gives_one_line_and_leaves_nothing(case, corpus):
    d, record = corpus[f"{case.family}-{case.name}"]
    assert_one_line_error(record, tuple(text.replace("{d}", str(d)) for text in case.expect), case.code)
    assert record["stdout"] == ""
    assert_nothing_left(d, record["before"])


@pytest.mark.parametrize("key", FRESH)
def test_a_fresh_interpreter_gives_the_fork_servers_record(corpus, key):
    """The fork server is only faster: the same exit code, stdout and stderr (its own folder's name aside) and
    nothing more left behind as `python -m auditkit` started afresh."""
    (d, served), (fresh_d, fresh) = corpus[key], corpus[f"{key}:fresh"]
    assert fresh["stderr"].replace(str(fresh_d), str(d)) == served["stderr"]
    assert (fresh["code"], fresh["stdout"], sorted(fresh["before"])) == (served["code"], served["stdout"],
                                                                         sorted(served["before"]))
    assert sorted(os.listdir(fresh_d)) == sorted(os.listdir(d))


def test_no_message_shows_an_object_repr_or_address(corpus):
    """An exception's text passed on raw can name an in-memory object: `<_io.BytesIO object at 0x7fa7244aa200>`."""
    shown = {key: record["stderr"] for key, (_, record) in corpus.items()
             if re.search(r"0x[0-9a-f]{6,}|<_io|object at", record["stderr"])}
    assert shown == {}


# --------------------------------------------------------------------------- Keras and SavedModel, in-process
@pytest.fixture(scope="session")
def keras_models(tmp_path_factory) -> Path:
    """Tiny Keras files that load but are wrong for auditkit, plus files that only look like models."""
    import zipfile

    import keras

    d = tmp_path_factory.mktemp("corpus-keras")
    inp = keras.Input((SIZE, SIZE), name="image")  # rank 3: no channel axis
    keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inp))).save(d / "rank3.keras")
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2)(inp)))
    keras.Model(inp, out).save(d / "lambda.keras")
    with zipfile.ZipFile(d / "emptyzip.keras", "w"):
        pass
    with zipfile.ZipFile(d / "junkzip.keras", "w") as z:
        z.writestr("config.json", "{not json")
    (d / "sm").mkdir()
    (d / "sm" / "saved_model.pb").write_bytes(b"\x08garbage")
    for name in ("rank3", "lambda", "emptyzip", "junkzip"):
        (d / f"{name}.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return d


@pytest.mark.parametrize("name,expect", [
    ("rank3.keras", ("rank3.keras", "rank 3", "[N, 16, 16]")),
    ("lambda.keras", ("lambda.keras", "cannot load Keras model")),
    ("emptyzip.keras", ("emptyzip.keras", "cannot load Keras model")),
    ("junkzip.keras", ("junkzip.keras", "cannot load Keras model")),
    ("sm", ("sm", "SavedModel")),
])
def test_bad_keras_and_savedmodel_files_give_one_line(keras_models, name, expect):
    from typer.testing import CliRunner

    from auditkit.cli import app

    result = CliRunner().invoke(app, ["inspect", "--model", str(keras_models / name)])
    assert_one_line_error({"code": result.exit_code, "stderr": result.stderr}, expect)


# --------------------------------------------------------------------------- odd but valid: loads right
def _load(manifest: Path, **kw):
    from auditkit.data import Preprocess, load_dataset

    return load_dataset(manifest, CLASSES, preprocess=Preprocess(size=8), cache_dir=False, **kw)


def _pixels(ds, i: int) -> float:
    return float(ds.images[i].mean())


ODD = {
    "crlf": lambda d: (png(d / "a.png"), (d / "m.csv").write_bytes(b"path,label,split\r\na.png,normal,train\r\n"),
                       d / "m.csv")[-1],
    "bom": lambda d: (png(d / "a.png"), (d / "m.csv").write_bytes(b"\xef\xbb\xbfpath,label,split\na.png,normal,t\n"),
                      d / "m.csv")[-1],
    "quoted-comma-space-unicode": lambda d: (png(d / "a, b é.png"), (d / "m.csv").write_text(
        'path,label,split\n"a, b é.png",normal,train\n'), d / "m.csv")[-1],
    "upper-suffix": lambda d: (png(d / "A.PNG"), (d / "m.csv").write_text("path,label,split\nA.PNG,normal,x\n"),
                               d / "m.csv")[-1],
    "symlink-inside": lambda d: (png(d / "img" / "a.png"), os.symlink("img/a.png", d / "in.png"),
                                 (d / "m.csv").write_text("path,label,split\nin.png,normal,train\n"), d / "m.csv")[-1],
    "jsonl-u2028-extra": lambda d: (png(d / "a.png"), (d / "m.jsonl").write_text(
        '{"path": "a.png", "label": "normal", "split": "train", "note": "x\u2028y"}\n'), d / "m.jsonl")[-1],
    "label-case-and-spaces": lambda d: (png(d / "a.png"), (d / "m.csv").write_text(
        "path,label,split\n a.png , Normal ,train\n"), d / "m.csv")[-1],
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_but_valid_manifests_load(tmp_path, name):
    ds = _load(ODD[name](tmp_path))
    assert len(ds) == 1 and ds.labels.tolist() == [0] and ds.images.shape == (1, 8, 8)


def test_symlinked_dataset_root_loads(tmp_path):
    png(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "m.csv").write_text("path,label,split\na.png,normal,train\n")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert _load(tmp_path / "alias" / "m.csv").ids == ["a.png"]


def test_manifest_in_a_subfolder_loads_with_image_root(tmp_path):
    png(tmp_path / "images" / "a.png")
    (tmp_path / "manifests").mkdir()
    for name, text in (("x.csv", "path,label,split\n../images/a.png,normal,train\n"),
                       ("x.jsonl", '{"path": "../images/a.png", "label": "normal", "split": "train"}\n')):
        (tmp_path / "manifests" / name).write_text(text)
        assert _load(tmp_path / "manifests" / name, image_root=tmp_path).ids == ["images/a.png"]


@pytest.mark.parametrize("kind", ["monochrome1", "png16", "rgba", "jpeg"])
def test_odd_but_valid_images_decode(tmp_path, kind):
    from auditkit.data import decode_image

    if kind == "monochrome1":
        pixels = np.tile(np.arange(0, 4096, 256, dtype=np.uint16), (16, 1))
        m1 = decode_image(_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
        m2 = decode_image(_dicom(tmp_path / "m2.dcm", pixels))
        assert (m1.astype(int) + m2 == 255).all()
    elif kind == "png16":
        Image.fromarray(np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (16, 1))).save(tmp_path / "d.png")
        out = decode_image(tmp_path / "d.png")
        assert out[0, 0] == 0 and out[0, -1] == 255
    elif kind == "rgba":
        Image.new("RGBA", (4, 4), (200, 200, 200, 0)).save(tmp_path / "t.png")
        assert decode_image(tmp_path / "t.png").max() == 0  # fully transparent over black
    else:
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "g.jpg", quality=95)
        assert abs(int(decode_image(tmp_path / "g.jpg").mean()) - 128) <= 2


def test_small_aliases_in_a_policy_are_fine(tmp_path):
    from auditkit.policy import load_policy

    text = POLICY.replace("random_controls: {draws: 0}", "random_controls: &rc {draws: 0}\nx-shared: *rc")
    (tmp_path / "p.yaml").write_text(text.replace("    blackbox: {batch_size: 3, samples: 1, low_res: 4}",
                                                  "    blackbox: &bb {batch_size: 3, samples: 1, low_res: 4}"))
    with pytest.raises(Exception, match="x-shared"):  # the alias itself is fine; the unknown key is not
        load_policy(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text(POLICY.replace("norms: [inf]", "norms: &n [inf]").replace(
        "random_controls:", "  - kinds: [nontargeted]\n    norms: *n\n    zetas: [0.2]\n"
                            "    algorithm: blackbox\n    max_iter: 1\nrandom_controls:"))
    assert [c.key for c in load_policy(tmp_path / "q.yaml").cells(CLASSES)] == [
        "nontargeted_inf_z0.1_blackbox", "nontargeted_inf_z0.2_blackbox"]
