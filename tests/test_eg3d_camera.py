"""`look_at_eg3d_label` against EG3D's LookAtPoseSampler written out here, and a real FFHQ label."""
import math

import numpy as np
import pytest

from rasterizer.types import Camera, look_at_eg3d_label

# One label of EG3D's FFHQ dataset.json (a near-frontal photo), as distributed with EG3D's
# preprocessed FFHQ and quoted by inversion projects built on it.
FFHQ_LABEL = np.array([
    0.9999064803123474, -0.006213949993252754, -0.012183905579149723, 0.028693876930960493,
    -0.0060052573680877686, -0.9998359084129333, 0.017090922221541405, -0.04020780808014847,
    -0.012288108468055725, -0.017016155645251274, -0.9997797012329102, 2.6995481091464293,
    0.0, 0.0, 0.0, 1.0, 4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0])


def eg3d_look_at(h, v, lookat, radius):
    """EG3D's camera_utils.LookAtPoseSampler.sample + create_cam2world_matrix, in numpy,
    line by line (stddev 0, batch 1)."""
    v = min(max(v, 1e-5), math.pi - 1e-5)
    theta = h
    v = v / math.pi
    phi = math.acos(1 - 2 * v)
    origin = np.array([radius * math.sin(phi) * math.cos(math.pi - theta),
                       radius * math.cos(phi),
                       radius * math.sin(phi) * math.sin(math.pi - theta)])
    forward = np.asarray(lookat, float) - origin
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 1.0, 0.0])
    right = -np.cross(up, forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    up /= np.linalg.norm(up)
    rotation = np.eye(4)
    rotation[:3, :3] = np.stack([right, up, forward], axis=-1)
    translation = np.eye(4)
    translation[:3, 3] = origin
    return translation @ rotation


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (0.0, 0.2), (0.3, -0.1), (-0.7, 0.35),
                                       (1.2, -0.5)])
def test_matches_eg3d_look_at_pose_sampler(yaw, pitch):
    label = look_at_eg3d_label(yaw, pitch)
    expected = eg3d_look_at(math.pi / 2 + yaw, math.pi / 2 + pitch, (0.0, 0.0, 0.2), 2.7)
    np.testing.assert_allclose(label[:16].reshape(4, 4), expected, atol=1e-6)
    np.testing.assert_allclose(label[16:], [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], atol=0)
    # EG3D's camera origin lies on a sphere around the world origin, not around the look-at.
    assert np.linalg.norm(label[[3, 7, 11]]) == pytest.approx(2.7, abs=1e-6)


def test_values_eg3d_gives():
    frontal = look_at_eg3d_label(0.0, 0.0)
    np.testing.assert_allclose(frontal[[3, 7, 11]], [0.0, 0.0, 2.7], atol=1e-6)
    # v = π/2 + 0.2 goes through φ = arccos(1 − 2v/π): t_y = 2.7·cos φ = −2.7·0.4/π.
    assert look_at_eg3d_label(0.0, 0.2)[7] == pytest.approx(-2.7 * 0.4 / math.pi, abs=1e-6)
    assert look_at_eg3d_label(0.0, 0.2)[7] == pytest.approx(-0.3438, abs=1e-4)


def test_real_ffhq_label_lies_on_the_same_sphere_and_axes():
    cam2world = FFHQ_LABEL[:16].reshape(4, 4)
    origin = cam2world[:3, 3]
    assert np.linalg.norm(origin) == pytest.approx(2.7, abs=1e-3)       # 2.6999...
    # The look-at label with the FFHQ camera's own direction reproduces its position and
    # its axes (FFHQ's pose also has a small roll, so the axes agree to about a degree).
    yaw = math.atan2(origin[0], origin[2])
    phi = math.acos(origin[1] / np.linalg.norm(origin))
    pitch = math.pi * (1 - math.cos(phi)) / 2 - math.pi / 2              # inverse of φ(v)
    label = look_at_eg3d_label(yaw, pitch)
    np.testing.assert_allclose(label[[3, 7, 11]], origin, atol=2e-3)
    ours = label[:16].reshape(4, 4)[:3, :3]
    cos = np.clip(np.sum(ours * cam2world[:3, :3], axis=0), -1, 1)
    assert np.degrees(np.arccos(cos)).max() < 1.5
    np.testing.assert_allclose(label[16:], FFHQ_LABEL[16:], atol=1e-6)
    # And both put the world origin's neighbourhood (the face) at the image centre.
    for lab in (label, FFHQ_LABEL.astype(np.float32)):
        camera = Camera.from_eg3d(lab, 512)
        p = np.asarray(camera.world_to_camera) @ np.array([0.0, 0.0, 0.2, 1.0])
        k = np.asarray(camera.intrinsics)
        u = k[0, 0] * p[0] / p[2] + k[0, 2]
        v = k[1, 1] * p[1] / p[2] + k[1, 2]
        assert abs(u - 256) < 6 and abs(v - 256) < 6
