"""Datasets: manifests (CSV, JSONL, COVIDx split files, class folders), image decoding, preprocessing, disk cache.

No TensorFlow here. Images are kept as uint8 grayscale planes of one size; models add their own channel
replication and normalisation.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import numbers
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import PIL
from PIL import Image, ImageOps

from .containment import Resolver, check_text, read_inside, real_root
from .errors import AuditkitError, AuditkitWarning
from .fileio import atomic_write
from .messages import quote

FORMATS = ("auto", "csv", "jsonl", "covidx", "folders")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
REQUIRED_COLUMNS = ("path", "label", "split")
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
RESIZE_METHODS = tuple(_RESAMPLE)
_CACHE_VERSION = 2  # bump when decoding or preprocessing changes what a cached array holds


@dataclass(frozen=True)
class Preprocess:
    """Crop the top `crop_top` fraction of rows (COVID-Net: 1/6), then resize to size x size (aspect not kept)."""

    size: int = 224
    crop_top: float = 0.0
    resize: str = "bilinear"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral) or self.size < 1:
            raise AuditkitError(f"size must be a positive integer, got {self.size!r}", where="preprocess.size")
        ok = isinstance(self.crop_top, numbers.Real) and not isinstance(self.crop_top, bool)
        if not (ok and 0 <= self.crop_top < 1):
            raise AuditkitError(f"crop_top must be a fraction in [0, 1), got {self.crop_top!r}",
                                where="preprocess.crop_top")
        if self.resize not in _RESAMPLE:
            raise AuditkitError(f"unknown resize {self.resize!r}; use one of {', '.join(_RESAMPLE)}",
                                where="preprocess.resize")

    def key(self) -> str:
        """Stable text for cache keys and provenance."""
        return f"size={int(self.size)},crop_top={float(self.crop_top)!r},resize={self.resize}"


@dataclass
class Dataset:
    """Preprocessed grayscale images with labels, splits and provenance; rows in manifest order."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    ids: list[str]
    classes: tuple[str, ...]
    extra: dict[str, list] = field(default_factory=dict)
    manifest_sha256: str = ""
    content_sha256: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, split: str) -> Dataset:
        """The rows of one split; AuditkitError if it has none."""
        idx = np.flatnonzero(self.splits == split)
        if idx.size == 0:
            present = ", ".join(sorted(map(str, set(self.splits.tolist())))) or "none"
            raise AuditkitError(f"empty split {split!r}: no rows (splits present: {present})", where=self.source)
        return self.take(idx)

    def take(self, indices) -> Dataset:
        """Rows by integer index (or boolean mask), same classes and manifest provenance."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.intp)
        elif idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
        images, labels = self.images[idx], self.labels[idx]
        return Dataset(images=images, labels=labels, splits=self.splits[idx],
                       ids=[self.ids[i] for i in idx], classes=self.classes,
                       extra={k: [v[i] for i in idx] for k, v in self.extra.items()},
                       manifest_sha256=self.manifest_sha256, content_sha256=content_digest(images, labels),
                       source=self.source)

    def floats(self) -> np.ndarray:
        """Images as float32 in [0, 1], shape (N, size, size)."""
        return self.images.astype(np.float32) / np.float32(255)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> count (every class listed, zeros included)."""
        return {str(s): {c: int(np.count_nonzero((self.splits == s) & (self.labels == i)))
                         for i, c in enumerate(self.classes)}
                for s in np.unique(self.splits)}


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the uint8 image arrays (with their shape) and int64 labels, in row order."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.uint8))
    h.update(np.ascontiguousarray(labels, dtype="<i8"))
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$AUDITKIT_CACHE, else ~/.cache/auditkit."""
    env = os.environ.get("AUDITKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "auditkit"


# --------------------------------------------------------------------------- images
def preprocess_image(gray_uint8: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Drop the top crop_top of rows (floor, like COVID-Net's x[h//6:]), then resize to size x size."""
    a = np.asarray(gray_uint8)
    if a.ndim != 2 or a.dtype != np.uint8 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D uint8 image, got shape {a.shape} dtype {a.dtype}")
    a = np.ascontiguousarray(a[int(a.shape[0] * pre.crop_top):])
    if a.shape == (pre.size, pre.size):
        return a.copy()
    return np.asarray(Image.fromarray(a).resize((pre.size, pre.size), _RESAMPLE[pre.resize]))


def decode_image(path: Path, root: str | None = None) -> np.ndarray:
    """uint8 HxW grayscale from PNG/JPEG (any mode) or DICOM (.dcm suffix or DICM magic). With `root` (a
    real_root), `path` must be a resolved path under it and is opened without following symlinks."""
    path = Path(path)
    try:
        data = read_inside(root, str(path), str(path)) if root is not None else path.read_bytes()
        return _decode_dicom(data, path) if _is_dicom(path, data) else _decode_pil(data)
    except AuditkitError:
        raise
    except FileNotFoundError:
        raise AuditkitError("image file not found", where=str(path)) from None
    except Exception as e:  # decoders raise many exception types on malformed files
        raise AuditkitError(f"cannot decode image: {_one_line(e)}", where=str(path)) from e


def _is_dicom(path: Path, data: bytes) -> bool:
    return path.suffix.lower() == ".dcm" or data[128:132] == b"DICM"


def _decode_pil(data: bytes) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise ValueError("not a readable PNG/JPEG/DICOM image") from None
    with im:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _minmax8(np.asarray(im, dtype=np.float64))
    if im.has_transparency_data:  # composite over black, as the cxr3 builder does
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return np.asarray(im.convert("L"))  # RGB -> ITU-R 601-2 luma


def _minmax8(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _decode_dicom(data: bytes, path: Path) -> np.ndarray:
    import pydicom  # only DICOM needs it

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except pydicom.errors.InvalidDicomError:  # its message suggests force=True, an API argument
        raise ValueError("not a DICOM file (no DICOM header)") from None
    if "PixelData" not in ds:
        raise AuditkitError("DICOM file has no pixel data", where=str(path))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise AuditkitError("unsupported DICOM PhotometricInterpretation PALETTE COLOR", where=str(path))
    a = ds.pixel_array
    if int(_num(ds, "NumberOfFrames", 1)) > 1:
        a = a[0]
    if int(_num(ds, "SamplesPerPixel", 1)) > 1:  # colour (pydicom gives RGB): luma, like colour PNGs
        luma = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(luma * (255.0 / (2 ** int(_num(ds, "BitsStored", 8)) - 1))), 0, 255).astype(np.uint8)
    a = a.astype(np.float64) * _num(ds, "RescaleSlope", 1.0) + _num(ds, "RescaleIntercept", 0.0)
    center, width = _num(ds, "WindowCenter", None), _num(ds, "WindowWidth", None)
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear VOI window onto 0..255
        out = np.clip((a - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5, 0.0, 1.0)
        out = np.rint(out * 255.0).astype(np.uint8)
    else:
        out = _minmax8(a)
    return 255 - out if photometric == "MONOCHROME1" else out


def _num(ds, keyword: str, default):
    """A numeric DICOM attribute (first value if multi-valued), or default when absent/empty/unparsable."""
    v = ds.get(keyword)
    if v is not None and not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
        v = v[0] if len(v) else None
    try:
        return default if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return default


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- manifests
@dataclass
class _Row:
    file: str  # where to read the image
    id: str  # posix path relative to the dataset root
    raw_label: str
    split: str
    where: str  # "manifest.csv:17" (or the image path for class folders)


@dataclass
class _Table:
    rows: list[_Row]
    extra: dict[str, list]
    sha256: str
    root: str  # the dataset root, resolved (containment.real_root): every image must really lie under it


def load_dataset(manifest: str | Path, classes: Sequence[str], *, aliases: Mapping[str, str] | None = None,
                 preprocess: Preprocess = Preprocess(), fmt: str = "auto", image_root: str | Path | None = None,
                 cache_dir: str | Path | None | Literal[False] = None,
                 progress: Callable[[int, int], None] | None = None) -> Dataset:
    """Read a manifest, decode and preprocess every image (thread pool), cached on disk.

    cache_dir=None uses default_cache_dir(); cache_dir=False disables the cache.
    progress(done, total) is called from the calling thread as images are ready.
    """
    manifest = Path(manifest)
    classes = _check_classes(classes)
    resolve_label = _label_resolver(classes, dict(aliases or {}))
    if fmt not in FORMATS:
        raise AuditkitError(f"unknown manifest format {fmt!r}; use one of {', '.join(FORMATS)}", where="fmt")
    if not manifest.exists():
        raise AuditkitError("manifest not found", where=str(manifest))
    fmt = _detect_format(manifest) if fmt == "auto" else fmt
    if fmt in ("csv", "jsonl") and not manifest.is_file():
        raise AuditkitError(f"a {fmt} manifest must be a file", where=str(manifest))
    if fmt == "folders" and not manifest.is_dir():
        raise AuditkitError("a class-folder dataset must be a directory", where=str(manifest))

    if fmt == "covidx":
        table = _read_covidx(manifest, image_root)
    elif fmt == "folders":
        table = _read_folders(manifest, image_root)
    else:
        table = _read_table(manifest, fmt, image_root)
    rows = table.rows
    if not rows:
        raise AuditkitError("empty manifest: no image rows", where=str(manifest))

    seen: dict[str, str] = {}
    labels = np.empty(len(rows), dtype=np.int64)
    file_stats, resolver = [], Resolver(table.root)
    for i, r in enumerate(rows):
        if r.id in seen:
            raise AuditkitError(f"duplicate image {r.id} (first listed at {seen[r.id]})", where=r.where)
        seen[r.id] = r.where
        labels[i] = resolve_label(r.raw_label, r.where)
        r.file, st = resolver.regular_file(r.file, r.where)  # from here on the row reads its real path
        file_stats.append([r.id, st.st_size, st.st_mtime_ns])

    cache_stem = cached = None
    if cache_dir is not False:
        key = hashlib.sha256(json.dumps({
            "version": _CACHE_VERSION, "pillow": PIL.__version__, "format": fmt, "manifest": table.sha256,
            "classes": list(classes), "aliases": sorted((aliases or {}).items()),
            "preprocess": preprocess.key(), "files": file_stats,
        }).encode()).hexdigest()
        cache_stem = (default_cache_dir() if cache_dir is None else Path(cache_dir)) / f"data-{key}"
        cached = _read_cache(cache_stem, (len(rows), preprocess.size, preprocess.size))
    if cached is None:
        images = _decode_all(rows, table.root, preprocess, progress)
        content_sha = content_digest(images, labels)
        if cache_stem is not None:
            _write_cache(cache_stem, images, content_sha)
    else:
        images, content_sha = cached
        if progress is not None:
            progress(len(rows), len(rows))

    return Dataset(images=images, labels=labels, splits=np.array([r.split for r in rows], dtype=str),
                   ids=[r.id for r in rows], classes=classes, extra=table.extra, manifest_sha256=table.sha256,
                   content_sha256=content_sha, source=str(manifest))


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
        raise AuditkitError(f"classes must be a list of non-empty names, got {classes!r}", where="classes")
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes):
        raise AuditkitError(f"classes must be non-empty and unique, got {list(classes)}", where="classes")
    return classes


def _label_resolver(classes: tuple[str, ...], aliases: dict[str, str]) -> Callable[[str, str], int]:
    """raw label -> class index: aliases first, then the exact class name, then a case-insensitive match."""
    index = {c: i for i, c in enumerate(classes)}
    for raw, target in aliases.items():
        if target not in index:
            raise AuditkitError(f"alias {raw!r} maps to {target!r}, which is not one of the classes "
                                f"{', '.join(classes)}", where=f"aliases[{raw!r}]")
    lowered = [c.lower() for c in classes]
    folded = {c.lower(): c for c in classes if lowered.count(c.lower()) == 1}

    def resolve(raw: str, where: str) -> int:
        name = aliases.get(raw) or (raw if raw in index else folded.get(raw.lower()))
        if name is None:
            raise AuditkitError(f"unknown label {raw!r}; classes are {', '.join(classes)}"
                                + (f"; aliases {', '.join(map(repr, aliases))}" if aliases else "")
                                + " (add an alias to map it)", where=where)
        return index[name]

    return resolve


def _detect_format(manifest: Path) -> str:
    if manifest.is_dir():
        if (manifest / "train.txt").is_file() or (manifest / "test.txt").is_file():
            return "covidx"
        if any(True for _ in _class_folder_images(manifest)):
            return "folders"
        if any(manifest.glob("*.txt")):
            return "covidx"
        raise AuditkitError("cannot detect the dataset format: expected COVIDx split files (*.txt) or "
                            "<split>/<label>/<image> folders", where=str(manifest))
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "covidx"}.get(manifest.suffix.lower())
    if fmt is None:
        raise AuditkitError(f"unknown manifest format (suffix {manifest.suffix!r}); expected .csv, .jsonl, "
                            "COVIDx .txt or a folder, or pass fmt", where=str(manifest))
    return fmt


def _read_text(path: Path) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AuditkitError(f"cannot read manifest: {e.strerror or e}", where=str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise AuditkitError("manifest is not UTF-8 text", where=f"{path}:{line}") from None
    if not text.strip():
        raise AuditkitError("empty manifest", where=str(path))
    return data, text


def _dataset_root(given: str | Path | None, default: Path) -> Path:
    """image_root when given (policy or --image-root), else the manifest's own folder; it must be a folder."""
    root = Path(given) if given is not None else default
    if not root.is_dir():
        raise AuditkitError("image root is not a directory", where=str(root))
    return root


def _roots(root: Path) -> tuple[str, ...]:
    """The dataset root as given (absolute) and with symlinks resolved, for _inside."""
    lexical = os.path.abspath(root)
    return tuple(dict.fromkeys((lexical, os.path.realpath(lexical))))


def _inside(roots: tuple[str, ...], raw: str, where: str, base: str | None = None) -> tuple[str, str]:
    """Normalised file path (`raw` relative to `base`, default the root) under a root, and its posix id relative
    to the root; AuditkitError if it escapes as written (symlinks are resolved later, by
    containment.Resolver)."""
    if not raw:
        raise AuditkitError("empty image path", where=where)
    check_text(raw, where)
    path = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(base or roots[0], raw))
    for base in roots:
        prefix = base if base.endswith(os.sep) else base + os.sep
        if path.startswith(prefix):  # strings: two Path() per row were a large share of a cache hit
            return path, path[len(prefix):].replace(os.sep, "/")
    holder = os.path.commonpath([roots[0], path])  # the nearest root that holds this row and the others
    folder = f" to {_folder(holder)}" if os.path.dirname(holder) != holder else ""  # "/" would let any file in
    raise AuditkitError(f"image path {quote(raw)} is outside the dataset root {_folder(roots[0])}; set --image-root "
                        f"(or data.image_root){folder} to allow it", where=where)


def _folder(path: str) -> str:
    """A folder quoted as the user would type it (relative to the current folder when inside it), and whole: cut
    like a row's text, it would not say where --image-root should point."""
    rel = os.path.relpath(path)
    return repr(path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel)


def _read_table(path: Path, fmt: str, image_root: str | Path | None) -> _Table:
    data, text = _read_text(path)
    records = _csv_records(path, text) if fmt == "csv" else _jsonl_records(path, text)
    root = _dataset_root(image_root, path.parent)
    roots, base, rows, extras = _roots(root), os.path.abspath(path.parent), [], []
    for where, rec in records:
        for col in REQUIRED_COLUMNS:
            if col not in rec:
                raise AuditkitError(f"missing required column {col!r}", where=where)
            if not isinstance(rec[col], str) or not rec[col].strip():
                raise AuditkitError(f"column {col!r} must be a non-empty string, got {rec[col]!r}", where=where)
        file, rid = _inside(roots, rec["path"].strip(), where, base)
        rows.append(_Row(file, rid, rec["label"].strip(), rec["split"].strip(), where))
        extras.append({k: v for k, v in rec.items() if k not in REQUIRED_COLUMNS})
    keys = list(dict.fromkeys(k for e in extras for k in e))
    return _Table(rows, {k: [e.get(k) for e in extras] for k in keys}, hashlib.sha256(data).hexdigest(),
                  real_root(root))


def _csv_records(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise AuditkitError(f"missing required column {missing[0]!r}; header has {', '.join(header)}",
                                where=f"{path}:1")
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise AuditkitError(f"duplicate column {dup!r}", where=f"{path}:1")
        start = reader.line_num + 1
        for fields in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise AuditkitError(f"row has {len(fields)} fields, the header has {len(header)}", where=where)
            records.append((where, dict(zip(header, fields))))
    except csv.Error as e:
        raise AuditkitError(f"malformed CSV: {_one_line(e)}", where=f"{path}:{reader.line_num}") from None
    return records


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict]]:
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AuditkitError(f"invalid JSON: {e.msg} (column {e.colno})", where=where) from None
        if not isinstance(obj, dict):
            raise AuditkitError(f"expected a JSON object, got {type(obj).__name__}", where=where)
        records.append((where, obj))
    return records


def _read_covidx(manifest: Path, image_root: str | Path | None) -> _Table:
    """COVIDx split files: `patient_id filename label source` per line, split = file stem."""
    files = sorted(manifest.glob("*.txt")) if manifest.is_dir() else [manifest]
    if not files:
        raise AuditkitError("no COVIDx split files (*.txt) in this folder", where=str(manifest))
    root = _dataset_root(image_root, files[0].parent)
    roots, digest = _roots(root), hashlib.sha256()
    rows, patients, sources = [], [], []
    for f in files:
        data, text = _read_text(f)
        digest.update(f"{f.name}\0{len(data)}\0".encode())
        digest.update(data)
        split = f.stem
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            fields = line.split()
            if len(fields) < 3:
                raise AuditkitError(f"expected 'patient_id filename label source', got {line.strip()!r}",
                                    where=where)
            if len(fields) == 3:
                patient, filename, label, source = *fields, ""
            else:  # the filename may hold spaces: patient first, label and source last
                patient, rest = line.strip().split(None, 1)
                filename, label, source = rest.rsplit(None, 2)
            file, rid = _inside(roots, filename, where)  # the name itself must stay under image_root
            in_split = _inside(roots, f"{split}/{filename}", where)
            if os.path.isfile(in_split[0]):
                file, rid = in_split
            rows.append(_Row(file, rid, label, split, where))
            patients.append(patient)
            sources.append(source)
    return _Table(rows, {"patient_id": patients, "source": sources}, digest.hexdigest(), real_root(root))


def _class_folder_images(root: Path):
    """(split, label, file) for root/<split>/<label>/<image>, sorted; hidden entries skipped."""
    def entries(d: Path, want_dir: bool):
        return sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.is_dir() == want_dir)

    for split_dir in entries(root, True):
        for label_dir in entries(split_dir, True):
            for f in entries(label_dir, False):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    yield split_dir.name, label_dir.name, f


def _read_folders(root: Path, image_root: str | Path | None) -> _Table:
    """Class folders; image_root, when given, is the containment root and must hold the tree."""
    outer = real_root(_dataset_root(image_root, root))
    if not (real_root(root) + os.sep).startswith(outer + os.sep):
        raise AuditkitError(f"the dataset folder is outside image_root {quote(outer)}", where=str(root))
    try:
        found = list(_class_folder_images(root))
    except OSError as e:
        raise AuditkitError(f"cannot list dataset folder: {e.strerror or e}", where=str(root)) from None
    rows = [_Row(str(f), f.relative_to(root).as_posix(), label, split, str(f)) for split, label, f in found]
    listing = "\n".join(r.id for r in rows).encode()
    return _Table(rows, {}, hashlib.sha256(listing).hexdigest(), outer)


# --------------------------------------------------------------------------- decoding and cache
def _decode_all(rows: list[_Row], root: str, pre: Preprocess,
                progress: Callable[[int, int], None] | None) -> np.ndarray:
    out = np.empty((len(rows), pre.size, pre.size), dtype=np.uint8)

    def work(i: int) -> None:
        r = rows[i]
        try:
            out[i] = preprocess_image(decode_image(r.file, root), pre)
        except AuditkitError as e:
            raise AuditkitError(f"{quote(r.id)}: {e.message}", where=r.where) from None

    pool = ThreadPoolExecutor(max_workers=max(1, min(len(rows), os.cpu_count() or 1)))
    try:
        for done, _ in enumerate(pool.map(work, range(len(rows))), 1):
            if progress is not None:
                progress(done, len(rows))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _read_cache(stem: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, str] | None:
    """(images, content sha256) from <stem>.npy and <stem>.json, or None when absent, unreadable or not the
    expected shape (then rebuilt). The sha is stored, not recomputed: the entry is keyed by everything it hashes.
    The images are a read-only memory map of the file (entries are replaced, never written in place): every use
    copies what it takes, and copying the whole file into fresh memory first cost 0.35 s of a 0.40 s cache hit
    at 224 px (page faults on 150 MB), against 0.05 s for reading all of it through the map."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_bytes())
        if not (isinstance(meta, dict) and isinstance(meta.get("content_sha256"), str)
                and meta.get("shape") == list(shape)):
            return None
        images = np.load(stem.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # JSONDecodeError, a bad .npy header, a short file; an empty one
        return None
    return (images, meta["content_sha256"]) if images.dtype == np.uint8 and images.shape == shape else None


def _write_cache(stem: Path, images: np.ndarray, content_sha: str) -> None:
    """Uncompressed .npy, then the .json that names its sha; each written atomically (temp file, os.replace).
    A cache that cannot be written only warns."""
    meta = json.dumps({"content_sha256": content_sha, "shape": list(images.shape)}).encode()
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stem.with_suffix(".npy"), lambda f: np.save(f, images, allow_pickle=False))
        atomic_write(stem.with_suffix(".json"), lambda f: f.write(meta))
    except OSError as e:
        warnings.warn(f"could not write dataset cache {stem}: {_one_line(e)}", AuditkitWarning, stacklevel=3)
