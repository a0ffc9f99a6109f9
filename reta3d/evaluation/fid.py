"""FID and KID from Inception pool3 features, as pytorch-fid and torch-fidelity compute them.

- FID (Heusel et al. 2017): d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½) of the Gaussians
  fitted to the two feature sets; statistics as pytorch-fid's `calculate_activation_statistics`
  and the distance as its `calculate_frechet_distance` (`pytorch_fid/fid_score.py`, itself
  TTUR's fid.py), float64, with scipy's `sqrtm`.
- KID (Bińkowski et al. 2018): the unbiased MMD² estimator with the cubic polynomial kernel
  k(x, y) = (gamma x·y + coef0)^degree, gamma = 1 / dim, averaged over random subsets; as
  torch-fidelity's `kid_features_to_metric` / `mmd2` / `kernel_poly`
  (`torch_fidelity/metric_kid.py`, from MMD-GAN's compute_scores.py), with the same subset
  draws for the same seed. Reported (mean, std) over the subsets; the paper-style numbers
  multiply the mean by 1000 or 100 depending on the paper, we do not.
- Caching of features (resumable, in chunks): `reta3d.evaluation.protocol.ChunkCache`.

Features are the (N, 2048) float32 output of `reta3d.evaluation.inception.inception_feature_fn`.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import numpy as np
from scipy import linalg

KID_SEED = 2020  # torch-fidelity's default `rng_seed`


def _as_features(features, name: str) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return array.astype(np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (N, D), any float dtype (typically (N, 2048) float32).

    Returns mu (D,) float64 and sigma (D, D) float64, the unbiased covariance (divides by
    N - 1), as pytorch-fid `calculate_activation_statistics` (np.mean(axis=0),
    np.cov(rowvar=False)) and torch-fidelity `fid_features_to_statistics`. Both in float64:
    numpy's np.cov promotes float32 features to float64 anyway, while their np.mean of float32
    features stays float32 (a ~1e-7 relative difference in mu). Raises ValueError for a non-2D
    input, N < 2, or non-finite values.
    """
    array = _as_features(features, "feature_statistics")
    if array.shape[0] < 2:
        raise ValueError(f"feature_statistics: need at least 2 samples, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): the FID for Inception stats.

    mu (D,), sigma (D, D), any float dtype (computed in float64); returns a Python float in
    squared feature units. Follows pytorch-fid `calculate_frechet_distance`
    (`pytorch_fid/fid_score.py`) step by step: sqrtm(sigma1 · sigma2) with scipy; if that is
    not finite (a nearly singular product), eps · I is added to both covariances and the root
    taken again (logged as a warning; pytorch-fid prints); a complex root whose diagonal has
    an imaginary part above 1e-3 raises ValueError("Imaginary component ..."), a smaller one
    is dropped. Raises ValueError for mismatched shapes.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mean vectors differ in shape {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: covariances {sigma1.shape}, {sigma2.shape} do not match "
                         f"the means {mu1.shape}")
    diff = mu1 - mu2
    # scipy >= 1.16 deprecates sqrtm's `disp` (pytorch-fid passes disp=False); without it the
    # root comes back alone and a failure shows as non-finite entries, which is what is tested.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            logging.warning("fid calculation produces singular product; adding %s to diagonal of "
                            "cov estimates", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    # torch-fidelity `mmd2(..., mmd_est="unbiased")`: the within-set sums drop the diagonal,
    # the cross term keeps it.
    m = k_xx.shape[0]
    kt_xx = k_xx.sum() - np.trace(k_xx)
    kt_yy = k_yy.sum() - np.trace(k_yy)
    return float((kt_xx + kt_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
    """(gamma x·yᵀ + coef0)^degree for x (m, D), y (n, D) → (m, n), gamma = 1 / D by default
    (torch-fidelity `kernel_poly`)."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def kernel_inception_distance(features1, features2, num_subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3,
                              gamma: Optional[float] = None, coef0: float = 1.0,
                              seed: int = KID_SEED) -> tuple[float, float]:
    """KID: mean and std over `num_subsets` of the unbiased polynomial-kernel MMD².

    features1 (N1, D), features2 (N2, D), any float dtype (computed in float64). Each subset
    draws `subset_size` rows of features1 and then of features2 without replacement with
    np.random.RandomState(seed).choice, exactly as torch-fidelity `kid_features_to_metric`
    (defaults: 100 subsets of 1000, degree 3, gamma 1/D, coef0 1, seed 2020), so the same
    subsets are drawn. Returns (mean, std) as Python floats (np.std, ddof 0), in kernel units;
    a slightly negative mean is valid (distributions very close).

    Differences from torch-fidelity: it computes in the features' dtype (float32 for its
    extractors; we use float64, a relative change of ~1e-6 for Inception features), and it
    raises when a set is smaller than `subset_size`, where we warn and use
    min(N1, N2) instead (the value torch-fidelity gives with kid_subset_size=min(N1, N2)).
    Raises ValueError for mismatched dims, fewer than 2 samples or num_subsets < 1.
    """
    f1 = _as_features(features1, "kernel_inception_distance features1")
    f2 = _as_features(features2, "kernel_inception_distance features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature dims differ ({f1.shape[1]} vs {f2.shape[1]})")
    if num_subsets < 1:
        raise ValueError(f"kernel_inception_distance: num_subsets must be >= 1, got {num_subsets}")
    n1, n2 = len(f1), len(f2)
    if min(n1, n2) < 2:
        raise ValueError(f"kernel_inception_distance: need at least 2 samples per set, got {n1}, {n2}")
    if subset_size > min(n1, n2):
        warnings.warn(f"KID subset size {subset_size} exceeds the number of samples ({n1}, {n2}); "
                      f"using {min(n1, n2)} (torch-fidelity would raise)", stacklevel=2)
        subset_size = min(n1, n2)
    if subset_size < 2:
        raise ValueError(f"kernel_inception_distance: subset_size must be >= 2, got {subset_size}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(n1, subset_size, replace=False)]
        y = f2[rng.choice(n2, subset_size, replace=False)]
        kernel = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)  # noqa: E731
        mmds[i] = _mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
    return float(np.mean(mmds)), float(np.std(mmds))
