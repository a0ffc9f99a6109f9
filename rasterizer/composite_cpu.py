"""Tile compositing on the CPU in C++ (`composite_cpu.cc`), called through the XLA FFI.

The same contract, arguments and results as `composite_jax.composite_jax` (reference 3DGS
semantics; float32 or float64), computed by the reference's per-pixel loops: front to back
with the early stop, and back to front for the gradient, threads splitting the images (or a
single image's tiles). On two CPU cores it is several times faster than the pure-JAX
compositor, whose chunked while-loop leaves one core idle and recomputes whole (tiles, 256,
64) arrays per step.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else `g++`)
against jaxlib's FFI headers (`jax.ffi.include_dir()`) and kept under the user's cache
directory (`$XDG_CACHE_HOME/reta3d/composite_cpu/`, else `~/.cache/...`), keyed by the
source, the jaxlib version and the flags, so later processes load it in milliseconds. Where it
cannot be built (no compiler, a failing build), `cpu_backend_problem()` says why in one line;
`render.resolve_backend` then raises for backend="cpu" and warns once for "auto".
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rasterizer.composite_jax import _check_inputs

_SOURCE = pathlib.Path(__file__).with_name("composite_cpu.cc")
# -march=native: the per-pixel loops are SIMD code (AVX2 where there is one); the cache key
# includes the CPU's flags, so a cache shared between different machines never mixes them.
# -ffinite-math-only (with no traps, errno or signed zeros) lets GCC turn the loops' min/max
# and selects into vector code, 4-5x faster; the inputs are finite (render() culls non-finite
# Gaussians before binning). No -ffast-math: it would reassociate sums and, linked into a
# shared library, set flush-to-zero for the whole process.
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno",
          "-ffinite-math-only", "-fno-signed-zeros", "-std=c++17", "-fPIC", "-shared",
          "-pthread")
_FORWARD, _BACKWARD = "reta3d_composite_forward", "reta3d_composite_backward"
_LOCK = threading.Lock()
_STATE = {}  # "problem": None or str, once tried


def cache_dir() -> pathlib.Path:
    """Where the compiled library is kept: $XDG_CACHE_HOME/reta3d/composite_cpu (else
    ~/.cache/reta3d/composite_cpu)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "reta3d" / "composite_cpu"


def _compiler() -> Optional[str]:
    name = os.environ.get("CXX", "g++")
    return shutil.which(name)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _library_path(compiler: str) -> pathlib.Path:
    import jaxlib
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(f"{jaxlib.__version__} {compiler} {' '.join(_FLAGS)} {_cpu_flags()}".encode())
    return cache_dir() / f"composite_cpu_{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
    """Compiles the library to `target` (atomically: a temporary file renamed into place, so
    concurrent processes never load a half-written one). Raises RuntimeError with the
    compiler's last lines."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"`{' '.join(command)}` failed: {tail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load() -> Optional[str]:
    """Builds (once per cache), loads and registers the FFI targets; returns None or the
    problem in one line."""
    with _LOCK:
        if "problem" in _STATE:
            return _STATE["problem"]
        problem = None
        compiler = _compiler()
        if compiler is None:
            problem = (f"the cpu backend compiles rasterizer/composite_cpu.cc on first use but "
                       f"no C++ compiler `{os.environ.get('CXX', 'g++')}` is on PATH (Debian/"
                       "Ubuntu: apt-get install g++; or set CXX)")
        else:
            try:
                path = _library_path(compiler)
                if not path.exists():
                    _build(compiler, path)
                library = ctypes.cdll.LoadLibrary(str(path))
                for name, symbol in ((_FORWARD, "Reta3dCompositeForward"),
                                     (_BACKWARD, "Reta3dCompositeBackward")):
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            except Exception as error:  # noqa: BLE001 - any failure means the path is unusable
                problem = (f"the cpu backend could not build or load rasterizer/composite_cpu.cc "
                           f"({type(error).__name__}: {error})")
        _STATE["problem"] = problem
        return problem


def cpu_backend_problem() -> Optional[str]:
    """None when the C++ compositor is built and registered (building it on the first call),
    else a one-line reason (no compiler, or the compiler's error)."""
    return _load()


def _attrs(width, height):
    return dict(width=np.int64(width), height=np.int64(height))


def _forward(means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
             width, height):
    problem = _load()
    if problem is not None:
        raise RuntimeError(f"rasterizer: {problem}")
    batch, dtype, channels = opacities.shape[0], means2d.dtype, colors.shape[-1]
    image = jax.ShapeDtypeStruct((batch, height, width), dtype)
    out_types = (jax.ShapeDtypeStruct((batch, height, width, channels), dtype), image, image,
                 image, jax.ShapeDtypeStruct((batch, height, width), jnp.int32))
    color, alpha, depth, trans, last = jax.ffi.ffi_call(
        _FORWARD, out_types, vmap_method="sequential")(
        means2d, conics, opacities, colors, depths, background,
        gaussian_ids.astype(jnp.int32), tile_ranges.astype(jnp.int32), **_attrs(width, height))
    return (color, alpha, depth), (trans, last)


def _check(means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
           width, height):
    _check_inputs(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height)
    dtype = means2d.dtype
    if dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"composite_cpu: float32 or float64 inputs, got {dtype}")
    for name, value in (("conics", conics), ("opacities", opacities), ("colors", colors),
                        ("depths", depths), ("background", background)):
        if value.dtype != dtype:
            raise TypeError(f"composite_cpu: {name} is {value.dtype}, means2d {dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def composite_cpu(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height):
    """Front-to-back alpha compositing of binned Gaussians (C++ on the CPU).

    means2d (B, N, 2), conics (B, N, 3), opacities (B, N), colors (B, N, C), depths (B, N),
    background (B, C): float32 or float64, one dtype; gaussian_ids (B, K) int32 and
    tile_ranges (B, T, 2) int32 from `binning.bin_gaussians`; width, height static ints.
    Returns color (B, H, W, C), alpha (B, H, W) = 1 - final transmittance and depth (B, H, W)
    = sum z alpha T (not normalised), as `composite_jax`. Differentiable w.r.t. all float
    inputs. Raises TypeError on other dtypes, RuntimeError when the library cannot be built
    (`cpu_backend_problem`).
    """
    _check(means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
           width, height)
    outputs, _ = _forward(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                          tile_ranges, width, height)
    return outputs


def _composite_fwd(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                   tile_ranges, width, height):
    _check(means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
           width, height)
    outputs, (trans, last) = _forward(means2d, conics, opacities, colors, depths, background,
                                      gaussian_ids, tile_ranges, width, height)
    return outputs, (means2d, conics, opacities, colors, depths, background, gaussian_ids,
                     tile_ranges, trans, last)


def _composite_bwd(width, height, residuals, cotangents):
    (means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges, trans,
     last) = residuals
    g_color, g_alpha, g_depth = (jnp.asarray(c, means2d.dtype) for c in cotangents)
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                      for x in (means2d, conics, opacities, colors, depths, background))
    grads = jax.ffi.ffi_call(_BACKWARD, out_types, vmap_method="sequential")(
        means2d, conics, opacities, colors, depths, background,
        gaussian_ids.astype(jnp.int32), tile_ranges.astype(jnp.int32), trans, last,
        g_color, g_alpha, g_depth, **_attrs(width, height))
    return tuple(grads) + (None, None)


composite_cpu.defvjp(_composite_fwd, _composite_bwd)
