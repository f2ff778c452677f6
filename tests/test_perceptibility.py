"""Perceptibility of a perturbation: PSNR and SSIM of attacked against clean images."""
import math

import numpy as np
import pytest

from auditkit.perceptibility import mean_ssim, psnr


def test_psnr():
    clean = np.zeros((3, 4, 4), dtype=np.float32)
    adv = clean.copy()
    adv[1] += 0.1  # MSE 0.01 -> 20 dB
    adv[2, 0, 0] = 1.0  # MSE 1/16 -> 10 log10(16)
    got = psnr(clean, adv)
    assert got.dtype == np.float64
    assert got[0] == math.inf
    assert got[1] == pytest.approx(20.0, abs=1e-5)
    assert got[2] == pytest.approx(10 * math.log10(16))
    assert psnr(clean * 255, adv * 255, data_range=255)[1] == pytest.approx(20.0, abs=1e-4)
    np.testing.assert_array_equal(psnr(clean, adv, chunk=2), got)
    with pytest.raises(ValueError, match="shape"):
        psnr(clean, adv[:2])


@pytest.mark.parametrize("size", [32, 12])
def test_mean_ssim_equals_tf_image_ssim(size):
    from auditkit.models.tf_runtime import configure_tensorflow

    tf = configure_tensorflow()
    rng = np.random.default_rng(size)
    clean = rng.random((70, size, size), dtype=np.float32)
    adv = np.clip(clean + rng.uniform(-0.2, 0.2, clean.shape), 0, 1).astype(np.float32)
    expected = tf.image.ssim(clean[..., None], adv[..., None], max_val=1.0, filter_size=min(11, size)).numpy()
    assert mean_ssim(clean, adv) == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert mean_ssim(clean, clean) == pytest.approx(1.0, abs=1e-6)
