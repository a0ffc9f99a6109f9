"""FID / KID formulas and the feature cache (reta3d/evaluation/fid.py) against the reference code:
pytorch-fid's `calculate_frechet_distance` / statistics (pytorch_fid/fid_score.py) and
torch-fidelity's `kid_features_to_metric` and eigenvalue FID (torch_fidelity/metric_kid.py,
metric_fid.py), imported from the installed packages without their package `__init__` (which
pulls in torchvision; see tests/test_inception.py) on the same random features.

The dimension is small (64-128) here: scipy's sqrtm is O(D³) and takes over a minute at
D = 2048 on two cores; the formulas do not depend on D.
"""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("pytorch_fid") is None:
    pytest.skip("pip install --no-deps -r requirements-metrics.txt", allow_module_level=True)

from reta3d.evaluation import fid  # noqa: E402


def import_isolated(package: str, modules, stubs=()):
    """Imports `package.module`s without running `package/__init__.py`, `stubs` standing in;
    sys.modules is restored for the package and the stubs afterwards."""
    spec = importlib.util.find_spec(package)
    stubs = dict(stubs)
    ours = lambda n: n == package or n.startswith(package + ".") or n in stubs  # noqa: E731
    before = {n: m for n, m in sys.modules.items() if ours(n)}
    try:
        for name in before:
            del sys.modules[name]
        shell = types.ModuleType(package)
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = shell
        sys.modules.update(stubs)
        return {name: importlib.import_module(f"{package}.{name}") for name in modules}
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(before)


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture(scope="module")
def reference():
    # fid_score only needs torchvision.transforms and pytorch_fid.inception at import time.
    torchvision = _module("torchvision", transforms=_module("torchvision.transforms"))
    pf = import_isolated("pytorch_fid", ["fid_score"], {
        "torchvision": torchvision, "torchvision.transforms": torchvision.transforms,
        "pytorch_fid.inception": _module("pytorch_fid.inception", InceptionV3=types.SimpleNamespace(
            BLOCK_INDEX_BY_DIM={64: 0, 192: 1, 768: 2, 2048: 3}))})["fid_score"]
    # metric_kid / metric_fid import torch_fidelity.utils (torchvision) for their end-to-end
    # entry points only; the feature-level functions tested here do not use it.
    utils = _module("torch_fidelity.utils")
    utils.__getattr__ = lambda name: None
    tf = import_isolated("torch_fidelity", ["metric_kid", "metric_fid"], {"torch_fidelity.utils": utils})
    return types.SimpleNamespace(pytorch_fid=pf, kid=tf["metric_kid"], fid=tf["metric_fid"])


def _features(seed, n, d, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    # ReLU-like, non-negative, correlated: roughly what pool3 features look like.
    return np.maximum(rng.standard_normal((n, d)) @ mixing + shift + 0.5, 0).astype(np.float32)


def test_statistics_and_frechet_distance_match_pytorch_fid(reference):
    f1, f2 = _features(0, 600, 96), _features(1, 500, 96, shift=0.1)
    mu1, s1 = fid.feature_statistics(f1)
    mu2, s2 = fid.feature_statistics(f2)
    assert mu1.dtype == np.float64 and s1.shape == (96, 96) and s1.dtype == np.float64
    # pytorch-fid calculate_activation_statistics, on the float32 features as it gets them.
    np.testing.assert_allclose(mu1, np.mean(f1, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False), rtol=1e-12)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    theirs = float(reference.pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2))
    eig = reference.fid.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2},
                                                 False)["frechet_inception_distance"]
    print(f"FID {ours:.10g}; pytorch-fid rel diff {abs(ours - theirs) / theirs:.1e}; "
          f"torch-fidelity (eigvals) rel diff {abs(ours - eig) / eig:.1e}")
    assert ours > 0
    assert abs(ours - theirs) <= 1e-6 * theirs
    assert abs(ours - eig) <= 1e-6 * eig
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) <= 1e-8 * ours
    with pytest.raises(ValueError, match="differ in shape"):
        fid.frechet_distance(mu1, s1, mu2[:-1], s2)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore::RuntimeWarning")
def test_singular_product_and_imaginary_check_match_pytorch_fid(reference, capsys):
    # sqrtm of the nilpotent [[0, 1], [0, 0]] does not exist: both retry with eps on the diagonal.
    sigma1, sigma2, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    ours = fid.frechet_distance(mu, sigma1, mu, sigma2)
    theirs = float(reference.pytorch_fid.calculate_frechet_distance(mu, sigma1, mu, sigma2))
    assert "singular product" in capsys.readouterr().out  # pytorch-fid took the same branch
    assert np.isfinite(ours) and abs(ours - theirs) <= 1e-6 * abs(theirs)
    # A product with a negative eigenvalue has an imaginary root: both refuse.
    with pytest.raises(ValueError, match="Imaginary component"):
        fid.frechet_distance(mu, np.diag([1.0, -1.0]), mu, sigma2)
    with pytest.raises(ValueError, match="Imaginary component"):
        reference.pytorch_fid.calculate_frechet_distance(mu, np.diag([1.0, -1.0]), mu, sigma2)


@pytest.mark.parametrize("options", [
    {},
    {"degree": 2, "gamma": 0.02, "coef0": 0.5, "seed": 7},
])
def test_kid_matches_torch_fidelity(reference, options):
    f1, f2 = _features(2, 300, 128), _features(3, 260, 128, shift=0.05)
    kwargs = {"kid_subsets": 10, "kid_subset_size": 200, "verbose": False,
              "kid_kernel_poly_degree": options.get("degree", 3),
              "kid_kernel_poly_gamma": options.get("gamma"),
              "kid_kernel_poly_coef0": options.get("coef0", 1),
              "rng_seed": options.get("seed", fid.KID_SEED)}
    mean, std = fid.kernel_inception_distance(f1, f2, num_subsets=10, subset_size=200, **options)
    # float64 features: torch-fidelity computes in the features' dtype, so this is the formula.
    exact = reference.kid.kid_features_to_metric(torch.from_numpy(f1.astype(np.float64)),
                                                 torch.from_numpy(f2.astype(np.float64)), **kwargs)
    assert abs(mean - exact["kernel_inception_distance_mean"]) <= 1e-10 * abs(mean)
    assert abs(std - exact["kernel_inception_distance_std"]) <= 1e-8 * std
    # float32 features, as torch-fidelity's extractors hand them over.
    usual = reference.kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), **kwargs)
    gap = abs(mean - usual["kernel_inception_distance_mean"]) / abs(mean)
    print(f"KID {mean:.6g} ± {std:.3g}; vs torch-fidelity float64 "
          f"{abs(mean - exact['kernel_inception_distance_mean']) / abs(mean):.1e}, float32 {gap:.1e}")
    assert gap <= 1e-3
    assert mean > 0


def test_kid_small_sets_warn_and_use_all_samples(reference):
    f1, f2 = _features(4, 40, 32), _features(5, 50, 32, shift=0.2)
    with pytest.warns(UserWarning, match="subset size 1000 exceeds"):
        mean, std = fid.kernel_inception_distance(f1, f2, num_subsets=3)
    capped = reference.kid.kid_features_to_metric(
        torch.from_numpy(f1.astype(np.float64)), torch.from_numpy(f2.astype(np.float64)),
        kid_subsets=3, kid_subset_size=40, verbose=False)
    assert abs(mean - capped["kernel_inception_distance_mean"]) <= 1e-10 * abs(mean)
    with pytest.raises(ValueError, match="KID subset size"):  # where torch-fidelity stops
        reference.kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2),
                                             kid_subsets=3, kid_subset_size=1000, verbose=False)
    with pytest.raises(ValueError, match="dims differ"):
        fid.kernel_inception_distance(f1, f2[:, :16])
