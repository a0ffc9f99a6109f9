"""Rasterizer (jax and cpu backends) against an independent float64 numpy renderer and hand
cases.

Shapes are shared between tests on purpose: every distinct (B, N, H, W, C, capacity) costs
a jit compile of the whole renderer, and CI time is mostly compile time.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rasterizer import Camera, Gaussians, projection
from rasterizer.binning import TILE_SIZE, bin_gaussians, saturating_cumsum
from rasterizer.render import render

@pytest.fixture(params=["jax", "cpu"])
def backend(request):
    """The two CPU compositors: pure JAX, and C++ (`composite_cpu.cc`, skipped with the reason
    where it cannot be built, e.g. no C++ compiler)."""
    if request.param == "cpu":
        from rasterizer.composite_cpu import cpu_backend_problem
        problem = cpu_backend_problem()
        if problem is not None:
            pytest.skip(problem)
    return request.param


WIDTH, HEIGHT = 37, 29  # not multiples of 16: 3 x 2 tiles, partial tiles on both axes
FOCAL = 45.0


# ----------------------------------------------------------------------------------------------
# Independent reference: every pixel against every Gaussian in depth order, numpy float64.
# ----------------------------------------------------------------------------------------------
def naive_screen_space(mean, scale, quat, world_to_camera, intrinsics, width, height):
    """One Gaussian, float64 numpy: (camera-space centre t (3,), dilated 2-D covariance (2, 2)),
    or None when the centre is not finite or z <= 0.2. The reference's EWA projection written
    out: R from the normalised quaternion, Sigma = R S^2 R^T, J at the FOV-clamped x/z, y/z."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    mean, scale, quat, world_to_camera, intrinsics = map(
        f64, (mean, scale, quat, world_to_camera, intrinsics))
    fx, fy = intrinsics[0, 0], intrinsics[1, 1]
    w, x, y, z = quat / np.linalg.norm(quat)
    rot = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    cov = rot @ np.diag(scale ** 2) @ rot.T
    view = world_to_camera[:3, :3]
    t = view @ mean + world_to_camera[:3, 3]
    if not np.all(np.isfinite(t)) or t[2] <= 0.2:
        return None
    limx, limy = 1.3 * width / (2 * fx), 1.3 * height / (2 * fy)
    tx = np.clip(t[0] / t[2], -limx, limx) * t[2]
    ty = np.clip(t[1] / t[2], -limy, limy) * t[2]
    jac = np.array([[fx / t[2], 0, -fx * tx / t[2] ** 2], [0, fy / t[2], -fy * ty / t[2] ** 2]])
    return t, jac @ view @ cov @ view.T @ jac.T + 0.3 * np.eye(2)


def naive_render(means, scales, quats, opacities, colors, world_to_camera, intrinsics, width,
                 height, background):
    """One image, all inputs numpy; returns color (H, W, C), alpha (H, W), depth (H, W) and
    the mask of pixels whose transmittance stop fired (H, W)."""
    f64 = lambda x: np.asarray(x, np.float64)
    means, scales, quats, opacities, colors = map(f64, (means, scales, quats, opacities, colors))
    world_to_camera, intrinsics, background = map(f64, (world_to_camera, intrinsics, background))
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    tiles_x = -(-width // TILE_SIZE)
    tiles_y = -(-height // TILE_SIZE)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    px, py = cols + 0.5, rows + 0.5

    gaussians = []
    for n in range(len(means)):
        projected = naive_screen_space(means[n], scales[n], quats[n], world_to_camera, intrinsics,
                                       width, height)
        if projected is None:
            continue
        t, cov2 = projected
        det = np.linalg.det(cov2)
        if not det > 0:
            continue
        mid = 0.5 * (cov2[0, 0] + cov2[1, 1])
        radius = np.ceil(3 * np.sqrt(mid + np.sqrt(max(0.1, mid * mid - det))))
        mu = np.array([fx * t[0] / t[2] + cx, fy * t[1] / t[2] + cy])
        if (mu[0] + radius <= 0 or mu[0] - radius >= width or mu[1] + radius <= 0
                or mu[1] - radius >= height):
            continue
        if not (np.isfinite(opacities[n]) and np.all(np.isfinite(colors[n]))):
            continue
        x0 = np.clip(np.floor((mu[0] - radius) / 16), 0, tiles_x)
        x1 = np.clip(np.ceil((mu[0] + radius) / 16), 0, tiles_x)
        y0 = np.clip(np.floor((mu[1] - radius) / 16), 0, tiles_y)
        y1 = np.clip(np.ceil((mu[1] + radius) / 16), 0, tiles_y)
        in_rect = ((cols // 16 >= x0) & (cols // 16 < x1) & (rows // 16 >= y0)
                   & (rows // 16 < y1))
        gaussians.append((t[2], n, mu, np.linalg.inv(cov2), in_rect))

    trans = np.ones((height, width))
    color = np.zeros((height, width, colors.shape[-1]))
    depth = np.zeros((height, width))
    done = np.zeros((height, width), bool)
    for z, n, mu, conic, in_rect in sorted(gaussians, key=lambda g: (g[0], g[1])):
        dx, dy = px - mu[0], py - mu[1]
        power = -0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) - conic[0, 1] * dx * dy
        alpha = np.minimum(0.99, opacities[n] * np.exp(power))
        use = in_rect & ~done & (power <= 0) & (alpha >= 1 / 255)
        next_trans = trans * (1 - alpha)
        stop = use & (next_trans < 1e-4)
        done |= stop
        use &= ~stop
        weight = np.where(use, alpha * trans, 0.0)
        color += weight[..., None] * colors[n]
        depth += weight * z
        trans = np.where(use, next_trans, trans)
    return color + trans[..., None] * background, 1 - trans, depth, done


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
def camera_for(batch, width=WIDTH, height=HEIGHT, focal=FOCAL, cx=None, cy=None):
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    k = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], np.float32)
    # Slightly rotated, translated cameras (a different one per batch element).
    w2c = np.tile(np.eye(4, dtype=np.float32), (batch, 1, 1))
    for b in range(batch):
        angle = 0.1 + 0.05 * b
        w2c[b, :3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0],
                          [-np.sin(angle), 0, np.cos(angle)]]
        w2c[b, :3, 3] = [0.05, -0.02, 0.3]
    return Camera(jnp.asarray(w2c), jnp.asarray(np.broadcast_to(k, (batch, 3, 3))), width, height)


def random_scene(seed, batch, num, channels):
    """Gaussians spread over the view, footprints of ~1-10 px (many cross tile borders)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(2.0, 5.0, (batch, num))
    xy = rng.uniform(-0.45, 0.45, (batch, num, 2)) * z[..., None] * [WIDTH, HEIGHT] / FOCAL
    means = np.concatenate([xy, z[..., None]], -1)
    return Gaussians(
        means=jnp.asarray(means, jnp.float32),
        scales=jnp.asarray(rng.uniform(0.03, 0.35, (batch, num, 3)), jnp.float32),
        quats=jnp.asarray(rng.normal(size=(batch, num, 4)), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.5, 1.0, (batch, num)), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (batch, num, channels)), jnp.float32))


def naive_batch(gaussians, camera, background):
    outs = [naive_render(gaussians.means[b], gaussians.scales[b], gaussians.quats[b],
                         gaussians.opacities[b], gaussians.colors[b], camera.world_to_camera[b],
                         camera.intrinsics[b], camera.width, camera.height, background[b])
            for b in range(gaussians.means.shape[0])]
    return [np.stack(x) for x in zip(*outs)]


def assert_matches_naive(out, gaussians, camera, background, atol=2e-5):
    """Returns the fraction of pixels where the transmittance stop fired."""
    color, alpha, depth, stopped = naive_batch(gaussians, camera, background)
    np.testing.assert_allclose(out.color, color, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(out.alpha, alpha, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(out.depth, depth, atol=atol * 10, rtol=1e-4)
    return stopped.mean()


NUM = 160  # > 64 per tile in places: several compositing chunks per tile


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_rgb(seed, backend):
    gaussians = random_scene(seed, 2, NUM, 3)
    camera = camera_for(2)
    background = np.random.default_rng(seed + 100).uniform(0, 1, (2, 3)).astype(np.float32)
    out = render(gaussians, camera, background, backend=backend)
    assert out.color.shape == (2, HEIGHT, WIDTH, 3)
    assert out.overflow.tolist() == [0, 0]
    stopped_fraction = assert_matches_naive(out, gaussians, camera, background)
    # The scene must exercise the transmittance stop and partial coverage, or it proves little.
    assert 0.05 < stopped_fraction < 0.95 and float(out.alpha.min()) < 0.9


def test_matches_naive_14_channels(backend):
    gaussians = random_scene(7, 2, NUM, 14)
    camera = camera_for(2)
    background = np.linspace(0, 1, 28, dtype=np.float32).reshape(2, 14)
    out = render(gaussians, camera, background, backend=backend)
    assert out.color.shape == (2, HEIGHT, WIDTH, 14)
    assert_matches_naive(out, gaussians, camera, background)


# ----------------------------------------------------------------------------------------------
# Small unbatched one-channel scenes: N = 24 Gaussians, 40 x 32 image (one shared compile;
# they double as the C = 1 test)
# ----------------------------------------------------------------------------------------------
SMALL_N, SMALL_W, SMALL_H = 24, 40, 32
BEHIND = [0.0, 0.0, -5.0]  # behind the camera: culled


def small_scene(means, scales, opacities, values, focal=100.0, cx=20.5, cy=12.5):
    """Pads to SMALL_N Gaussians with culled ones; identity camera (camera = world frame)."""
    count = len(means)
    pad = SMALL_N - count
    means = np.concatenate([np.asarray(means, np.float32), np.tile(BEHIND, (pad, 1))])
    scales = np.concatenate([np.asarray(scales, np.float32), np.full((pad, 3), 0.1)])
    quats = np.tile([1.0, 0.0, 0.0, 0.0], (SMALL_N, 1))
    opacities = np.concatenate([np.asarray(opacities, np.float32), np.full(pad, 0.9)])
    colors = np.concatenate([np.asarray(values, np.float32), np.ones(pad)])[:, None]
    gaussians = Gaussians(*(jnp.asarray(x, jnp.float32)
                            for x in (means, scales, quats, opacities, colors)))
    k = jnp.asarray([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], jnp.float32)
    return gaussians, Camera(jnp.eye(4), k, SMALL_W, SMALL_H)


def test_one_isotropic_gaussian_by_hand(backend):
    """Facing the camera on the optical axis: Sigma2D = ((f s / z)^2 + 0.3) I exactly."""
    focal, z, sigma2 = 100.0, 2.0, 4.0
    scale = np.sqrt(sigma2 - 0.3) * z / focal
    opacity, value, bg = 0.8, 0.7, 0.2
    gaussians, camera = small_scene([[0, 0, z]], [[scale] * 3], [opacity], [value])
    out = render(gaussians, camera, jnp.asarray([bg]), backend=backend)
    assert out.color.shape == (SMALL_H, SMALL_W, 1)
    color, alpha, depth = np.asarray(out.color[..., 0]), np.asarray(out.alpha), np.asarray(
        out.depth)
    # The mean sits on the centre of pixel (row 12, col 20): the peak is the opacity itself.
    np.testing.assert_allclose(alpha[12, 20], opacity, rtol=1e-6)
    np.testing.assert_allclose(color[12, 20], opacity * value + (1 - opacity) * bg, rtol=1e-6)
    np.testing.assert_allclose(depth[12, 20], opacity * z, rtol=1e-6)
    # Three pixels right and one down: alpha = o exp(-(9 + 1) / (2 sigma^2)).
    expected = opacity * np.exp(-10 / (2 * sigma2))
    np.testing.assert_allclose(alpha[13, 23], expected, rtol=1e-5)
    np.testing.assert_allclose(color[13, 23], expected * value + (1 - expected) * bg, rtol=1e-5)
    np.testing.assert_allclose(depth[13, 23], expected * z, rtol=1e-5)
    # alpha < 1/255 is skipped exactly: (12, 27) would have o e^{-49/8} = 0.0018.
    assert alpha[12, 27] == 0 and color[12, 27] == np.float32(bg)
    # (12, 26) has o e^{-36/8} = 0.0089 >= 1/255: composited.
    np.testing.assert_allclose(alpha[12, 26], opacity * np.exp(-36 / 8), rtol=1e-5)
    # Exactly the pixels with alpha >= 1/255 got anything (all inside the 7-pixel radius).
    cols, rows = np.arange(SMALL_W)[None], np.arange(SMALL_H)[:, None]
    visible = opacity * np.exp(-((cols - 20) ** 2 + (rows - 12) ** 2) / (2 * sigma2)) >= 1 / 255
    np.testing.assert_array_equal(alpha > 0, visible)
    assert np.all(color[~visible] == np.float32(bg))


def test_tile_rectangle_cuts_visible_tail(backend):
    """A wide Gaussian whose 3-sigma square ends at a tile border: the next tile row gets
    nothing although alpha there would be >= 1/255 (reference 3DGS behaviour)."""
    focal, z, sigma2 = 100.0, 2.0, 100.0
    scale = np.sqrt(sigma2 - 0.3) * z / focal
    # cy = -15: radius ceil(3 sqrt(100 + 0.316)) = 31, so the square ends at y = 16 and only
    # tile row 0 (pixel rows 0..15) lists it.
    gaussians, camera = small_scene([[0, 0, z]], [[scale] * 3], [0.99], [1.0], cy=-15.0)
    out = render(gaussians, camera, backend=backend)
    alpha = np.asarray(out.alpha)
    row15 = 0.99 * np.exp(-(30.5 ** 2) / (2 * sigma2))  # ~0.0095, composited
    row16 = 0.99 * np.exp(-(31.5 ** 2) / (2 * sigma2))  # ~0.0069 >= 1/255, but outside
    assert row16 >= 1 / 255
    np.testing.assert_allclose(alpha[15, 20], row15, rtol=1e-4)
    assert np.all(alpha[16:] == 0)


def test_transmittance_stop_exact_count(backend):
    """24 Gaussians on one pixel, alpha = 0.5 each: T = 0.5^k; the 14th would bring T to
    6.1e-5 < 1e-4, so exactly 13 are composited (front to back by depth)."""
    count = 24
    depths = 2.0 + 0.1 * np.arange(count)[::-1]  # listed back to front: order comes from depth
    means = np.stack([np.zeros(count), np.zeros(count), depths], -1)
    values = np.arange(count, dtype=np.float64)
    gaussians, camera = small_scene(means, np.full((count, 3), 0.01), np.full(count, 0.5),
                                    values)
    out = render(gaussians, camera, jnp.ones(1), backend=backend)
    front_to_back = np.argsort(depths)
    weights = 0.5 ** np.arange(1, 14)  # alpha * T for the 13 composited ones
    np.testing.assert_allclose(out.alpha[12, 20], 1 - 0.5 ** 13, rtol=1e-6)
    np.testing.assert_allclose(out.color[12, 20, 0],
                               weights @ values[front_to_back[:13]] + 0.5 ** 13, rtol=1e-5)
    np.testing.assert_allclose(out.depth[12, 20], weights @ depths[front_to_back[:13]],
                               rtol=1e-5)


def test_stop_across_chunks_matches_naive(backend):
    """Long lists (> 64, several chunks) on every pixel, alpha ~ 0.1: the stop falls in the
    second chunk (0.9^k < 1e-4 at k = 88)."""
    gaussians = random_scene(11, 2, NUM, 3)
    means = np.asarray(gaussians.means).copy()
    means[..., :2] *= 0.05  # all piled up near the centre
    gaussians = Gaussians(jnp.asarray(means), gaussians.scales * 3, gaussians.quats,
                          jnp.full((2, NUM), 0.1, jnp.float32), gaussians.colors)
    camera = camera_for(2)
    background = np.zeros((2, 3), np.float32)
    out = render(gaussians, camera, background, backend=backend)
    assert assert_matches_naive(out, gaussians, camera, background) > 0.1


# ----------------------------------------------------------------------------------------------
# Culling, robustness, batching
# ----------------------------------------------------------------------------------------------
def _with(gaussians, field, index, value):
    array = np.asarray(getattr(gaussians, field)).copy()
    array[index] = value
    return Gaussians(**{**vars(gaussians), field: jnp.asarray(array)})


def test_empty_and_fully_culled_scenes_give_background(backend):
    background = jnp.asarray([0.2, 0.4, 0.6])
    camera = camera_for(1)
    empty = Gaussians(jnp.zeros((0, 3)), jnp.zeros((0, 3)), jnp.zeros((0, 4)), jnp.zeros((0,)),
                      jnp.zeros((0, 3)))
    single_camera = Camera(camera.world_to_camera[0], camera.intrinsics[0], WIDTH, HEIGHT)
    out = render(empty, single_camera, background, backend=backend)
    assert out.color.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(out.color, np.broadcast_to(background, (HEIGHT, WIDTH, 3)))
    assert not np.any(out.alpha) and not np.any(out.depth)

    behind = _with(random_scene(0, 2, NUM, 3), "means", (slice(None), slice(None), 2), -1.0)
    out = render(behind, camera_for(2), background, backend=backend)
    np.testing.assert_array_equal(out.color, np.broadcast_to(background, (2, HEIGHT, WIDTH, 3)))
    assert not np.any(out.alpha) and not np.any(out.depth)


def test_gaussians_behind_camera_or_off_image_change_nothing(backend):
    gaussians = random_scene(3, 2, NUM, 3)
    camera = camera_for(2)
    moved = list(range(0, NUM, 7))
    rot = np.asarray(camera.world_to_camera[:, None, :3, :3], np.float64)
    shift = np.asarray(camera.world_to_camera[:, None, :3, 3], np.float64)
    cam = np.einsum("bnij,bnj->bni", rot, np.asarray(gaussians.means, np.float64)) + shift
    cam[0, moved[::2], 2] *= -1                       # behind the camera
    cam[0, moved[1::2], 0] = 40.0 * cam[0, moved[1::2], 2]  # far right of the image
    cam[1, moved, 2] = 0.15                           # in front of the near plane (0.2)
    means = np.einsum("bnji,bnj->bni", rot, cam - shift)  # back to world (rigid cameras)
    culled = Gaussians(**{**vars(gaussians), "means": jnp.asarray(means, jnp.float32)})
    invisible = _with(gaussians, "opacities", (slice(None), moved), 0.0)
    out_culled = render(culled, camera, backend=backend)
    out_invisible = render(invisible, camera, backend=backend)
    for a, b in zip(out_culled[:3], out_invisible[:3]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # ... and the moved Gaussians really were visible before they moved.
    assert not np.allclose(render(gaussians, camera, backend=backend).color, out_invisible.color)


def test_huge_gaussian_covering_every_tile(backend):
    gaussians = random_scene(5, 2, NUM, 3)
    gaussians = _with(gaussians, "scales", (slice(None), 0), 3.0)
    gaussians = _with(gaussians, "opacities", (slice(None), 0), 0.5)
    camera = camera_for(2)
    proj = _project(gaussians, camera)
    bins = _bin_packed(proj.means2d, proj.depths, proj.radii)
    for b in range(2):
        ids = np.asarray(bins.gaussian_ids[b])
        for start, end in np.asarray(bins.tile_ranges[b]):
            assert 0 in ids[start:end]
    out = render(gaussians, camera, backend=backend)
    assert_matches_naive(out, gaussians, camera, np.zeros((2, 3)))
    assert float(out.alpha.min()) > 0.2  # it really covers every pixel


def test_nan_gaussian_is_culled_and_others_unaffected(backend):
    gaussians = random_scene(6, 2, NUM, 3)
    camera = camera_for(2)
    target = (0, 5)
    reference = _with(gaussians, "opacities", target, 0.0)

    def loss(g):
        out = render(g, camera, backend=backend)
        return jnp.sum(out.color * jnp.arange(3.0)) + jnp.sum(out.alpha) + jnp.sum(out.depth)

    grad_fn = jax.jit(jax.grad(loss))
    ref_out = render(reference, camera, backend=backend)
    ref_grads = grad_fn(reference)
    for field, index in [("means", target + (0,)), ("scales", target + (1,)),
                         ("quats", target), ("opacities", target), ("colors", target + (2,))]:
        broken = _with(gaussians, field, index, np.nan)
        out = render(broken, camera, backend=backend)
        for a, b in zip(out[:3], ref_out[:3]):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=field)
        grads = grad_fn(broken)
        for name in ("means", "scales", "quats", "opacities", "colors"):
            g, g_ref = np.asarray(getattr(grads, name)), np.asarray(getattr(ref_grads, name))
            assert np.all(np.isfinite(g)), (field, name)
            assert not np.any(g[target]), (field, name)  # culled: zero gradient
            keep = np.ones(g.shape[:2], bool)
            keep[target] = False
            np.testing.assert_allclose(g[keep], g_ref[keep], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{field} -> {name}")


def test_batch_equals_per_image_renders_under_jit(backend):
    gaussians = random_scene(8, 2, NUM, 3)
    camera = camera_for(2)
    background = jnp.asarray([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    batched = render(gaussians, camera, background, backend=backend)
    single = jax.jit(lambda g, c, bg: render(g, c, bg, backend=backend))
    for b in range(2):
        image = single(Gaussians(*(x[b] for x in vars(gaussians).values())),
                       Camera(camera.world_to_camera[b], camera.intrinsics[b], WIDTH, HEIGHT),
                       background[b])
        assert image.color.shape == (HEIGHT, WIDTH, 3) and image.overflow.shape == ()
        for a, c in zip(image[:3], batched[:3]):
            np.testing.assert_allclose(a, c[b], atol=1e-6)

    # One unbatched head seen by a batch of cameras: broadcast against the cameras.
    head = Gaussians(*(x[0] for x in vars(gaussians).values()))
    broadcast = render(head, camera, background, backend=backend)
    assert broadcast.color.shape == (2, HEIGHT, WIDTH, 3)
    for b in range(2):
        image = single(head, Camera(camera.world_to_camera[b], camera.intrinsics[b], WIDTH,
                                    HEIGHT), background[b])
        np.testing.assert_allclose(broadcast.color[b], image.color, atol=1e-6)
    assert not np.allclose(broadcast.color[0], broadcast.color[1])  # the cameras differ


def test_backend_choice_and_input_errors():
    from rasterizer.render import resolve_backend
    from rasterizer.composite_cpu import cpu_backend_problem
    on_cpu = "jax" if cpu_backend_problem() else "cpu"
    assert resolve_backend("auto") == ("triton" if jax.default_backend() == "gpu" else on_cpu)
    gaussians, camera = random_scene(0, 2, 4, 3), camera_for(2)
    with pytest.raises(ValueError, match="backend"):
        render(gaussians, camera, backend="cuda")
    with pytest.raises(ValueError, match="gaussians.scales"):
        render(Gaussians(**{**vars(gaussians), "scales": gaussians.scales[..., :2]}), camera)
    with pytest.raises(ValueError, match="gaussians.colors"):
        render(Gaussians(**{**vars(gaussians), "colors": gaussians.colors[0]}), camera)
    with pytest.raises(ValueError, match="batch mismatch"):
        render(gaussians, camera_for(3))
    with pytest.raises(ValueError, match="background"):
        render(gaussians, camera, jnp.zeros(4))
    with pytest.raises(ValueError, match="capacity"):
        render(gaussians, camera, capacity=0)


def test_32_channels(backend):
    channels = 32  # C = 1 is the small-scene family above
    gaussians = random_scene(9, 1, NUM, channels)
    camera = camera_for(1)
    background = np.full((1, channels), 0.5, np.float32)
    out = render(gaussians, camera, background, backend=backend)
    assert out.color.shape == (1, HEIGHT, WIDTH, channels)
    assert_matches_naive(out, gaussians, camera, background)


# ----------------------------------------------------------------------------------------------
# Binning
# ----------------------------------------------------------------------------------------------
@jax.jit
def _bin_packed(means2d, depths, radii):
    return bin_gaussians(means2d, depths, radii, WIDTH, HEIGHT, 4096, packed_keys=True)


@jax.jit
def _bin_two_keys(means2d, depths, radii):
    return bin_gaussians(means2d, depths, radii, WIDTH, HEIGHT, 4096, packed_keys=False)


@jax.jit
def _project(gaussians, camera):
    return projection.project(gaussians.means, gaussians.scales, gaussians.quats,
                              camera.world_to_camera, camera.intrinsics, camera.width,
                              camera.height)


def _projected(seed=0):
    return _project(random_scene(seed, 2, NUM, 3), camera_for(2))


def _naive_tile_lists(means2d, depths, radii):
    """{tile: [gaussian ids front to back]} by brute force over every (Gaussian, tile)."""
    tiles_x, tiles_y = -(-WIDTH // 16), -(-HEIGHT // 16)
    lists = {t: [] for t in range(tiles_x * tiles_y)}
    for n in np.lexsort((np.arange(len(depths)), depths)):
        if radii[n] <= 0:
            continue
        r = float(radii[n])
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                # Tile overlaps [mu - r, mu + r]^2 in the rule's floor/ceil sense.
                if (np.floor((means2d[n, 0] - r) / 16) <= tx < np.ceil((means2d[n, 0] + r) / 16)
                        and np.floor((means2d[n, 1] - r) / 16) <= ty
                        < np.ceil((means2d[n, 1] + r) / 16)):
                    lists[ty * tiles_x + tx].append(n)
    return lists


@pytest.mark.parametrize("packed_keys", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_bins_match_brute_force(packed_keys, ties):
    proj = _projected()
    means2d, depths, radii = (np.asarray(x) for x in (proj.means2d, proj.depths, proj.radii))
    radii = radii.copy()
    radii[:, ::9] = 0  # some culled
    depths = depths.copy()
    if ties:  # exact depth ties keep index order (through the argsort fallback)
        depths[0, 1:20:3] = depths[0, 0]
    assert np.any(depths[0, 1:20:3] == depths[0, 0]) == ties
    bins = (_bin_packed if packed_keys else _bin_two_keys)(means2d, depths, radii)
    for b in range(2):
        expected = _naive_tile_lists(means2d[b], depths[b], radii[b])
        ids, ranges = np.asarray(bins.gaussian_ids[b]), np.asarray(bins.tile_ranges[b])
        assert int(bins.overflow[b]) == 0
        for tile, (start, end) in enumerate(ranges):
            assert ids[start:end].tolist() == expected[tile], (b, tile)
        assert ranges[-1, 1] == sum(len(v) for v in expected.values())


def test_overflow_counted_and_strict_raises():
    proj = _projected()
    capacity = 300
    total = [sum(len(v) for v in _naive_tile_lists(np.asarray(proj.means2d[b]),
                                                     np.asarray(proj.depths[b]),
                                                     np.asarray(proj.radii[b])).values())
             for b in range(2)]
    assert min(total) > capacity
    gaussians, camera = random_scene(0, 2, NUM, 3), camera_for(2)
    out = render(gaussians, camera, backend="jax", capacity=capacity)
    assert out.overflow.tolist() == [t - capacity for t in total]
    # The capacity each image needed: the naive count, with and without overflow.
    assert out.intersections.tolist() == total
    roomy = render(gaussians, camera, backend="jax", capacity=max(total) + 1)
    assert roomy.intersections.tolist() == total and roomy.overflow.tolist() == [0, 0]
    assert np.all(np.isfinite(out.color))
    with pytest.raises(RuntimeError, match="did not fit in capacity 300"):
        render(gaussians, camera, backend="jax", capacity=capacity, strict=True)
    # Under an outer jit the count is a tracer: the check runs as a callback at run time.
    from rasterizer.render import _raise_on_overflow
    checked = jax.jit(lambda overflow: _raise_on_overflow(overflow, capacity) or overflow)
    with pytest.raises(Exception, match="did not fit in capacity 300"):
        jax.block_until_ready(checked(out.overflow))
    jax.block_until_ready(checked(jnp.zeros(2, jnp.int32)))
    # Enough capacity: strict is silent.
    render(gaussians, camera, backend="jax", strict=True)


def test_saturating_cumsum():
    cumsum = jax.jit(saturating_cumsum, static_argnums=1)
    values = jnp.asarray([2**30, 2**30, 5, 0, 7, 3], jnp.int32)
    expected = np.minimum(np.cumsum(np.asarray(values, np.int64)), 2**31 - 1)
    np.testing.assert_array_equal(cumsum(values, 2**31 - 1), expected)
    np.testing.assert_array_equal(cumsum(values, 100), [100] * 6)
    small = jnp.asarray([3, 0, 4, 1, 1, 1], jnp.int32)
    np.testing.assert_array_equal(cumsum(small, 2**31 - 1), [3, 3, 7, 8, 9, 10])


# ----------------------------------------------------------------------------------------------
# Tile cull: (Gaussian, tile) pairs whose alpha stays below 1/255 over the tile
# ----------------------------------------------------------------------------------------------
def test_tile_alpha_bound_equals_box_constrained_minimum():
    """log o - q_min / 2 against scipy's L-BFGS-B minimum of the convex quadratic form over the
    tile's pixel-centre rectangle (float64), for random anisotropic conics and tiles."""
    from scipy.optimize import minimize
    from rasterizer.binning import tile_alpha_bound
    rng = np.random.default_rng(5)
    count = 120
    angle = rng.uniform(0, np.pi, count)
    sigma = rng.uniform(0.7, 9.0, (count, 2))
    rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], -1)
    rot = rot.reshape(count, 2, 2)
    cov = rot @ (sigma[:, :, None] ** 2 * np.eye(2)) @ np.swapaxes(rot, 1, 2) + 0.3 * np.eye(2)
    conic = np.linalg.inv(cov)
    conics = np.stack([conic[:, 0, 0], conic[:, 0, 1], conic[:, 1, 1]], -1)
    means = rng.uniform([-15, -15], [WIDTH + 15, HEIGHT + 15], (count, 2))
    means[:10] = [[min(8.0 + 16 * (i % 3), 34.0), min(8.0 + 16 * (i // 3 % 2), 26.0)]
                  for i in range(10)]  # inside their tile
    opacities = rng.uniform(0.01, 1.0, count)
    tile_x, tile_y = rng.integers(0, 3, count), rng.integers(0, 2, count)
    tile_x[:10], tile_y[:10] = np.arange(10) % 3, np.arange(10) // 3 % 2
    bound = np.asarray(jax.jit(tile_alpha_bound, static_argnums=(5, 6))(
        jnp.asarray(means, jnp.float32), jnp.asarray(conics, jnp.float32),
        jnp.asarray(opacities, jnp.float32), jnp.asarray(tile_x), jnp.asarray(tile_y),
        WIDTH, HEIGHT))
    for i in range(count):
        lo = np.array([16 * tile_x[i] + 0.5, 16 * tile_y[i] + 0.5])
        hi = np.minimum(lo + 15, [WIDTH - 0.5, HEIGHT - 0.5])

        def form(p, i=i):
            d = p - means[i]
            return d @ conic[i] @ d

        best = minimize(form, np.clip(means[i], lo, hi), jac=lambda p, i=i: 2 * conic[i] @ (
            p - means[i]), bounds=list(zip(lo, hi)), method="L-BFGS-B",
            options=dict(ftol=1e-15, gtol=1e-12))
        expected = np.log(opacities[i]) - 0.5 * min(best.fun, form(np.clip(means[i], lo, hi)))
        assert abs(bound[i] - expected) < 1e-4 * max(1.0, abs(expected)), (i, bound[i], expected)
    np.testing.assert_allclose(bound[:10], np.log(opacities[:10]), rtol=1e-6)  # mean inside


@jax.jit
def _bin_culled(means2d, depths, radii, conics, opacities):
    return bin_gaussians(means2d, depths, radii, WIDTH, HEIGHT, 4096, packed_keys=True,
                         conics=conics, opacities=opacities)


def test_tile_cull_drops_only_pairs_that_never_composite():
    """The culled tile lists are the rectangle lists, in the same order, minus pairs with no
    pixel of the tile at alpha >= 1/255 (brute force in float64 over every pixel); they drop
    some, and the compositor's outputs and gradients are those of the full lists."""
    from rasterizer.composite_jax import composite_jax
    gaussians = random_scene(3, 2, NUM, 3)
    rng = np.random.default_rng(3)
    gaussians = Gaussians(gaussians.means, gaussians.scales, gaussians.quats, jnp.asarray(
        rng.uniform(0.004, 1.0, (2, NUM)) ** 2, jnp.float32), gaussians.colors)  # faint ones
    camera = camera_for(2)
    proj = _project(gaussians, camera)
    full = _bin_packed(proj.means2d, proj.depths, proj.radii)
    culled = _bin_culled(proj.means2d, proj.depths, proj.radii, proj.conics, gaussians.opacities)
    tiles_x = -(-WIDTH // 16)
    kept_total = dropped_total = 0
    for b in range(2):
        m2, con = np.asarray(proj.means2d[b], np.float64), np.asarray(proj.conics[b], np.float64)
        opac = np.asarray(gaussians.opacities[b], np.float64)
        for tile, ((s0, e0), (s1, e1)) in enumerate(zip(np.asarray(full.tile_ranges[b]),
                                                        np.asarray(culled.tile_ranges[b]))):
            rect = np.asarray(full.gaussian_ids[b, s0:e0]).tolist()
            kept = np.asarray(culled.gaussian_ids[b, s1:e1]).tolist()
            ty, tx = divmod(tile, tiles_x)
            ys, xs = np.mgrid[16 * ty:min(16 * ty + 16, HEIGHT), 16 * tx:min(16 * tx + 16, WIDTH)]
            px, py = xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5
            dx, dy = px[None] - m2[rect, :1], py[None] - m2[rect, 1:]
            a, bb, c = con[rect, 0:1], con[rect, 1:2], con[rect, 2:3]
            power = -0.5 * (a * dx * dx + c * dy * dy) - bb * dx * dy
            contributes = ((power <= 0) & (opac[rect, None] * np.exp(power) >= 1 / 255)).any(1)
            assert set(np.asarray(rect)[contributes].tolist()) <= set(kept), (b, tile)
            assert kept == [n for n in rect if n in set(kept)], (b, tile)  # same order
            kept_total += len(kept)
            dropped_total += len(rect) - len(kept)
        assert int(culled.overflow[b]) == int(full.overflow[b]) == 0
    assert dropped_total > 0.1 * (kept_total + dropped_total), (kept_total, dropped_total)

    background = jnp.full((2, 3), 0.3)
    weights = jax.random.normal(jax.random.PRNGKey(0), (2, HEIGHT, WIDTH, 3))

    @jax.jit
    def loss_and_grads(bins_ids, bins_ranges):
        def loss(means2d, conics, opacities, colors, depths):
            color, alpha, depth = composite_jax(means2d, conics, opacities, colors, depths,
                                                background, bins_ids, bins_ranges, WIDTH, HEIGHT)
            return jnp.sum(color * weights) + jnp.sum(alpha) + 0.1 * jnp.sum(depth)
        return jax.value_and_grad(loss, argnums=range(5))(
            proj.means2d, proj.conics, gaussians.opacities, gaussians.colors, proj.depths)

    value_full, grads_full = loss_and_grads(full.gaussian_ids, full.tile_ranges)
    value_cull, grads_cull = loss_and_grads(culled.gaussian_ids, culled.tile_ranges)
    np.testing.assert_allclose(value_cull, value_full, rtol=1e-6)
    for g_cull, g_full in zip(grads_cull, grads_full):
        np.testing.assert_allclose(g_cull, g_full, rtol=1e-4, atol=1e-5)


def test_bin_gaussians_cull_needs_both_conics_and_opacities():
    proj = _projected()
    with pytest.raises(ValueError, match="both conics and opacities"):
        bin_gaussians(proj.means2d, proj.depths, proj.radii, WIDTH, HEIGHT, 4096,
                      conics=proj.conics)


# ----------------------------------------------------------------------------------------------
# render_pair: one render, two gradient paths
# ----------------------------------------------------------------------------------------------
def test_render_pair_routes_each_cotangent_to_its_own_handle(backend):
    """render_pair(g, g_b) == (render(g), render(g)); the gradient of w_a . out + w_b . out_b
    reaches g with render's gradient of w_a . out alone and g_b with that of w_b . out_b, for
    the native one-sweep jax pair and the generic two-sweep pair (the triton backend's)."""
    from rasterizer import render_pair
    from rasterizer.composite_jax import composite_jax, composite_jax_pair
    from rasterizer.render import _composite_pair_generic
    gaussians, camera = random_scene(4, 2, NUM, 3), camera_for(2)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    w_a, w_b = (jax.random.normal(k, (2, HEIGHT, WIDTH, 3)) for k in keys[:2])
    v_a, v_b = (jax.random.normal(k, (2, HEIGHT, WIDTH)) for k in keys[2:])

    def weighted(out, w, v):
        return jnp.sum(out.color * w) + jnp.sum(out.alpha * v) + 0.01 * jnp.sum(out.depth * v)

    @jax.jit
    def pair_grads(g, g_b):
        def loss(g, g_b):
            out, out_b = render_pair(g, g_b, camera, jnp.asarray([0.2, 0.5, 1.0]),
                                     backend=backend)
            return weighted(out, w_a, v_a) + weighted(out_b, w_b, v_b), (out, out_b)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(g, g_b)

    @jax.jit
    def single_grads(g):
        def loss(g, w, v):
            out = render(g, camera, jnp.asarray([0.2, 0.5, 1.0]), backend=backend)
            return weighted(out, w, v), out
        return (jax.grad(loss, has_aux=True)(g, w_a, v_a),
                jax.grad(loss, has_aux=True)(g, w_b, v_b)[0])

    (grad_a, grad_b), (out, out_b) = pair_grads(gaussians, gaussians)
    (expected_a, expected_out), expected_b = single_grads(gaussians)
    for got, want in [(out, expected_out), (out_b, expected_out)]:
        for x, y in zip(got[:3], want[:3]):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    for got, want in [(grad_a, expected_a), (grad_b, expected_b)]:
        for name in ("means", "scales", "quats", "opacities", "colors"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4,
                                       atol=1e-5, err_msg=name)
    assert not np.allclose(grad_a.means, grad_b.means)  # two different paths

    # The compositor pairs alone: native (one sweep) and generic (two) agree.
    proj = _project(gaussians, camera)
    bins = _bin_packed(proj.means2d, proj.depths, proj.radii)
    inputs = (proj.means2d, proj.conics, gaussians.opacities, gaussians.colors, proj.depths,
              jnp.full((2, 3), 0.4))

    @jax.jit
    def pair_vjp(inputs):
        results = []
        for pair in (composite_jax_pair,
                     lambda *a: _composite_pair_generic(composite_jax, *a)):
            outs, pullback = jax.vjp(lambda x, y: pair(x, y, bins.gaussian_ids, bins.tile_ranges,
                                                       WIDTH, HEIGHT), inputs, inputs)
            cotangent = ((w_a, v_a, v_a), (w_b, v_b, jnp.zeros_like(v_b)))
            results.append(pullback(cotangent))
        return results

    native, generic = pair_vjp(inputs)
    for side in range(2):
        for x, y in zip(native[side], generic[side]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same shapes"):
        render_pair(gaussians, jax.tree_util.tree_map(lambda x: x[:1], gaussians), camera)


# ----------------------------------------------------------------------------------------------
# Gradients: float64 central finite differences of every input
# ----------------------------------------------------------------------------------------------
def test_gradients_match_float64_finite_differences(backend):
    """jax.grad of a random linear function of color, alpha and depth against float64 central
    differences, for every entry of every input (Gaussians, background, camera).

    Two images; for each, one batched render holds the unperturbed image plus +-eps copies
    of it, one per input entry, so a single compile of forward+backward covers it all."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(12)
        num, channels, width, height, focal = 9, 3, 20, 18, 30.0
        k = np.array([[focal, 0, width / 2 + 0.3], [0, focal * 1.1, height / 2 - 0.2],
                      [0, 0, 1]])
        w2c = np.eye(4)
        w2c[:3, 3] = [0.05, -0.03, 0.1]
        names = ["means", "scales", "quats", "opacities", "colors", "background",
                 "world_to_camera", "intrinsics"]

        def image_params():
            # Spread-out Gaussians, plus a stack of four opaque ones (o = 0.96) in the middle
            # so that some pixels hit the transmittance stop after two of them.
            z = rng.uniform(2.0, 3.0, num)
            xy = rng.uniform(-0.3, 0.3, (num, 2)) * z[:, None] * [width, height] / focal
            xy[-4:] = rng.uniform(-0.02, 0.02, (4, 2))
            z[-4:] = [2.0, 2.2, 2.4, 2.6]
            opacities = rng.uniform(0.3, 0.8, num)
            opacities[-4:] = 0.96
            return dict(means=np.concatenate([xy, z[:, None]], -1),
                        scales=rng.uniform(0.05, 0.2, (num, 3)),
                        quats=rng.normal(size=(num, 4)), opacities=opacities,
                        colors=rng.uniform(0, 1, (num, channels)),
                        background=rng.uniform(0, 1, channels), world_to_camera=w2c,
                        intrinsics=k)

        weights = [rng.normal(size=shape) for shape in
                   [(height, width, channels), (height, width), (height, width)]]

        def per_image_losses(p):
            gaussians = Gaussians(*(p[name] for name in names[:5]))
            camera = Camera(p["world_to_camera"], p["intrinsics"], width, height)
            out = render(gaussians, camera, p["background"], backend=backend)
            assert out.color.dtype == jnp.float64
            return sum(jnp.sum(o * w, axis=tuple(range(1, o.ndim)))
                       for o, w in zip(out[:3], weights))

        @jax.jit
        def losses_and_grad(p):
            losses, vjp = jax.vjp(per_image_losses, p)
            (grads,) = vjp(jnp.zeros_like(losses).at[-1].set(1.0))  # unperturbed copy
            return losses, {name: g[-1] for name, g in grads.items()}

        eps = 1e-6
        for _ in range(2):
            params = image_params()
            stopped = naive_render(*(params[name] for name in names[:5]),
                                   params["world_to_camera"], params["intrinsics"], width, height,
                                   params["background"])[3]
            assert 0 < stopped.sum() < stopped.size / 2, "the stop should be exercised"
            sizes = [np.size(params[name]) for name in names]
            total = sum(sizes)
            batch = {}
            for name, size, offset in zip(names, sizes, np.cumsum([0] + sizes[:-1])):
                flat = np.broadcast_to(np.reshape(params[name], -1), (2 * total + 1, size)).copy()
                for i in range(size):
                    flat[offset + i, i] += eps
                    flat[total + offset + i, i] -= eps
                batch[name] = jnp.asarray(flat.reshape((-1,) + np.shape(params[name])))
            losses, grads = losses_and_grad(batch)
            numeric = (np.asarray(losses[:total]) - np.asarray(losses[total:-1])) / (2 * eps)
            for name, size, offset in zip(names, sizes, np.cumsum([0] + sizes[:-1])):
                analytic = np.asarray(grads[name]).reshape(-1)
                expected = numeric[offset:offset + size]
                used = {"world_to_camera": np.s_[:12],      # the last row is unused
                        "intrinsics": np.s_[[0, 2, 4, 5]]}  # fx, cx, fy, cy
                assert np.all(analytic[used.get(name, np.s_[:])] != 0), name
                np.testing.assert_allclose(analytic, expected, rtol=1e-5,
                                           atol=1e-6 * max(1.0, np.abs(expected).max()),
                                           err_msg=name)
