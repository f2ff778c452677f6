"""Tests for auditkit.data: manifests, decoding, preprocessing, cache, errors."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import auditkit.data as data
from auditkit.data import Dataset, Preprocess, content_digest, decode_image, load_dataset, preprocess_image
from auditkit.errors import AuditkitError

CLASSES = ("normal", "pneumonia", "covid")
CXR3 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr3"
SMALL = Preprocess(size=16)


# --------------------------------------------------------------------------- fixture helpers
@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """A test that reaches the default cache writes under tmp_path, never into the home folder."""
    monkeypatch.setenv("AUDITKIT_CACHE", str(tmp_path / "default-cache"))


def _png(path: Path, value: int, size=(20, 24)) -> np.ndarray:
    """A grayscale PNG with a distinct pattern: constant `value` plus a bright top-left pixel."""
    a = np.full(size, value, dtype=np.uint8)
    a[0, 0] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


def _csv(root: Path, lines: list[str], header: str = "path,label,split", name: str = "manifest.csv") -> Path:
    p = root / name
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


def _small_csv(root: Path) -> Path:
    for i, v in enumerate((10, 60, 110, 160)):
        _png(root / "img" / f"{i}.png", v)
    return _csv(root, ["img/0.png,normal,train,a", "img/1.png,pneumonia,train,b",
                       "img/2.png,COVID-19,test,a", "img/3.png,NORMAL,test,c"], header="path,label,split,source")


def _dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)
    return path


def _error(fn, *args, **kwargs) -> AuditkitError:
    with pytest.raises(AuditkitError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- formats
def test_csv_loads_labels_splits_ids_extra_and_aliases(tmp_path):
    ds = load_dataset(_small_csv(tmp_path), CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL,
                      cache_dir=False)
    assert ds.ids == ["img/0.png", "img/1.png", "img/2.png", "img/3.png"]
    assert ds.labels.tolist() == [0, 1, 2, 0]  # alias, exact and case-insensitive matches
    assert ds.labels.dtype == np.int64
    assert ds.splits.tolist() == ["train", "train", "test", "test"]
    assert ds.extra == {"source": ["a", "b", "a", "c"]}
    assert ds.images.shape == (4, 16, 16) and ds.images.dtype == np.uint8
    assert ds.classes == CLASSES and ds.source == str(tmp_path / "manifest.csv")
    assert ds.manifest_sha256 == hashlib.sha256((tmp_path / "manifest.csv").read_bytes()).hexdigest()
    assert ds.content_sha256 == content_digest(ds.images, ds.labels)
    assert int(np.median(ds.images[1])) == 60  # pixel values survive the pipeline
    assert ds.class_counts() == {"test": {"normal": 1, "pneumonia": 0, "covid": 1},
                                 "train": {"normal": 1, "pneumonia": 1, "covid": 0}}


def test_csv_paths_are_normalised_and_absolute_inside_root_allowed(tmp_path):
    _png(tmp_path / "img" / "a.png", 10)
    _png(tmp_path / "img" / "b.png", 20)
    m = _csv(tmp_path, ["./img/x/../a.png,normal,train", f"{tmp_path / 'img' / 'b.png'},normal,test"])
    assert load_dataset(m, CLASSES, preprocess=SMALL, cache_dir=False).ids == ["img/a.png", "img/b.png"]


def test_jsonl_loads_and_keeps_extra_keys(tmp_path):
    _png(tmp_path / "a.png", 30)
    _png(tmp_path / "b.png", 90)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "a.png", "label": "pneumonia", "split": "train", "age": 4}) + "\n\n"
                 + json.dumps({"path": "b.png", "label": "covid", "split": "val", "sex": "F"}) + "\n")
    ds = load_dataset(m, CLASSES, preprocess=SMALL, cache_dir=False)
    assert ds.ids == ["a.png", "b.png"] and ds.labels.tolist() == [1, 2] and ds.splits.tolist() == ["train", "val"]
    assert ds.extra == {"age": [4, None], "sex": [None, "F"]}


def test_covidx_directory_with_split_subfolders_and_fallback(tmp_path):
    _png(tmp_path / "train" / "a.png", 10)
    _png(tmp_path / "train" / "b 1.png", 20)
    _png(tmp_path / "c.png", 30)  # not under test/: found at image_root/<filename>
    (tmp_path / "train.txt").write_text("p1 a.png normal ieee\np2 b 1.png positive rsna\n")
    (tmp_path / "test.txt").write_text("\np3 c.png COVID-19 sirm\n")
    ds = load_dataset(tmp_path, CLASSES, aliases={"positive": "covid", "COVID-19": "covid"}, preprocess=SMALL,
                      cache_dir=False)
    # split files are read in name order: test.txt, then train.txt
    assert ds.ids == ["c.png", "train/a.png", "train/b 1.png"]
    assert ds.splits.tolist() == ["test", "train", "train"]
    assert ds.labels.tolist() == [2, 0, 2]
    assert ds.extra == {"patient_id": ["p3", "p1", "p2"], "source": ["sirm", "ieee", "rsna"]}
    assert [int(np.median(x)) for x in ds.images] == [30, 10, 20]


def test_covidx_single_file_with_separate_image_root(tmp_path):
    _png(tmp_path / "imgs" / "test" / "x.png", 50)
    split_file = tmp_path / "lists" / "test.txt"
    split_file.parent.mkdir()
    split_file.write_text("p9 x.png pneumonia src\n")
    ds = load_dataset(split_file, CLASSES, image_root=tmp_path / "imgs", preprocess=SMALL, cache_dir=False)
    assert ds.ids == ["test/x.png"] and ds.splits.tolist() == ["test"] and ds.labels.tolist() == [1]


def test_class_folders_load_and_ignore_hidden_and_other_files(tmp_path):
    _png(tmp_path / "train" / "normal" / "a.png", 10)
    _png(tmp_path / "train" / "Pneumonia" / "b.png", 20)
    (tmp_path / "test" / "covid").mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 100, np.uint8)).save(tmp_path / "test" / "covid" / "c.JPG")
    (tmp_path / "train" / "normal" / "notes.csv").write_text("x")
    (tmp_path / "train" / "normal" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "README.txt").write_text("a class-folder tree, not COVIDx")
    ds = load_dataset(tmp_path, CLASSES, preprocess=SMALL, cache_dir=False)
    assert ds.ids == ["test/covid/c.JPG", "train/Pneumonia/b.png", "train/normal/a.png"]
    assert ds.labels.tolist() == [2, 1, 0] and ds.splits.tolist() == ["test", "train", "train"]
    assert ds.extra == {}
    listing = "\n".join(ds.ids).encode()
    assert ds.manifest_sha256 == hashlib.sha256(listing).hexdigest()


# --------------------------------------------------------------------------- image decoding
def test_jpeg_rgb_rgba_la_and_16bit_png_decode_to_gray(tmp_path):
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "g.jpg", quality=95)
    assert abs(int(decode_image(tmp_path / "g.jpg").mean()) - 128) <= 2

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert decode_image(tmp_path / "rgb.png").tolist() == np.full((16, 16), 76).tolist()  # ITU-R 601 luma

    rgba = np.full((16, 16, 4), 200, np.uint8)
    rgba[:8, :, 3] = 0  # transparent top half -> black
    rgba[8:, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png")
    assert (out[:8] == 0).all() and (out[8:] == 200).all()

    la = np.stack([np.full((16, 16), 200, np.uint8), np.full((16, 16), 128, np.uint8)], axis=-1)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert abs(int(decode_image(tmp_path / "la.png")[0, 0]) - 100) <= 1  # 200 * 128/255 over black

    ramp = np.tile(np.linspace(1000, 4000, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit PNG
    out = decode_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255  # min-max scaled
    assert (np.diff(out[0].astype(int)) > 0).all()


def test_dicom_monochrome1_is_inverse_of_monochrome2(tmp_path):
    pixels = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 7
    m2 = decode_image(_dicom(tmp_path / "m2.dcm", pixels))
    m1 = decode_image(_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert m2.dtype == np.uint8 and m2.shape == (20, 24)
    assert m2.min() == 0 and m2.max() == 255 and m2[0, 0] == 0  # min-max window without window tags
    assert (m1.astype(int) == 255 - m2.astype(int)).all()


def test_dicom_rescale_and_window_applied(tmp_path):
    pixels = np.array([[0, 10, 16, 20, 30]], dtype=np.uint16)
    # rescaled = 10 * p - 100 = [-100, 0, 60, 100, 200]; window [0, 100] (center 50.5, width 101)
    out = decode_image(_dicom(tmp_path / "w.dcm", pixels, slope=10, intercept=-100, window=(50.5, 101)))
    assert out.tolist() == [[0, 0, 153, 255, 255]]
    up = decode_image(_dicom(tmp_path / "up.dcm", pixels, slope=1, intercept=0))
    down = decode_image(_dicom(tmp_path / "down.dcm", pixels, slope=-1, intercept=0))
    assert (down.astype(int) == 255 - up.astype(int)).all()  # a negative slope flips the min-max window


def test_dicom_detected_by_magic_without_suffix_and_loads_in_csv(tmp_path):
    pixels = np.tile(np.arange(16, dtype=np.uint16) * 100, (16, 1))
    _dicom(tmp_path / "scan", pixels)
    assert decode_image(tmp_path / "scan").shape == (16, 16)
    ds = load_dataset(_csv(tmp_path, ["scan,normal,test"]), CLASSES, preprocess=SMALL, cache_dir=False)
    assert ds.images[0, 0, 0] == 0 and ds.images[0, 0, -1] == 255


# --------------------------------------------------------------------------- preprocessing
def test_crop_top_drops_the_top_rows_before_resizing(tmp_path):
    a = np.zeros((60, 40), np.uint8)
    a[:10] = 255  # the top sixth is white
    nearest = Preprocess(size=20, resize="nearest")
    assert (preprocess_image(a, nearest)[:3] == 255).all()
    cropped = preprocess_image(a, Preprocess(size=20, crop_top=1 / 6, resize="nearest"))
    assert cropped.shape == (20, 20) and (cropped == 0).all()
    Image.fromarray(a).save(tmp_path / "top.png")
    ds = load_dataset(_csv(tmp_path, ["top.png,normal,train"]), CLASSES,
                      preprocess=Preprocess(size=20, crop_top=1 / 6), cache_dir=False)
    assert (ds.images == 0).all()


@pytest.mark.parametrize("resize", ["bilinear", "bicubic", "nearest", "lanczos", "area"])
def test_every_resize_method_gives_size_by_size_uint8(resize):
    out = preprocess_image(np.arange(30 * 20, dtype=np.uint16).reshape(30, 20).astype(np.uint8),
                           Preprocess(size=12, resize=resize))
    assert out.shape == (12, 12) and out.dtype == np.uint8


def test_preprocess_validates_and_key_is_stable():
    assert Preprocess().key() == Preprocess(224, 0.0, "bilinear").key()
    assert len({Preprocess().key(), Preprocess(crop_top=1 / 6).key(), Preprocess(resize="area").key(),
                Preprocess(size=64).key()}) == 4
    assert "preprocess.size" in str(_error(Preprocess, size=0))
    assert "preprocess.crop_top" in str(_error(Preprocess, crop_top=1.0))
    assert "'cubic'" in str(_error(Preprocess, resize="cubic"))


# --------------------------------------------------------------------------- Dataset methods
def test_subset_take_floats(tmp_path):
    ds = load_dataset(_small_csv(tmp_path), CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL,
                      cache_dir=False)
    test = ds.subset("test")
    assert test.ids == ["img/2.png", "img/3.png"] and test.extra == {"source": ["a", "c"]}
    assert test.content_sha256 == content_digest(test.images, test.labels) != ds.content_sha256
    assert test.manifest_sha256 == ds.manifest_sha256
    picked = ds.take([3, 0])
    assert picked.ids == ["img/3.png", "img/0.png"] and picked.labels.tolist() == [0, 0]
    assert (picked.images[1] == ds.images[0]).all()
    assert len(ds.take(np.array([], dtype=int))) == 0
    f = ds.floats()
    assert f.dtype == np.float32 and f.shape == ds.images.shape and 0 <= f.min() <= f.max() <= 1
    np.testing.assert_allclose(f * 255, ds.images)
    err = _error(ds.subset, "val")
    assert "empty split 'val'" in err.message and err.where == ds.source


# --------------------------------------------------------------------------- cache
def test_cache_hit_does_not_decode(tmp_path, monkeypatch):
    m, cache = _small_csv(tmp_path), tmp_path / "cache"
    first = load_dataset(m, CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == len(list(cache.glob("*.json"))) == 1 and not list(cache.glob("*.tmp"))

    def boom(path, root=None):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(data, "decode_image", boom)
    calls = []
    second = load_dataset(m, CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=cache,
                          progress=lambda done, total: calls.append((done, total)))
    assert (second.images == first.images).all() and second.content_sha256 == first.content_sha256
    assert second.ids == first.ids and second.extra == first.extra and calls == [(4, 4)]
    with pytest.raises(AssertionError):  # a different preprocess is a different cache entry
        load_dataset(m, CLASSES, aliases={"COVID-19": "covid"}, preprocess=Preprocess(size=8), cache_dir=cache)


def test_cache_invalidates_when_an_image_changes(tmp_path, monkeypatch):
    m, cache = _small_csv(tmp_path), tmp_path / "cache"
    kw = dict(aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=cache)
    first = load_dataset(m, CLASSES, **kw)
    img = tmp_path / "img" / "1.png"
    old = img.stat().st_mtime_ns
    _png(img, 200)
    os.utime(img, ns=(old + 10**9, old + 10**9))
    decoded = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda p, *root: decoded.append(p) or real(p, *root))
    second = load_dataset(m, CLASSES, **kw)
    assert len(decoded) == 4 and int(np.median(second.images[1])) == 200
    assert second.content_sha256 != first.content_sha256 and second.manifest_sha256 == first.manifest_sha256
    assert len(list(cache.glob("*.npy"))) == 2


def _counting_decoder(monkeypatch) -> list:
    decoded, real = [], data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda p, *root: decoded.append(p) or real(p, *root))
    return decoded


def _touch(path: Path, grow: bool) -> None:
    """A later mtime with the same bytes, or one more byte with the same mtime (PNG ignores trailing bytes)."""
    st = path.stat()
    if grow:
        with open(path, "ab") as f:
            f.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + (0 if grow else 10**9)))


CACHE_KEY_CHANGES = {
    "manifest": lambda root, mp: dict(manifest=_csv(root, [
        "img/0.png,normal,train,a", "img/1.png,pneumonia,train,b",  # only the extra column differs
        "img/2.png,COVID-19,test,a", "img/3.png,NORMAL,test,z"], header="path,label,split,source")),
    "image_mtime": lambda root, mp: _touch(root / "img" / "2.png", grow=False),
    "image_size": lambda root, mp: _touch(root / "img" / "2.png", grow=True),
    "classes": lambda root, mp: dict(classes=(*CLASSES, "other")),
    "aliases": lambda root, mp: dict(aliases={"COVID-19": "covid", "unused": "normal"}),
    "preprocess_crop": lambda root, mp: dict(preprocess=Preprocess(size=16, crop_top=0.25)),
    "preprocess_resize": lambda root, mp: dict(preprocess=Preprocess(size=16, resize="area")),
    "cache_version": lambda root, mp: mp.setattr(data, "_CACHE_VERSION", data._CACHE_VERSION + 1),
    "pillow_version": lambda root, mp: mp.setattr(data.PIL, "__version__", "0.0"),
}


@pytest.mark.parametrize("change", list(CACHE_KEY_CHANGES))
def test_cache_invalidates_on_each_key_change(tmp_path, monkeypatch, change):
    kw = dict(manifest=_small_csv(tmp_path), classes=CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL,
              cache_dir=tmp_path / "cache")
    first = load_dataset(**kw)
    decoded = _counting_decoder(monkeypatch)
    load_dataset(**kw)
    assert decoded == []  # control: nothing changed, a hit
    kw.update(CACHE_KEY_CHANGES[change](tmp_path, monkeypatch) or {})
    second = load_dataset(**kw)
    assert len(decoded) == 4 and second.ids == first.ids
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    load_dataset(**kw)
    assert len(decoded) == 4  # the new entry is a hit


def test_cache_invalidates_when_the_format_changes(tmp_path, monkeypatch):
    """The same files, ids, labels and splits read as COVIDx and as class folders are two cache entries."""
    _png(tmp_path / "train" / "normal" / "a.png", 1)
    (tmp_path / "train.txt").write_text("p1 normal/a.png normal src\n")
    as_covidx = load_dataset(tmp_path, CLASSES, preprocess=SMALL, cache_dir=tmp_path / "cache")
    decoded = _counting_decoder(monkeypatch)
    as_folders = load_dataset(tmp_path, CLASSES, preprocess=SMALL, fmt="folders", cache_dir=tmp_path / "cache")
    assert len(decoded) == 1 and as_folders.ids == as_covidx.ids == ["train/normal/a.png"]


CACHE_CORRUPTIONS = {
    "npy_garbage": lambda npy, meta: npy.write_bytes(b"not an array"),
    "npy_truncated": lambda npy, meta: npy.write_bytes(npy.read_bytes()[:-7]),
    "npy_wrong_shape": lambda npy, meta: np.save(npy, np.zeros((4, 8, 8), np.uint8)),
    "npy_wrong_dtype": lambda npy, meta: np.save(npy, np.zeros((4, 16, 16), np.int16)),
    "npy_pickled_object": lambda npy, meta: np.save(npy, np.array([{"x": 1}], dtype=object), allow_pickle=True),
    "npy_missing": lambda npy, meta: npy.unlink(),
    "npy_empty": lambda npy, meta: npy.write_bytes(b""),
    "json_garbage": lambda npy, meta: meta.write_bytes(b"{not json"),
    "json_not_an_object": lambda npy, meta: meta.write_text("[]"),
    "json_without_sha": lambda npy, meta: meta.write_text(json.dumps({"shape": [4, 16, 16]})),
    "json_missing": lambda npy, meta: meta.unlink(),
}


@pytest.mark.parametrize("corruption", list(CACHE_CORRUPTIONS))
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, corruption):
    kw = dict(aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=tmp_path / "cache")
    m = _small_csv(tmp_path)
    first = load_dataset(m, CLASSES, **kw)
    (npy,), (meta,) = (tmp_path / "cache").glob("*.npy"), (tmp_path / "cache").glob("*.json")
    assert meta.stem == npy.stem and json.loads(meta.read_text())["content_sha256"] == first.content_sha256
    CACHE_CORRUPTIONS[corruption](npy, meta)
    decoded = _counting_decoder(monkeypatch)
    again = load_dataset(m, CLASSES, **kw)
    assert len(decoded) == 4 and again.content_sha256 == first.content_sha256
    assert (again.images == first.images).all()
    assert np.load(npy, allow_pickle=False).shape == (4, 16, 16)  # repaired in place
    assert load_dataset(m, CLASSES, **kw).content_sha256 == first.content_sha256 and len(decoded) == 4


def test_default_cache_dir_and_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITKIT_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    m = _small_csv(tmp_path)
    load_dataset(m, CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=False)
    assert not (tmp_path / "envcache").exists()
    first = load_dataset(m, CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL)  # None -> default dir
    (npy,) = (tmp_path / "envcache").glob("*.npy")
    assert (np.load(npy, allow_pickle=False) == first.images).all()


def test_progress_reports_every_image(tmp_path):
    calls = []
    load_dataset(_small_csv(tmp_path), CLASSES, aliases={"COVID-19": "covid"}, preprocess=SMALL, cache_dir=False,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# --------------------------------------------------------------------------- errors
def test_missing_image_names_file_and_row(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("m")  # short: a message quotes the first 80 characters of the image's path
    _png(tmp_path / "a.png", 1)
    err = _error(load_dataset, _csv(tmp_path, ["a.png,normal,train", "gone.png,normal,train"]), CLASSES,
                 cache_dir=False)
    assert err.where == f"{tmp_path / 'manifest.csv'}:3" and "not found" in err.message and "gone.png" in err.message


def test_undecodable_image_names_file_and_row(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    err = _error(load_dataset, _csv(tmp_path, ["bad.png,normal,train"]), CLASSES, cache_dir=False)
    assert err.where.endswith("manifest.csv:2")
    assert err.message == "'bad.png': cannot decode image: not a readable PNG/JPEG/DICOM image"  # no decoder repr
    (tmp_path / "bad.dcm").write_bytes(b"no preamble")
    assert _error(decode_image, tmp_path / "bad.dcm").message == \
        "cannot decode image: not a DICOM file (no DICOM header)"


def test_unknown_label_names_label_and_classes(tmp_path):
    _png(tmp_path / "a.png", 1)
    err = _error(load_dataset, _csv(tmp_path, ["a.png,tuberculosis,train"]), CLASSES, cache_dir=False)
    assert err.where.endswith("manifest.csv:2")
    assert "'tuberculosis'" in err.message and "normal, pneumonia, covid" in err.message
    assert "aliases" in str(_error(load_dataset, tmp_path / "manifest.csv", CLASSES, aliases={"x": "nope"}))


@pytest.mark.parametrize("raw", ["../outside.png", "img/../../outside.png", "ABS"])
def test_path_escaping_the_root_is_rejected(tmp_path, raw):
    root = tmp_path / "ds"
    root.mkdir()
    _png(tmp_path / "outside.png", 1)  # exists, so only the escape check can stop it
    raw = str(tmp_path / "outside.png") if raw == "ABS" else raw
    err = _error(load_dataset, _csv(root, [f"{raw},normal,train"]), CLASSES, cache_dir=False)
    assert err.where.endswith("manifest.csv:2") and "outside the dataset root" in err.message


def test_a_row_outside_the_root_says_which_image_root_would_hold_it(tmp_path, monkeypatch):
    _png(tmp_path / "ds" / "images" / "a.png", 1)
    (tmp_path / "ds" / "manifests").mkdir()
    manifest = _csv(tmp_path / "ds" / "manifests", ["../images/a.png,normal,train"])
    monkeypatch.chdir(tmp_path)  # folders inside the current one are shown as the user would type them
    err = _error(load_dataset, manifest, CLASSES, cache_dir=False)
    assert err.message == ("image path '../images/a.png' is outside the dataset root 'ds/manifests'; "
                           "set --image-root (or data.image_root) to 'ds' to allow it")


def test_covidx_escape_and_bad_line(tmp_path):
    _png(tmp_path / "outside.png", 1)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.txt").write_text("p1 ../outside.png normal src\n")
    err = _error(load_dataset, tmp_path / "ds", CLASSES, cache_dir=False)
    assert err.where == f"{tmp_path / 'ds' / 'train.txt'}:1" and "outside" in err.message
    (tmp_path / "ds" / "train.txt").write_text("p1 a.png normal x\np2 b.png\n")
    err = _error(load_dataset, tmp_path / "ds", CLASSES, cache_dir=False)
    assert err.where.endswith("train.txt:2") and "patient_id filename label source" in err.message


def test_missing_required_column(tmp_path):
    err = _error(load_dataset, _csv(tmp_path, ["a.png,train"], header="path,split"), CLASSES, cache_dir=False)
    assert err.where.endswith("manifest.csv:1") and "'label'" in err.message
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.png", "label": "normal", "split": "train"}\n{"path": "b.png", "label": "normal"}\n')
    err = _error(load_dataset, m, CLASSES, cache_dir=False)
    assert err.where.endswith("m.jsonl:2") and "'split'" in err.message


def test_empty_manifests(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert "empty manifest" in _error(load_dataset, tmp_path / "empty.csv", CLASSES).message
    err = _error(load_dataset, _csv(tmp_path, [], name="header_only.csv"), CLASSES)
    assert "empty manifest" in err.message and err.where.endswith("header_only.csv")
    (tmp_path / "t.txt").write_text("\n\n")
    assert "empty manifest" in _error(load_dataset, tmp_path / "t.txt", CLASSES).message


def test_unreadable_or_unknown_manifest_formats(tmp_path):
    (tmp_path / "m.xml").write_text("<x/>")
    assert "unknown manifest format" in _error(load_dataset, tmp_path / "m.xml", CLASSES).message
    assert "not found" in _error(load_dataset, tmp_path / "nope.csv", CLASSES).message
    (tmp_path / "emptydir").mkdir()
    assert "cannot detect" in _error(load_dataset, tmp_path / "emptydir", CLASSES).message
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"\n')
    err = _error(load_dataset, tmp_path / "m.jsonl", CLASSES)
    assert "invalid JSON" in err.message and err.where.endswith("m.jsonl:1")
    (tmp_path / "latin.csv").write_bytes(b"path,label,split\nim\xe9.png,normal,train\n")
    err = _error(load_dataset, tmp_path / "latin.csv", CLASSES)
    assert "UTF-8" in err.message and err.where.endswith("latin.csv:2")
    assert "fields" in _error(load_dataset, _csv(tmp_path, ["a.png,normal"], name="short.csv"), CLASSES).message
    assert "fmt" == _error(load_dataset, tmp_path / "m.jsonl", CLASSES, fmt="xml").where
    (tmp_path / "ok.jsonl").write_text('{"path": "a.png", "label": "normal", "split": "train"}\n')
    err = _error(load_dataset, tmp_path / "ok.jsonl", CLASSES, image_root=tmp_path / "nowhere")
    assert "image root is not a directory" in err.message and err.where == str(tmp_path / "nowhere")


def test_duplicate_rows_and_bad_classes(tmp_path):
    _png(tmp_path / "a.png", 1)
    err = _error(load_dataset, _csv(tmp_path, ["a.png,normal,train", "./a.png,normal,test"]), CLASSES)
    assert err.where.endswith("manifest.csv:3") and "duplicate" in err.message and "manifest.csv:2" in err.message
    assert _error(load_dataset, tmp_path / "manifest.csv", ["normal", "normal"]).where == "classes"
    assert _error(load_dataset, tmp_path / "manifest.csv", "normal").where == "classes"


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.cxr3
def test_real_cxr3_manifest_loads(tmp_path, monkeypatch):
    if not (CXR3 / "manifest.csv").is_file():
        pytest.skip(f"real dataset not found at {CXR3}")
    classes = ("normal", "pneumonia", "COVID-19")
    pre = Preprocess(size=32, crop_top=1 / 6)
    ds = load_dataset(CXR3 / "manifest.csv", classes, preprocess=pre, cache_dir=tmp_path)
    counts = ds.class_counts()
    assert counts["train"]["normal"] == 800 and counts["test"]["pneumonia"] == 200
    assert len(ds) == sum(sum(c.values()) for c in counts.values()) > 2900
    assert ds.images.shape == (len(ds), 32, 32) and 40 < ds.images.mean() < 220
    assert all(i.startswith("images/") for i in ds.ids) and {"source", "license"} <= set(ds.extra)
    monkeypatch.setattr(data, "decode_image", lambda p, *root: (_ for _ in ()).throw(AssertionError("decoded")))
    again = load_dataset(CXR3 / "manifest.csv", classes, preprocess=pre, cache_dir=tmp_path)
    assert again.content_sha256 == ds.content_sha256
    assert isinstance(again.subset("test"), Dataset) and len(again.subset("test")) == sum(counts["test"].values())
