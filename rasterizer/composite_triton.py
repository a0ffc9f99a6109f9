"""Per-pixel compositing with Triton kernels, differentiable through `jax.custom_vjp`.

Same signature and semantics as `rasterizer.composite_jax.composite_jax` (the reference
3DGS compositing rules, spelled out in `composite_triton`'s docstring; kernels in
`rasterizer/triton_kernels.py`). Two launchers run the same kernel source:

* CUDA (jax's default backend is "gpu" and Triton compiles): `jax_triton.triton_call`,
  imported lazily because it needs a GPU build of jaxlib.
* Anywhere else: Triton's interpreter. `TRITON_INTERPRET=1` must be in the environment
  before `triton` is imported (the `@triton.jit` decorator picks the interpreter at
  decoration time), so this module sets it before its own `import triton` and refuses to
  load if triton was already imported without it. jax arrays reach the kernels through
  `jax.pure_callback` -> numpy -> `torch.from_numpy` (CPU tensors) -> kernel -> numpy,
  which works under `jax.jit` and inside the custom VJP's forward and backward.
  (On a GPU machine with TRITON_INTERPRET=1 the interpreter path is used too.)
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from typing import Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

_TRUTHY = ("1", "true", "on", "yes")


def _configure_triton_interpreter() -> None:
    if jax.default_backend() == "gpu":
        return  # compile for the GPU unless the caller asked for the interpreter
    flag = os.environ.get("TRITON_INTERPRET")
    if flag is None:
        if "triton" in sys.modules:
            raise RuntimeError(
                "rasterizer.composite_triton: jax has no GPU here, so the Triton kernels must "
                "run under Triton's interpreter, but `triton` was imported before "
                "TRITON_INTERPRET=1 was set. Set TRITON_INTERPRET=1 in the environment (or "
                "import rasterizer.composite_triton) before anything imports triton.")
        os.environ["TRITON_INTERPRET"] = "1"
    elif flag.strip().lower() not in _TRUTHY:
        raise RuntimeError(
            f"rasterizer.composite_triton: TRITON_INTERPRET={flag!r} but jax has no GPU "
            f"(default backend {jax.default_backend()!r}); the Triton kernels can only run "
            "under the interpreter here. Unset TRITON_INTERPRET or set it to 1.")


_configure_triton_interpreter()

import triton  # noqa: E402  (must follow the interpreter set-up above)

from rasterizer import triton_kernels  # noqa: E402
from rasterizer.binning import TILE_SIZE  # noqa: E402

# Whether the kernels were decorated as interpreted functions (decided by TRITON_INTERPRET
# when `triton_kernels` was imported); this, not the jax backend alone, picks the launcher.
KERNELS_INTERPRETED = not isinstance(triton_kernels.composite_forward_kernel,
                                     triton.runtime.JITFunction)

MAX_CHANNELS = 32
# List entries per batch of the forward kernel: the "every pixel is done" test (a
# block-wide reduction) runs once per batch.
DEFAULT_GAUSSIAN_BATCH = 32
NUM_WARPS = 4  # 256 pixels over 128 threads


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(value)))


def _grid_sizes(width: int, height: int) -> Tuple[int, int]:
    tiles_x = -(-width // TILE_SIZE)
    tiles_y = -(-height // TILE_SIZE)
    return tiles_x, tiles_x * tiles_y


def _constexprs(num_gaussians, num_intersections, num_channels, width, height):
    tiles_x, num_tiles = _grid_sizes(width, height)
    return dict(
        NUM_GAUSSIANS=num_gaussians, NUM_INTERSECTIONS=num_intersections,
        NUM_CHANNELS=num_channels, CHANNELS_PAD=_next_power_of_two(num_channels),
        WIDTH=width, HEIGHT=height, TILES_X=tiles_x, NUM_TILES=num_tiles,
        TILE_SIZE=TILE_SIZE)


def _forward_shapes(batch, width, height, channels):
    image = (batch, height, width)
    return (jax.ShapeDtypeStruct(image + (channels,), jnp.float32),  # color
            jax.ShapeDtypeStruct(image, jnp.float32),  # alpha
            jax.ShapeDtypeStruct(image, jnp.float32),  # depth
            jax.ShapeDtypeStruct(image, jnp.float32),  # final transmittance
            jax.ShapeDtypeStruct(image, jnp.int32))    # last composited list index


def _gradient_shapes(batch, num_gaussians, channels):
    return (jax.ShapeDtypeStruct((batch, num_gaussians, 2), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_gaussians, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_gaussians), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_gaussians, channels), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_gaussians), jnp.float32))


# --------------------------------------------------------------------------------------
# Interpreter launcher: numpy in, numpy out, via CPU torch tensors.
# --------------------------------------------------------------------------------------

def _to_torch(array, dtype):
    import torch
    # A fresh, writable, C-contiguous copy: jax hands callbacks read-only buffers.
    return torch.from_numpy(np.array(array, dtype=dtype, order="C", copy=True))


def _forward_host(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, *, width, height, gaussian_batch):
    import torch
    batch, num_gaussians, channels = colors.shape
    constexprs = _constexprs(num_gaussians, gaussian_ids.shape[1], channels, width, height)
    inputs = [_to_torch(a, np.float32) for a in
              (means2d, conics, opacities, colors, depths, background)]
    inputs += [_to_torch(gaussian_ids, np.int32), _to_torch(tile_ranges, np.int32)]
    # Every in-image pixel belongs to exactly one tile, so `empty` is fully overwritten.
    outputs = [torch.empty(s.shape, dtype=torch.int32 if s.dtype == jnp.int32 else torch.float32)
               for s in _forward_shapes(batch, width, height, channels)]
    grid = (batch * constexprs["NUM_TILES"],)
    triton_kernels.composite_forward_kernel[grid](
        *inputs, *outputs, BLOCK_G=gaussian_batch, **constexprs)
    return tuple(o.numpy() for o in outputs)


def _backward_host(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                   tile_ranges, final_transmittance, last_index, grad_color, grad_alpha,
                   grad_depth, *, width, height):
    import torch
    batch, num_gaussians, channels = colors.shape
    constexprs = _constexprs(num_gaussians, gaussian_ids.shape[1], channels, width, height)
    inputs = [_to_torch(a, np.float32) for a in
              (means2d, conics, opacities, colors, depths, background)]
    inputs += [_to_torch(gaussian_ids, np.int32), _to_torch(tile_ranges, np.int32),
               _to_torch(final_transmittance, np.float32), _to_torch(last_index, np.int32)]
    inputs += [_to_torch(a, np.float32) for a in (grad_color, grad_alpha, grad_depth)]
    gradients = [torch.zeros(s.shape, dtype=torch.float32)
                 for s in _gradient_shapes(batch, num_gaussians, channels)]
    grid = (batch * constexprs["NUM_TILES"],)
    # The zero-initialised buffers are passed twice: as the "init" operands (aliased to the
    # outputs by the GPU launcher) and as the outputs the kernel accumulates into.
    triton_kernels.composite_backward_kernel[grid](*inputs, *gradients, *gradients, **constexprs)
    return tuple(g.numpy() for g in gradients)


def _forward_callback(args, width, height, gaussian_batch):
    batch, _, channels = args[3].shape
    return jax.pure_callback(
        functools.partial(_forward_host, width=width, height=height,
                          gaussian_batch=gaussian_batch),
        _forward_shapes(batch, width, height, channels), *args, vmap_method="sequential")


def _backward_callback(args, width, height):
    batch, num_gaussians, channels = args[3].shape
    return jax.pure_callback(
        functools.partial(_backward_host, width=width, height=height),
        _gradient_shapes(batch, num_gaussians, channels), *args, vmap_method="sequential")


# --------------------------------------------------------------------------------------
# CUDA launcher: jax_triton (imported here only; it needs a GPU build of jaxlib).
# --------------------------------------------------------------------------------------

def _triton_call(*args, kernel, out_shapes, **kwargs):
    try:
        import jax_triton
    except Exception as error:  # noqa: BLE001 - a broken install is as unusable as none
        # One clear line instead of an import error deep in a jit trace; the same text as
        # render(backend="triton") raises before tracing (`render.triton_backend_problem`).
        from rasterizer.render import BackendUnavailableError
        raise BackendUnavailableError(
            "rasterizer: the triton backend needs the `jax_triton` package (jax_triton."
            f"triton_call launches the kernels on the GPU) but `import jax_triton` failed "
            f"({type(error).__name__}: {error}); pip install jax-triton (offline: from the "
            "wheelhouse, README 'GPU stack'), or use backend='jax'") from None
    # jax_triton <= 0.3 names the output spec `out_shape`; later releases `out_type`.
    parameters = inspect.signature(jax_triton.triton_call).parameters
    out_key = "out_shape" if "out_shape" in parameters else "out_type"
    return jax_triton.triton_call(*args, kernel=kernel, **{out_key: list(out_shapes)}, **kwargs)


def _forward_gpu(args, width, height, gaussian_batch):
    batch, num_gaussians, channels = args[3].shape
    constexprs = _constexprs(num_gaussians, args[6].shape[1], channels, width, height)
    # Every scalar is a constexpr, so operand indices == array indices in every jax_triton.
    return tuple(_triton_call(
        *args, kernel=triton_kernels.composite_forward_kernel,
        out_shapes=_forward_shapes(batch, width, height, channels),
        grid=(batch * constexprs["NUM_TILES"],), num_warps=NUM_WARPS,
        name="reta3d_composite_forward", BLOCK_G=gaussian_batch, **constexprs))


def _backward_gpu(args, width, height):
    batch, num_gaussians, channels = args[3].shape
    constexprs = _constexprs(num_gaussians, args[6].shape[1], channels, width, height)
    shapes = _gradient_shapes(batch, num_gaussians, channels)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    # Each zero buffer becomes the output it is aliased to: the kernel only atomically
    # adds, so its outputs must start at zero.
    aliases = {len(args) + i: i for i in range(len(zeros))}
    return tuple(_triton_call(
        *args, *zeros, kernel=triton_kernels.composite_backward_kernel, out_shapes=shapes,
        grid=(batch * constexprs["NUM_TILES"],), num_warps=NUM_WARPS,
        input_output_aliases=aliases, name="reta3d_composite_backward", **constexprs))


def _use_gpu_launcher() -> bool:
    return (not KERNELS_INTERPRETED) and jax.default_backend() == "gpu"


def _forward(args, width, height, gaussian_batch):
    if _use_gpu_launcher():
        return _forward_gpu(args, width, height, gaussian_batch)
    return _forward_callback(args, width, height, gaussian_batch)


def _backward(args, width, height):
    if _use_gpu_launcher():
        return _backward_gpu(args, width, height)
    return _backward_callback(args, width, height)


# --------------------------------------------------------------------------------------
# Differentiable op.
# --------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _composite(means2d, conics, opacities, colors, depths, background, gaussian_ids,
               tile_ranges, width, height, gaussian_batch):
    args = (means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges)
    color, alpha, depth, _, _ = _forward(args, width, height, gaussian_batch)
    return color, alpha, depth


def _composite_fwd(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                   tile_ranges, width, height, gaussian_batch):
    args = (means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges)
    color, alpha, depth, final_transmittance, last_index = _forward(
        args, width, height, gaussian_batch)
    return (color, alpha, depth), args + (final_transmittance, last_index)


def _composite_bwd(width, height, gaussian_batch, residuals, cotangents):
    del gaussian_batch
    grad_color, grad_alpha, grad_depth = cotangents
    final_transmittance = residuals[8]
    grad_means2d, grad_conics, grad_opacities, grad_colors, grad_depths = _backward(
        residuals + (grad_color, grad_alpha, grad_depth), width, height)
    # color = ... + T_final * background: a plain reduction, cheaper and deterministic in XLA.
    grad_background = jnp.einsum("bhw,bhwc->bc", final_transmittance, grad_color)
    return (grad_means2d, grad_conics, grad_opacities, grad_colors, grad_depths,
            grad_background, None, None)


_composite.defvjp(_composite_fwd, _composite_bwd)


def _check_inputs(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height):
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"composite_triton: {name} must be a positive Python int, "
                             f"got {value!r}")
    for name, array in (("means2d", means2d), ("conics", conics), ("colors", colors)):
        if np.ndim(array) != 3:
            raise ValueError(f"composite_triton: {name} must be (B, N, ...), got shape "
                             f"{np.shape(array)}")
    batch, num_gaussians, channels = np.shape(colors)
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"composite_triton: colors must have 1..{MAX_CHANNELS} channels, "
                         f"got shape {np.shape(colors)}")
    _, num_tiles = _grid_sizes(int(width), int(height))
    expected = {
        "means2d": (means2d, (batch, num_gaussians, 2)),
        "conics": (conics, (batch, num_gaussians, 3)),
        "opacities": (opacities, (batch, num_gaussians)),
        "depths": (depths, (batch, num_gaussians)),
        "background": (background, (batch, channels)),
        "tile_ranges": (tile_ranges, (batch, num_tiles, 2)),
    }
    for name, (array, shape) in expected.items():
        try:
            chex.assert_shape(array, shape)
        except AssertionError as error:
            raise ValueError(f"composite_triton: {name} must have shape {shape} (B={batch}, "
                             f"N={num_gaussians}, C={channels}, T={num_tiles} tiles of "
                             f"{TILE_SIZE}px for {width}x{height}), got {np.shape(array)}"
                             ) from error
    if np.ndim(gaussian_ids) != 2 or np.shape(gaussian_ids)[0] != batch:
        raise ValueError(f"composite_triton: gaussian_ids must be (B={batch}, K), got shape "
                         f"{np.shape(gaussian_ids)}")
    for name, array in (("gaussian_ids", gaussian_ids), ("tile_ranges", tile_ranges)):
        if not jnp.issubdtype(jnp.result_type(array), jnp.integer):
            raise TypeError(f"composite_triton: {name} must be an integer array, got dtype "
                            f"{jnp.result_type(array)}")
    for name, array in (("means2d", means2d), ("conics", conics), ("opacities", opacities),
                        ("colors", colors), ("depths", depths), ("background", background)):
        if not jnp.issubdtype(jnp.result_type(array), jnp.floating):
            raise TypeError(f"composite_triton: {name} must be a floating array, got dtype "
                            f"{jnp.result_type(array)}")


def composite_triton(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                     tile_ranges, width, height, *, gaussian_batch=DEFAULT_GAUSSIAN_BATCH):
    """Front-to-back alpha compositing of binned 2D Gaussians with Triton kernels.

    Pixel (row i, col j) is evaluated at (x, y) = (j + 0.5, i + 0.5), walking its tile's
    list in order: d = (x, y) - mean, power = -0.5 (a dx^2 + c dy^2) - b dx dy, skipped if
    power > 0; alpha = min(0.99, opacity exp(power)), skipped if alpha < 1/255; if
    T (1 - alpha) < 1e-4 the pixel stops and this Gaussian is not composited; otherwise
    color += c alpha T, depth += z alpha T, T *= 1 - alpha. Finally color += T background,
    alpha = 1 - T. Where the 0.99 clamp is active the gradient through alpha is zero.

    Args:
      means2d      (B, N, 2) float32  pixel coordinates (x = column, y = row)
      conics       (B, N, 3) float32  (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
      opacities    (B, N)    float32
      colors       (B, N, C) float32  C in 1..32
      depths       (B, N)    float32  camera z
      background   (B, C)    float32
      gaussian_ids (B, K)    int32    per-tile, front-to-back Gaussian ids (from binning)
      tile_ranges  (B, T, 2) int32    [start, end) into gaussian_ids, T = ceil(H/16)*ceil(W/16)
      width, height          static Python ints
      gaussian_batch         static: list entries per early-exit test (power of two helps)

    Returns:
      color (B, H, W, C) float32, alpha (B, H, W) float32 (1 - final transmittance),
      depth (B, H, W) float32 (alpha-weighted, not normalised).

    Differentiable (custom VJP) w.r.t. means2d, conics, opacities, colors, depths and
    background; the integer inputs get no gradient. Values are not checked for NaN (that
    would need a device sync); shapes and dtypes are.
    """
    _check_inputs(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height)
    if not isinstance(gaussian_batch, int) or gaussian_batch <= 0:
        raise ValueError(f"composite_triton: gaussian_batch must be a positive int, got "
                         f"{gaussian_batch!r}")
    floats = [jnp.asarray(a, jnp.float32) for a in
              (means2d, conics, opacities, colors, depths, background)]
    return _composite(*floats, jnp.asarray(gaussian_ids, jnp.int32),
                      jnp.asarray(tile_ranges, jnp.int32), int(width), int(height),
                      int(gaussian_batch))
