"""Differentiable 3D Gaussian splatting for JAX (pure JAX, C++ CPU and Triton backends).

    out = rasterizer.render(rasterizer.Gaussians(...), rasterizer.Camera(...))

This package must not import `reta3d`. The Triton backend (and torch / jax_triton) is imported
only when selected; the C++ CPU compositor is compiled on first use (composite_cpu.py).
"""
from rasterizer.types import Camera, Gaussians, look_at_eg3d_label
# Importing the submodule first binds the package attribute `render` to the module; the
# from-import then rebinds it to the function, which is what `rasterizer.render(...)` means.
from rasterizer.render import RenderOutput, render, render_pair

__all__ = ["Camera", "Gaussians", "look_at_eg3d_label", "render", "render_pair", "RenderOutput"]
