"""Decoding of non-zero raw UV features, value by value, against formulas written out here.

`test_binding.py` checks the decoding at raw 0 (scale γs, opacity and colour 0.5) and the
offsets and rotations; a change of the activations away from 0 (e.g. exp(0.5·raw + ln γs))
passed it. Here every channel gets non-zero raw values, on the template head (rest pose and a
posed one), and each decoded field is compared with (Sec. 2.1, DESIGN.md "Decoding"):

  μ = p + 0.25·C·tanh(o)   p the barycentric surface point, C = [x | y | z] the consecutive
                           frame: x = normalize(Σ bary·n), y = normalize(up × x), z = x × y
  R = C·R(q/‖q‖)           (the decoded quaternion's rotation matrix)
  s = exp(raw + ln γs)     with an explicit ln γs (float, per texel, and per map in a head)
  opacity = 1/(1 + e^−σ),  colour = 1/(1 + e^−c)

all in float64 numpy, plus a few values typed in by hand.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d import binding as B
from reta3d import flame

RES, MOUTH_RES = 16, 8
LOG_GAMMA_S = -3.7   # not the paper's −5.5: a decoder that ignores its ln γs argument fails


@pytest.fixture(scope="module")
def head():
    model = flame.load()
    head_binding = B.HeadBinding.from_model(model, RES, MOUTH_RES)
    params = {"shape": np.full((2, 3), 0.3, np.float32),
              "expression": np.array([[0.0, 0.0], [0.8, -0.5]], np.float32),
              "global_pose": np.array([[0, 0, 0], [0.1, -0.4, 0.05]], np.float32),
              "neck_pose": np.array([[0, 0, 0], [0.05, 0.1, 0]], np.float32),
              "jaw_pose": np.array([[0, 0, 0], [0.2, 0, 0]], np.float32)}
    posed = jax.jit(lambda p: B.pose_head(model, p, 2))(params)
    return model, head_binding, jax.device_get(posed)


def quat_to_matrix(q):
    """(..., 4) wxyz → (..., 3, 3), float64, normalising q."""
    q = np.asarray(q, np.float64)
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def surface_and_frames(posed, faces, texel_binding):
    """p (B, M, 3) and consecutive frames C (B, M, 3, 3) (axes as columns), float64."""
    corners = np.asarray(faces)[texel_binding.face_index]                  # (M, 3)
    bary = texel_binding.bary.astype(np.float64)
    v = np.asarray(posed.vertices_world, np.float64)
    n = np.asarray(posed.normals, np.float64)
    p = np.einsum("mk,bmkd->bmd", bary, v[:, corners])
    x = np.einsum("mk,bmkd->bmd", bary, n[:, corners])
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    up = np.asarray(posed.up, np.float64)
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    y = np.cross(up[:, None, :], x)
    cross_sq = np.sum(y * y, -1)
    with np.errstate(invalid="ignore", divide="ignore"):  # n ∥ up: masked out by callers
        y /= np.linalg.norm(y, axis=-1, keepdims=True)
    z = np.cross(x, y)
    return p, np.stack([x, y, z], -1), cross_sq


def random_features(rng, shape):
    """Raw channels well away from 0: offsets ±(0.2..1.5), scales ±(0.3..2), a random
    quaternion, colour and opacity logits ±(0.3..3)."""
    def away(lo, hi, size):
        return rng.uniform(lo, hi, size) * rng.choice([-1.0, 1.0], size)
    f = np.empty(shape + (14,), np.float32)
    f[..., 0:3] = away(0.2, 1.5, shape + (3,))
    f[..., 3:6] = away(0.3, 2.0, shape + (3,))
    f[..., 6:10] = rng.normal(size=shape + (4,))
    f[..., 10:14] = away(0.3, 3.0, shape + (4,))
    return f


@pytest.mark.parametrize("log_gamma_s", ["float", "per_texel"])
def test_decode_texels_every_channel_matches_formulas(head, log_gamma_s):
    model, head_binding, posed = head
    tb = head_binding.face
    m = tb.num_texels
    rng = np.random.default_rng(0)
    feats = random_features(rng, (2, m))
    lg = LOG_GAMMA_S if log_gamma_s == "float" else rng.uniform(-5.0, -2.0, m)
    decode = jax.jit(lambda f, v, n, up, lg: B.decode_texels(
        f, tb, v, n, up, model.faces, kind="consecutive", log_gamma_s=lg))
    gaussians, aux = jax.device_get(decode(feats, posed.vertices_world, posed.normals, posed.up,
                                           jnp.asarray(lg, jnp.float32)))
    raw = feats.astype(np.float64)
    p, frames, cross_sq = surface_and_frames(posed, model.faces, tb)
    regular = cross_sq > 1e-4   # away from the fallback where the normal is parallel to up
    assert regular.mean() > 0.95

    lg_col = np.asarray(lg, np.float64)[..., None]
    np.testing.assert_allclose(gaussians.scales, np.exp(raw[..., 3:6] + lg_col), rtol=2e-6)
    np.testing.assert_allclose(gaussians.opacities, sigmoid(raw[..., 13]), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(gaussians.colors, sigmoid(raw[..., 10:13]), rtol=2e-6, atol=1e-7)
    # float32 FLAME + frames: ~1e-6 of the head's size (~1 world unit) in positions.
    means = p + 0.25 * np.einsum("bmij,bmj->bmi", frames, np.tanh(raw[..., 0:3]))
    np.testing.assert_allclose(gaussians.means[regular], means[regular], atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(gaussians.quats, axis=-1), 1.0, atol=1e-6)
    world = frames @ quat_to_matrix(raw[..., 6:10])
    np.testing.assert_allclose(quat_to_matrix(gaussians.quats)[regular], world[regular],
                               atol=2e-5)
    # The raw channels are passed through in the documented order.
    np.testing.assert_array_equal(aux["raw"]["scale"], feats[..., 3:6])
    np.testing.assert_array_equal(aux["raw"]["offset"], feats[..., 0:3])


def test_decode_hand_typed_values(head):
    """A few activations typed in by hand (computed once with a calculator), so that a
    formula mistyped the same way here and in the library still fails."""
    model, head_binding, posed = head
    tb = head_binding.face
    feats = np.zeros((2, tb.num_texels, 14), np.float32)
    feats[..., 6] = 1.0
    feats[:, 7, 3:6] = [0.5, -1.0, 2.0]          # raw scale
    feats[:, 7, 13] = 1.5                        # raw opacity
    feats[:, 7, 10:13] = [-2.0, 0.0, 0.25]       # raw colour
    gaussians, _ = jax.device_get(jax.jit(lambda f, v, n, up: B.decode_texels(
        f, tb, v, n, up, model.faces, log_gamma_s=-4.0))(
            feats, posed.vertices_world, posed.normals, posed.up))
    # exp(−3.5), exp(−5), exp(−2)
    np.testing.assert_allclose(gaussians.scales[:, 7], [[0.030197383, 0.006737947,
                                                         0.135335283]] * 2, rtol=1e-6)
    np.testing.assert_allclose(gaussians.opacities[:, 7], 0.817574476, rtol=1e-6)
    np.testing.assert_allclose(gaussians.colors[:, 7], [[0.119202922, 0.5, 0.562176501]] * 2,
                               rtol=1e-6)
    # Raw 0 elsewhere: exactly the target scale e^−4.
    np.testing.assert_allclose(gaussians.scales[:, 8], 0.018315639, rtol=1e-6)


def test_head_decodes_each_map_with_its_own_gamma(head):
    """decode_head passes the HeadBinding's ln γs: the face map's to the face Gaussians,
    the mouth patch's to the mouth ones (face first, then mouth, as `log_gamma_s` lists)."""
    model, head_binding, posed = head
    hb = dataclasses.replace(head_binding, face_log_gamma_s=-3.25, mouth_log_gamma_s=-4.5)
    np.testing.assert_array_equal(
        hb.log_gamma_s, np.concatenate([np.full(hb.num_face, -3.25, np.float32),
                                        np.full(hb.num_mouth, -4.5, np.float32)]))
    rng = np.random.default_rng(1)
    face = random_features(rng, (2, RES, RES))
    mouth = random_features(rng, (2, MOUTH_RES, MOUTH_RES))
    gaussians, aux = jax.device_get(jax.jit(lambda f, m, posed: B.decode_head(
        hb, model.faces, f, m, posed))(face, mouth, posed))
    raw_scale = np.concatenate([face.reshape(2, -1, 14)[:, hb.face.flat_index, 3:6],
                                mouth.reshape(2, -1, 14)[:, hb.mouth.flat_index, 3:6]], 1)
    np.testing.assert_array_equal(aux["scale_raw"], raw_scale)
    expected = np.exp(raw_scale.astype(np.float64) + hb.log_gamma_s[:, None].astype(np.float64))
    np.testing.assert_allclose(gaussians.scales, expected, rtol=2e-6)
    nf = hb.num_face
    np.testing.assert_allclose(gaussians.scales[:, :nf],
                               np.exp(raw_scale[:, :nf].astype(np.float64) - 3.25), rtol=2e-6)
    np.testing.assert_allclose(gaussians.scales[:, nf:],
                               np.exp(raw_scale[:, nf:].astype(np.float64) - 4.5), rtol=2e-6)


def test_measured_gamma_is_the_log_texel_spacing(head):
    """from_model's ln γs is the log of the measured median spacing of adjacent texels,
    computed here from the rest mesh independently."""
    model, head_binding, _ = head
    rest = np.asarray(model.to_world(jnp.asarray(model.v_template)[None]), np.float64)[0]
    faces = np.asarray(model.faces)
    for tb, value in ((head_binding.face, head_binding.face_log_gamma_s),
                      (head_binding.mouth, head_binding.mouth_log_gamma_s)):
        points = np.einsum("mk,mkd->md", tb.bary.astype(np.float64), rest[faces[tb.face_index]])
        where = {tuple(rc): i for i, rc in enumerate(tb.texel_rc)}
        distances = [np.linalg.norm(points[i] - points[where[(r + dr, c + dc)]])
                     for (r, c), i in where.items() for dr, dc in ((0, 1), (1, 0))
                     if (r + dr, c + dc) in where]
        assert value == pytest.approx(math.log(np.median(distances)), abs=1e-9)
    fixed = B.HeadBinding.from_model(model, RES, MOUTH_RES, log_gamma_s=-5.5)
    assert fixed.face_log_gamma_s == fixed.mouth_log_gamma_s == -5.5
