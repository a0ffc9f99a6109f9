"""Tests for reta3d.metrics (sliced Wasserstein distance on Laplacian pyramids)."""
import numpy as np
import pytest
import scipy.ndimage

from reta3d import metrics


def _smooth_images(seed, n=8, size=64):
    """Random smooth colour images in [-1, 1] (N, size, size, 3) float32: a stand-in for
    natural images, with structure at every pyramid level."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, size, size, 3))
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 2, 2, 0), mode="wrap")
    return np.clip(smooth / smooth.std() * 0.4, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def images():
    return _smooth_images(0)


# ---------------------------------------------------------------------------------------
# Building blocks against naive references.


def test_pyramid_down_matches_2d_convolution_reference():
    x = np.random.default_rng(1).standard_normal((2, 16, 12, 3)).astype(np.float32)
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float32) / 256
    # Karras et al.'s pyr_down: full 2-D convolve with reflect-101 ("mirror") borders.
    expected = scipy.ndimage.convolve(x, kernel[None, :, :, None], mode="mirror")[:, ::2, ::2, :]
    np.testing.assert_allclose(metrics.pyramid_down(x), expected, rtol=1e-5, atol=1e-6)
    upsampled = np.zeros((2, 32, 24, 3), np.float32)
    upsampled[:, ::2, ::2] = x
    expected_up = scipy.ndimage.convolve(upsampled, 4 * kernel[None, :, :, None], mode="mirror")
    np.testing.assert_allclose(metrics.pyramid_up(x), expected_up, rtol=1e-5, atol=1e-6)


def test_pyramid_preserves_constants_and_reconstructs(images):
    constant = np.full((1, 32, 32, 3), 0.7, np.float32)
    np.testing.assert_allclose(metrics.pyramid_down(constant), 0.7, rtol=1e-6)
    np.testing.assert_allclose(metrics.pyramid_up(constant[:, :16, :16]), 0.7, rtol=1e-6)
    pyramid = metrics.laplacian_pyramid(images, 3)
    assert [level.shape for level in pyramid] == [(8, 64, 64, 3), (8, 32, 32, 3), (8, 16, 16, 3)]
    # Collapsing the pyramid (upsample and add, coarse to fine) gives the image back.
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = band + metrics.pyramid_up(image)
    np.testing.assert_allclose(image, images, atol=1e-5)


def test_sliced_wasserstein_of_translated_set_is_mean_projected_shift():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((50, 6)).astype(np.float32)
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.0, 0.25], np.float32)
    directions = rng.standard_normal((6, 10))
    directions /= np.linalg.norm(directions, axis=0)
    # Translating a set moves every sorted projection by shift·d: W1 = |shift·d| per direction.
    expected = np.mean(np.abs(shift @ directions))
    got = metrics.sliced_wasserstein(a, a + shift, directions.astype(np.float32))
    assert got == pytest.approx(expected, rel=1e-5)
    # A permutation of the same points is the same distribution.
    assert metrics.sliced_wasserstein(a, a[::-1].copy(), directions.astype(np.float32)) == 0.0


def test_swd_resolutions():
    assert metrics.swd_resolutions(64) == [64, 32, 16]
    assert metrics.swd_resolutions(512) == [512, 256, 128, 64, 32, 16]
    assert metrics.swd_resolutions(48) == [48, 24]
    assert metrics.swd_resolutions(16) == [16]


# ---------------------------------------------------------------------------------------
# swd().


def test_swd_identical_sets_zero_and_output_structure(images):
    result = metrics.swd(images, images)
    assert sorted(result) == ["levels", "mean"]
    assert list(result["levels"]) == [64, 32, 16]
    assert all(value == 0.0 for value in result["levels"].values())
    assert result["mean"] == 0.0
    small = metrics.swd(images[:, :32, :32], images[:, :32, :32] + 0.1)
    assert list(small["levels"]) == [32, 16]
    assert small["mean"] == pytest.approx(np.mean(list(small["levels"].values())))


def test_swd_same_distribution_much_smaller_than_different(images):
    other_draw = _smooth_images(1)
    noisy = np.clip(images + 0.3 * np.random.default_rng(3).standard_normal(images.shape), -1, 1)
    same = metrics.swd(images, other_draw)
    different = metrics.swd(images, noisy.astype(np.float32))
    # Noise lives in the finest band, where two draws of one distribution are ~10x closer.
    assert 0 < same["levels"][64] < 0.15 * different["levels"][64]
    assert same["mean"] < different["mean"]


def test_swd_between_draws_of_one_distribution_shrinks_with_more_images():
    # Finite-sample SWD is biased upwards; the estimate must converge as sets grow.
    small = metrics.swd(_smooth_images(0, n=4), _smooth_images(1, n=4))["mean"]
    large = metrics.swd(_smooth_images(0, n=32), _smooth_images(1, n=32))["mean"]
    assert large < 0.75 * small


def test_swd_grows_with_noise(images):
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(images.shape).astype(np.float32)
    results = [metrics.swd(images, images + sigma * noise) for sigma in (0.02, 0.05, 0.1, 0.2)]
    means = [r["mean"] for r in results]
    finest = [r["levels"][64] for r in results]
    assert np.all(np.diff(means) > 0), means
    assert np.all(np.diff(finest) > 0), finest


def test_swd_grows_with_colour_shift_joint_but_not_separate(images):
    shifts = (0.05, 0.1, 0.2, 0.4)
    red = np.array([1.0, 0.0, 0.0], np.float32)
    shifted = [np.clip(images + s * red, -1, 1) for s in shifts]
    means = [metrics.swd(images, x)["mean"] for x in shifted]
    assert np.all(np.diff(means) > 0), means
    assert means[0] > 1.0
    # A uniform shift only moves the low-pass level's mean, which the original per-set
    # normalisation removes. Without clipping (so the shift stays exactly uniform) the
    # "separate" SWD is zero up to float rounding.
    unclipped = images * 0.5 + 0.3 * red
    base = images * 0.5
    assert metrics.swd(base, unclipped, normalization="separate")["mean"] < 1e-2
    assert metrics.swd(base, unclipped)["mean"] > 100 * metrics.swd(base, unclipped, normalization="separate")["mean"]


def test_swd_symmetric_and_seeded(images):
    other = np.clip(images + 0.1 * np.random.default_rng(5).standard_normal(images.shape), -1, 1)
    forward = metrics.swd(images, other, seed=7)
    assert metrics.swd(other, images, seed=7) == forward
    assert metrics.swd(images, other, seed=7) == forward
    different_seed = metrics.swd(images, other, seed=8)
    assert different_seed != forward
    assert different_seed["mean"] == pytest.approx(forward["mean"], rel=0.2)  # same quantity


def test_swd_uint8_equals_float(images):
    as_uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
    shifted = np.clip(as_uint8.astype(np.int32) + 20, 0, 255).astype(np.uint8)
    from_uint8 = metrics.swd(as_uint8, shifted)
    from_float = metrics.swd(as_uint8 / np.float32(127.5) - 1, shifted / np.float32(127.5) - 1)
    for resolution in from_uint8["levels"]:
        assert from_uint8["levels"][resolution] == pytest.approx(from_float["levels"][resolution], rel=1e-4)


def test_swd_input_errors(images):
    with pytest.raises(ValueError, match="same shape"):
        metrics.swd(images, images[:4])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        metrics.swd(images[..., :1], images[..., :1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.swd(images, np.where(images > 0.5, np.nan, images))
    with pytest.raises(ValueError, match="at least 16"):
        metrics.swd(images[:, :8, :8], images[:, :8, :8])
    with pytest.raises(ValueError, match="square"):
        metrics.swd(images[:, :32], images[:, :32])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.swd(images * 127.5 + 127.5, images * 127.5 + 127.5)
    with pytest.raises(ValueError, match="dtype"):
        metrics.swd(images.astype(np.int32), images.astype(np.int32))
    with pytest.raises(ValueError, match="normalization"):
        metrics.swd(images, images, normalization="both")
