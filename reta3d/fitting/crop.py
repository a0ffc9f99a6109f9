"""EG3D-style face crops: scale + translation from 5 landmarks, then a square resampled crop.

EG3D's FFHQ / in-the-wild preprocessing (github.com/NVlabs/eg3d,
dataset_preprocessing/ffhq/crop_images_in_the_wild.py, calling Deep3DFaceRecon_pytorch's
util/preprocess.py `align_img` → `POS` → `resize_n_crop_img`) does:
1. 5 landmarks (two eye centres, nose tip, two mouth corners) from MTCNN or from 68 points;
2. `POS`: least squares fit of image = scale · (standard 3D landmarks) + translation (the 3D
   points through an affine camera; its scale is the mean norm of the two projection rows);
3. resize the photo by rescale_factor / scale and cut a square centred on the image position of
   the standard landmarks' origin (target 1024 px, rescale_factor 300), then a 700 px centre
   crop resized to 512 with Lanczos.
There is no in-plane rotation: the camera label estimated for the crop carries the head's roll.

Here the standard landmarks are replaced by `reference`: the head model's landmarks projected
by the canonical FFHQ camera into normalised crop coordinates, so a crop puts the face where
that camera expects it. The fit is 2D (scale + translation, still no rotation), in POS's
direction: residuals are measured in the photo. EG3D's integer rounding of the resized size and
crop corner (and its half-pixel y flip) are not reproduced; this crop is continuous.

Pixel convention: pixel (row i, col j) covers [j, j+1) x [i, i+1), centre (j + 0.5, i + 0.5),
in the photo and in the crop alike (rasterizer/types.py). An affine is a (2, 3) float64 matrix
A with crop = A[:, :2] @ photo + A[:, 2].
"""
from __future__ import annotations

import math

import numpy as np

# five_points order, as EG3D's MTCNN detections and Deep3DFaceRecon's extract_5p: image-left eye,
# image-right eye, nose tip, image-left mouth corner, image-right mouth corner.
FIVE_POINT_NAMES = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")
PAD_MODES = ("reflect", "edge", "constant")


def five_points(landmarks68) -> np.ndarray:
    """(..., 68, 2) iBUG 68 points → (..., 5, 2) float64 in `FIVE_POINT_NAMES` order.

    Eye centres are the means of the six eye-contour points (36-41, 42-47), which approximate
    MTCNN's eye centres (what EG3D used for in-the-wild photos); Deep3DFaceRecon's extract_5p
    averages only the two corners (36, 39 / 42, 45). Nose tip 30; mouth corners 48, 54.
    Units are those of the input. Raises ValueError for another shape.
    """
    lm = np.asarray(landmarks68, np.float64)
    if lm.shape[-2:] != (68, 2):
        raise ValueError(f"expected (..., 68, 2) landmarks, got {lm.shape}")
    return np.stack([lm[..., 36:42, :].mean(-2), lm[..., 42:48, :].mean(-2),
                     lm[..., 30, :], lm[..., 48, :], lm[..., 54, :]], axis=-2)


def _points(points, name: str) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"{name} must be (N>=2, 2) points, got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{name} has non-finite values")
    return points


def similarity_no_rotation(source, target) -> tuple[float, np.ndarray]:
    """Least squares scale s and translation t with target ≈ s · source + t (no rotation).

    source, target: (N >= 2, 2) corresponding points. Minimising sum |s p_i + t - q_i|^2 gives
    (centred p', q') s = sum p'_i · q'_i / sum |p'_i|^2 and t = mean(q) - s mean(p): the
    rotation-free case of Umeyama (1991) / the 2D part of Deep3DFaceRecon's POS.
    Returns (s float, t (2,) float64). s can be <= 0 for point sets that do not correspond
    (crop_transform rejects that). Raises ValueError for bad shapes, non-finite values, or a
    source whose points all coincide.
    """
    p, q = _points(source, "source"), _points(target, "target")
    if p.shape != q.shape:
        raise ValueError(f"source {p.shape} and target {q.shape} differ in shape")
    p_mean, q_mean = p.mean(0), q.mean(0)
    pc, qc = p - p_mean, q - q_mean
    spread = float(np.sum(pc * pc))
    if spread <= 1e-12 * max(1.0, float(np.sum(p * p))):
        raise ValueError("source points all coincide: scale is undetermined")
    scale = float(np.sum(pc * qc)) / spread
    return scale, q_mean - scale * p_mean


def _five(points, name: str) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.shape == (68, 2):
        return five_points(points)
    if points.shape == (5, 2):
        return points
    raise ValueError(f"{name} must be (68, 2) or (5, 2) points, got {points.shape}")


def crop_transform(landmarks, reference, output_size: int) -> np.ndarray:
    """(2, 3) float64 affine from photo pixels to crop pixels (scale + translation only).

    landmarks: (68, 2) iBUG points or (5, 2) `five_points`, photo pixels.
    reference: (68, 2) or (5, 2) where those points belong in the crop, in normalised crop
      coordinates (0 = left / top edge, 1 = right / bottom edge, as intrinsics normalised by the
      image size project them); 68 points are reduced with `five_points` too.
    output_size: crop side in pixels; the reference is scaled by it.
    The fit is `similarity_no_rotation(reference pixels → photo)` (POS's direction: residuals in
    the photo), inverted. Raises ValueError for bad shapes or a non-positive fitted scale (e.g.
    reference mirrored or landmarks from another face layout).
    """
    output_size = _size(output_size)
    src = _five(landmarks, "landmarks")
    ref = _five(reference, "reference") * output_size
    scale, translation = similarity_no_rotation(ref, src)
    if not scale > 0:
        raise ValueError(f"landmarks do not match the reference layout (fitted scale {scale:.3g})")
    return np.array([[1 / scale, 0, -translation[0] / scale],
                     [0, 1 / scale, -translation[1] / scale]])


def _affine(affine) -> np.ndarray:
    affine = np.asarray(affine, np.float64)
    if affine.shape != (2, 3) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite (2, 3) matrix, got {affine!r}")
    return affine


def invert_affine(affine) -> np.ndarray:
    """Inverse of a (2, 3) affine (crop → photo for a `crop_transform`). Raises ValueError when
    it is singular."""
    affine = _affine(affine)
    linear = affine[:, :2]
    det = float(np.linalg.det(linear))
    if abs(det) < 1e-12:
        raise ValueError("affine is singular")
    inverse = np.linalg.inv(linear)
    return np.concatenate([inverse, -inverse @ affine[:, 2:]], axis=1)


def transform_points(points, affine) -> np.ndarray:
    """(..., 2) points through a (2, 3) affine → (..., 2) float64 (same pixel convention)."""
    affine = _affine(affine)
    points = np.asarray(points, np.float64)
    if points.shape[-1:] != (2,):
        raise ValueError(f"points must be (..., 2), got {points.shape}")
    return points @ affine[:, :2].T + affine[:, 2]


def _size(output_size) -> int:
    if isinstance(output_size, bool) or int(output_size) != output_size or output_size < 1:
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    return int(output_size)


def outside_mask(image_shape, affine, output_size: int) -> np.ndarray:
    """(output_size, output_size) bool: crop pixels whose centre maps outside the photo.

    image_shape: (H, W, ...) of the photo; affine: photo → crop (2, 3). A crop pixel is outside
    when its centre, mapped back, leaves [0, W) x [0, H).
    """
    output_size = _size(output_size)
    height, width = int(image_shape[0]), int(image_shape[1])
    centres = np.arange(output_size) + 0.5
    grid = np.stack(np.meshgrid(centres, centres, indexing="xy"), axis=-1)
    src = transform_points(grid, invert_affine(affine))
    return ((src[..., 0] < 0) | (src[..., 0] >= width)
            | (src[..., 1] < 0) | (src[..., 1] >= height))


def _source_indices(start: int, stop: int, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Photo indices for positions start..stop-1 along an axis of `size` pixels, padded by
    `mode`, and which positions are inside."""
    idx = np.arange(start, stop)
    inside = (idx >= 0) & (idx < size)
    if mode == "edge" or size == 1:
        src = np.clip(idx, 0, size - 1)
    elif mode == "reflect":  # numpy's "reflect": mirror about the edge pixel, edge not repeated
        period = 2 * size - 2
        src = np.abs(idx) % period
        src = np.where(src < size, src, period - src)
    else:  # constant: any index, masked to zero afterwards
        src = np.clip(idx, 0, size - 1)
    return src, inside


def crop_image(image, affine, output_size: int, pad_mode: str = "reflect"
               ) -> tuple[np.ndarray, float]:
    """Resample the crop given by a scale + translation `affine` (photo → crop pixels).

    image: (H, W, 3) or (H, W) uint8. affine: (2, 3) with no rotation or shear and positive
      scales (as `crop_transform` makes).
    pad_mode: how the photo is extended where the crop leaves it: "reflect" (mirror about the
      edge pixels, numpy's "reflect"), "edge" (repeat the edge pixels) or "constant" (black, as
      EG3D's PIL crop).
    Resampling: PIL `resize` with Lanczos (a = 3) over the crop's footprint, a separable filter
    whose support widens by the shrink factor, so shrinking a large photo does not alias (no
    box pre-downscale needed) and enlarging a small one stays sharp; it follows the same
    pixel-centre convention, so a photo point p lands at affine(p) in the crop.
    Returns (crop (output_size, output_size[, 3]) uint8, outside_fraction): the fraction of
    crop pixels whose centre lies outside the photo (`outside_mask`), which callers report.
    Raises ValueError for a bad image, affine, size or pad_mode.
    """
    from PIL import Image

    image = np.asarray(image)
    grey_or_rgb = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    if image.dtype != np.uint8 or not grey_or_rgb:
        raise ValueError(f"crop_image expects an (H, W, 3) or (H, W) uint8 image, got "
                         f"{image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image {image.shape}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    output_size = _size(output_size)
    affine = _affine(affine)
    if affine[0, 1] != 0 or affine[1, 0] != 0 or not (affine[0, 0] > 0 and affine[1, 1] > 0):
        raise ValueError(f"crop_image takes a scale + translation affine (no rotation, shear or "
                         f"flip), got {affine.tolist()}")
    height, width = image.shape[:2]
    # The crop's footprint in the photo: the preimage of the crop square [0, S]^2.
    x0, y0 = transform_points([0.0, 0.0], invert_affine(affine))
    x1, y1 = transform_points([output_size, output_size], invert_affine(affine))
    # Cut only the footprint plus the filter's reach (Lanczos support 3 output pixels) from the
    # photo, padded there by index arithmetic: no full-size padded copy of a large photo.
    reach_x = math.ceil(3 * max(1.0, (x1 - x0) / output_size)) + 1
    reach_y = math.ceil(3 * max(1.0, (y1 - y0) / output_size)) + 1
    rx0, rx1 = math.floor(x0) - reach_x, math.ceil(x1) + reach_x
    ry0, ry1 = math.floor(y0) - reach_y, math.ceil(y1) + reach_y
    xs, x_in = _source_indices(rx0, rx1, width, pad_mode)
    ys, y_in = _source_indices(ry0, ry1, height, pad_mode)
    region = image[ys[:, None], xs[None, :]]
    if pad_mode == "constant":
        region = region * (y_in[:, None] & x_in[None, :]).reshape(
            region.shape[:2] + (1,) * (region.ndim - 2)).astype(np.uint8)
    crop = Image.fromarray(np.ascontiguousarray(region)).resize(
        (output_size, output_size), resample=Image.Resampling.LANCZOS,
        box=(x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0))
    fraction = float(outside_mask(image.shape, affine, output_size).mean())
    return np.asarray(crop), fraction
