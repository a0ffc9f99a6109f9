"""Rasterizer gradients in the regimes the other scenes miss, for both backends.

The finite-difference scenes of `test_rasterizer.py` / `test_rasterizer_triton.py` hold 9 to 20
Gaussians, never an α clamped at 0.99 on the jax side, and square cameras built by hand. Here:

- compositing (screen space) against the float64 per-pixel reference of
  `test_rasterizer_triton.py` (`reference_composite`: every pixel walks its tile list; its
  discrete decisions — skip, stop, clamp — are frozen so that central differences measure the
  derivative of the smooth piece the analytic gradient belongs to), for the JAX backend in
  float64 and the Triton kernels (interpreted on CPU) in float32:
    * α at the 0.99 clamp (broad opaque Gaussians): zero gradient through the clamped pixels;
    * α just below 1/255 (faint Gaussians whose footprint straddles the skip threshold);
    * the transmittance stop (T < 1e-4) falling in the second chunk of a list;
    * more Gaussians in one tile (80) than one JAX chunk (64) or one Triton batch (32) holds,
      so T and the "everything behind" sums are carried across chunks;
- `render` end to end on a non-square image whose camera comes from an EG3D label with
  fx ≠ fy and an off-centre principal point, against `naive_render` (float64) with the K in
  pixels written out by hand, values and float64 finite-difference gradients, both backends.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import test_rasterizer_triton as TT
from rasterizer import Camera, Gaussians
from rasterizer.composite_jax import CHUNK_SIZE, composite_jax
from rasterizer.composite_triton import DEFAULT_GAUSSIAN_BATCH
from rasterizer.render import render
from rasterizer.types import look_at_eg3d_label
from test_rasterizer import naive_render, naive_screen_space

FIELDS = TT.FIELDS


# ----------------------------------------------------------------------------------------
# Screen-space scenes
# ----------------------------------------------------------------------------------------

def isotropic_conic(sigma):
    return [1.0 / sigma**2, 0.0, 1.0 / sigma**2]


def clamp_and_faint_scene():
    """24 × 16 pixels (two tiles), 12 Gaussians: random ones, two broad opaque ones (α clamped
    at 0.99 over ~25 pixels each), and three faint ones whose α is 0.0046 at their centre
    pixel, above 1/255 at the 4 nearest pixels and 0.0039 (just below 1/255 = 0.00392) at the
    4 diagonal ones."""
    width, height = 24, 16
    scene = TT.random_scene(40, 1, 12, 2, width, height, opacity=(0.2, 0.8), sigma=(1.5, 5.0))
    # Opaque and broad (σ = 20 px): α = min(0.99, e^{-r²/800}) is clamped for r < 2.8 px.
    # One in the middle of the depth range (others in front and behind it), one at the back.
    for index, mean, depth in ((0, (8.5, 7.5), 2.5), (1, (17.5, 9.5), 4.9)):
        scene["means2d"][0, index] = mean
        scene["conics"][0, index] = isotropic_conic(20.0)
        scene["opacities"][0, index] = 1.0
        scene["depths"][0, index] = depth
    # Faint: o = 0.0046 and e^{-1/σ²} = 0.0039 / 0.0046 at the diagonal neighbours.
    inv_sigma_sq = -np.log(0.0039 / 0.0046)
    for index, mean in ((2, (3.5, 3.5)), (3, (12.5, 12.5)), (4, (20.5, 4.5))):
        scene["means2d"][0, index] = mean
        scene["conics"][0, index] = [inv_sigma_sq, 0.0, inv_sigma_sq]
        scene["opacities"][0, index] = 0.0046
        scene["depths"][0, index] = 1.1 + 0.1 * index   # in front: nothing hides them
    return scene, width, height


def long_list_scene():
    """16 × 16 pixels (one tile), 80 Gaussians on it, o ~ 0.1..0.4: the list spans two JAX
    chunks (64) and three Triton batches (32); T falls below 1e-4 inside the second chunk at
    some pixels and never at others."""
    width, height = 16, 16
    scene = TT.random_scene(41, 1, 80, 3, width, height, opacity=(0.1, 0.4), sigma=(2.5, 7.0),
                            margin=-2.0)
    return scene, width, height


def decisions_stable(scene, ids, ranges, width, height):
    """The reference's discrete decisions are unchanged by a 1e-5 relative perturbation of
    every input, so float32 rounding cannot decide them differently (no α within 1e-5 of a
    threshold, no T within 1e-5 of the stop)."""
    _, base = TT.reference_composite(scene, ids, ranges, width, height)
    rng = np.random.default_rng(0)
    for _ in range(2):
        shaken = {k: v * (1 + 1e-5 * rng.choice([-1.0, 1.0], v.shape)) for k, v in scene.items()}
        _, other = TT.reference_composite(shaken, ids, ranges, width, height)
        for steps_a, steps_b in zip(base, other):
            for a, b in zip(steps_a, steps_b):
                if not all(np.array_equal(x, y) for x, y in zip(a, b)):
                    return False
    return True


def jax_values_and_grads(scene, ids, ranges, width, height, weights):
    """composite_jax in float64: outputs and the VJP with `weights` per field."""
    with jax.enable_x64(True):
        fields = tuple(jnp.asarray(scene[k], jnp.float64) for k in FIELDS)
        values, vjp = jax.vjp(
            lambda *f: composite_jax(*f, jnp.asarray(ids), jnp.asarray(ranges), width, height),
            *fields)
        assert values[0].dtype == jnp.float64
        grads = vjp(tuple(jnp.asarray(w, jnp.float64) for w in weights))
        return [np.asarray(v) for v in values], dict(zip(FIELDS, map(np.asarray, grads)))


def _counts(decisions):
    """Per list position: pixels composited, stopped, clamped-and-composited."""
    steps = decisions[0]
    composited = np.array([(c & ~s).sum() for c, s, _ in steps])
    stopped = np.array([s.sum() for _, s, _ in steps])
    clamped = np.array([(c & ~s & k).sum() for c, s, k in steps])
    return composited, stopped, clamped


@pytest.fixture(scope="module")
def scenes():
    """Each scene with its bins, weights, float64 reference outputs and finite differences."""
    out = {}
    for name, make in (("clamp_and_faint", clamp_and_faint_scene), ("long_list", long_list_scene)):
        scene, width, height = make()
        ids, ranges = TT.bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width,
                                   height)
        channels = scene["colors"].shape[-1]
        weights = TT.loss_weights(7, 1, width, height, channels)
        expected, decisions = TT.reference_composite(scene, ids, ranges, width, height)
        fd = TT.finite_difference_grads(scene, ids, ranges, width, height, weights)
        out[name] = dict(scene=scene, width=width, height=height, ids=ids, ranges=ranges,
                         weights=weights, expected=expected, decisions=decisions, fd=fd)
    return out


def test_scenes_exercise_the_regimes(scenes):
    s = scenes["clamp_and_faint"]
    composited, stopped, clamped = _counts(s["decisions"])
    assert clamped.sum() >= 30, clamped                 # α at the clamp, over many pixels
    # The faint Gaussians: composited at exactly their centre and 4 nearest pixels.
    scene, width = s["scene"], s["width"]
    p = {k: np.asarray(v, np.float64) for k, v in scene.items()}
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(s["height"]) + 0.5)
    for index in (2, 3, 4):
        dx, dy = cols - p["means2d"][0, index, 0], rows - p["means2d"][0, index, 1]
        alpha = p["opacities"][0, index] * np.exp(-0.5 * p["conics"][0, index, 0] * (dx**2 + dy**2))
        assert ((alpha >= 1 / 255).sum(), ((alpha < 1 / 255) & (alpha > 0.0038)).sum()) == (5, 4)
    assert decisions_stable(s["scene"], s["ids"], s["ranges"], width, s["height"])
    # The clamp matters: letting the gradient through the clamped pixels (α = o·e^power there,
    # as if there were no clamp) changes the opaque Gaussians' opacity gradients by far more
    # than the tolerances below.
    unclamped = [[(c, st, np.zeros_like(k)) for c, st, k in steps] for steps in s["decisions"]]

    def loss(opacities):
        outputs, _ = TT.reference_composite(dict(p, opacities=opacities), s["ids"], s["ranges"],
                                            width, s["height"], unclamped)
        return sum(np.sum(w * o) for w, o in zip(s["weights"], outputs))
    scale = np.abs(s["fd"]["opacities"]).max()
    for index in (0, 1):
        plus, minus = p["opacities"].copy(), p["opacities"].copy()
        plus[0, index] += 1e-6
        minus[0, index] -= 1e-6
        through_clamp = (loss(plus) - loss(minus)) / 2e-6
        assert abs(through_clamp - s["fd"]["opacities"][0, index]) > 1e-2 * scale, index

    s = scenes["long_list"]
    assert int(s["ranges"][0, 0, 1] - s["ranges"][0, 0, 0]) == 80 > CHUNK_SIZE
    assert 80 > 2 * DEFAULT_GAUSSIAN_BATCH
    composited, stopped, clamped = _counts(s["decisions"])
    assert composited[CHUNK_SIZE:].sum() > 500           # the second chunk contributes
    assert stopped[CHUNK_SIZE:].sum() >= 30              # the stop falls in the second chunk
    assert stopped[:CHUNK_SIZE].sum() >= 10              # ... or in the first
    assert 50 <= stopped.sum() <= 200                    # ... at some pixels, not all
    assert decisions_stable(s["scene"], s["ids"], s["ranges"], s["width"], s["height"])


@pytest.mark.parametrize("name", ["clamp_and_faint", "long_list"])
def test_jax_backend_float64_matches_reference(scenes, name):
    s = scenes[name]
    values, grads = jax_values_and_grads(s["scene"], s["ids"], s["ranges"], s["width"],
                                         s["height"], s["weights"])
    for label, a, e in zip(("color", "alpha", "depth"), values, s["expected"]):
        np.testing.assert_allclose(a, e, atol=1e-12, rtol=1e-12, err_msg=label)
    # float64 central differences (ε = 1e-6): truncation ~1e-12, rounding ~1e-10 relative.
    TT.assert_grads_close(grads, s["fd"], rtol=1e-7, label=f"jax float64 {name}")


@pytest.mark.parametrize("name", ["clamp_and_faint", "long_list"])
def test_triton_backend_matches_reference(scenes, name):
    s = scenes[name]
    values, grads = TT.triton_value_and_grads(s["scene"], s["ids"], s["ranges"], s["width"],
                                              s["height"], s["weights"])
    for label, a, e in zip(("color", "alpha", "depth"), values, s["expected"]):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=0, err_msg=label)
    TT.assert_grads_close(grads, s["fd"], rtol=1e-4, label=f"triton {name}")


# ----------------------------------------------------------------------------------------
# render(): a non-square image, EG3D intrinsics with fx ≠ fy and an off-centre point
# ----------------------------------------------------------------------------------------

WIDTH, HEIGHT = 24, 16
FX, FY, CX, CY = 2.1, 1.7, 0.43, 0.58   # EG3D's normalised intrinsics (by width / height)


def eg3d_label():
    label = look_at_eg3d_label(0.15, -0.1)
    label[16:] = [FX, 0, CX, 0, FY, CY, 0, 0, 1]
    return label


def hand_intrinsics():
    # fx, cx scale with the width (24 px); fy, cy with the height (16 px).
    return np.array([[50.4, 0.0, 10.32], [0.0, 27.2, 9.28], [0.0, 0.0, 1.0]])


def camera_scene(seed=3, num=12):
    rng = np.random.default_rng(seed)
    return dict(
        means=rng.uniform(-0.35, 0.35, (num, 3)) * [1.0, 0.6, 0.5] + [0.0, 0.0, 0.2],
        scales=rng.uniform(0.04, 0.12, (num, 3)),
        quats=rng.normal(size=(num, 4)),
        opacities=rng.uniform(0.3, 0.9, num),
        colors=rng.uniform(0, 1, (num, 3)))


def test_eg3d_intrinsics_scale_with_width_and_height():
    camera = Camera.from_eg3d(eg3d_label(), WIDTH, HEIGHT)
    assert (camera.width, camera.height) == (WIDTH, HEIGHT)
    np.testing.assert_allclose(np.asarray(camera.intrinsics), hand_intrinsics(), rtol=1e-6)
    cam2world = eg3d_label()[:16].reshape(4, 4).astype(np.float64)
    np.testing.assert_allclose(np.asarray(camera.world_to_camera), np.linalg.inv(cam2world),
                               atol=1e-5)


def _naive(params, background):
    w2c = np.linalg.inv(eg3d_label()[:16].reshape(4, 4).astype(np.float64))
    return naive_render(params["means"], params["scales"], params["quats"], params["opacities"],
                        params["colors"], w2c, hand_intrinsics(), WIDTH, HEIGHT, background)


@pytest.fixture(scope="module")
def camera_reference():
    """naive_render's outputs and float64 central differences of a weighted sum of them, with
    the hand-written K, for every entry of every Gaussian field."""
    params = camera_scene()
    background = np.array([0.2, 0.5, 0.9])
    rng = np.random.default_rng(4)
    weights = [rng.normal(size=(HEIGHT, WIDTH, 3)), rng.normal(size=(HEIGHT, WIDTH)),
               rng.normal(size=(HEIGHT, WIDTH))]

    def loss(p):
        return sum(np.sum(w * o) for w, o in zip(weights, _naive(p, background)[:3]))

    eps, fd = 1e-6, {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            grad[index] = (loss(plus) - loss(minus)) / (2 * eps)
        fd[name] = grad
    return params, background, weights, _naive(params, background), fd


@pytest.mark.parametrize("backend", ["jax", "triton"])
def test_render_non_square_off_centre_eg3d_camera(camera_reference, backend):
    params, background, weights, expected, fd = camera_reference
    color, alpha, depth, _ = expected
    assert alpha.max() > 0.9 and (alpha < 0.01).mean() > 0.1   # covered, with margins
    # The image is not symmetric: a width/height swap or a centred principal point differs.
    camera = Camera.from_eg3d(eg3d_label(), WIDTH, HEIGHT)
    gaussians = Gaussians(*(jnp.asarray(params[k], jnp.float32) for k in
                            ("means", "scales", "quats", "opacities", "colors")))

    def loss(g):
        out = render(g, camera, jnp.asarray(background, jnp.float32), backend=backend)
        return sum(jnp.sum(o * w) for o, w in zip(out[:3], weights)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(gaussians)
    assert out.color.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(out.color, color, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out.alpha, alpha, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out.depth, depth, atol=2e-4, rtol=1e-4)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        analytic, numeric = np.asarray(getattr(grads, name), np.float64), fd[name]
        scale = np.abs(numeric).max()
        assert scale > 0, name
        error = np.abs(analytic - numeric).max()
        # float32 renders: measured ≤ 2e-6 of the largest gradient of the field.
        assert error <= 2e-5 * scale, f"{backend} d/d{name}: error {error:.3g} of {scale:.3g}"


# ----------------------------------------------------------------------------------------
# Projection of a huge flat Gaussian
# ----------------------------------------------------------------------------------------

def test_huge_flat_gaussian_keeps_an_exact_determinant():
    """A needle 10^4 units long and 10^-4 thick, lying in the image plane at 30°: its 2-D
    covariance has eigenvalues ~10^12 px² and the 0.3 px² dilation, where a c − b² cancels to
    float32 noise (checked below). The projection's determinant (Cauchy–Binet on J W R S) keeps
    it valid, and its conic matches a float64 inverse of the covariance written out here."""
    from rasterizer import projection
    label = look_at_eg3d_label(0.0, 0.0)
    camera = Camera.from_eg3d(label[None], 64)
    angle = np.deg2rad(30.0)
    quat = np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])   # about the view axis
    scales = np.array([1e4, 1e-4, 1e-4])
    out = projection.project(jnp.zeros((1, 1, 3), jnp.float32),
                             jnp.asarray(scales, jnp.float32)[None, None],
                             jnp.asarray(quat, jnp.float32)[None, None],
                             camera.world_to_camera, camera.intrinsics, 64, 64)

    _, cov = naive_screen_space(np.zeros(3), scales, quat, camera.world_to_camera[0],
                                camera.intrinsics[0], 64, 64)
    det = np.linalg.det(cov)
    inverse = np.linalg.inv(cov)
    assert cov.max() > 1e11 and 0.1 < det / cov.max() < 1.0     # eigenvalues ~1e12 and ~0.3
    a32, b32, c32 = (np.float32(v) for v in (cov[0, 0], cov[0, 1], cov[1, 1]))
    naive = float(a32 * c32 - b32 * b32)
    assert abs(naive - det) > 0.5 * det            # the old formula's determinant is noise

    # (within 1 px: the float32 and float64 ceilings of ~3e6 px may straddle an integer)
    assert abs(int(out.radii[0, 0]) - np.ceil(3.0 * np.sqrt(np.linalg.eigvalsh(cov).max()))) <= 1
    want = np.array([inverse[0, 0], inverse[0, 1], inverse[1, 1]])
    np.testing.assert_allclose(np.asarray(out.conics[0, 0], np.float64), want,
                               rtol=0, atol=1e-4 * np.abs(want).max())
