"""Shared fixtures: a small easy image set and a tiny trained CNN (32x32), built once per session."""
import contextlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as auditkit's configure_tensorflow sets it

CLASSES = ("normal", "pneumonia", "COVID-19")
TINY_SIZE = 32


# With pytest-xdist (`-n 2 --dist loadgroup`, as CI runs the suite) a group's tests run on one worker, one after
# another. Each file is a group, so that its module fixtures are built once; a few share across files: the cxr3
# tests (one worker trains and caches the cxr3 CNN), the tests that start Ray (one cluster at a time), and those
# that use the built-in phantom set (generated once into the worker's cache).
XDIST_GROUPS = {"test_ray.py": "ray", "test_signals.py::test_a_ray_run": "ray",
                "test_induced_rates.py": "builtin-phantoms", "test_model_preprocessing.py": "builtin-phantoms",
                "test_step_norm.py": "builtin-phantoms", "test_tf1.py": "builtin-phantoms",
                "test_zoo.py": "builtin-phantoms"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        where = f"{item.path.name}::{item.name}"
        group = next((g for prefix, g in XDIST_GROUPS.items() if where.startswith(prefix)), item.path.name)
        if item.get_closest_marker("cxr3") is not None:
            group = "cxr3"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's ~/.cache/auditkit."""
    monkeypatch.setenv("AUDITKIT_CACHE", str(tmp_path_factory.getbasetemp() / "auditkit-cache"))


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """A small image set a tiny CNN learns in seconds: each class brightens its own region of a noisy frame."""
    from PIL import Image

    root = tmp_path_factory.mktemp("easy") / "set"
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64]
    regions = [(xx < 24), (xx > 40), ((yy - 40) ** 2 + (xx - 32) ** 2 < 120)]
    rows = ["path,label,split"]
    for split, n in (("train", 120), ("test", 60)):
        for i in range(n):
            label = i % 3
            img = rng.normal(110, 25, (64, 64)) + 40 * regions[label] * rng.uniform(0.6, 1.2)
            rel = f"{split}/{i:03d}.png"
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel)
            rows.append(f"{rel},{CLASSES[label]},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, phantom_manifest) -> Path:
    """A 32x32 CNN trained for a few epochs on that set, saved as .keras with its model.yaml."""
    import keras

    from auditkit.data import Preprocess, load_dataset

    data = load_dataset(phantom_manifest, CLASSES, preprocess=Preprocess(size=TINY_SIZE, crop_top=1 / 6),
                        cache_dir=False).subset("train")
    keras.utils.set_random_seed(0)
    inp = keras.Input((TINY_SIZE, TINY_SIZE, 1), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)  # the classes differ by where they are bright: keep the layout
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(data.floats()[..., None], data.labels, epochs=12, batch_size=16, verbose=0)
    d = tmp_path_factory.mktemp("tiny")
    model.save(d / "tiny.keras")
    (d / "tiny.yaml").write_text("classes: [normal, pneumonia, COVID-19]\n")
    return d / "tiny.keras"


def attack_settings(norm: str, target: str | None = None, *, zeta: float = 0.02, **crafting):
    """One cell's AttackSettings for engine tests: nontargeted, or targeted at the class named `target`. Crafting
    takes xi explicitly, so zeta only has to be valid (tests pass the one their xi comes from)."""
    from auditkit.uap.base import AttackSettings

    return AttackSettings(kind="nontargeted" if target is None else "targeted", target=target, norm=norm, zeta=zeta,
                          **crafting)


def write_policy(path: Path, *, thresholds: str = "", extra_data: str = "", classes=CLASSES) -> Path:
    """A quick policy for a tiny model: small subsets, 2 passes, 2 random draws."""
    cls = ", ".join(f'"{c}"' for c in classes)
    path.write_text(f"""version: 1
seed: 5
data:
  classes: [{cls}]
  preprocess: {{crop_top: 0.16666667}}
  max_images: {{train: 60, test: 60}}
{extra_data}
attacks:
  - kinds: [nontargeted, targeted]
    targets: ["{classes[2]}"]
    norms: [inf]
    zetas: [0.2]
    eps: 0.05
    max_iter: 6
  - kinds: [nontargeted, targeted]
    targets: ["{classes[2]}"]
    norms: [2]
    zetas: [0.2]
    eps: 0.05
    max_iter: 6
random_controls: {{draws: 2}}
strength: {{reach_rate: 0.8}}  # the tiny model's nontargeted L2 reach is 0.89 at zeta 0.2
thresholds:
{thresholds or '''  - metric: fooling_rate
    split: test
    max: 1.0'''}
report: {{title: "test audit", formats: [html, json, junit]}}
""")
    return path


def json_without_times(path: Path) -> dict:
    import json

    data = json.loads(path.read_text())
    prov = data["provenance"]
    for k in ("started", "finished", "seconds", "command", "phases"):
        prov.pop(k)
    for cell in data["cells"]:
        cell.pop("seconds")
    return data


np.set_printoptions(precision=4)


@contextlib.contextmanager
def network_guard():
    """Every attempt to reach the network (a name lookup, an IP connection) fails and is recorded in the list
    yielded. Local (AF_UNIX) sockets still connect."""
    attempts = []
    connect = socket.socket.connect

    def refused(what: str, target) -> OSError:
        attempts.append((what, target))
        return OSError(f"offline test: {what} {target}")

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise refused("connect", address)
        return connect(sock, address)

    def lookup(host, *args, **kw):
        raise refused("getaddrinfo", host)

    def create_connection(address, *args, **kw):
        raise refused("create_connection", address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "getaddrinfo", lookup)
        mp.setattr(socket, "create_connection", create_connection)
        yield attempts


@pytest.fixture(scope="session")
def signed_audit(tmp_path_factory, tiny_model, phantom_manifest):
    """One audit of the tiny model, signed, with every report and an SBOM, made under network_guard() and with
    the session's cache: (run folder, public key, policy, the network attempts recorded).

    Tests that change files work on copies."""
    from auditkit import api
    from auditkit.evidence import generate_keypair

    d = tmp_path_factory.mktemp("signed")
    with network_guard() as attempts, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUDITKIT_CACHE", str(tmp_path_factory.getbasetemp() / "auditkit-cache"))
        generate_keypair(d / "audit.key", d / "audit.pub")
        policy = write_policy(d / "policy.yaml")
        api.run(tiny_model, policy, d / "out", data=phantom_manifest, formats=["html", "pdf", "json", "junit"],
                sign_key=d / "audit.key", sbom=True)
    return d / "out", d / "audit.pub", policy, attempts


@pytest.fixture(scope="session")
def signed_run(signed_audit):
    """signed_audit's (run folder, public key, policy)."""
    return signed_audit[:3]
