"""The C++ compositor (`rasterizer/composite_cpu.cc`, backend "cpu"): gradients against the
pure-JAX compositor on the two threading paths, and its build: the compiler's absence or
failure named in one line, an atomic build into the cache, dtype errors.

Its forward against the float64 numpy renderer, and its float64 gradients against finite
differences, are in test_rasterizer.py (the `backend` fixture runs those tests on both).
"""
import ctypes
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rasterizer import Camera, Gaussians, render, render_pair
from rasterizer.composite_cpu import cpu_backend_problem
from rasterizer.render import BackendUnavailableError, resolve_backend
from test_rasterizer import camera_for, random_scene

composite_cpu_module = sys.modules["rasterizer.composite_cpu"]
render_module = sys.modules["rasterizer.render"]

needs_compiler = pytest.mark.skipif(cpu_backend_problem() is not None,
                                    reason=str(cpu_backend_problem()))


def _grads(gaussians, camera, background, backend, weights):
    def loss(g):
        out = render(g, camera, background, backend=backend)
        return (jnp.sum(out.color * weights[0]) + jnp.sum(out.alpha * weights[1])
                + 0.1 * jnp.sum(out.depth * weights[1])), out
    return jax.jit(jax.grad(loss, has_aux=True))(gaussians)


@needs_compiler
@pytest.mark.parametrize("batch,channels", [(1, 32), (3, 1)])
def test_gradients_equal_the_jax_compositor(batch, channels):
    """batch 1: one image's tiles split between threads, each with private gradient
    accumulators summed at the end; batch 3: whole images per thread. Both against the
    pure-JAX compositor's custom VJP on the same scene (160 Gaussians, 37 x 29 px, the
    transmittance stop reached on part of the image)."""
    gaussians = random_scene(21 + batch, batch, 160, channels)
    camera = camera_for(batch)
    if batch == 1:  # unbatched inputs: the render() path of a single head and camera
        gaussians = Gaussians(*(x[0] for x in vars(gaussians).values()))
        camera = Camera(camera.world_to_camera[0], camera.intrinsics[0], camera.width,
                        camera.height)
    lead = () if batch == 1 else (batch,)
    rng = np.random.default_rng(batch)
    background = jnp.asarray(rng.uniform(0, 1, lead + (channels,)), jnp.float32)
    weights = (jnp.asarray(rng.normal(size=lead + (29, 37, channels)), jnp.float32),
               jnp.asarray(rng.normal(size=lead + (29, 37)), jnp.float32))
    grads_cpu, out_cpu = _grads(gaussians, camera, background, "cpu", weights)
    grads_jax, out_jax = _grads(gaussians, camera, background, "jax", weights)
    assert 0.02 < float(jnp.mean(out_jax.alpha > 0.999)) < 0.98  # the stop is exercised
    for a, b in zip(out_cpu[:3], out_jax[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        got, want = np.asarray(getattr(grads_cpu, name)), np.asarray(getattr(grads_jax, name))
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max(),
                                   err_msg=name)


@needs_compiler
def test_render_pair_on_the_cpu_backend():
    """render_pair's two gradient handles through the cpu compositor (the generic pair: one
    forward, one C++ reverse sweep per cotangent) equal the jax backend's one-sweep pair."""
    gaussians, camera = random_scene(4, 2, 160, 3), camera_for(2)
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 29, 37, 3))

    def grads(backend):
        def loss(g, g_b):
            out, out_b = render_pair(g, g_b, camera, backend=backend)
            return jnp.sum(out.color * w) + jnp.sum(out_b.alpha * w[..., 0])
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(gaussians, gaussians)

    for got, want in zip(jax.tree_util.tree_leaves(grads("cpu")),
                         jax.tree_util.tree_leaves(grads("jax"))):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not tried to build the library yet, with an empty cache."""
    monkeypatch.setattr(composite_cpu_module, "_STATE", {})
    monkeypatch.setattr(render_module, "_WARNED", set())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_no_compiler_is_named_and_auto_falls_back_with_one_warning(monkeypatch, fresh_state,
                                                                   caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    problem = cpu_backend_problem()
    assert "no C++ compiler `no-such-compiler-here` is on PATH" in problem
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler"):
        resolve_backend("cpu")
    caplog.set_level(logging.WARNING, logger="rasterizer")
    assert resolve_backend("auto") == "jax"
    assert resolve_backend("auto") == "jax"
    records = [r for r in caplog.records if r.name == "rasterizer"]
    assert len(records) == 1 and "falls back to the pure-JAX backend" in records[0].getMessage()


def test_cpu_backend_on_a_gpu_platform_is_refused(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(BackendUnavailableError, match="jax's default backend here is 'gpu'"):
        resolve_backend("cpu")


def test_failing_build_is_named_and_leaves_nothing_in_the_cache(monkeypatch, fresh_state):
    failing = fresh_state / "fake-cxx"
    failing.write_text("#!/bin/sh\necho 'fatal error: no headers here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    problem = cpu_backend_problem()
    assert "could not build or load rasterizer/composite_cpu.cc" in problem
    assert "fatal error: no headers here" in problem
    leftovers = list((fresh_state / "reta3d" / "composite_cpu").iterdir())
    assert leftovers == []  # the temporary output was removed, nothing half-written kept


@needs_compiler
def test_build_lands_in_the_cache_keyed_by_source_and_flags(fresh_state):
    compiler = composite_cpu_module._compiler()
    path = composite_cpu_module._library_path(compiler)
    assert path.parent == fresh_state / "reta3d" / "composite_cpu"
    composite_cpu_module._build(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    assert library.Reta3dCompositeForward and library.Reta3dCompositeBackward
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@needs_compiler
def test_dtype_and_shape_errors():
    from rasterizer.composite_cpu import composite_cpu
    b, n, w, h = 1, 4, 16, 16
    args = [jnp.zeros((b, n, 2), jnp.float16), jnp.zeros((b, n, 3), jnp.float16),
            jnp.zeros((b, n), jnp.float16), jnp.zeros((b, n, 3), jnp.float16),
            jnp.zeros((b, n), jnp.float16), jnp.zeros((b, 3), jnp.float16),
            jnp.zeros((b, 8), jnp.int32), jnp.zeros((b, 1, 2), jnp.int32)]
    with pytest.raises(TypeError, match="float32 or float64"):
        composite_cpu(*args, w, h)
    args = [a.astype(jnp.float32) if a.dtype == jnp.float16 else a for a in args]
    args[3] = args[3][..., :2]  # 2 color channels against a 3-channel background
    with pytest.raises(AssertionError, match=r"\(1, 3\) but expected \(1, 2\)"):
        composite_cpu(*args, w, h)


@needs_compiler
def test_bins_outside_the_buffers_are_an_error_not_a_stray_read():
    """gaussian_ids and tile_ranges index the other inputs and the gradient buffers in C++:
    an id outside [0, N) or a range outside [0, K] is refused with its position, forward and
    backward, before any of it is read; well-formed bins on the same inputs composite."""
    from rasterizer.composite_cpu import composite_cpu
    b, n, w, h, k = 1, 4, 16, 16, 8
    rng = np.random.default_rng(0)
    floats = [jnp.full((b, n, 2), 8.5, jnp.float32),   # at pixel (8, 8)'s centre
              jnp.tile(jnp.asarray([0.05, 0.0, 0.05], jnp.float32), (b, n, 1)),
              jnp.full((b, n), 0.5, jnp.float32),
              jnp.asarray(rng.uniform(size=(b, n, 3)), jnp.float32),
              jnp.arange(1.0, n + 1.0, dtype=jnp.float32)[None], jnp.ones((b, 3), jnp.float32)]
    ids = jnp.asarray([[0, 1, 2, 3, 0, 0, 0, 0]], jnp.int32)
    good = jnp.asarray([[[0, 4]]], jnp.int32)
    color, alpha, _ = composite_cpu(*floats, ids, good, w, h)
    assert float(alpha[0, 8, 8]) == pytest.approx(1 - 0.5 ** 4, rel=1e-5)

    def run(ids, ranges):
        def loss(f):
            return jnp.sum(composite_cpu(*f, ids, ranges, w, h)[0])
        return jax.block_until_ready(jax.grad(loss)(floats))
    run(ids, good)
    for bad_ids, ranges, message in (
            (ids.at[0, 2].set(n), good, r"gaussian_ids\[0, 2\] = 4 is not a Gaussian \(N = 4\)"),
            (ids.at[0, 1].set(-7), good, r"gaussian_ids\[0, 1\] = -7"),
            (ids, jnp.asarray([[[0, k + 1]]], jnp.int32), r"tile_ranges outside \[0, capacity\]"),
            (ids, jnp.asarray([[[3, 2]]], jnp.int32), r"\[3, 2\), capacity 8")):
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(composite_cpu(*floats, bad_ids, ranges, w, h))
        with pytest.raises(Exception, match=message):
            run(bad_ids, ranges)
