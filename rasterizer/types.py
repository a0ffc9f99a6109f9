"""Data types shared by every rasterizer backend.

Shapes use `...` for an optional leading batch (0 or 1 dims): B heads seen by B cameras.
Camera convention: OpenCV (x right, y down, z forward); pixel (row i, col j) is sampled
at image coordinates (j + 0.5, i + 0.5).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["means", "scales", "quats", "opacities", "colors"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Gaussians:
    """A set of 3D Gaussians.

    means     (..., N, 3) float32  world positions
    scales    (..., N, 3) float32  linear standard deviations along the local axes (> 0)
    quats     (..., N, 4) float32  rotation, (w, x, y, z); normalised inside the renderer
    opacities (..., N)    float32  in [0, 1]
    colors    (..., N, C) float32  C in 1..32 (RGB or feature channels)

    A frozen dataclass and a JAX pytree (jit, vmap and tree_map see the five arrays): change a
    field with `dataclasses.replace(gaussians, colors=...)`. q and −q are the same rotation;
    the head binding's quaternions can change sign between frames, the renders cannot.
    """

    means: jax.Array
    scales: jax.Array
    quats: jax.Array
    opacities: jax.Array
    colors: jax.Array

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[-2]

    @property
    def num_channels(self) -> int:
        return self.colors.shape[-1]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["world_to_camera", "intrinsics"],
    meta_fields=["width", "height"],
)
@dataclasses.dataclass(frozen=True)
class Camera:
    """A pinhole camera.

    world_to_camera (..., 4, 4) float32  OpenCV convention
    intrinsics      (..., 3, 3) float32  in pixels: [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]
    width, height   static Python ints (image size in pixels)
    """

    world_to_camera: jax.Array
    intrinsics: jax.Array
    width: int
    height: int

    @staticmethod
    def from_eg3d(label: jax.Array, width: int, height: Optional[int] = None) -> "Camera":
        """Camera from EG3D's 25-number label(s) (..., 25).

        The label is the 4x4 cam2world matrix (row-major, 16 numbers, OpenCV axes) then the
        3x3 intrinsics normalised by the image size (9 numbers; FFHQ: fx = fy = 4.2647,
        cx = cy = 0.5).
        """
        height = width if height is None else height
        label = jnp.asarray(label, jnp.float32)
        if label.shape[-1] != 25:
            raise ValueError(f"EG3D camera label must have 25 numbers, got shape {label.shape}")
        cam2world = label[..., :16].reshape(label.shape[:-1] + (4, 4))
        k = label[..., 16:].reshape(label.shape[:-1] + (3, 3))
        scale = jnp.array([[width, 0, width], [0, height, height], [0, 0, 1]], jnp.float32)
        # fx, cx scale with the width; fy, cy with the height; the last row stays (0, 0, 1).
        intrinsics = k * scale
        return Camera(jnp.linalg.inv(cam2world), intrinsics, int(width), int(height))


def look_at_eg3d_label(yaw: float, pitch: float, radius: float = 2.7,
                       target=(0.0, 0.0, 0.2), focal: float = 4.2647) -> np.ndarray:
    """EG3D's LookAtPoseSampler pose as a 25-number label (numpy (25,) float32).

    yaw, pitch in radians, 0 = frontal (camera on +z looking at the face); positive yaw
    moves the camera to +x, the subject's left (yaw 30°: camera at (1.35, 0, 2.34)); positive
    pitch moves the camera down (EG3D: v = π/2 + pitch). Exactly EG3D's `LookAtPoseSampler.sample`
    (eg3d/camera_utils.py) with h = π/2 + yaw, v = π/2 + pitch:
        θ = h,  φ = arccos(1 − 2·clamp(v, 1e-5, π − 1e-5)/π),
        origin = radius·(sin φ cos(π − θ), cos φ, sin φ sin(π − θ))   (a sphere around the
        WORLD ORIGIN, not around the look-at point), looking at `target`, world up +y,
    then `create_cam2world_matrix` (OpenCV axes: x right, y down, z forward), and FFHQ's
    normalised intrinsics (fx = fy = `focal`, cx = cy = 0.5). The frontal camera is at
    (0, 0, radius), as in FFHQ's labels (distance 2.7).
    """
    h = np.pi / 2 + yaw
    v = np.clip(np.pi / 2 + pitch, 1e-5, np.pi - 1e-5)
    theta = h
    phi = np.arccos(1.0 - 2.0 * v / np.pi)
    target = np.asarray(target, np.float64)
    origin = radius * np.array(
        [np.sin(phi) * np.cos(np.pi - theta), np.cos(phi), np.sin(phi) * np.sin(np.pi - theta)])
    forward = target - origin
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 1.0, 0.0])
    right = -np.cross(up, forward)
    right /= np.linalg.norm(right)
    cam_up = np.cross(forward, right)
    cam2world = np.eye(4)
    cam2world[:3, 0], cam2world[:3, 1], cam2world[:3, 2], cam2world[:3, 3] = right, cam_up, forward, origin
    k = np.array([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]])
    return np.concatenate([cam2world.reshape(-1), k.reshape(-1)]).astype(np.float32)
