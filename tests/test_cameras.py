"""Camera paths of the sampling and animation scripts (reta3d/cameras.py)."""
import numpy as np
import pytest

from rasterizer.types import look_at_eg3d_label
from reta3d import cameras


def test_orbit_follows_eg3d_gen_videos_path():
    labels = cameras.orbit_labels(8, yaw_range=0.35, pitch_range=0.15)
    assert labels.shape == (8, 25) and labels.dtype == np.float32
    # t = i/8: yaw = 0.35 sin(2πt), pitch = 0.15 cos(2πt)
    np.testing.assert_allclose(labels[0], look_at_eg3d_label(0.0, 0.15), atol=1e-6)
    np.testing.assert_allclose(labels[2], look_at_eg3d_label(0.35, 0.0), atol=1e-6)
    np.testing.assert_allclose(labels[6], look_at_eg3d_label(-0.35, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="at least one frame"):
        cameras.orbit_labels(0)


def test_view_grid_and_fixed_path():
    grid = cameras.view_grid_labels([-0.3, 0.0, 0.3], [0.0, 0.2])
    assert grid.shape == (4, 25)             # (0, 0) is not repeated by the pitch sweep
    np.testing.assert_allclose(grid[3], look_at_eg3d_label(0.0, 0.2), atol=1e-6)
    fixed = cameras.camera_path("fixed", 3)
    np.testing.assert_array_equal(fixed, np.repeat(cameras.frontal_label()[None], 3, 0))
    np.testing.assert_array_equal(cameras.camera_path("orbit", 5), cameras.orbit_labels(5))
    with pytest.raises(ValueError, match="'fixed' or 'orbit'"):
        cameras.camera_path("dolly", 3)


def test_conditioning_labels():
    class Config:
        class model:
            c_dim = 25
    labels = cameras.conditioning_labels(Config, 2)
    np.testing.assert_array_equal(labels, np.repeat(cameras.frontal_label()[None], 2, 0))
    Config.model.c_dim = 0
    assert cameras.conditioning_labels(Config, 2) is None
