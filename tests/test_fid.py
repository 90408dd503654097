import numpy as np
import torch

import fid_min


def test_feature_stats_match_numpy_and_batching():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((257, 6)).astype(np.float32) * 3 + 1
    mu, sigma = fid_min.feature_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)  # N-1
    mu_b, sigma_b = fid_min.feature_stats(torch.from_numpy(f[i:i + 50]) for i in range(0, 257, 50))
    np.testing.assert_allclose(mu_b, mu, atol=1e-12)
    np.testing.assert_allclose(sigma_b, sigma, atol=1e-10)


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = fid_min.feature_stats(rng.standard_normal((500, 32)))
    assert abs(fid_min.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_closed_form_diagonal_gaussians():
    # For diagonal covariances sqrtm(S1 S2) = diag(sqrt(s1 s2)), so FID = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(s1) - np.sqrt(s2)).sum()
    fid = fid_min.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert abs(fid - expected) < 1e-8 * max(1.0, expected)
