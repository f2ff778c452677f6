import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from auditkit import metrics as M

Z = 1.959963984540054


def wilson_by_quadratic(count: int, n: int) -> tuple[float, float]:
    """Wilson bounds as the roots of (p_hat - p)^2 = z^2 p (1 - p) / n, an independent form of the formula."""
    p_hat, k = count / n, Z * Z / n
    a, b, c = 1 + k, -(2 * p_hat + k), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(
    "count, n, low, high",
    [
        (0, 10, 0.0, Z * Z / (10 + Z * Z)),  # = 0.27753; at count 0 the upper bound is z^2 / (n + z^2)
        (10, 10, 10 / (10 + Z * Z), 1.0),  # = 0.72247, the mirror image
        (5, 10, 0.2365931, 0.7634069),  # statsmodels proportion_confint(5, 10, method="wilson")
    ],
)
def test_wilson_known_values(count, n, low, high):
    got = M.wilson_interval(count, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_wilson_matches_quadratic_roots():
    # 81/263: the paper-sized test set; p_hat = 0.30798.
    low, high = M.wilson_interval(81, 263)
    assert (low, high) == pytest.approx(wilson_by_quadratic(81, 263), abs=1e-12)
    assert 0.2552 < low < 0.2553 and 0.3662 < high < 0.3663  # worked by hand from the closed form


def test_rate_of_nothing_is_nan():
    r = M.rate(0, 0)
    assert (r.count, r.n) == (0, 0)
    assert math.isnan(r.value) and math.isnan(r.low) and math.isnan(r.high)


@pytest.mark.parametrize("count, n", [(-1, 5), (6, 5), (1.0, 5), (True, 5)])
def test_rate_rejects_bad_counts(count, n):
    with pytest.raises(ValueError):
        M.rate(count, n)


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_estimate_within_unit_interval(count_n):
    count, n = count_n
    r = M.rate(count, n)
    assert 0.0 <= r.low <= r.value <= r.high <= 1.0
    assert r.low < r.high


@given(st.integers(0, 50), st.integers(1, 50), st.integers(2, 20))
def test_wilson_narrows_as_n_grows(count, extra, factor):
    n = count + extra
    small = M.wilson_interval(count, n)
    large = M.wilson_interval(count * factor, n * factor)  # same p_hat, more images
    assert large[1] - large[0] < small[1] - small[0]


def test_fooling_rate_counts_already_misclassified_images():
    true = [0, 0, 1, 2]
    clean = [0, 1, 1, 2]  # image 1 is wrong before any attack
    adv = [0, 1, 1, 0]  # ... and stays at the same (wrong) prediction
    r = M.fooling_rate(true, adv)
    assert (r.count, r.n, r.value) == (2, 4, 0.5)  # images 1 and 3
    assert M.flip_rate(clean, adv).count == 1  # only image 3 changed


def test_targeted_success_includes_images_of_the_target_class():
    true = np.array([2, 2, 0, 1, 0])
    adv = np.array([2, 2, 2, 1, 0])
    r = M.targeted_success_rate(adv, target=2)
    assert (r.count, r.n) == (3, 5)  # the two COVID-19 images count too
    assert M.accuracy(true, adv).count == 4


def test_confusion_sensitivity_ppv_hand_example():
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 2, 1, 2, 2]
    conf = M.confusion_matrix(true, pred, 3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[2, 0, 1], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(M.row_normalise(conf), [[2 / 3, 0, 1 / 3], [0, 0.5, 0.5], [0, 0, 1]])
    sens, ppv = M.sensitivity_ppv(conf)
    assert sens == pytest.approx([2 / 3, 0.5, 1.0])
    assert ppv == pytest.approx([1.0, 1.0, 1 / 3])


def test_undefined_sensitivity_ppv_are_none_and_empty_rows_stay_zero():
    conf = M.confusion_matrix([0, 0], [0, 1], 3)  # no image of class 2, none predicted as 2
    sens, ppv = M.sensitivity_ppv(conf)
    assert sens[2] is None and ppv[2] is None
    assert sens[1] is None and ppv[1] == 0.0  # predicted once, never right
    np.testing.assert_array_equal(M.row_normalise(conf)[2], [0, 0, 0])


def test_dominant_label():
    clean = [0, 0, 1, 1, 2, 2, 0]
    adv = [2, 2, 2, 1, 2, 0, 0]  # flipped: images 0, 1, 2 (to 2) and 5 (to 0)
    assert M.dominant_label(clean, adv, 3) == (2, 0.75, 4)
    assert M.dominant_label(clean, clean, 3) == (None, None, 0)


def test_label_validation():
    with pytest.raises(ValueError, match="differ in length"):
        M.fooling_rate([0, 1], [0])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        M.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="integer"):
        M.accuracy([0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        M.flip_rate([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match=">= 0"):
        M.flip_rate([0, -1], [0, 1])


def test_empty_split_gives_nan_rate():
    assert math.isnan(M.fooling_rate([], []).value)


def test_pooled_rate_sums_draws():
    pooled = M.pooled_rate([M.rate(1, 10), M.rate(3, 10), M.rate(0, 10)])
    assert pooled == M.rate(4, 30)
    assert math.isnan(M.pooled_rate([]).value)
