"""Triton compositing kernels (Triton's interpreter on CPU; the jax_triton path on CUDA).

References, independent of the kernels:
- a float64 numpy compositor that walks every pixel's tile list (vectorised over pixels),
  whose discrete decisions (skip / stop / clamp) can be frozen so that central finite
  differences measure the derivative of the smooth piece the analytic gradient belongs to;
- a numpy binning (3-sigma square footprint, tiles, depth order) to build the lists;
- `composite_jax` and `render(backend="jax")` from the JAX engineer, when present.
Scenes are tiny: the interpreter is ~1000x slower than a GPU.
"""
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rasterizer import composite_triton as ct

TILE = 16
FIELDS = ("means2d", "conics", "opacities", "colors", "depths", "background")


# ----------------------------------------------------------------------------------------
# Scenes and references
# ----------------------------------------------------------------------------------------

def random_scene(seed, batch, num, channels, width, height, opacity=(0.05, 0.95),
                 sigma=(1.0, 6.0), margin=6.0):
    """Random screen-space Gaussians as float32 numpy arrays (dict of FIELDS)."""
    rng = np.random.default_rng(seed)
    means2d = np.stack([rng.uniform(-margin, width + margin, (batch, num)),
                        rng.uniform(-margin, height + margin, (batch, num))], -1)
    angle = rng.uniform(0, np.pi, (batch, num))
    sx, sy = rng.uniform(*sigma, (2, batch, num))
    cos, sin = np.cos(angle), np.sin(angle)
    cov_xx = cos**2 * sx**2 + sin**2 * sy**2 + 0.3
    cov_yy = sin**2 * sx**2 + cos**2 * sy**2 + 0.3
    cov_xy = cos * sin * (sx**2 - sy**2)
    det = cov_xx * cov_yy - cov_xy**2
    conics = np.stack([cov_yy / det, -cov_xy / det, cov_xx / det], -1)
    return dict(
        means2d=means2d.astype(np.float32), conics=conics.astype(np.float32),
        opacities=rng.uniform(*opacity, (batch, num)).astype(np.float32),
        colors=rng.uniform(0, 1, (batch, num, channels)).astype(np.float32),
        depths=rng.uniform(1, 5, (batch, num)).astype(np.float32),
        background=rng.uniform(0, 1, (batch, channels)).astype(np.float32))


def bin_numpy(means2d, conics, depths, width, height, padding=5):
    """Tile lists for each image: ids (B, K) int32 (padding = -1), ranges (B, T, 2) int32."""
    batch, num = depths.shape
    tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
    lists = []
    for b in range(batch):
        a, bb, c = conics[b].astype(np.float64).T
        det = a * c - bb * bb
        cov = np.stack([c / det, -bb / det, a / det], -1)  # inverse of the conic
        mid = 0.5 * (cov[:, 0] + cov[:, 2])
        lam = mid + np.sqrt(np.maximum(0.1, mid**2 - (cov[:, 0] * cov[:, 2] - cov[:, 1]**2)))
        radius = np.ceil(3 * np.sqrt(lam))
        order = np.argsort(depths[b], kind="stable")
        per_tile = []
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                hit = [g for g in order
                       if means2d[b, g, 0] + radius[g] > tx * TILE
                       and means2d[b, g, 0] - radius[g] < (tx + 1) * TILE
                       and means2d[b, g, 1] + radius[g] > ty * TILE
                       and means2d[b, g, 1] - radius[g] < (ty + 1) * TILE]
                per_tile.append(hit)
        lists.append(per_tile)
    capacity = max(sum(len(t) for t in per_tile) for per_tile in lists) + padding
    ids = np.full((batch, capacity), -1, np.int32)
    ranges = np.zeros((batch, tiles_x * tiles_y, 2), np.int32)
    for b, per_tile in enumerate(lists):
        flat = [g for tile in per_tile for g in tile]
        ids[b, :len(flat)] = flat
        ends = np.cumsum([len(t) for t in per_tile])
        ranges[b, :, 0], ranges[b, :, 1] = ends - [len(t) for t in per_tile], ends
    return ids, ranges


def reference_composite(scene, ids, ranges, width, height, decisions=None):
    """Float64 front-to-back compositing of every pixel's tile list.

    Returns ((color, alpha, depth), decisions). `decisions` (per image, per list step,
    per pixel: counted / stopped / clamped) may be passed back in to evaluate the same
    smooth piece at perturbed parameters.
    """
    p = {k: np.asarray(v, np.float64) for k, v in scene.items()}
    batch, _, channels = p["colors"].shape
    tiles_x = -(-width // TILE)
    rows, cols = np.divmod(np.arange(height * width), width)
    x, y = cols + 0.5, rows + 0.5
    tile = (rows // TILE) * tiles_x + cols // TILE
    color = np.zeros((batch, height * width, channels))
    depth = np.zeros((batch, height * width))
    alpha_out = np.zeros((batch, height * width))
    new_decisions = []
    for b in range(batch):
        start, end = ranges[b, tile, 0], ranges[b, tile, 1]
        transmittance = np.ones(height * width)
        done = np.zeros(height * width, bool)
        steps = []
        for step in range(int((end - start).max(initial=0))):
            in_list = start + step < end
            g = np.where(in_list, ids[b, np.minimum(start + step, ids.shape[1] - 1)], 0)
            dx, dy = x - p["means2d"][b, g, 0], y - p["means2d"][b, g, 1]
            a, bb, c = p["conics"][b, g].T
            power = -0.5 * (a * dx * dx + c * dy * dy) - bb * dx * dy
            raw = p["opacities"][b, g] * np.exp(power)
            if decisions is None:
                counted = in_list & ~done & (power <= 0) & (np.minimum(raw, 0.99) >= 1 / 255)
                stopped = counted & (transmittance * (1 - np.minimum(raw, 0.99)) < 1e-4)
                clamped = raw > 0.99
                steps.append((counted, stopped, clamped))
            else:
                counted, stopped, clamped = decisions[b][step]
            alpha = np.where(clamped, 0.99, raw)
            composited = counted & ~stopped
            weight = np.where(composited, alpha * transmittance, 0.0)
            color[b] += weight[:, None] * p["colors"][b, g]
            depth[b] += weight * p["depths"][b, g]
            transmittance = np.where(composited, transmittance * (1 - alpha), transmittance)
            done |= stopped
        new_decisions.append(steps)
        color[b] += transmittance[:, None] * p["background"][b]
        alpha_out[b] = 1 - transmittance
    shape = (batch, height, width)
    outputs = (color.reshape(shape + (channels,)), alpha_out.reshape(shape), depth.reshape(shape))
    return outputs, (new_decisions if decisions is None else decisions)


def loss_weights(seed, batch, width, height, channels):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, height, width, channels)),
            rng.normal(size=(batch, height, width)), rng.normal(size=(batch, height, width)))


def triton_value_and_grads(scene, ids, ranges, width, height, weights, **kwargs):
    """Outputs and the gradient of sum(w * outputs) (= VJP with the weights) per field."""
    def outputs(*fields):
        return ct.composite_triton(*fields, ids, ranges, width, height, **kwargs)
    values, vjp = jax.vjp(outputs, *(jnp.asarray(scene[k]) for k in FIELDS))
    grads = vjp(tuple(jnp.asarray(w, jnp.float32) for w in weights))
    return [np.asarray(v) for v in values], dict(zip(FIELDS, map(np.asarray, grads)))


def assert_grads_close(actual, expected, rtol=1e-4, label=""):
    """Every field's gradient within rtol * max|expected gradient of that field|."""
    for name in FIELDS:
        scale = np.abs(expected[name]).max()
        error = np.abs(actual[name] - expected[name]).max()
        assert error <= rtol * scale + 1e-7, (
            f"{label} d/d{name}: max error {error:.3g} vs max |grad| {scale:.3g}")


# ----------------------------------------------------------------------------------------
# Against the float64 numpy reference
# ----------------------------------------------------------------------------------------

def test_hand_computed_single_gaussian():
    """One Gaussian centred on pixel (row 5, col 5): alpha = o exp(power) by hand."""
    scene = dict(means2d=np.array([[[5.5, 5.5]]], np.float32),
                 conics=np.array([[[1.0, 0.0, 0.25]]], np.float32),
                 opacities=np.array([[0.5]], np.float32),
                 colors=np.array([[[1.0, 0.0, 0.0]]], np.float32),
                 depths=np.array([[2.0]], np.float32),
                 background=np.array([[0.0, 0.0, 1.0]], np.float32))
    ids = np.array([[0, -1]], np.int32)
    ranges = np.array([[[0, 1], [1, 1]]], np.int32)  # 20 x 9 image: 2 tiles, second empty
    color, alpha, depth = map(np.asarray, ct.composite_triton(
        *(scene[k] for k in FIELDS), ids, ranges, 20, 9))
    assert color.shape == (1, 9, 20, 3) and alpha.shape == depth.shape == (1, 9, 20)
    np.testing.assert_allclose(color[0, 5, 5], [0.5, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(depth[0, 5, 5], 1.0, atol=1e-6)
    a = 0.5 * np.exp(-0.5 * 1.0)  # one column right: dx = 1
    np.testing.assert_allclose(color[0, 5, 6], [a, 0.0, 1 - a], atol=1e-6)
    a = 0.5 * np.exp(-0.5 * 0.25 * 4)  # two rows down: dy = 2, c = 0.25
    np.testing.assert_allclose(alpha[0, 7, 5], a, atol=1e-6)
    # alpha < 1/255 is skipped entirely (not merely tiny): pixel (0, 15), dx = 10
    np.testing.assert_allclose(color[0, 0, 15], [0, 0, 1], atol=0)
    # The empty second tile shows the background only.
    np.testing.assert_array_equal(color[0, :, 16:], np.broadcast_to([0, 0, 1], (9, 4, 3)))
    np.testing.assert_array_equal(alpha[0, :, 16:], 0)


@pytest.mark.parametrize("seed,channels,width,height", [(0, 3, 37, 21), (1, 14, 21, 37)])
def test_forward_matches_float64_reference(seed, channels, width, height):
    scene = random_scene(seed, 2, 24, channels, width, height)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)
    expected, _ = reference_composite(scene, ids, ranges, width, height)
    # A small batch size exercises the multi-batch loop and its early exit.
    actual = ct.composite_triton(*(scene[k] for k in FIELDS), ids, ranges, width, height,
                                 gaussian_batch=4)
    for name, a, e in zip(("color", "alpha", "depth"), actual, expected):
        np.testing.assert_allclose(np.asarray(a), e, atol=1e-5, rtol=0, err_msg=name)


def stop_scene(channels, num=10, width=24, height=20):
    """Stacked broad, nearly opaque Gaussians: most central pixels hit T < 1e-4."""
    return random_scene(7, 2, num, channels, width, height, opacity=(0.9, 0.97),
                        sigma=(5.0, 9.0), margin=-6.0)


def test_stop_rule_matches_reference_and_stops():
    width, height = 24, 20
    scene = stop_scene(3)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)
    expected, decisions = reference_composite(scene, ids, ranges, width, height)
    stopped = sum(s.sum() for steps in decisions for (_, s, _) in steps)
    assert stopped > 50, "scene does not exercise the T < 1e-4 stop"
    color, alpha, depth = ct.composite_triton(*(scene[k] for k in FIELDS), ids, ranges,
                                              width, height, gaussian_batch=2)
    np.testing.assert_allclose(np.asarray(color), expected[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(alpha), expected[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(depth), expected[2], atol=1e-5, rtol=0)
    # The stopping Gaussian is not composited, so T stays >= 1e-4.
    assert np.asarray(alpha).max() <= 1 - 1e-4 + 1e-7


def finite_difference_grads(scene, ids, ranges, width, height, weights, eps=1e-6):
    """Central differences of sum(w * reference outputs), decisions frozen, float64."""
    base = {k: v.astype(np.float64) for k, v in scene.items()}
    _, decisions = reference_composite(base, ids, ranges, width, height)

    def loss(params):
        outs, _ = reference_composite(params, ids, ranges, width, height, decisions)
        return sum(np.sum(w * o) for w, o in zip(weights, outs))

    grads = {}
    for name in FIELDS:
        grad = np.zeros_like(base[name])
        for index in np.ndindex(base[name].shape):
            plus = {k: v.copy() for k, v in base.items()}
            minus = {k: v.copy() for k, v in base.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            grad[index] = (loss(plus) - loss(minus)) / (2 * eps)
        grads[name] = grad
    return grads


@pytest.mark.parametrize("case", ["random", "stop"])
def test_gradients_match_float64_finite_differences(case):
    if case == "random":
        width, height, channels = 19, 17, 3
        scene = random_scene(3, 2, 7, channels, width, height)
        # A broad opaque Gaussian on a pixel centre: alpha clamps to 0.99 near its centre.
        scene["means2d"][:, 0] = [9.5, 8.5]
        scene["conics"][:, 0] = [1 / 100.3, 0.0, 1 / 100.3]
        scene["opacities"][:, 0] = 1.0
    else:
        width, height, channels = 24, 20, 2
        scene = stop_scene(channels, num=7)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)
    _, decisions = reference_composite(scene, ids, ranges, width, height)
    stopped, clamped = (sum((step[i] & step[0]).sum() for steps in decisions for step in steps)
                        for i in (1, 2))
    assert (stopped if case == "stop" else clamped) > 5, (stopped, clamped)
    weights = loss_weights(11, 2, width, height, channels)
    _, grads = triton_value_and_grads(scene, ids, ranges, width, height, weights,
                                      gaussian_batch=2)
    expected = finite_difference_grads(scene, ids, ranges, width, height, weights)
    assert_grads_close(grads, expected, rtol=1e-4, label=case)


def test_jit_and_grad_through_the_callback():
    width, height = 18, 17
    scene = random_scene(5, 2, 6, 3, width, height)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)

    def loss(means2d, opacities):
        color, alpha, depth = ct.composite_triton(
            means2d, scene["conics"], opacities, scene["colors"], scene["depths"],
            scene["background"], ids, ranges, width, height)
        return jnp.sum(color**2) + jnp.sum(alpha) + 0.1 * jnp.sum(depth)

    eager = jax.grad(loss, argnums=(0, 1))(scene["means2d"], scene["opacities"])
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(scene["means2d"], scene["opacities"])
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(e)).max() > 0


def test_bad_inputs_raise_clear_errors():
    scene = random_scene(0, 1, 3, 3, 20, 18)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], 20, 18)
    args = [scene[k] for k in FIELDS]
    with pytest.raises(ValueError, match="conics"):
        ct.composite_triton(args[0], args[1][..., :2], *args[2:], ids, ranges, 20, 18)
    with pytest.raises(ValueError, match="tile_ranges"):
        ct.composite_triton(*args, ids, ranges, 40, 18)  # 3 x 2 tiles expected, not 2 x 2
    with pytest.raises(ValueError, match="1..32 channels"):
        many = dict(scene, colors=np.zeros((1, 3, 33), np.float32),
                    background=np.zeros((1, 33), np.float32))
        ct.composite_triton(*(many[k] for k in FIELDS), ids, ranges, 20, 18)
    with pytest.raises(TypeError, match="gaussian_ids"):
        ct.composite_triton(*args, ids.astype(np.float32), ranges, 20, 18)
    with pytest.raises(ValueError, match="width"):
        ct.composite_triton(*args, ids, ranges, 0, 18)


def test_refuses_triton_imported_without_interpreter():
    """On a GPU-less machine, importing triton first (no TRITON_INTERPRET) is an error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    code = ("import triton\n"
            "try:\n    import rasterizer.composite_triton\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "REFUSED" in result.stdout and "TRITON_INTERPRET" in result.stdout, (
        result.stdout + result.stderr)


_COMPILE_FOR_SM90 = """
import inspect, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
if "constexprs" not in inspect.signature(ASTSource).parameters:
    print("SKIP: ASTSource of triton", triton.__version__, "takes no constexprs=")
    sys.exit(0)
from rasterizer import triton_kernels as tk
sizes = dict(NUM_GAUSSIANS=1000, NUM_INTERSECTIONS=5000, NUM_CHANNELS=14, CHANNELS_PAD=16,
             WIDTH=37, HEIGHT=21, TILES_X=3, NUM_TILES=6, TILE_SIZE=16)
ints = ("gaussian_ids_ptr", "tile_ranges_ptr", "last_index_ptr")
for kernel, extra in ((tk.composite_forward_kernel, dict(BLOCK_G=32)),
                      (tk.composite_backward_kernel, {})):
    assert isinstance(kernel, triton.runtime.JITFunction), type(kernel)
    constexprs = dict(sizes, **extra)
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else ("*i32" if n in ints else "*fp32")
                 for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4))
    print(kernel.__name__, "cubin", len(compiled.asm["cubin"]))
"""


def test_kernels_compile_for_cuda_sm90(tmp_path):
    """The interpreter does not type-check like the compiler: compile both kernels to a
    Hopper cubin (Triton's bundled ptxas needs no GPU), in a process without the interpreter."""
    nvidia = pathlib.Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia"
    if not (nvidia / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no NVIDIA backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]),
               TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert "composite_forward_kernel cubin" in result.stdout
    assert "composite_backward_kernel cubin" in result.stdout


# ----------------------------------------------------------------------------------------
# Parity with the pure-JAX backend
# ----------------------------------------------------------------------------------------

def _have(module):
    return importlib.util.find_spec(module) is not None


needs_composite_jax = pytest.mark.skipif(not _have("rasterizer.composite_jax"),
                                         reason="rasterizer/composite_jax.py not written yet")
needs_render = pytest.mark.skipif(not _have("rasterizer.render"),
                                  reason="rasterizer/render.py not written yet")


@functools.partial(jax.jit, static_argnums=(3, 4))
def _jax_value_and_grads(fields, ids, ranges, width, height, weights):
    # Module-level jit: cases with equal shapes reuse one compilation of composite_jax.
    from rasterizer.composite_jax import composite_jax
    values, vjp = jax.vjp(lambda *f: composite_jax(*f, ids, ranges, width, height), *fields)
    return values, vjp(weights)


def jax_value_and_grads(scene, ids, ranges, width, height, weights):
    values, grads = _jax_value_and_grads(
        tuple(jnp.asarray(scene[k]) for k in FIELDS), jnp.asarray(ids), jnp.asarray(ranges),
        width, height, tuple(jnp.asarray(w, jnp.float32) for w in weights))
    return [np.asarray(v) for v in values], dict(zip(FIELDS, map(np.asarray, grads)))


@needs_composite_jax
@pytest.mark.parametrize("seed,channels,case", [(10, 3, "random"), (11, 14, "random"),
                                               (12, 3, "stop")])
def test_parity_with_composite_jax(seed, channels, case):
    from rasterizer.binning import bin_gaussians
    # One image size, N and capacity for every case, so binning / composite_jax compile once.
    width, height, num, capacity = 37, 21, 20, 512
    if case == "stop":
        scene = stop_scene(channels, num, width, height)
        _, decisions = reference_composite(
            scene, *bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width,
                              height), width, height)
        assert sum((step[1] & step[0]).sum() for steps in decisions for step in steps) > 50
    else:
        scene = random_scene(seed, 2, num, channels, width, height)
    # Lists from the JAX engineer's binning this time (radii from the conics).
    radii = _radii_from_conics(scene["conics"])
    bins = bin_gaussians(jnp.asarray(scene["means2d"]), jnp.asarray(scene["depths"]),
                         jnp.asarray(radii), width, height, capacity=capacity)
    assert int(np.asarray(bins.overflow).max()) == 0
    weights = loss_weights(seed, 2, width, height, channels)
    values_t, grads_t = triton_value_and_grads(scene, bins.gaussian_ids, bins.tile_ranges,
                                               width, height, weights)
    values_j, grads_j = jax_value_and_grads(scene, bins.gaussian_ids, bins.tile_ranges,
                                            width, height, weights)
    for name, t, j in zip(("color", "alpha", "depth"), values_t, values_j):
        np.testing.assert_allclose(t, j, atol=1e-5, rtol=0, err_msg=name)
    assert_grads_close(grads_t, grads_j, rtol=1e-4, label=f"{case} seed {seed}")


def _radii_from_conics(conics):
    a, b, c = np.moveaxis(conics.astype(np.float64), -1, 0)
    det = a * c - b * b
    cov_xx, cov_xy, cov_yy = c / det, -b / det, a / det
    mid = 0.5 * (cov_xx + cov_yy)
    lam = mid + np.sqrt(np.maximum(0.1, mid**2 - (cov_xx * cov_yy - cov_xy**2)))
    return np.ceil(3 * np.sqrt(lam)).astype(np.int32)


@needs_render
def test_render_triton_matches_render_jax():
    from rasterizer import Camera, Gaussians
    from rasterizer.render import render
    rng = np.random.default_rng(21)
    batch, num, width, height = 2, 20, 37, 21
    gaussians = Gaussians(
        means=jnp.asarray(rng.uniform(-0.6, 0.6, (batch, num, 3)), jnp.float32),
        scales=jnp.asarray(rng.uniform(0.03, 0.12, (batch, num, 3)), jnp.float32),
        quats=jnp.asarray(rng.normal(size=(batch, num, 4)), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.1, 0.9, (batch, num)), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (batch, num, 3)), jnp.float32))
    world_to_camera = np.tile(np.eye(4, dtype=np.float32), (batch, 1, 1))
    world_to_camera[:, 2, 3] = [2.5, 3.0]  # camera 2.5 / 3 units in front of the origin
    intrinsics = np.tile(np.array([[40.0, 0, width / 2], [0, 40.0, height / 2], [0, 0, 1]],
                                  np.float32), (batch, 1, 1))
    camera = Camera(jnp.asarray(world_to_camera), jnp.asarray(intrinsics), width, height)
    background = jnp.asarray(rng.uniform(0, 1, (batch, 3)), jnp.float32)
    weights = loss_weights(22, batch, width, height, 3)

    def loss(gaussians, background, backend):
        out = render(gaussians, camera, background=background, backend=backend)
        value = (jnp.sum(out.color * weights[0]) + jnp.sum(out.alpha * weights[1])
                 + jnp.sum(out.depth * weights[2]))
        return value, out

    def run(backend):  # one compiled forward + backward per backend
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                       static_argnums=2)
        (_, out), grads = step(gaussians, background, backend)
        return out, grads

    out_t, grads_t = run("triton")
    out_j, grads_j = run("jax")
    for name in ("color", "alpha", "depth"):
        np.testing.assert_allclose(np.asarray(getattr(out_t, name)),
                                   np.asarray(getattr(out_j, name)), atol=1e-5, rtol=0,
                                   err_msg=name)
    assert float(np.asarray(out_t.alpha).max()) > 0.5, "scene renders nothing"
    for name in ("means", "scales", "quats", "opacities", "colors"):
        t, j = np.asarray(getattr(grads_t[0], name)), np.asarray(getattr(grads_j[0], name))
        assert np.abs(t - j).max() <= 1e-4 * np.abs(j).max() + 1e-7, name
        assert np.abs(j).max() > 0, name
    np.testing.assert_allclose(np.asarray(grads_t[1]), np.asarray(grads_j[1]),
                               atol=1e-4 * float(np.abs(np.asarray(grads_j[1])).max()))


# ----------------------------------------------------------------------------------------
# CUDA (jax_triton) path
# ----------------------------------------------------------------------------------------

def _gpu_skip_reason():
    if jax.default_backend() != "gpu":
        return ("no CUDA device for jax (run with JAX_PLATFORMS=cuda TRITON_INTERPRET=0 on a "
                "GPU machine to test the jax_triton launcher)")
    if ct.KERNELS_INTERPRETED:
        return "TRITON_INTERPRET is on, so the kernels are interpreted (set TRITON_INTERPRET=0)"
    if not _have("jax_triton"):
        return "jax_triton is not installed"
    return None


@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_gpu_jax_triton_path_matches_references():
    width, height, channels = 37, 21, 14
    scene = random_scene(31, 2, 40, channels, width, height)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)
    expected, _ = reference_composite(scene, ids, ranges, width, height)
    weights = loss_weights(32, 2, width, height, channels)
    values, grads = triton_value_and_grads(scene, ids, ranges, width, height, weights)
    for name, a, e in zip(("color", "alpha", "depth"), values, expected):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=0, err_msg=name)
    if _have("rasterizer.composite_jax"):
        _, grads_j = jax_value_and_grads(scene, ids, ranges, width, height, weights)
        assert_grads_close(grads, grads_j, rtol=1e-4, label="gpu")
    # Gradients of a tiny scene against float64 finite differences, under jit.
    width, height = 19, 17
    scene = random_scene(3, 2, 7, 3, width, height)
    ids, ranges = bin_numpy(scene["means2d"], scene["conics"], scene["depths"], width, height)
    weights = loss_weights(11, 2, width, height, 3)
    jitted = jax.jit(lambda *f: triton_value_and_grads(dict(zip(FIELDS, f)), ids, ranges,
                                                       width, height, weights)[1])
    grads = {k: np.asarray(v) for k, v in jitted(*(scene[k] for k in FIELDS)).items()}
    expected = finite_difference_grads(scene, ids, ranges, width, height, weights)
    assert_grads_close(grads, expected, rtol=1e-4, label="gpu jit")
