"""Rasterizer benchmark: forward and forward+backward time of a head-sized scene; prints JSON.

The scene is shaped like a RETA3D head: N Gaussians on an ellipsoid shell (the head's
surface) with few-pixel footprints, seen by EG3D's frontal FFHQ camera (radius 2.7,
focal 4.2647). Each configuration reports the median of --repeats timed runs after
--warmup runs (block_until_ready), the tile intersections per frame, and the peak device
memory where the device reports it.

  python experiments/benchmark_rasterizer.py                  # paper size: 68k, 512^2
  python experiments/benchmark_rasterizer.py --num_gaussians=8000 --resolution=128 \
      --batch_sizes=1 --channels=3 --repeats=3                # quick CPU run
"""
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_timing_flags(repeats=10, warmup=2)
cli.define_capacity_flag()
flags.DEFINE_integer("num_gaussians", 68_000, "Gaussians per head.")
flags.DEFINE_integer("resolution", 512, "Image width and height.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes (heads x cameras) to time.")
flags.DEFINE_list("channels", ["3", "32"], "Color channel counts to time.")
flags.DEFINE_list("backends", ["jax", "triton", "gsplat"], "Backends to try.")
flags.DEFINE_bool("include_interpreter", False,
                  "Also time the triton backend on CPU (Triton's interpreter: very slow).")
flags.DEFINE_bool("backward", True, "Also time forward+backward.")


def head_scene(num, channels, batch, seed=0):
    """numpy arrays of a head-like scene: (B, N, 3) means, scales, (B, N, 4) quats, ..."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(batch, num, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    semi_axes = np.array([0.19, 0.25, 0.21])
    means = direction * semi_axes * rng.uniform(0.97, 1.0, (batch, num, 1)) + [0, 0.02, 0.05]
    spacing = np.sqrt(4 * np.pi * 0.21 ** 2 / num)
    scales = spacing * rng.uniform(0.4, 1.2, (batch, num, 3))
    scales[..., 2] *= 0.2  # flat splats
    quats = rng.normal(size=(batch, num, 4))
    opacities = 1 / (1 + np.exp(-rng.normal(1.0, 1.5, (batch, num))))
    colors = rng.uniform(0, 1, (batch, num, channels))
    f32 = lambda x: np.asarray(x, np.float32)
    return tuple(map(f32, (means, scales, quats, opacities, colors)))


def frontal_camera(batch, resolution):
    from rasterizer.types import Camera, look_at_eg3d_label
    label = np.stack([look_at_eg3d_label(0.1 * b, 0.05 * b) for b in range(batch)])
    return Camera.from_eg3d(jnp.asarray(label), resolution)


def median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def peak_memory_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_ours(backend, scene, camera, capacity):
    from rasterizer import binning, projection
    from rasterizer.render import render
    from rasterizer.types import Gaussians

    gaussians = Gaussians(*map(jnp.asarray, scene))
    render_kw = dict(backend=backend, capacity=capacity)
    forward = jax.jit(lambda g, c: render(g, c, **render_kw).color)

    def loss(g, c):
        out = render(g, c, **render_kw)
        return jnp.sum(out.color) + jnp.sum(out.alpha)

    backward = jax.jit(jax.grad(loss))
    result = {"forward_ms": median_ms(lambda: forward(gaussians, camera), FLAGS.warmup,
                                      FLAGS.repeats)}
    if FLAGS.backward:
        result["forward_backward_ms"] = median_ms(lambda: backward(gaussians, camera),
                                                  FLAGS.warmup, FLAGS.repeats)
    proj = projection.project(gaussians.means, gaussians.scales, gaussians.quats,
                              camera.world_to_camera, camera.intrinsics, camera.width,
                              camera.height)
    x0, x1, y0, y1 = binning.tile_rectangles(proj.means2d, proj.radii, camera.width,
                                             camera.height)
    out = render(gaussians, camera, **render_kw)
    result["intersections_per_frame"] = float(jnp.mean(jnp.sum((x1 - x0) * (y1 - y0), -1)))
    result["overflow"] = np.asarray(out.overflow).tolist()
    result["visible_gaussians_per_frame"] = float(jnp.mean(jnp.sum(proj.radii > 0, -1)))
    return result


def bench_gsplat(scene, camera):
    import torch
    from gsplat import rasterization

    device = torch.device("cuda")
    means, scales, quats, opacities, colors = (
        torch.tensor(x, device=device, requires_grad=True) for x in scene)
    # Batch dims: B heads, one camera each.
    viewmats = torch.tensor(np.array(camera.world_to_camera), device=device)[:, None]
    ks = torch.tensor(np.array(camera.intrinsics), device=device)[:, None]

    def forward():
        return rasterization(means, quats, scales, opacities, colors, viewmats, ks,
                             camera.width, camera.height, near_plane=0.2, packed=False)[0]

    def timed(fn):
        for _ in range(FLAGS.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        return float(np.median(times))

    result = {"forward_ms": timed(forward)}
    if FLAGS.backward:
        result["forward_backward_ms"] = timed(lambda: forward().sum().backward())
    return result


def main(argv):
    del argv
    platform = jax.default_backend()
    device = jax.devices()[0]
    report = {"device": getattr(device, "device_kind", str(device)), "platform": platform,
              "num_gaussians": FLAGS.num_gaussians, "resolution": FLAGS.resolution,
              "results": []}
    for batch in map(int, FLAGS.batch_sizes):
        camera = frontal_camera(batch, FLAGS.resolution)
        for channels in map(int, FLAGS.channels):
            scene = head_scene(FLAGS.num_gaussians, channels, batch)
            for backend in FLAGS.backends:
                entry = {"backend": backend, "batch": batch, "channels": channels}
                if backend == "triton" and platform != "gpu" and not FLAGS.include_interpreter:
                    entry["skipped"] = "no GPU: Triton's interpreter is too slow to time " \
                                       "(--include_interpreter to force)"
                elif backend == "gsplat" and platform != "gpu":
                    entry["skipped"] = "gsplat's CUDA rasterizer needs a GPU"
                else:
                    try:
                        if backend == "gsplat":
                            entry.update(bench_gsplat(scene, camera))
                        else:
                            entry.update(bench_ours(backend, scene, camera,
                                                    FLAGS.capacity or None))
                        entry["peak_device_bytes"] = peak_memory_bytes()
                    except (ImportError, RuntimeError) as error:
                        entry["skipped"] = f"{type(error).__name__}: {error}"[:300]
                report["results"].append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli.run(main)
