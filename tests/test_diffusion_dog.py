"""DoG band-pass loss: scipy-exact Gaussian blur, zero on constants, band peaks at 1.10 / s, normalisation."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from stale.diffusion.dog import DOG_BANDS, DOG_K, DoGLoss, dog, dog_gain, gaussian_blur, peak_frequency, realised_peak


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 6.4])  # 6.4 = k * 4: a kernel wider than the 9 px axis
def test_gaussian_blur_matches_scipy_reflect(sigma):
    x = torch.randn(2, 3, 5, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(x, sigma, dims=(-2, -1)).numpy()
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, 0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    ours3 = gaussian_blur(x, sigma, dims=(-3, -2, -1)).numpy()  # the temporal option filters T as well
    ref3 = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours3, ref3, rtol=0, atol=1e-12)


def test_gaussian_blur_float32_and_gradient():
    x = torch.randn(1, 1, 2, 8, 8, requires_grad=True)
    y = gaussian_blur(x, 1.0)
    assert y.dtype == torch.float32 and y.shape == x.shape
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("temporal", [False, True])
def test_dog_of_a_constant_clip_is_zero(temporal):
    x = torch.full((1, 2, 8, 16, 16), 0.37, dtype=torch.float64)
    dims = (-3, -2, -1) if temporal else (-2, -1)
    for s in DOG_BANDS:
        assert dog(x, s, dims=dims).abs().max() < 1e-12
    assert DoGLoss(temporal=temporal)(x) < 1e-20
    # but not of a non-constant one
    assert DoGLoss(temporal=temporal)(x + torch.randn_like(x)) > 0.1


def _measured_peak(sigma: float, temporal_axis: bool) -> float:
    """Peak of |DTFT| of the implemented DoG's impulse response, in rad/px (or rad/frame)."""
    n = 1024
    shape = (1, 1, n, 1, 1) if temporal_axis else (1, 1, 1, 1, n)
    x = torch.zeros(shape, dtype=torch.float64)
    x.view(-1)[n // 2] = 1.0
    dims = (-3, -2, -1) if temporal_axis else (-2, -1)
    h = dog(x, sigma, DOG_K, dims).reshape(-1).numpy()
    spectrum = np.abs(np.fft.rfft(h, n=1 << 18))  # zero padding: a fine frequency grid on [0, pi]
    return float(np.linspace(0, math.pi, len(spectrum))[spectrum.argmax()])


@pytest.mark.parametrize("temporal_axis", [False, True])
@pytest.mark.parametrize("sigma", DOG_BANDS)
def test_band_peak_frequency_within_10_percent(sigma, temporal_axis):
    assert abs(peak_frequency(sigma) - 1.10 / sigma) < 0.01 / sigma  # the analytic value METHOD.md quotes
    measured = _measured_peak(sigma, temporal_axis)
    assert abs(measured - 1.10 / sigma) <= 0.10 * 1.10 / sigma, f"s={sigma}: peak {measured:.3f} rad/px"
    assert realised_peak(sigma) == pytest.approx(measured, abs=2e-3)  # the closed form the warning uses


def test_the_half_pixel_band_aliases_to_nyquist_and_warns():
    """Why the finest default band is 0.6 px and not METHOD.md's 0.5 px: the sampled 0.5 px band is a high-pass."""
    assert _measured_peak(0.5, False) == pytest.approx(math.pi, rel=1e-3)
    assert abs(_measured_peak(0.6, False) - 1.10 / 0.6) <= 0.10 * 1.10 / 0.6
    with pytest.warns(UserWarning, match=r"0.5 px band peaks at 3.14 rad/px, not 2.20"):
        DoGLoss(bands=[0.5, 1.0, 2.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DoGLoss()  # the default bands do not warn


def test_dog_gain_is_the_exact_white_noise_gain():
    """dog_gain = ||M||_F^2 / n for the DoG operator M on the given sizes, reflected boundaries included."""
    h, w = 6, 7
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, 1, h, w)
    for s in (0.6, 2.0):
        m = dog(basis, s)  # row j: the response to the j-th unit impulse
        assert dog_gain(s, sizes=(h, w)) == pytest.approx(m.pow(2).sum().item() / (h * w), rel=1e-10)


def test_per_band_normalisation_equalises_bands_on_white_noise():
    loss = DoGLoss()
    noise = torch.randn(24, 2, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = loss.weights((16, 16))
    parts = [w * dog(noise, s).pow(2).mean().item() for s, w in zip(loss.bands, weights)]
    for p in parts:  # each band carries 1 / n_bands of the white-noise energy
        assert p == pytest.approx(1 / len(parts), rel=0.1)
    assert loss(noise).item() == pytest.approx(noise.pow(2).mean().item(), rel=0.05)


def test_dog_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="dog_bands"):
        DoGLoss(bands=[0.0, 1.0])
    with pytest.raises(ValueError, match="dog_k"):
        DoGLoss(k=1.0)
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        DoGLoss()(torch.zeros(3, 16, 16))
