"""Differentiable 3D Gaussian splatting for JAX (pure JAX and Triton backends).

This package must not import `reta3d`.
"""
from rasterizer.types import Camera, Gaussians, look_at_eg3d_label

__all__ = ["Camera", "Gaussians", "look_at_eg3d_label", "render", "RenderOutput"]


def __getattr__(name):
    # `render` pulls in the backends; keep `import rasterizer` light for the types.
    if name in ("render", "RenderOutput"):
        from rasterizer import render as _render_module
        return getattr(_render_module, name)
    raise AttributeError(name)
