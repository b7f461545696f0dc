"""Clipping, Gaussian noise and adaptive clipping: property and statistical tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from confide.exceptions import PrivacyError
from confide.privacy.mechanisms import (
    AdaptiveClipping,
    GaussianMechanism,
    gaussian_noise,
    l2_clip,
    split_noise_multiplier,
)

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.floats(1e-6, 1e6),
       st.sampled_from([torch.float32, torch.float64]), st.floats(1e-30, 1e30))
def test_clipped_norm_never_exceeds_clip_norm(values, clip_norm, dtype, scale):
    v = torch.tensor(values, dtype=torch.float64) * scale
    v = v.to(dtype)
    if not torch.isfinite(v).all():
        return
    clipped = l2_clip(v, clip_norm)
    assert clipped.dtype == v.dtype
    assert float(torch.linalg.vector_norm(clipped.double())) <= clip_norm
    norm = float(torch.linalg.vector_norm(v.double()))
    if norm <= clip_norm:
        assert torch.equal(clipped, v)  # short vectors are untouched
    elif norm > 0:
        # the direction is kept (cosine 1 up to rounding)
        cos = float(clipped.double() @ v.double()) / (norm * float(
            torch.linalg.vector_norm(clipped.double())) or 1.0)
        assert cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_norm_must_be_positive(bad):
    with pytest.raises(PrivacyError, match="clip norm"):
        l2_clip(torch.ones(3), bad)
    with pytest.raises(PrivacyError, match="clip norm"):
        GaussianMechanism(clip_norm=bad, noise_multiplier=1.0)


def test_clip_refuses_non_finite_vectors():
    with pytest.raises(PrivacyError, match="NaN or infinite"):
        l2_clip(torch.tensor([1.0, float("nan")]), 1.0)


@pytest.mark.parametrize(("clip_norm", "z"), [(1.0, 1.0), (0.1, 0.7), (3.0, 2.5)])
def test_noise_has_the_configured_standard_deviation(clip_norm, z):
    n = 200_000
    mech = GaussianMechanism(clip_norm=clip_norm, noise_multiplier=z)
    gen = torch.Generator().manual_seed(1234)
    noise = mech.add_noise(torch.zeros(n, dtype=torch.float64), generator=gen).numpy()
    sigma = z * clip_norm
    # sample std ~ sigma * (1 +- 1/sqrt(2n)); mean ~ 0 +- sigma/sqrt(n): 5 standard errors
    assert abs(noise.std(ddof=1) / sigma - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    assert stats.kstest(noise / sigma, "norm").pvalue > 1e-3


def test_noise_is_reproducible_by_seed_only():
    a = gaussian_noise(torch.zeros(1000), 1.0, generator=torch.Generator().manual_seed(7))
    b = gaussian_noise(torch.zeros(1000), 1.0, generator=torch.Generator().manual_seed(7))
    c = gaussian_noise(torch.zeros(1000), 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_privatize_is_add_noise_of_clip():
    mech = GaussianMechanism(clip_norm=0.5, noise_multiplier=1.3)
    x = torch.arange(10, dtype=torch.float64)
    a = mech.privatize(x, generator=torch.Generator().manual_seed(3))
    b = mech.add_noise(mech.clip(x), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.05, 50), st.floats(0.05, 500))
def test_noise_split_keeps_the_accounted_multiplier(z, count_stddev):
    # Andrew et al. 2021, Sec. 3.1: z^-2 = z_update^-2 + (2 sigma_b)^-2
    if z >= 2 * count_stddev:
        with pytest.raises(PrivacyError, match="adaptive clipping needs"):
            split_noise_multiplier(z, count_stddev)
        return
    z_update = split_noise_multiplier(z, count_stddev)
    assert z_update >= z
    assert z_update ** -2 + (2 * count_stddev) ** -2 == pytest.approx(z ** -2, rel=1e-9)


def _run_adaptive(target: float, scale: float, seed: int, rounds: int = 400,
                  clients: int = 100) -> tuple[float, list[float]]:
    """Synthetic update norms ~ scale * LogNormal(0, 1); returns (true CDF at C, history)."""
    rng = np.random.default_rng(seed)
    ac = AdaptiveClipping(clip_norm=0.1, target_quantile=target, learning_rate=0.2,
                          expected_clients=clients)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(rounds):
        norms = scale * rng.lognormal(0.0, 1.0, size=clients)
        ac.update(sum(ac.indicator(float(x)) for x in norms), generator=gen)
        history.append(ac.clip_norm)
    c_final = float(np.exp(np.mean(np.log(history[-100:]))))
    cdf = float(stats.lognorm.cdf(c_final / scale, s=1.0))
    return cdf, history


@settings(max_examples=12, deadline=None)
@given(st.floats(0.2, 0.8), st.floats(1e-2, 1e2), st.integers(0, 2 ** 31))
def test_adaptive_clipping_converges_to_the_target_quantile(target, scale, seed):
    cdf, _ = _run_adaptive(target, scale, seed)
    assert abs(cdf - target) < 0.06


def test_adaptive_clipping_uses_the_papers_count_noise():
    ac = AdaptiveClipping(clip_norm=0.1, expected_clients=100)
    assert ac.count_stddev == 5.0  # sigma_b = m / 20 (Andrew et al. 2021)
    assert ac.indicator(0.05) == 0.5 and ac.indicator(0.2) == -0.5
    # every client unclipped and no noise: b = 1 > gamma, so C shrinks by exp(-0.2 * 0.5)
    ac.count_stddev = 0.0
    assert ac.update(50.0, generator=None) == 1.0
    assert ac.clip_norm == pytest.approx(0.1 * math.exp(-0.1))
    # every client clipped: b = 0, C grows by exp(0.2 * 0.5)
    assert ac.update(-50.0, generator=None) == 0.0
    assert ac.clip_norm == pytest.approx(0.1)


def test_l2_clip_long_float64_vectors_converge():
    # torch's float64 norm of ~1e4-1e6 entries is tens of ulp off; clipping must still finish
    import torch

    from confide.privacy.mechanisms import l2_clip

    gen = torch.Generator().manual_seed(0)
    for n in (26_000, 250_000):
        v = torch.randn(n, generator=gen, dtype=torch.float64) * 1e3
        assert float(torch.linalg.vector_norm(l2_clip(v, 1.0))) <= 1.0
