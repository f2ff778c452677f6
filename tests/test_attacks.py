"""The UAP engine against an exact numpy oracle of docs/method.md's loop, and projection / control properties."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auditkit.uap.criteria import criterion_for
from auditkit.uap.geometry import image_norms, project, random_control, xi_for
from auditkit.uap.paper import PaperUAP

from conftest import attack_settings
from oracle import SoftmaxRegression, oracle_uap

SIZE = 8
REG_CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def reg():
    from auditkit.models import keras_adapter

    oracle = SoftmaxRegression(1, SIZE)
    adapter = keras_adapter(oracle.keras(), "softmax-regression",
                            {"classes": REG_CLASSES, "channels": 1, "output": "softmax"})
    X = np.random.default_rng(2).random((40, SIZE, SIZE)).astype(np.float32)
    return oracle, adapter, X


def reg_settings(norm, target, **crafting):
    """Settings for the regression model, `target` given as a class index (the oracle's) or None."""
    return attack_settings(norm, None if target is None else REG_CLASSES[target], **crafting)


@pytest.mark.parametrize("norm,zeta,eps", [("inf", 0.08, 0.01), ("2", 0.08, 0.05)])
@pytest.mark.parametrize("target", [None, 1])
@pytest.mark.parametrize("clip", [False, True])
def test_engine_matches_numpy_oracle(reg, norm, zeta, eps, target, clip):
    oracle, adapter, X = reg
    xi, _ = xi_for(X, norm, zeta)
    expected = oracle_uap(oracle, X.astype(np.float64), norm, xi, eps, 4, 1e-6, clip, target,
                          np.random.default_rng(7))
    cell = reg_settings(norm, target, zeta=zeta, eps=eps, max_iter=4, clip=clip)
    for speculative in (False, True):
        attack = PaperUAP(cell, speculative=speculative)
        result = attack.craft(adapter, X, xi, np.random.default_rng(7))
        assert np.abs(result.rho).max() > 0, "the attack moved nothing: the comparison would be vacuous"
        np.testing.assert_allclose(result.rho, expected, atol=1e-5)


@pytest.mark.parametrize("norm,step_norm,eps", [("inf", "inf", 0.01), ("2", "2", 0.05)])
@pytest.mark.parametrize("target", [None, 1])
def test_a_pass_that_accepts_no_step_ends_the_loop_with_the_oracles_uap(reg, norm, step_norm, eps, target):
    """Once a pass accepts no step, every later pass would repeat it: stopping gives the all-passes UAP.
    (Sign steps of this size under an L2 budget never settle here: the L2 case steps along unit L2 lengths.)"""
    oracle, adapter, X = reg
    xi, _ = xi_for(X, norm, 0.08)
    max_iter = 40
    expected = oracle_uap(oracle, X.astype(np.float64), norm, xi, eps, max_iter, 1e-6, True, target,
                          np.random.default_rng(5), step_norm)
    cell = reg_settings(norm, target, zeta=0.08, eps=eps, max_iter=max_iter, step_norm=step_norm)
    for speculative in (False, True):
        result = PaperUAP(cell, speculative=speculative).craft(adapter, X, xi, np.random.default_rng(5))
        assert 1 < result.passes < max_iter and result.rates[-1] < 1.0, "the loop did not stop at a fixed point"
        assert result.rates[-1] == result.rates[-2], "the last pass moved rho, so the loop should have gone on"
        np.testing.assert_allclose(result.rho, expected, atol=1e-5)
        every = PaperUAP(cell, speculative=speculative, stop_at_fixed_point=False).craft(
            adapter, X, xi, np.random.default_rng(5))
        assert every.passes == max_iter and every.visited == max_iter * len(X)
        assert np.array_equal(every.rho, result.rho) and every.steps > result.steps
        assert every.rates == result.rates + [result.rates[-1]] * (max_iter - result.passes)


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("target", [None, 1])
def test_speculative_equals_plain_bit_for_bit(reg, norm, target):
    _, adapter, X = reg
    xi, _ = xi_for(X, norm, 0.1)
    cell = reg_settings(norm, target, zeta=0.1, eps=0.02, max_iter=5)
    plain = PaperUAP(cell, speculative=False).craft(adapter, X, xi, np.random.default_rng(3))
    fast = PaperUAP(cell, speculative=True).craft(adapter, X, xi, np.random.default_rng(3))
    assert np.array_equal(plain.rho, fast.rho)
    assert plain.rates == fast.rates and plain.steps == fast.steps


@pytest.mark.parametrize("norm, eps", [("2", 0.002), ("2", 0.5), ("inf", 0.01)])
@pytest.mark.parametrize("target", [None, 2])
def test_speculative_equals_plain_on_a_cnn(tiny_model, phantom_manifest, norm, eps, target):
    """On a conv net, where batched and single-image calls run different kernels. eps 0.002 (L2) rejects almost
    every step, so the batched step probes carry the pass; the other settings accept often."""
    from auditkit.data import Preprocess, load_dataset
    from auditkit.models import load_model

    adapter = load_model(str(tiny_model))
    X = load_dataset(phantom_manifest, adapter.classes, preprocess=Preprocess(size=adapter.spec.input_size),
                     cache_dir=False).subset("train").floats()
    xi, _ = xi_for(X, norm, 0.1)
    cell = attack_settings(norm, None if target is None else adapter.classes[target], zeta=0.1, eps=eps, max_iter=3)
    plain, fast = (PaperUAP(cell, speculative=s, probe_batch=16).craft(adapter, X, xi, np.random.default_rng(4))
                   for s in (False, True))
    assert np.array_equal(plain.rho, fast.rho)
    assert plain.rates == fast.rates and plain.steps == fast.steps
    assert plain.steps > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["2", "inf"]), st.floats(1e-4, 10.0))
def test_projection_and_controls_stay_in_the_ball(seed, norm, xi):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, rng.uniform(0.01, 50), (12, 12)).astype(np.float32)
    for w in (project(v, norm, xi), random_control((12, 12), norm, xi, rng)):
        n = image_norms(w[None], norm)[0]
        assert n <= xi * (1 + 1e-5)
    cube = random_control((16, 16), "inf", xi, rng)
    assert cube.min() >= -xi and cube.max() <= xi and cube.min() < 0 < cube.max()


def test_projection_is_the_closest_point():
    v = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(project(v, "2", 1.0), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(project(v, "inf", 1.0), [[1.0, 1.0]])
    np.testing.assert_allclose(project(v * 0.01, "2", 1.0), v * 0.01)


def test_random_controls_are_seeded_and_l2_draws_fill_the_ball():
    a = random_control((32, 32), "2", 2.0, np.random.default_rng(5))
    b = random_control((32, 32), "2", 2.0, np.random.default_rng(5))
    assert np.array_equal(a, b)
    norms = [np.linalg.norm(random_control((32, 32), "2", 2.0, np.random.default_rng(s))) for s in range(20)]
    assert min(norms) > 1.9  # uniform in a 1024-dimensional ball: almost surely near the surface


def test_xi_is_zeta_times_mean_image_norm():
    X = np.zeros((2, 4, 4), np.float32)
    X[0, 0, 0], X[1] = 0.5, 0.25
    xi, mean = xi_for(X, "inf", 0.02)
    assert mean == pytest.approx(0.375) and xi == pytest.approx(0.0075)
    xi2, mean2 = xi_for(X, "2", 0.5)
    assert mean2 == pytest.approx((0.5 + 1.0) / 2) and xi2 == pytest.approx(0.375)


def test_make_attack_builds_the_named_algorithm_and_each_refuses_a_negative_budget(reg):
    from auditkit.uap import make_attack
    from auditkit.uap.blackbox import BlackBoxUAP
    from auditkit.uap.sgd import SGDUAP

    _, adapter, X = reg
    for algorithm, kind in (("paper", PaperUAP), ("sgd", SGDUAP), ("blackbox", BlackBoxUAP)):
        attack = make_attack(reg_settings("inf", None, algorithm=algorithm))
        assert type(attack) is kind and attack.settings.algorithm == algorithm
        with pytest.raises(ValueError, match="xi must be >= 0"):
            attack.craft(adapter, X, -0.1, np.random.default_rng(0))


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("target", [None, 1])
def test_sgd_mode_stays_in_the_ball_is_seeded_and_beats_random(reg, norm, target):
    from auditkit.uap.base import SGDSettings
    from auditkit.uap.geometry import perturb
    from auditkit.uap.sgd import SGDUAP

    _, adapter, X = reg
    xi, _ = xi_for(X, norm, 0.1)
    cell = reg_settings(norm, target, zeta=0.1, algorithm="sgd", max_iter=4,
                        sgd=SGDSettings(batch_size=8, step_size=0.2))
    criterion = criterion_for(cell, adapter.classes)
    a = SGDUAP(cell).craft(adapter, X, xi, np.random.default_rng(4))
    b = SGDUAP(cell).craft(adapter, X, xi, np.random.default_rng(4))
    assert np.array_equal(a.rho, b.rho) and a.steps == 4 * 5
    assert image_norms(a.rho[None], norm)[0] <= xi * (1 + 1e-5)
    clean = adapter.predict(X)
    labels = criterion.labels(clean)

    def success(rho):
        pred = adapter.predict(perturb(X, rho, True))
        return np.mean(pred == labels) if target is not None else np.mean(pred != labels)

    controls = [success(random_control(X.shape[1:], norm, xi, np.random.default_rng(s))) for s in range(5)]
    assert success(a.rho) > max(controls)

    # running rates: each epoch's is measured before its steps; one step per epoch makes that the previous rho
    whole = cell.model_copy(update={"max_iter": 2, "sgd": cell.sgd.model_copy(update={"batch_size": len(X)})})
    two = SGDUAP(whole).craft(adapter, X, xi, np.random.default_rng(4))
    one = SGDUAP(whole.model_copy(update={"max_iter": 1})).craft(adapter, X, xi, np.random.default_rng(4))
    assert two.rates == pytest.approx([success(np.zeros_like(a.rho)), success(one.rho)])


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_a_walk_through_several_images_equals_one_call_per_image(tiny_model, phantom_manifest, norm):
    """The speculative loop walks through several images in one graph call, passing over those it knows are fooled,
    the plain loop visits one image a call: rho and every verdict must be the same, bit for bit."""
    from auditkit.data import Preprocess, load_dataset
    from auditkit.models import load_model
    from auditkit.uap.backends import Call, Cell, loop_ops

    adapter = load_model(str(tiny_model))
    X = load_dataset(phantom_manifest, adapter.classes, preprocess=Preprocess(size=adapter.spec.input_size),
                     cache_dir=False).subset("train").floats()
    y = adapter.predict(X).astype(np.int32)
    loop = loop_ops(adapter, norm, True, "inf")
    held = loop.hold(X, y)
    xi, _ = xi_for(X, norm, 0.1)
    eps = 0.05 if norm == "inf" else 1.0
    cell = Cell(xi=xi, eps=eps, target=-1, loss_cap=0.0, momentum=0.0)
    rng = np.random.default_rng(0)
    uap = PaperUAP(attack_settings(norm, zeta=0.1, eps=eps, max_iter=3)).craft(adapter, X, xi, rng).rho

    def run(op, idx, rho, **call):
        return loop.run(op, *held, [Call(op, cell, np.int32(idx), rho, **call)])[0]
    everyone = np.arange(len(X), dtype=np.int32)
    accepted = skipped = revisited = 0
    for _ in range(40):  # rho between zero and a UAP: some images fooled, some not
        noise = project(rng.uniform(-1, 1, X.shape[1:]).astype(np.float32), norm, 0.2 * xi)
        rho = project((0.4 + 0.6 * rng.random()) * uap + noise, norm, xi)
        fooled = run("fooled", everyone, rho)
        if fooled.all() or not fooled.any():
            continue
        # first an unfooled image whose step is accepted, then images fooled before that step but not after it:
        # known fooled when the walk starts, they must be visited again once rho moved
        def unfooled_by(first):
            moved = run("walk", [first], rho, skip=np.zeros(1, bool))[0]
            return np.flatnonzero(fooled & ~run("fooled", everyone, moved))

        first = max(rng.permutation(np.flatnonzero(~fooled))[:5], key=lambda j: len(unfooled_by(j)))
        unfooled_by_it = unfooled_by(first)
        walk = np.concatenate([rng.choice(np.flatnonzero(fooled), int(rng.integers(0, 4))), [first],
                               rng.choice(unfooled_by_it, min(3, len(unfooled_by_it)), replace=False),
                               rng.integers(len(X), size=int(rng.integers(0, 4)))]).astype(np.int32)
        skip = fooled[walk] & (rng.random(len(walk)) < 0.8)  # known fooled, said or not
        walked = run("walk", walk, rho, skip=skip)
        verdicts = []
        for j in walk:
            rho, was_fooled, step_accepted = run("walk", j[None], rho, skip=np.zeros(1, bool))
            verdicts.append((bool(was_fooled[0]), bool(step_accepted[0])))
        np.testing.assert_array_equal(walked[0], rho)
        assert list(zip(walked[1].tolist(), walked[2].tolist())) == verdicts
        first_move = int(np.argmax(walked[2])) if walked[2].any() else len(walk)
        accepted += int(walked[2].sum())
        skipped += int(skip[:first_move].sum())
        revisited += int(np.sum(skip[first_move + 1 :] & ~walked[1][first_move + 1 :]))
    assert min(accepted, skipped, revisited) >= 5, f"too few cases: {accepted}, {skipped}, {revisited}"


def test_the_loop_follows_weights_changed_in_place(tiny_model, phantom_manifest):
    """The loop runs a Keras model with its weights frozen as constants: weights changed in place (as hardening
    trains them) must reach it."""
    from auditkit.data import Preprocess, load_dataset
    from auditkit.models import load_model
    from auditkit.uap.backends import Call, Cell, loop_ops

    adapter = load_model(str(tiny_model))
    X = load_dataset(phantom_manifest, adapter.classes, preprocess=Preprocess(size=adapter.spec.input_size),
                     cache_dir=False).subset("train").floats()
    labels = adapter.predict(X).astype(np.int32)
    zero = np.zeros(X.shape[1:], np.float32)
    everyone = np.arange(len(X), dtype=np.int32)
    cell = Cell(xi=0.1, eps=0.01, target=-1, loss_cap=0.0, momentum=0.0)

    def fooled(loop):
        return loop.run("fooled", *loop.hold(X, labels), [Call("fooled", cell, everyone, zero)])[0]

    before = loop_ops(adapter, "inf", True, "inf")
    assert not fooled(before).any()

    last = adapter.model.layers[-1]
    kernel, bias = last.get_weights()
    target = int(np.argmin(np.bincount(labels, minlength=len(bias))))  # a class few images are predicted as
    bias[target] += 100.0
    last.set_weights([kernel, bias])
    after = loop_ops(adapter, "inf", True, "inf")
    assert after is not before
    flipped = fooled(after)
    np.testing.assert_array_equal(flipped, adapter.predict(X) != labels)
    assert flipped.mean() > 0.5


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_cells_crafted_side_by_side_equal_each_cell_crafted_alone(tiny_model, phantom_manifest, norm, monkeypatch):
    """Cells sharing norms and clip advance together, one graph call stepping an image of each (nontargeted and
    targeted, paper and SGD, different budgets and steps side by side): every UAP, rate and step count equals the
    cell's crafted alone, byte for byte, and the crafting set is held once for the group."""
    from auditkit.data import Preprocess, load_dataset
    from auditkit.models import load_model
    from auditkit.uap.backends import craft_side_by_side
    from auditkit.uap.backends.tf import TFLoop
    from auditkit.uap.sgd import SGDUAP

    adapter = load_model(str(tiny_model))
    X = load_dataset(phantom_manifest, adapter.classes, preprocess=Preprocess(size=adapter.spec.input_size),
                     cache_dir=False).subset("train").floats()
    eps = 0.05 if norm == "inf" else 1.0
    cells = [PaperUAP(attack_settings(norm, zeta=0.1, eps=eps, max_iter=4)),
             PaperUAP(attack_settings(norm, adapter.classes[1], zeta=0.2, eps=eps, max_iter=4)),
             PaperUAP(attack_settings(norm, zeta=0.15, eps=eps * 0.8, max_iter=3), speculative=False),
             SGDUAP(attack_settings(norm, adapter.classes[2], zeta=0.1, algorithm="sgd", max_iter=2))]
    budgets = [xi_for(X, norm, attack.settings.zeta)[0] for attack in cells]
    alone = [attack.craft(adapter, X, xi, np.random.default_rng(k)) for k, (attack, xi) in enumerate(zip(cells,
                                                                                                           budgets))]
    held = []
    hold = TFLoop.hold
    monkeypatch.setattr(TFLoop, "hold", lambda self, *arrays: held.append(len(arrays)) or hold(self, *arrays))
    together = craft_side_by_side(adapter, X, [(attack, xi, np.random.default_rng(k))
                                               for k, (attack, xi) in enumerate(zip(cells, budgets))])
    assert held == [2]  # images and clean labels, once for the four cells
    for a, b in zip(alone, together):
        assert a.rho.tobytes() == b.rho.tobytes() and a.rates == b.rates and a.steps == b.steps
    assert len({r.rho.tobytes() for r in together}) == 4 and all(np.abs(r.rho).max() > 0 for r in together)
    with pytest.raises(ValueError, match="side by side"):
        craft_side_by_side(adapter, X, [(cells[0], budgets[0], np.random.default_rng(0)),
                                        (PaperUAP(attack_settings("2" if norm == "inf" else "inf", zeta=0.1)),
                                         budgets[0], np.random.default_rng(0))])
