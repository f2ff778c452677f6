import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditkit import phantoms
from auditkit.errors import AuditkitError
from auditkit.phantoms import (MANIFEST_COLUMNS, PHANTOM_CLASSES, class_counts, generate_phantoms, phantom_rng,
                               render_phantom, split_labels)

SIZE = 96


def _render(label, seed, index=0, size=SIZE):
    return render_phantom(label, phantom_rng(seed, "train", index), size)


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_render_is_deterministic_and_seed_dependent():
    a = _render(1, 5)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
    assert a.tobytes() == _render(1, 5).tobytes()
    assert a.tobytes() != _render(1, 6).tobytes()
    assert a.tobytes() != _render(1, 5, index=1).tobytes()
    assert render_phantom(0, phantom_rng(1, "test", 0), 40).shape == (40, 40)


def test_render_looks_like_a_chest_film():
    img = _render(0, 3, size=128).astype(np.float32) / 255
    lungs = np.concatenate([img[40:80, 25:45].ravel(), img[40:80, 85:103].ravel()])
    mediastinum = img[30:70, 60:68]
    assert lungs.mean() < mediastinum.mean() - 0.2  # dark lungs, bright midline
    assert img[112:, 20:108].mean() > lungs.mean() + 0.2  # abdomen below the diaphragm is bright


def test_render_rejects_bad_label_and_size():
    with pytest.raises(AuditkitError, match="label"):
        render_phantom(3, np.random.default_rng(0))
    with pytest.raises(AuditkitError, match="size"):
        render_phantom(0, np.random.default_rng(0), size=8)


def _finding(label, seed):
    """Finding alone: the same patient and exposure rendered with `label` minus rendered as normal."""
    diff = _render(label, seed, size=128).astype(np.float32) - _render(0, seed, size=128).astype(np.float32)
    return np.clip(diff, 0, None)


def test_pneumonia_is_a_focal_opacity_in_one_lung():
    for seed in range(8):
        d = _finding(1, seed)
        left, right = d[:, :64].sum(), d[:, 64:].sum()
        assert max(left, right) > 0.9 * (left + right), seed  # one lung
        assert np.count_nonzero(d > 8) < 0.12 * d.size, seed  # focal, not diffuse
        assert d.max() > 20, seed  # visible


def test_covid_is_bilateral_peripheral_and_lower_zone():
    rows, cols = np.mgrid[0:128, 0:128]
    for seed in range(8):
        d = _finding(2, seed)
        left, right = d[:, :64].sum(), d[:, 64:].sum()
        assert min(left, right) > 0.15 * (left + right), seed  # bilateral
        w = d / d.sum()
        assert (w * rows).sum() > 64, seed  # lower half of the film
        assert (w * np.abs(cols - 63.5)).sum() > 28, seed  # away from the midline


def test_classes_differ_in_lower_peripheral_zones_over_a_sample():
    def zone_mean(label):
        vals = []
        for i in range(16):
            img = render_phantom(label, phantom_rng(11, "test", 3 * i + label), 128).astype(np.float32)
            vals.append(np.concatenate([img[70:96, 14:36].ravel(), img[70:96, 92:114].ravel()]).mean())
        return np.mean(vals)

    assert zone_mean(2) > zone_mean(0) + 15


def test_split_labels_and_counts():
    assert class_counts(9) == (3, 3, 3) and class_counts(10) == (4, 3, 3)
    assert split_labels(6).tolist() == [0, 1, 2, 0, 1, 2]
    assert split_labels(150)[:90].tolist() == split_labels(90).tolist()  # a smaller split is a prefix
    for n in (10, 150, 600, 1000):
        normal, pneumonia, covid = class_counts(n, imbalance=True)
        assert normal + pneumonia + covid == n
        assert covid >= min(n, phantoms.MIN_COVID_PER_SPLIT) and covid <= max(5, round(0.02 * n))
        assert abs(normal / (normal + pneumonia) - 58 / 98) < 0.06
        assert np.bincount(split_labels(n, imbalance=True), minlength=3).tolist() == [normal, pneumonia, covid]


def test_generate_writes_manifest_images_and_is_reproducible(tmp_path):
    m1 = generate_phantoms(tmp_path / "a", n_train=6, n_test=3, size=48, seed=9)
    m2 = generate_phantoms(tmp_path / "b", n_train=6, n_test=3, size=48, seed=9)
    m3 = generate_phantoms(tmp_path / "c", n_train=6, n_test=3, size=48, seed=10)
    assert m1 == tmp_path / "a" / "manifest.csv"
    rows = _rows(m1)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == 9
    assert [r["split"] for r in rows].count("test") == 3
    assert {r["label"] for r in rows} == set(PHANTOM_CLASSES)
    assert all(r["synthetic"] == "1" and r["generator"] == "auditkit-phantoms-v1" and r["seed"] == "9"
               for r in rows)
    for i, r in enumerate(rows[:6]):
        assert r["path"] == f"images/train/{r['label']}/train-{i:05d}.png"
        png = np.asarray(Image.open(m1.parent / r["path"]))
        again = render_phantom(PHANTOM_CLASSES.index(r["label"]), phantom_rng(9, "train", i), 48)
        assert np.array_equal(png, again)  # each image reproducible on its own
    assert m1.read_bytes() == m2.read_bytes()
    for r in rows:
        same = (m1.parent / r["path"]).read_bytes() == (m2.parent / r["path"]).read_bytes()
        other = (m1.parent / r["path"]).read_bytes() == (m3.parent / r["path"]).read_bytes()
        assert same and not other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left


def test_generate_imbalanced_ratio(tmp_path):
    rows = _rows(generate_phantoms(tmp_path / "imb", n_train=100, n_test=0, size=32, imbalance=True))
    counts = [sum(r["label"] == c for r in rows) for c in PHANTOM_CLASSES]
    assert counts == list(class_counts(100, imbalance=True)) == [56, 39, 5]


def test_generate_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(AuditkitError) as err:
        generate_phantoms(tmp_path / "x", n_train=3, n_test=0, size=32)
    assert err.value.where == str(tmp_path / "x")
    with pytest.raises(AuditkitError, match="n_test"):
        generate_phantoms(tmp_path / "y", n_train=3, n_test=-1, size=32)


def test_default_manifest_is_generated_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(phantoms, "DEFAULT_PARAMS",
                        {"n_train": 3, "n_test": 3, "size": 32, "seed": 1, "imbalance": False})
    monkeypatch.setenv("AUDITKIT_CACHE", str(tmp_path / "env-cache"))
    m = phantoms.default_phantom_manifest()
    assert m.parent.parent == tmp_path / "env-cache" and m.parent.name.startswith("phantoms-v1-")
    stamp = m.stat().st_mtime_ns
    assert phantoms.default_phantom_manifest() == m and m.stat().st_mtime_ns == stamp
    other = phantoms.default_phantom_manifest(tmp_path / "explicit")
    assert other.parent.parent == tmp_path / "explicit" and other.read_bytes() == m.read_bytes()
