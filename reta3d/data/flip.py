"""Horizontal flip of a training sample: image, EG3D camera and FLAME parameters (numpy).

Mirroring the photo of a head is the same as mirroring the whole world across the plane
x = 0 (S = diag(-1, 1, 1)) and looking at it with the mirrored camera:

- image: columns reversed (pixel centre u = j + 0.5 goes to W - u);
- camera: cam2world M -> S4 M S4 with S4 = diag(-1, 1, 1, 1). A world point X seen at
  camera coordinates x = M^-1 X; its mirror S X is seen by the mirrored camera at
  S4 M^-1 S4 S4 X = S x = (-x, y, z), so u = fx (-x/z) + cx' must equal W - (fx x/z + cx):
  cx' = W - cx, i.e. 1 - cx for EG3D's normalised intrinsics (and the skew changes sign);
- FLAME poses: a rotation R mirrors to S R S = R(det(S) S r) = R((x, -y, -z)) for the
  axis-angle r = (x, y, z): pitch kept, yaw and roll negated. Applied to global, neck and
  jaw; the eyes are swapped (left <-> right) and each mirrored the same way.
- shape and expression are left unchanged. LIMITATION: FLAME ships no mirror map for its
  shape and expression bases, so an asymmetric identity or expression (a wink, a lopsided
  smile) keeps its side after flipping. The template mesh is left-right symmetric, so the
  error is only that asymmetry.

This assumes FLAME's x axis maps to the world's x axis (the head-to-world similarity has no
rotation about y), which holds for the fixed head transform of this project.
"""
from __future__ import annotations

from typing import Mapping

import chex
import numpy as np

_AXIS_ANGLE_MIRROR = np.array([1.0, -1.0, -1.0])
_MIRROR4 = np.diag([-1.0, 1.0, 1.0, 1.0])
_POSE_KEYS = ("global_pose", "neck_pose", "jaw_pose")


def flip_image(image: np.ndarray) -> np.ndarray:
    """(..., H, W, C) any dtype -> the same, columns reversed."""
    chex.assert_rank(image, {3, 4})
    return np.ascontiguousarray(image[..., :, ::-1, :])


def flip_camera(camera25: np.ndarray) -> np.ndarray:
    """(..., 25) EG3D label (cam2world row-major, normalised K) -> mirrored label, same dtype."""
    camera25 = np.asarray(camera25)
    chex.assert_axis_dimension(camera25, -1, 25)
    lead = camera25.shape[:-1]
    cam2world = camera25[..., :16].reshape(lead + (4, 4)).astype(np.float64)
    intrinsics = camera25[..., 16:].reshape(lead + (3, 3)).astype(np.float64)
    mirrored = _MIRROR4 @ cam2world @ _MIRROR4
    intrinsics = intrinsics.copy()
    # u' = W - u for every point: the principal point moves to W - cx and the skew flips;
    # in normalised units (W = 1, scaled by the last row's 1) cx' = 1 - cx.
    intrinsics[..., 0, 2] = intrinsics[..., 2, 2] - intrinsics[..., 0, 2]
    intrinsics[..., 0, 1] = -intrinsics[..., 0, 1]
    out = np.concatenate([mirrored.reshape(lead + (16,)), intrinsics.reshape(lead + (9,))], -1)
    return out.astype(camera25.dtype)


def flip_axis_angle(rotation: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle (x, y, z) -> (x, -y, -z): the rotation mirrored across x = 0."""
    rotation = np.asarray(rotation)
    chex.assert_axis_dimension(rotation, -1, 3)
    return (rotation * _AXIS_ANGLE_MIRROR).astype(rotation.dtype)


def flip_flame(flame: Mapping[str, np.ndarray]) -> dict:
    """Mirrors FLAME parameters; keys as in the dataset (any subset), leading dims allowed.

    global_pose, neck_pose, jaw_pose (..., 3): (x, y, z) -> (x, -y, -z);
    eye_pose (..., 6) = left then right: swapped, each mirrored; shape, expression (and any
    other key) unchanged (see the module docstring for why).
    """
    out = {key: np.asarray(value) for key, value in flame.items()}
    for key in _POSE_KEYS:
        if key in out:
            out[key] = flip_axis_angle(out[key])
    if "eye_pose" in out:
        eyes = out["eye_pose"]
        chex.assert_axis_dimension(eyes, -1, 6)
        left, right = eyes[..., :3], eyes[..., 3:]
        out["eye_pose"] = np.concatenate([flip_axis_angle(right), flip_axis_angle(left)], -1)
    return out


def flip_sample(image: np.ndarray, camera25: np.ndarray, flame: Mapping[str, np.ndarray]):
    """Mirrors one sample (or a batch with matching leading dims).

    image (..., H, W, C), camera25 (..., 25), flame {key: (..., k)} -> the same structure,
    mirrored as described in the module docstring. Flipping twice is the identity.
    """
    return flip_image(image), flip_camera(camera25), flip_flame(flame)
