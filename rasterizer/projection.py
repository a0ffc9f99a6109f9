"""EWA projection of 3D Gaussians to screen space (reference 3DGS semantics).

Follows `preprocessCUDA` / `computeCov2D` of the reference 3DGS rasterizer
(graphdeco-inria/diff-gaussian-rasterization), written for autodiff:

- world -> camera with `world_to_camera` (OpenCV: x right, y down, z forward);
- Sigma = R S S^T R^T (R from the normalised quaternion w, x, y, z);
- Sigma2D = J W Sigma W^T J^T + 0.3 I, with the projected x/z and y/z clamped, inside the
  Jacobian only, to +-1.3 tan(half FOV), tan(half FOV) = width / (2 fx) (height / (2 fy)),
  exactly as the reference does (it keeps off-screen Gaussians from getting huge footprints);
- mu2D = (fx x/z + cx, fy y/z + cy) from the unclamped point; pixel (row i, col j) is sampled
  at (j + 0.5, i + 0.5), which is the reference's ndc2Pix convention shifted by half a pixel;
- radius = ceil(3 sqrt(lambda_max)) with lambda_max = mid + sqrt(max(0.1, mid^2 - det)), the
  reference's formula (the 0.1 floor slightly enlarges near-isotropic footprints), with
  mid^2 - det written as ((a - c)/2)^2 + b^2 and the radius capped at 2^30 px;
- det of the dilated Sigma2D from the factor J W R S by Cauchy-Binet (`_dilated_det`), not
  as a c - b^2, which cancels to noise for huge flat Gaussians (culled or kept at random
  between two compilations before);
- culled (radius 0, outputs zero): z <= 0.2 (reference `in_frustum`), det <= 0, any
  non-finite input or output, or the square [mu - r, mu + r]^2 entirely outside the image.

Culled Gaussians get zero gradient. Gaussians with non-finite inputs, a zero quaternion or
z <= 0.2 are replaced by a harmless unit sphere before any arithmetic (the "double where"),
so NaN/inf inputs cannot leak NaN into the gradients of the others or of the camera. (Finite
but absurd inputs whose covariance overflows float32, scales ~1e19, are culled too, but may
give NaN gradients.)
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

NEAR_PLANE = 0.2
COV2D_DILATION = 0.3
FOV_CLAMP = 1.3


class Projection(NamedTuple):
    """Screen-space Gaussians.

    means2d (B, N, 2) float  pixel coordinates (x along columns, y along rows)
    conics  (B, N, 3) float  (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths  (B, N)    float  camera-space z
    radii   (B, N)    int32  ceil(3 sqrt(lambda_max)); 0 for culled Gaussians
    """

    means2d: jax.Array
    conics: jax.Array
    depths: jax.Array
    radii: jax.Array


def _rotation_entries(quats: jax.Array):
    """(..., 4) quaternion (w, x, y, z), normalised here -> 3x3 nested list of (...) arrays."""
    w, x, y, z = (quats[..., k] for k in range(4))
    inv_norm = jax.lax.rsqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w * inv_norm, x * inv_norm, y * inv_norm, z * inv_norm
    return [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]


def quat_to_rotmat(quats: jax.Array) -> jax.Array:
    """(..., 4) quaternion (w, x, y, z), normalised here -> (..., 3, 3) rotation matrix."""
    return jnp.stack([jnp.stack(row, -1) for row in _rotation_entries(quats)], -2)


def stack_last(components):
    """jnp.stack(components, -1), written as slice updates.

    XLA CPU fuses a concatenate with everything that computes its operands into one
    pathological loop (0.4 s instead of 1 ms for 68k Gaussians); slice updates stay fast.
    """
    out = jnp.zeros(components[0].shape + (len(components),), components[0].dtype)
    for k, component in enumerate(components):
        out = out.at[..., k].set(component)
    return out


def _screen_space(means, scales, quats, world_to_camera, intrinsics, width, height, valid=None):
    """Projection of every Gaussian: ((mu_x, mu_y), (a, b, c) of Sigma2D, depth), each (B, N).

    With `valid` given, invalid Gaussians are replaced by a unit sphere at camera (0, 0, 1) so
    that every intermediate (and every gradient through them) is finite.

    The 3x3 products are einsums (dots): they keep XLA from fusing the whole chain into its
    consumers, which on CPU duplicates it many times over in the backward pass.
    """
    if valid is not None:
        means = jnp.where(valid[..., None], means, 0.0)
        scales = jnp.where(valid[..., None], scales, 1.0)
        quats = jnp.where(valid[..., None], quats, jnp.array([1.0, 0.0, 0.0, 0.0], quats.dtype))
    m = quat_to_rotmat(quats) * scales[..., None, :]
    cam_rot = world_to_camera[:, None, :3, :3]
    # W R S: the camera-space square root of the covariance.
    m_cam = jnp.einsum("...ij,...jk->...ik", cam_rot, m)
    t = jnp.einsum("...ij,...j->...i", cam_rot, means) + world_to_camera[:, None, :3, 3]
    if valid is not None:
        t = jnp.where(valid[..., None], t, jnp.array([0.0, 0.0, 1.0], t.dtype))

    fx = intrinsics[:, 0, 0, None]
    fy = intrinsics[:, 1, 1, None]
    cx = intrinsics[:, 0, 2, None]
    cy = intrinsics[:, 1, 2, None]
    tx, ty, tz = t[..., 0], t[..., 1], t[..., 2]

    lim_x = FOV_CLAMP * (0.5 * width / fx)
    lim_y = FOV_CLAMP * (0.5 * height / fy)
    tx_clamped = jnp.clip(tx / tz, -lim_x, lim_x) * tz
    ty_clamped = jnp.clip(ty / tz, -lim_y, lim_y) * tz
    zeros = jnp.zeros_like(tz)
    jacobian = jnp.stack([
        jnp.stack([fx / tz, zeros, -fx * tx_clamped / (tz * tz)], -1),
        jnp.stack([zeros, fy / tz, -fy * ty_clamped / (tz * tz)], -1)], -2)
    # Sigma2D = (J W R S)(J W R S)^T.
    jm = jnp.einsum("...ij,...jk->...ik", jacobian, m_cam)
    cov2d = jnp.einsum("...ik,...jk->...ij", jm, jm)
    cov2d_abc = (cov2d[..., 0, 0] + COV2D_DILATION, cov2d[..., 0, 1],
                 cov2d[..., 1, 1] + COV2D_DILATION)
    means2d = (fx * tx / tz + cx, fy * ty / tz + cy)
    return means2d, cov2d_abc, tz, _dilated_det(jm, cov2d)


def _dilated_det(jm, cov2d):
    """det(jm jm^T + d I) of the dilated 2-D covariance, (B, N), without cancellation.

    a c - b^2 subtracts two products of size ~lambda_max^2 to get lambda_max lambda_min: for a
    flat Gaussian seen edge-on that is hundreds of times wider than the image (eigenvalue ratio
    past ~1e7) the result is float32 rounding noise, its sign included. Cauchy-Binet gives
    det(jm jm^T) as the sum of the squared 2x2 minors of jm (2x3); the dilation adds
    d (a0 + c0) + d^2. Every term is non-negative, so the determinant of a finite covariance
    is always > 0 and accurate to rounding of its terms.
    """
    (m00, m01, m02), (m10, m11, m12) = ([jm[..., i, k] for k in range(3)] for i in range(2))
    minors = ((m00 * m11 - m01 * m10) ** 2 + (m00 * m12 - m02 * m10) ** 2
              + (m01 * m12 - m02 * m11) ** 2)
    d = COV2D_DILATION
    return minors + d * (cov2d[..., 0, 0] + cov2d[..., 1, 1]) + d * d


MAX_RADIUS = float(2 ** 30)   # px: past any image; keeps the int32 conversion defined


def _radius_and_validity(means2d, cov2d_abc, det, depths, width, height):
    (mx, my), (a, b, c) = means2d, cov2d_abc
    mid = 0.5 * (a + c)
    # mid^2 - det = ((a - c) / 2)^2 + b^2, written without the cancellation.
    half_diff = 0.5 * (a - c)
    lambda_max = mid + jnp.sqrt(jnp.maximum(0.1, half_diff * half_diff + b * b))
    radius = jnp.minimum(jnp.ceil(3.0 * jnp.sqrt(lambda_max)), MAX_RADIUS)
    finite = (jnp.isfinite(mx) & jnp.isfinite(my) & jnp.isfinite(det) & jnp.isfinite(depths)
              & jnp.isfinite(radius))
    on_screen = ((mx + radius > 0) & (mx - radius < width)
                 & (my + radius > 0) & (my - radius < height))
    valid = finite & (depths > NEAR_PLANE) & (det > 0) & on_screen
    return jnp.where(valid, radius, 0).astype(jnp.int32), valid


def project(means: jax.Array, scales: jax.Array, quats: jax.Array, world_to_camera: jax.Array,
            intrinsics: jax.Array, width: int, height: int) -> Projection:
    """Projects Gaussians for B cameras (one Gaussian set per camera).

    means (B, N, 3), scales (B, N, 3), quats (B, N, 4) wxyz, world_to_camera (B, 4, 4),
    intrinsics (B, 3, 3) -> `Projection` (see its docstring); all float32 (or float64).
    Differentiable w.r.t. every float input; culled Gaussians have zero gradient.
    """
    chex.assert_rank([means, scales, quats, world_to_camera, intrinsics], [3, 3, 3, 3, 3])
    batch, num = means.shape[:2]
    chex.assert_shape(means, (batch, num, 3))
    chex.assert_shape(scales, (batch, num, 3))
    chex.assert_shape(quats, (batch, num, 4))
    chex.assert_shape(world_to_camera, (batch, 4, 4))
    chex.assert_shape(intrinsics, (batch, 3, 3))

    # Cheap pre-check on the inputs: whatever fails it never enters the arithmetic below.
    sg = jax.lax.stop_gradient
    # Unrolled: XLA CPU is slow at fused broadcast-multiply-reduce over a size-3 minor axis.
    camera_z = sum(sg(world_to_camera)[:, 2, k, None] * sg(means)[..., k] for k in range(3)) \
        + sg(world_to_camera)[:, 2, 3, None]
    safe = (jnp.all(jnp.isfinite(means), -1) & jnp.all(jnp.isfinite(scales), -1)
            & jnp.all(jnp.isfinite(quats), -1) & jnp.any(quats != 0, -1)
            & (camera_z > NEAR_PLANE))
    means2d, cov2d_abc, depths, det = _screen_space(means, scales, quats, world_to_camera,
                                                    intrinsics, width, height, valid=safe)
    radii, valid = _radius_and_validity(sg(means2d), sg(cov2d_abc), sg(det), sg(depths), width,
                                        height)
    valid = valid & safe
    radii = jnp.where(valid, radii, 0)
    a, b, c = cov2d_abc
    inv_det = 1.0 / jnp.where(valid, det, 1.0)
    zero = jnp.zeros((), means.dtype)
    keep = lambda x: jnp.where(valid, x, zero)  # noqa: E731
    return Projection(
        means2d=stack_last([keep(means2d[0]), keep(means2d[1])]),
        conics=stack_last([keep(c * inv_det), keep(-b * inv_det), keep(a * inv_det)]),
        depths=keep(depths),
        radii=radii,
    )
