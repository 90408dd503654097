"""EDM-compatible FID: Inception-v3 feature statistics and the Frechet distance (recipe F.2)."""

import numpy as np
import scipy.linalg
import torch

#----------------------------------------------------------------------------
# Feature statistics (edm-formats.md (c)): mu = sum(f) / N,
# sigma = (sum(f f^T) - N mu mu^T) / (N - 1), accumulated in float64.

class FeatureStats:
    """Running float64 sums of f and f f^T; `reduce()` sums them across torch.distributed ranks."""
    def __init__(self, dim=None):
        self.n, self.sum, self.sum_sq = 0, None, None
        if dim is not None:
            self._init(dim)

    def _init(self, dim):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features):
        f = torch.as_tensor(features).detach().to('cpu', torch.float64)
        if f.ndim != 2:
            raise ValueError(f'features must have shape [N, D], got {list(f.shape)}')
        if self.sum is None:
            self._init(f.shape[1])
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_sq += f.T @ f

    def reduce(self, device='cpu'):
        # Sum N, sum(f) and sum(f f^T) over ranks: the statistics of the union of every rank's images.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.sum_sq.flatten()])
        flat = flat.to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        d = self.sum.numel()
        self.n = int(round(flat[0].item()))
        self.sum, self.sum_sq = flat[1:1 + d].clone(), flat[1 + d:].reshape(d, d).clone()
        return self

    def mu_sigma(self):
        if self.n < 2:
            raise ValueError(f'need at least 2 feature vectors for a covariance, got {self.n}')
        mu = self.sum / self.n
        sigma = (self.sum_sq - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def feature_stats(features):
    """(mu [D], sigma [D, D]) in float64 from an [N, D] array or an iterable of [n, D] batches."""
    stats = FeatureStats()
    for batch in ([features] if isinstance(features, (np.ndarray, torch.Tensor)) else features):
        stats.add(batch)
    return stats.mu_sigma()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), real part (recipe F.2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    m = np.square(mu1 - mu2).sum()
    # SciPy's matrix square root as EDM uses it; the product of two covariances can give a tiny imaginary part.
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))
