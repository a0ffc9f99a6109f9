"""`render`: projection -> tile binning -> compositing (jax, cpu or triton backend).

Reference 3DGS semantics (see projection.py, binning.py, composite_jax.py for the details and
the few documented deviations). Non-finite Gaussians are culled: a Gaussian with any NaN/inf
field (mean, scale, quaternion, opacity or color) renders nothing and gets zero gradient; the
others are unaffected.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rasterizer import binning, projection
from rasterizer.types import Camera, Gaussians

BACKENDS = ("auto", "jax", "cpu", "triton")


class RenderOutput(NamedTuple):
    """color (..., H, W, C), alpha (..., H, W) = 1 - final transmittance,
    depth (..., H, W) = sum z alpha T (not normalised), overflow (...) int32: tile
    intersections that did not fit in the capacity (dropped), intersections (...) int32: the
    capacity this image needed for nothing to drop (`binning.Bins.intersections`)."""

    color: jax.Array
    alpha: jax.Array
    depth: jax.Array
    overflow: jax.Array
    intersections: jax.Array


def _compositor(backend: str):
    if backend == "jax":
        from rasterizer.composite_jax import composite_jax
        return composite_jax
    if backend == "cpu":
        from rasterizer.composite_cpu import composite_cpu
        return composite_cpu
    # Imported only when selected: the triton path pulls in torch / jax_triton.
    from rasterizer.composite_triton import composite_triton
    return composite_triton


class BackendUnavailableError(ImportError):
    """The triton backend cannot run here (a package it needs is missing or fails to import),
    or the cpu backend cannot be built (no C++ compiler, a failing build).
    The message names the package and what to do (one line)."""


_log = logging.getLogger("rasterizer")
_TRUTHY = ("1", "true", "on", "yes")
# Import outcome per module name (None = imports), so a missing package costs one failed
# import per process, not one per render() call.
_IMPORT_PROBLEMS = {}
_WARNED = set()


def _import_problem(module: str) -> Optional[str]:
    if module not in _IMPORT_PROBLEMS:
        try:
            if module == "triton" and importlib.util.find_spec("triton") is None:
                # Only looked up, not imported: on CPU triton must be imported after
                # composite_triton has set TRITON_INTERPRET (see there).
                raise ModuleNotFoundError("No module named 'triton'")
            if module != "triton":
                importlib.import_module(module)
            _IMPORT_PROBLEMS[module] = None
        except Exception as error:  # noqa: BLE001 - a broken install is as unusable as none
            _IMPORT_PROBLEMS[module] = f"{type(error).__name__}: {error}"
    return _IMPORT_PROBLEMS[module]


_INSTALL_HINTS = {
    "triton": "pip install triton",
    "jax_triton": "pip install jax-triton (offline: from the wheelhouse, README 'GPU stack')",
    "torch": "pip install torch",
}


def triton_backend_problem() -> Optional[str]:
    """None when the triton backend can run here, else a one-line reason naming the package
    (the text of `BackendUnavailableError` and of the "auto" fallback warning).

    On a GPU (jax's default backend "gpu", TRITON_INTERPRET unset or 0) the kernels launch
    through `jax_triton.triton_call`, so `triton` and `jax_triton` must import; elsewhere (or
    with TRITON_INTERPRET=1) Triton's interpreter runs them on CPU torch tensors, so `triton`
    and `torch` must import. Import outcomes are remembered for the process.
    """
    gpu = jax.default_backend() == "gpu"
    interpreted = os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY
    launcher = "jax_triton" if gpu and not interpreted else "torch"
    for module in ("triton", "rasterizer.composite_triton", launcher):
        problem = _import_problem(module)
        if problem is None:
            continue
        if module == "rasterizer.composite_triton":
            return (f"the triton backend cannot load rasterizer/composite_triton.py ({problem}); "
                    "use backend='jax' or fix the cause named here")
        where = ("jax_triton.triton_call launches the kernels on the GPU"
                 if launcher == "jax_triton"
                 else "Triton's interpreter runs the kernels on CPU torch tensors")
        return (f"the triton backend needs the `{module}` package ({where}) but "
                f"`import {module}` failed ({problem}); {_INSTALL_HINTS[module]}, or use "
                "backend='jax'")
    return None


def resolve_backend(backend: str) -> str:
    """"auto" -> "triton" on a GPU when it can run there, "cpu" (the C++ compositor,
    composite_cpu.py) on a CPU when it builds there, else "jax"; "jax" passes through; "cpu"
    and "triton" are checked.

    On a GPU whose Python lacks `jax_triton` (or `triton`), or on a CPU without a C++ compiler
    (or whose build fails), "auto" falls back to "jax" and logs one warning line (once per
    process) naming the cause; "triton" / "cpu" raise `BackendUnavailableError` (an
    ImportError) with that same line. See `triton_backend_problem` and
    `composite_cpu.cpu_backend_problem`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "jax":
        return backend
    if backend == "cpu" and jax.default_backend() != "cpu":
        raise BackendUnavailableError(
            f"rasterizer: the cpu backend runs on jax's CPU platform, but jax's default backend "
            f"here is {jax.default_backend()!r}; use backend='auto'")
    if backend == "cpu" or (backend == "auto" and jax.default_backend() == "cpu"):
        from rasterizer.composite_cpu import cpu_backend_problem
        return _checked(backend, "cpu", cpu_backend_problem())
    if backend == "auto" and jax.default_backend() != "gpu":
        return "jax"
    return _checked(backend, "triton", triton_backend_problem())


def _checked(backend: str, fast: str, problem: Optional[str]) -> str:
    """`fast` when it can run (problem None); else raises for an explicit request, or warns once
    per problem and returns "jax" for "auto"."""
    if problem is None:
        return fast
    if backend == fast:
        raise BackendUnavailableError(f"rasterizer: {problem}")
    if problem not in _WARNED:
        _WARNED.add(problem)
        _log.warning("rasterizer: backend='auto' falls back to the pure-JAX backend: %s",
                     problem)
    return "jax"


def _splat_inputs(gaussians: Gaussians, camera: Camera, keep=None):
    """Projection and the per-Gaussian compositor inputs → (proj, radii, opacities, colors)."""
    proj = projection.project(gaussians.means, gaussians.scales, gaussians.quats,
                              camera.world_to_camera, camera.intrinsics, camera.width,
                              camera.height)
    finite = (jnp.isfinite(gaussians.opacities)
              & jnp.all(jnp.isfinite(gaussians.colors), axis=-1))
    radii = jnp.where(finite, proj.radii, 0)
    # Culled Gaussians are never read by the compositor, but zeroing their opacity/colour keeps
    # NaN out of every arithmetic path (and out of the gradients of the others).
    keep = radii > 0 if keep is None else keep
    opacities = jnp.where(keep, gaussians.opacities, 0.0)
    colors = jnp.where(keep[..., None], gaussians.colors, 0.0)
    return proj, radii, opacities, colors


def _bins(proj, radii, opacities, camera, capacity):
    return binning.bin_gaussians(proj.means2d, proj.depths, radii, camera.width, camera.height,
                                 capacity, conics=proj.conics, opacities=opacities)


@functools.partial(jax.jit, static_argnames=("backend", "capacity"))
def _render_batched(gaussians: Gaussians, camera: Camera, background: jax.Array, *,
                    backend: str, capacity: int) -> RenderOutput:
    proj, radii, opacities, colors = _splat_inputs(gaussians, camera)
    bins = _bins(proj, radii, opacities, camera, capacity)
    color, alpha, depth = _compositor(backend)(
        proj.means2d, proj.conics, opacities, colors, proj.depths, background,
        bins.gaussian_ids, bins.tile_ranges, camera.width, camera.height)
    return RenderOutput(color, alpha, depth, bins.overflow, bins.intersections)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _composite_pair_generic(composite, inputs, inputs_b, gaussian_ids, tile_ranges, width,
                            height):
    """composite_jax_pair's contract for any compositor: two reverse sweeps."""
    outputs = composite(*inputs, gaussian_ids, tile_ranges, width, height)
    return outputs, outputs


def _pair_generic_fwd(composite, inputs, inputs_b, gaussian_ids, tile_ranges, width, height):
    outputs, pullback = jax.vjp(
        lambda *x: composite(*x, gaussian_ids, tile_ranges, width, height), *inputs)
    return (outputs, outputs), pullback


def _pair_generic_bwd(composite, width, height, pullback, cotangents):
    return pullback(cotangents[0]), pullback(cotangents[1]), None, None


_composite_pair_generic.defvjp(_pair_generic_fwd, _pair_generic_bwd)


@functools.partial(jax.jit, static_argnames=("backend", "capacity"))
def _render_pair_batched(gaussians: Gaussians, gaussians_b: Gaussians, camera: Camera,
                         background: jax.Array, *, backend: str, capacity: int):
    proj, radii, opacities, colors = _splat_inputs(gaussians, camera)
    proj_b, _, opacities_b, colors_b = _splat_inputs(gaussians_b, camera, keep=radii > 0)
    bins = _bins(proj, radii, opacities, camera, capacity)
    inputs = (proj.means2d, proj.conics, opacities, colors, proj.depths, background)
    inputs_b = (proj_b.means2d, proj_b.conics, opacities_b, colors_b, proj_b.depths,
                background)
    if backend == "jax":
        from rasterizer.composite_jax import composite_jax_pair
        outputs, outputs_b = composite_jax_pair(inputs, inputs_b, bins.gaussian_ids,
                                                bins.tile_ranges, camera.width, camera.height)
    else:
        outputs, outputs_b = _composite_pair_generic(
            _compositor(backend), inputs, inputs_b, bins.gaussian_ids, bins.tile_ranges,
            camera.width, camera.height)
    return (RenderOutput(*outputs, bins.overflow, bins.intersections),
            RenderOutput(*outputs_b, bins.overflow, bins.intersections))


def _raise_on_overflow(overflow, capacity):
    def check(value):
        value = jax.device_get(value)
        if (value > 0).any():
            raise RuntimeError(
                f"rasterizer: {value.tolist()} tile intersections did not fit in capacity "
                f"{capacity} and were dropped; pass a larger `capacity` to render()")

    if isinstance(overflow, jax.core.Tracer):
        # Under an outer jit the count is only known on device: the callback raises at run
        # time (surfacing as a JaxRuntimeError carrying this message).
        jax.debug.callback(check, overflow)
    else:
        check(overflow)


def _batched_inputs(gaussians: Gaussians, camera: Camera, background):
    """render()'s argument checks and broadcasting → (gaussians (B, N, ·), camera (B, ·),
    background (B, C), batched: whether either input had a batch dimension). Errors name the
    argument and the expected shape."""
    means = jnp.asarray(gaussians.means)
    if means.ndim not in (2, 3) or means.shape[-1] != 3:
        raise ValueError(f"gaussians.means must be (N, 3) or (B, N, 3), got {means.shape}")
    num = means.shape[-2]
    lead = means.shape[:-2]
    expected = {"means": (num, 3), "scales": (num, 3), "quats": (num, 4), "opacities": (num,)}
    for name, tail in expected.items():
        shape = jnp.shape(getattr(gaussians, name))
        if shape != lead + tail:
            raise ValueError(f"gaussians.{name} must have shape {lead + tail}, got {shape}")
    colors_shape = jnp.shape(gaussians.colors)
    if len(colors_shape) != len(lead) + 2 or colors_shape[:-1] != lead + (num,) \
            or colors_shape[-1] < 1:
        raise ValueError(f"gaussians.colors must have shape {lead + (num, 'C')} with C >= 1, "
                         f"got {colors_shape}")
    channels = colors_shape[-1]
    w2c_shape = jnp.shape(camera.world_to_camera)
    k_shape = jnp.shape(camera.intrinsics)
    if w2c_shape[-2:] != (4, 4) or len(w2c_shape) not in (2, 3):
        raise ValueError(f"camera.world_to_camera must be (4, 4) or (B, 4, 4), got {w2c_shape}")
    if k_shape != w2c_shape[:-2] + (3, 3):
        raise ValueError(f"camera.intrinsics must be {w2c_shape[:-2] + (3, 3)}, got {k_shape}")
    if not (isinstance(camera.width, int) and isinstance(camera.height, int)
            and camera.width > 0 and camera.height > 0):
        raise ValueError(f"camera width/height must be positive ints, got "
                         f"{camera.width!r}, {camera.height!r}")

    batched = bool(lead) or len(w2c_shape) == 3
    batch_sizes = {s[0] for s in (means.shape, w2c_shape) if len(s) == 3}
    if len(batch_sizes) > 1:
        raise ValueError(f"batch mismatch: gaussians {means.shape[:-2]} vs camera "
                         f"{w2c_shape[:-2]}")
    batch = batch_sizes.pop() if batch_sizes else 1

    def batch_of(x, item_ndim):
        x = jnp.asarray(x)
        if x.ndim == item_ndim:
            x = x[None]
        return jnp.broadcast_to(x, (batch,) + x.shape[1:])

    gaussians_bn = Gaussians(batch_of(gaussians.means, 2), batch_of(gaussians.scales, 2),
                             batch_of(gaussians.quats, 2), batch_of(gaussians.opacities, 1),
                             batch_of(gaussians.colors, 2))
    camera_b = Camera(batch_of(camera.world_to_camera, 2), batch_of(camera.intrinsics, 2),
                      camera.width, camera.height)
    dtype = gaussians_bn.means.dtype
    if background is None:
        background_b = jnp.zeros((batch, channels), dtype)
    else:
        background = jnp.asarray(background, dtype)
        if background.shape not in ((channels,), (batch, channels)) and not (
                not batched and background.shape == (1, channels)):
            raise ValueError(f"background must be ({channels},) or ({batch}, {channels}), got "
                             f"{background.shape}")
        background_b = jnp.broadcast_to(background.reshape((-1, channels)), (batch, channels))

    return gaussians_bn, camera_b, background_b, batched


def _capacity(capacity, num, camera) -> int:
    """The static intersection capacity: `capacity`, or the default for N Gaussians."""
    if capacity is None:
        capacity = binning.default_capacity(num, camera.width, camera.height)
    if int(capacity) < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return int(capacity)


def render(gaussians: Gaussians, camera: Camera, background: Optional[jax.Array] = None,
           backend: str = "auto", capacity: Optional[int] = None,
           strict: bool = False) -> RenderOutput:
    """Renders Gaussians with differentiable 3D Gaussian splatting.

    gaussians: `Gaussians` with leading shape () or (B,): means (..., N, 3), scales (..., N, 3),
      quats (..., N, 4) wxyz, opacities (..., N), colors (..., N, C), float32.
    camera: `Camera`, world_to_camera (..., 4, 4), intrinsics (..., 3, 3); an unbatched
      camera (or unbatched Gaussians) is broadcast against a batch of B.
    background: (C,) or (B, C); None = zeros (black). The RETA3D configs train and sample on
      `config.render.background` (1.0, white): pass `jnp.full((3,), 1.0)` to match them.
    backend: "jax", "cpu", "triton" or "auto" (triton when jax.default_backend() == "gpu" and
      jax_triton imports; cpu, the C++ compositor, on a CPU where it builds; otherwise jax,
      with one warning line naming the cause: `resolve_backend`).
    capacity: static number K of (Gaussian, tile) intersection slots per image; None =
      `binning.default_capacity(N, W, H)`. Extra intersections are dropped and counted.
    strict: raise if any intersection was dropped: a host check when called eagerly, a
      `jax.debug.callback` that raises at run time when traced under an outer jit.

    Returns `RenderOutput` with color (..., H, W, C), alpha (..., H, W), depth (..., H, W),
    overflow (...) int32, intersections (...) int32 (the capacity that would have dropped
    nothing); `...` is () when neither input had a batch dimension.
    Jit-able, vmap-able; differentiable in reverse mode (jax.grad, jax.vjp) w.r.t. every
    Gaussian field, the background and the camera. Not in forward mode: the compositing of
    every backend is a jax.custom_vjp, so jax.jvp, jax.jacfwd and jax.hessian end in JAX's
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function" (use jax.jacrev).
    """
    backend = resolve_backend(backend)
    gaussians_bn, camera_b, background_b, batched = _batched_inputs(gaussians, camera,
                                                                    background)
    batch, num, channels = gaussians_bn.colors.shape
    dtype = gaussians_bn.means.dtype
    if num == 0:
        height, width = camera.height, camera.width
        out = RenderOutput(
            jnp.broadcast_to(background_b[:, None, None, :], (batch, height, width, channels)),
            jnp.zeros((batch, height, width), dtype), jnp.zeros((batch, height, width), dtype),
            jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))
    else:
        capacity = _capacity(capacity, num, camera)
        out = _render_batched(gaussians_bn, camera_b, background_b, backend=backend,
                              capacity=capacity)
        if strict:
            _raise_on_overflow(out.overflow, capacity)
    if not batched:
        out = RenderOutput(*(x[0] for x in out))
    return out


def render_pair(gaussians: Gaussians, gaussians_b: Gaussians, camera: Camera,
                background: Optional[jax.Array] = None, backend: str = "auto",
                capacity: Optional[int] = None) -> tuple[RenderOutput, RenderOutput]:
    """`render(gaussians, ...)` returned twice, (out, out_b), with out_b's gradient flowing to
    `gaussians_b` instead of `gaussians`.

    gaussians_b must hold the same values as `gaussians` (a second handle on the same
    Gaussians, typically computed with part of its upstream gradient stopped); only
    `gaussians` is rendered. This is how a training step sends two losses on one image to
    different parameters without rendering twice: on the jax backend one reverse sweep serves
    both cotangents (`composite_jax_pair`, about 0.7x the cost of two sweeps), on the cpu and
    triton backends two sweeps run. Arguments and returns as `render` (batched or not; num Gaussians
    >= 1); both outputs carry the same overflow.
    """
    backend = resolve_backend(backend)
    shapes = [jax.tree_util.tree_map(jnp.shape, g) for g in (gaussians, gaussians_b)]
    if shapes[0] != shapes[1]:
        raise ValueError("render_pair: gaussians and gaussians_b must have the same shapes, got "
                         f"{shapes[0]} and {shapes[1]}")
    batched_g, camera_b, background_b, batched = _batched_inputs(gaussians, camera, background)
    batched_g_b, _, _, _ = _batched_inputs(gaussians_b, camera, background)
    batch, num, _ = batched_g.colors.shape
    if num == 0:
        raise ValueError("render_pair needs at least one Gaussian")
    outs = _render_pair_batched(batched_g, batched_g_b, camera_b, background_b,
                                backend=backend, capacity=_capacity(capacity, num, camera))
    if not batched:
        outs = tuple(RenderOutput(*(x[0] for x in out)) for out in outs)
    return outs
