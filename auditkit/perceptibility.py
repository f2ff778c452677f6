"""How visible a perturbation is: PSNR and SSIM of attacked against clean images."""
from __future__ import annotations

import functools

import numpy as np

from .models.tf_runtime import GraphFunction, configure_tensorflow

SSIM_BATCH = 64


def psnr(clean, adv, data_range: float = 1.0, chunk: int = 256) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image (first axis indexes images), float64; inf where identical."""
    clean, adv = np.asarray(clean), np.asarray(adv)
    if clean.shape != adv.shape:
        raise ValueError(f"psnr: clean has shape {clean.shape} but adv has shape {adv.shape}")
    if clean.ndim < 2:
        raise ValueError(f"psnr: expected a batch of images (at least 2 dimensions), got shape {clean.shape}")
    if not data_range > 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    # Chunked so a whole training split is never held as one float64 copy.
    mse = np.empty(clean.shape[0], dtype=np.float64)
    axes = tuple(range(1, clean.ndim))
    for start in range(0, clean.shape[0], chunk):
        diff = clean[start:start + chunk].astype(np.float64) - adv[start:start + chunk].astype(np.float64)
        mse[start:start + chunk] = np.mean(diff * diff, axis=axes)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range * data_range / mse)


def mean_ssim(clean: np.ndarray, adv: np.ndarray) -> float:
    """Mean SSIM of attacked vs clean images: tf.image.ssim's definition (Gaussian window of 11 px, sigma 1.5,
    valid padding, max_val 1), with the window applied as two 1-D passes (tf.image.ssim's 2-D window took
    75 ms per 224x224 image here, the largest cost of an audit; this takes a few)."""
    fn = _ssim_fn(clean.shape[1])
    vals = [fn(clean[i:i + SSIM_BATCH], adv[i:i + SSIM_BATCH]).numpy() for i in range(0, len(clean), SSIM_BATCH)]
    return float(np.mean(np.concatenate(vals)))


@functools.cache
def _ssim_fn(size: int):
    tf = configure_tensorflow()
    k = min(11, size)
    g = np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2) / 1.5) ** 2)
    g = (g / g.sum()).astype(np.float32)
    band = np.zeros((size, size - k + 1), np.float32)  # the 1-D window as a banded matrix: a matmul is 20x faster
    for j in range(size - k + 1):                       # here than TF's conv2d with one channel
        band[j:j + k, j] = g
    band = tf.constant(band)
    c1, c2 = 0.01**2, 0.03**2

    def window(m):
        return tf.einsum("nhw,hu,wv->nuv", m, band, band)

    def ssim(x, y):
        mean_x, mean_y = window(x), window(y)
        num0 = mean_x * mean_y * 2.0
        den0 = tf.square(mean_x) + tf.square(mean_y)
        luminance = (num0 + c1) / (den0 + c1)
        cs = (window(x * y) * 2.0 - num0 + c2) / (window(tf.square(x) + tf.square(y)) - den0 + c2)
        return tf.reduce_mean(luminance * cs, axis=[1, 2])

    return GraphFunction(tf, ssim, [tf.TensorSpec([None, size, size], tf.float32)] * 2)
