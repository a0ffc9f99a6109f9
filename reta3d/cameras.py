"""Camera paths for sampling and animation, as EG3D 25-number labels.

A label is EG3D's: the 4x4 cam2world matrix (row-major, OpenCV axes: x right, y down, z
forward) then the 3x3 intrinsics normalised by the image size (`rasterizer.Camera.from_eg3d`
turns it into a camera). Every path here is built from `rasterizer.types.look_at_eg3d_label`
(EG3D's LookAtPoseSampler: world up +y, the frontal camera on +z looking at the face).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

CAMERA_PATHS = ("fixed", "orbit")


def frontal_label() -> np.ndarray:
    """(25,) float32 EG3D label of the frontal camera (radius 2.7, FFHQ intrinsics)."""
    from rasterizer.types import look_at_eg3d_label
    return look_at_eg3d_label(0.0, 0.0)


def conditioning_labels(config, batch: int) -> Optional[np.ndarray]:
    """The mapping network's camera condition for sampling: the frontal camera (B, 25), as
    EG3D samples with a fixed conditioning pose; None when the config has c_dim = 0."""
    if config.model.c_dim == 0:
        return None
    return np.repeat(frontal_label()[None], batch, axis=0)


def orbit_labels(num_frames: int, yaw_range: float = 0.35, pitch_range: float = 0.15,
                 pitch: float = 0.0) -> np.ndarray:
    """(T, 25) float32 camera labels of one full orbit around the head (EG3D's gen_videos
    path: yaw = yaw_range·sin(2πt), pitch = pitch + pitch_range·cos(2πt), t = i/T; radians)."""
    from rasterizer.types import look_at_eg3d_label
    if num_frames < 1:
        raise ValueError(f"orbit needs at least one frame, got {num_frames}")
    t = np.arange(num_frames) / num_frames
    return np.stack([look_at_eg3d_label(yaw_range * math.sin(2 * math.pi * s),
                                        pitch + pitch_range * math.cos(2 * math.pi * s))
                     for s in t]).astype(np.float32)


def view_grid_labels(yaws: Sequence[float], pitches: Sequence[float]) -> np.ndarray:
    """(V, 25) float32: a yaw sweep at pitch 0, then a pitch sweep at yaw 0 (radians; views
    already in the yaw sweep are not repeated)."""
    from rasterizer.types import look_at_eg3d_label
    views = [(float(y), 0.0) for y in yaws]
    views += [(0.0, float(p)) for p in pitches if (0.0, float(p)) not in views]
    if not views:
        raise ValueError("view grid needs at least one yaw or pitch")
    return np.stack([look_at_eg3d_label(y, p) for y, p in views]).astype(np.float32)


def camera_path(kind: str, num_frames: int) -> np.ndarray:
    """(T, 25) float32 labels for `--camera`: 'fixed' (frontal) or 'orbit' (one orbit over
    the clip)."""
    if kind == "fixed":
        return np.repeat(frontal_label()[None], num_frames, axis=0)
    if kind == "orbit":
        return orbit_labels(num_frames)
    raise ValueError(f"camera must be 'fixed' or 'orbit', got {kind!r}")
