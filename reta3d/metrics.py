"""Sliced Wasserstein distance (SWD) on Laplacian-pyramid patches (Karras et al. 2018,
"Progressive Growing of GANs", Appendix D and their `metrics/sliced_wasserstein.py`).

Needs no downloaded network, so it runs on every machine. Procedure, per image set:
1. Laplacian pyramid of each image, one level per resolution from the image size down
   to 16x16 (64x64 images -> levels 64, 32, 16). The pyramid uses OpenCV's pyrDown/pyrUp
   5x5 binomial filter with reflect-101 borders; the last level is the low-pass residual.
2. From each level of each image, `patches_per_image` (128) random 7x7x3 patches
   ("descriptors", 147 numbers each).
3. Per level, normalise each colour channel of the descriptors to zero mean and unit
   standard deviation (see `normalization` below).
4. SWD between the real and fake descriptor sets: `repeats` (4) times draw
   `directions_per_repeat` (128) random unit directions (512 in total), project both sets,
   sort, and take the mean absolute difference of the sorted projections; average over
   directions and repeats.

Units: as in the original code and the paper's tables, the returned numbers are SWD x 1e3
(SWD of unit-variance descriptors, multiplied by 1000). Lower is better; 0 for identical sets.

Choices that differ from or sharpen the original (all documented in `swd`):
- `normalization="joint"` (default) normalises real and fake descriptors with the
  statistics of their union, so a global colour or contrast change of the fakes is
  measured. Karras et al.'s code normalises each set with its own statistics
  (`normalization="separate"` reproduces it), which makes SWD blind to any per-channel
  affine colour change of a whole set.
- Patch positions are drawn once per (level, image index) from `seed` and shared by the
  real and fake sets (common random numbers), so SWD(x, x) = 0 exactly, the result is
  exactly symmetric in its two arguments, and seed noise is lower. Both sets must hold
  the same number of images of the same size.
- Everything is seeded (numpy Generator), so results are reproducible.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage

SWD_MIN_RESOLUTION = 16
# OpenCV's pyrDown kernel: outer([1, 4, 6, 4, 1]) / 256, applied separably.
_BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(images: np.ndarray, taps: np.ndarray) -> np.ndarray:
    # scipy "mirror" = OpenCV BORDER_REFLECT_101 (dcb|abcd|cba), pyrDown/pyrUp's default.
    out = scipy.ndimage.convolve1d(images, taps, axis=1, mode="mirror")
    return scipy.ndimage.convolve1d(out, taps, axis=2, mode="mirror")


def pyramid_down(images: np.ndarray) -> np.ndarray:
    """OpenCV pyrDown: blur then keep even rows/cols. (N, H, W, C) -> (N, H/2, W/2, C)."""
    return _blur(images, _BINOMIAL_5)[:, ::2, ::2, :]


def pyramid_up(images: np.ndarray) -> np.ndarray:
    """OpenCV pyrUp: zero-insert then blur with 4x the kernel. (N, h, w, C) -> (N, 2h, 2w, C)."""
    n, h, w, c = images.shape
    upsampled = np.zeros((n, 2 * h, 2 * w, c), images.dtype)
    upsampled[:, ::2, ::2, :] = images
    return _blur(upsampled, 2.0 * _BINOMIAL_5)


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Laplacian pyramid [(N, H, W, C), (N, H/2, W/2, C), ...] float32, finest first.

    Level l < last is G_l − pyrUp(G_{l+1}) (band-pass); the last is the low-pass G_last.
    H and W must be divisible by 2**(num_levels − 1).
    """
    levels = [np.asarray(images, np.float32)]
    for _ in range(1, num_levels):
        coarser = pyramid_down(levels[-1])
        levels[-1] = levels[-1] - pyramid_up(coarser)
        levels.append(coarser)
    return levels


def swd_resolutions(size: int) -> list[int]:
    """Pyramid resolutions for square images of side `size`: size, size/2, ..., >= 16."""
    resolutions = []
    while size >= SWD_MIN_RESOLUTION:
        resolutions.append(size)
        if size % 2:
            break
        size //= 2
    return resolutions


def _extract_patches(level: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch_size: int) -> np.ndarray:
    """level (N, h, w, C); rows, cols (N, P) patch centres -> (N*P, patch, patch, C)."""
    half = patch_size // 2
    offsets = np.arange(-half, half + 1)
    image_index = np.arange(level.shape[0])[:, None, None, None]
    r = rows[:, :, None, None] + offsets[None, None, :, None]
    c = cols[:, :, None, None] + offsets[None, None, None, :]
    patches = level[image_index, r, c]  # (N, P, patch, patch, C)
    return patches.reshape(-1, patch_size, patch_size, level.shape[-1])


def _normalize_channels(descriptors: np.ndarray, statistics_from: np.ndarray) -> np.ndarray:
    """(M, p, p, C) -> (M, p*p*C): per-channel zero mean / unit std using `statistics_from`."""
    mean = statistics_from.mean(axis=(0, 1, 2), dtype=np.float64)
    std = statistics_from.std(axis=(0, 1, 2), dtype=np.float64)
    # A constant channel (e.g. a flat test image) has std 0: leave it centred, unscaled.
    std = np.where(std > 0, std, 1.0)
    normalized = (descriptors - mean.astype(np.float32)) / std.astype(np.float32)
    return normalized.reshape(descriptors.shape[0], -1)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance of the projected sets.

    a, b: (M, D) float32 point sets of equal size; directions: (D, K) unit columns.
    W1 of two equal-size 1-D samples = mean |sorted(a·d) − sorted(b·d)|.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"sliced_wasserstein: need two (M, D) sets of equal shape, got {a.shape} and {b.shape}")
    if directions.shape[0] != a.shape[1]:
        raise ValueError(f"sliced_wasserstein: directions {directions.shape} do not match dimension {a.shape[1]}")
    projected_a = np.sort(a @ directions, axis=0)
    projected_b = np.sort(b @ directions, axis=0)
    return float(np.mean(np.abs(projected_a - projected_b), dtype=np.float64))


def _as_float_images(images, name: str) -> np.ndarray:
    """(N, H, W, 3) uint8 in [0, 255] or float in [-1, 1] -> float32 in [-1, 1]."""
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"swd: {name} must be (N, H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"swd: {name} must be uint8 or float in [-1, 1], got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"swd: {name} contains NaN or infinite values")
    if array.size and np.max(np.abs(array)) > 2.0:
        raise ValueError(
            f"swd: {name} is float with values up to {np.max(np.abs(array)):.3g}; float images "
            "must be in [-1, 1] (pass uint8 for [0, 255] images)"
        )
    # Generator outputs overshoot [-1, 1] a little; metrics see them clipped, as when saved.
    return np.clip(array.astype(np.float32), -1.0, 1.0)


def swd(
    real_images,
    fake_images,
    seed: int = 0,
    *,
    patches_per_image: int = 128,
    patch_size: int = 7,
    repeats: int = 4,
    directions_per_repeat: int = 128,
    normalization: str = "joint",
) -> dict:
    """Sliced Wasserstein distance x 1e3 between two image sets, per pyramid level.

    real_images, fake_images: (N, S, S, 3), uint8 in [0, 255] or float in [-1, 1]
    (floats are clipped to [-1, 1]); same N and S, S >= 16. Levels halve S while it is
    even and stays >= 16 (64: levels 64, 32, 16; 48: 48, 24; 512: 512 ... 16).
    normalization: "joint" (statistics of real ∪ fake, default) or "separate"
    (each set by its own statistics, as Karras et al.'s code).
    Returns {"levels": {resolution (int): SWD x 1e3}, "mean": average over levels}, floats.
    Deterministic for a given seed (see the module docstring for the sampling scheme).
    """
    real = _as_float_images(real_images, "real_images")
    fake = _as_float_images(fake_images, "fake_images")
    if real.shape != fake.shape:
        raise ValueError(
            f"swd: real and fake sets must have the same shape (same number of images, same "
            f"size), got {real.shape} and {fake.shape}"
        )
    n, height, width, _ = real.shape
    if n == 0:
        raise ValueError("swd: empty image sets")
    if height != width:
        raise ValueError(f"swd: images must be square, got {height}x{width}")
    if height < SWD_MIN_RESOLUTION:
        raise ValueError(f"swd: images must be at least {SWD_MIN_RESOLUTION} px, got {height}")
    if normalization not in ("joint", "separate"):
        raise ValueError(f"swd: normalization must be 'joint' or 'separate', got {normalization!r}")
    if patch_size % 2 != 1 or patch_size > SWD_MIN_RESOLUTION:
        raise ValueError(f"swd: patch_size must be odd and <= {SWD_MIN_RESOLUTION}, got {patch_size}")
    resolutions = swd_resolutions(height)

    rng = np.random.default_rng(seed)
    real_pyramid = laplacian_pyramid(real, len(resolutions))
    fake_pyramid = laplacian_pyramid(fake, len(resolutions))
    half = patch_size // 2
    distances = {}
    for resolution, real_level, fake_level in zip(resolutions, real_pyramid, fake_pyramid):
        # Centres keep the whole patch inside the level (as the original: [half, size − half)).
        rows = rng.integers(half, resolution - half, size=(n, patches_per_image))
        cols = rng.integers(half, resolution - half, size=(n, patches_per_image))
        real_patches = _extract_patches(real_level, rows, cols, patch_size)
        fake_patches = _extract_patches(fake_level, rows, cols, patch_size)
        if normalization == "joint":
            union = np.concatenate([real_patches, fake_patches], axis=0)
            real_desc = _normalize_channels(real_patches, union)
            fake_desc = _normalize_channels(fake_patches, union)
        else:
            real_desc = _normalize_channels(real_patches, real_patches)
            fake_desc = _normalize_channels(fake_patches, fake_patches)
        per_repeat = []
        for _ in range(repeats):
            directions = rng.standard_normal((real_desc.shape[1], directions_per_repeat))
            directions /= np.linalg.norm(directions, axis=0, keepdims=True)
            per_repeat.append(sliced_wasserstein(real_desc, fake_desc, directions.astype(np.float32)))
        distances[resolution] = float(np.mean(per_repeat)) * 1e3
    return {"levels": distances, "mean": float(np.mean(list(distances.values())))}
