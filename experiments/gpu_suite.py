"""The GPU suite: the stack, correctness on the GPU and every benchmark in one run, one JSON.

  python experiments/gpu_suite.py --out=DIR            # one CUDA GPU (H100/H200 class)
  python experiments/gpu_suite.py --out=DIR --smoke    # CPU, tiny sizes (CI: tests/test_gpu_suite.py)

Everything goes to DIR/gpu_suite.json, rewritten after every section (a temporary file, then
os.replace), so a crash or a timeout keeps what was measured. Each section runs in its own
Python process (`gpu_suite.py --section=NAME`) under a time budget (--budget_s for the whole
run, BUDGETS per section): a hung compile, a crash or an out-of-memory ends that section
only, its exception and traceback land in the JSON, the next section starts, and the peak GPU
memory a section reports is its own. Progress lines with the elapsed time go to stdout; each
section's output also to DIR/logs/NAME.log, pytest's to DIR/pytest_gpu.log (+ .xml).

Sections, in order:

  stack        GPU name, driver and CUDA versions, jax/jaxlib/triton/jax-triton/torch/... versions,
               whether jax_triton imports, what rasterizer backend "auto" resolves to here.
  pytest       `JAX_PLATFORMS=cuda TRITON_INTERPRET=0 pytest tests/test_rasterizer_triton.py`:
               the Triton kernels launched through jax_triton against the float64 per-pixel
               reference, float64 finite differences and the pure-JAX backend (small scenes).
  correctness  the template head (63,029 Gaussians, 256² + 64² UV maps) rendered at 512² by
               triton (float32), jax (float32) and jax (float64): values and the gradients of
               every Gaussian field against each other, and against a float64 per-pixel numpy
               renderer on sample tiles (values; gradients through directional float64 central
               differences). Tolerances in CORRECTNESS_TOLERANCES, recorded in the JSON.
  rasterizer   forward and forward+backward ms: 68k-Gaussian head scene, 512², B 1 and 8,
               C 3 and 32, backends jax and triton (`experiments/benchmark_rasterizer.py`'s scene).
  table1b      Tab. 1(b) Gen / Rend / Dri FPS at batch 1 (5 identities x 240 frames) and the
               batch-32 throughput; paper config (configs/ffhq512.py), random init.
  networks     generate_static and animate at batch 1 and 32 in fp32 (matmul precision
               "highest"), TF32 ("tensorfloat32") and bf16 (config dtype bfloat16).
  train_fp32, train_bf16
               the paper-config training iteration (G step + D step + R1 every 16) in images/s,
               and the peak GPU memory of that process (`memory_stats()["peak_bytes_in_use"]`).

Timings are medians of repeated runs after warm-up, each ended by block_until_ready. Functions
are lowered one by one and compiled in parallel threads (--compile_workers), which cuts the
compile wall time on a many-core GPU host; first-call compile seconds are recorded.
--smoke runs the same sections and code on the CPU at tiny sizes (the Triton kernels under
Triton's interpreter; XLA's optimisations off) so that CI keeps the suite from rotting;
its numbers mean nothing and the JSON says so ("smoke": true).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("stack", "pytest", "correctness", "rasterizer", "table1b", "networks",
            "train_fp32", "train_bf16")
# Not run with --smoke: its code path is train_fp32's with config.model.dtype = "bfloat16",
# and one more tiny training compile costs CI more than it protects.
SMOKE_SKIPS = {"train_bf16": "not run with --smoke: the same code as train_fp32 with "
                             "config.model.dtype='bfloat16' (one more CPU compile of the "
                             "training step)"}
# Seconds per section (each is also capped by what is left of --budget_s).
BUDGETS = {"stack": 60, "pytest": 150, "correctness": 120, "rasterizer": 120, "table1b": 150,
           "networks": 120, "train_fp32": 180, "train_bf16": 180}
SMOKE_BUDGETS = {"stack": 60, "pytest": 90, "correctness": 100, "rasterizer": 100,
                 "table1b": 120, "networks": 100, "train_fp32": 150, "train_bf16": 150}
DEFAULT_BUDGET_S = 480.0         # the "under 8 minutes" (the GPU run's hard limit is 10)
DEFAULT_SMOKE_BUDGET_S = 170.0
MIN_SECTION_S = 15.0             # a section with less time left is skipped, not started

# Sizes of the full run (the paper's) and of --smoke (tiny, CPU).
SIZES = {
    "correctness": dict(face_resolution=256, mouth_resolution=64, image=512, sample_tiles=8,
                        yaw=0.25, pitch=0.1),
    "rasterizer": dict(num_gaussians=68_000, resolution=512, batch_sizes=(1, 8),
                       channels=(3, 32), backends=("jax", "triton"), warmup=2, repeats=10),
    "table1b": dict(config="ffhq512", identities=5, frames=240, repeats=10, warmup=2,
                    throughput_batch=32, throughput_identities=2, throughput_frames=30),
    # Batch 1 only: table1b has the batch-32 throughput; six more compiles cost ~30 s.
    "networks": dict(config="ffhq512", batch_sizes=(1,), repeats=10, warmup=2,
                     precisions=("fp32", "tf32", "bf16")),
    "train": dict(config="ffhq512", warmup=1, repeats=5, batch_fallbacks=(16, 8)),
}
SMOKE_SIZES = {
    "correctness": dict(face_resolution=8, mouth_resolution=4, image=16, sample_tiles=1,
                        yaw=0.25, pitch=0.1),
    "rasterizer": dict(num_gaussians=24, resolution=16, batch_sizes=(1,), channels=(3,),
                       backends=("jax", "triton"), warmup=1, repeats=2),
    # throughput_batch 1: the throughput code path reuses the batch-1 compilations.
    "table1b": dict(config="smoke", identities=1, frames=3, repeats=2, warmup=1,
                    throughput_batch=1, throughput_identities=1, throughput_frames=3),
    "networks": dict(config="smoke", batch_sizes=(1,), repeats=2, warmup=1,
                     precisions=("fp32", "tf32", "bf16")),
    "train": dict(config="smoke", warmup=1, repeats=1, batch_fallbacks=()),
}

# Correctness tolerances (the "correctness" section). Values: float32 renders against a
# float64 one, per output (color, alpha, depth; depth relative to max(1, max |depth|)): the
# 99.9th percentile of |error| and its maximum (a few pixels may flip a threshold decision,
# e.g. alpha >= 1/255, between float32 and float64). Gradients: relative L2 error per field.
# Directional derivatives: |<g, v> - finite difference| / sum |g_ref * v| per field.
CORRECTNESS_TOLERANCES = {
    "value_p999_f32": 1e-4, "value_max_f32": 2e-2, "value_max_f64": 1e-6,
    "grad_rel_l2_f32": 1e-3, "grad_rel_l2_triton_vs_jax": 1e-3,
    "directional_f32": 1e-3, "directional_f64": 1e-6,
}
GRADIENT_FIELDS = ("means", "scales", "quats", "opacities", "colors", "background")
PRECISIONS = {"fp32": ("float32", "highest"), "tf32": ("float32", "tensorfloat32"),
              "bf16": ("bfloat16", None)}

_T0 = float(os.environ.get("GPU_SUITE_T0", time.time()))


def progress(message: str) -> None:
    """One progress line with the time since the suite started."""
    print(f"[gpu_suite {time.time() - _T0:7.1f}s] {message}", flush=True)


def _clean(value):
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json_atomic(path: pathlib.Path, data) -> None:
    """Writes `data` as JSON to a temporary file beside `path`, then renames it over `path`
    (atomic on POSIX), so a reader never sees half a file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ==========================================================================================
# Inside a section's process
# ==========================================================================================

class Recorder:
    """A section's results, saved to DIR/sections/NAME.json after every `save()`/`attempt()`.

    `attempt(label, fn)` runs one measurement: its exception (with traceback) is recorded in
    `errors` and the section goes on with the next measurement."""

    def __init__(self, path: pathlib.Path, name: str, smoke: bool,
                 sizes: Optional[Dict[str, Any]] = None):
        self.path = path
        self.data: Dict[str, Any] = {"section": name, "status": "running", "smoke": smoke,
                                     "started": _iso_now(), "sizes": sizes or {},
                                     "result": {}, "errors": []}
        self._start = time.perf_counter()
        self.save()

    @property
    def result(self) -> Dict[str, Any]:
        return self.data["result"]

    def save(self) -> None:
        self.data["seconds"] = time.perf_counter() - self._start
        write_json_atomic(self.path, self.data)

    def error(self, label: str, error: BaseException) -> None:
        self.data["errors"].append({
            "where": label, "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": "".join(traceback.format_exception(
                type(error), error, error.__traceback__))[-6000:]})
        progress(f"ERROR in {label}: {type(error).__name__}: {str(error)[:300]}")
        self.save()

    def attempt(self, label: str, fn: Callable[[], Any]):
        try:
            value = fn()
        except Exception as error:  # noqa: BLE001 - recorded, and the section goes on
            self.error(label, error)
            return None
        self.save()
        return value

    def finish(self) -> None:
        self.data["status"] = "error" if self.data["errors"] else "ok"
        self.save()


class Context:
    """What a section function gets: its sizes, the recorder, the run's options."""

    def __init__(self, name, recorder, smoke, sizes, compile_workers):
        self.name = name
        self.rec = recorder
        self.smoke = smoke
        self.sizes = sizes
        self.compile_workers = compile_workers


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> Dict[str, float]:
    """Median (min, max) milliseconds of `repeats` calls of fn after `warmup` calls, each call
    ended by jax.block_until_ready."""
    import jax
    import numpy as np
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "max_ms": 1e3 * float(np.max(times)), "repeats": len(times), "warmup": warmup}


def compile_parallel(lowered: Dict[Any, Any], workers: int) -> Dict[Any, Any]:
    """{key: lowered} → {key: (compiled or the exception, seconds)}; XLA compiles in `workers`
    threads (it releases the GIL), lowering (tracing) has already happened in the caller."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        key, low = item
        start = time.perf_counter()
        try:
            compiled = low.compile()
        except Exception as error:  # noqa: BLE001 - reported per function by the caller
            compiled = error
        return key, (compiled, time.perf_counter() - start)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(pool.map(one, list(lowered.items())))


def peak_memory() -> Dict[str, Optional[int]]:
    """The first device's allocator statistics (None on backends without them, e.g. CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "bytes_in_use": stats.get("bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}


def device_info() -> Dict[str, Any]:
    import jax
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count()}


def _reta3d(name: str):
    """A reta3d helper by name from the module that holds it (cameras / sequences / inference)."""
    import importlib
    for module in ("reta3d.cameras", "reta3d.sequences", "reta3d.inference"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"no reta3d module defines {name}")


def load_config(name: str, smoke_batch: int = 2):
    """"ffhq512" → configs/ffhq512.py (the paper); "smoke" → configs/demo.py shrunk to the
    smallest model with the same structure (for the CPU smoke run)."""
    import importlib
    if name != "smoke":
        return importlib.import_module(f"configs.{name}").get_config()
    c = importlib.import_module("configs.demo").get_config()
    c.model.z_dim = c.model.w_dim = 16
    c.model.mapping_layers = 1
    c.model.uv_resolution, c.model.mouth_resolution = 8, 4
    c.model.channel_base, c.model.channel_max = 64, 8
    c.model.mouth_channel_base, c.model.mouth_channel_max = 32, 4
    c.model.gd_channels, c.model.expression_dims = 4, 4
    c.disc.channel_base, c.disc.channel_max, c.disc.mbstd_group_size = 64, 8, 2
    c.render.resolution = 16
    c.train.batch_size = smoke_batch
    c.loss.vgg_layers = ("relu1_2",)
    return c


# ------------------------------------------------------------------------------------------
# Section: stack
# ------------------------------------------------------------------------------------------

PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "triton", "jax-triton", "torch", "flax", "optax",
            "orbax-checkpoint", "chex", "numpy", "scipy", "ml_collections", "grain",
            "array-record", "tensorflow-datasets", "tensorboardX", "imageio-ffmpeg", "pytest")


def _nvidia_smi() -> Dict[str, Any]:
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return {"available": False, "error": f"{type(error).__name__}: {error}"}
    cuda = None
    for token in header.stdout.split("CUDA Version:")[1:2]:
        cuda = token.split()[0].strip(" |")
    return {"available": query.returncode == 0, "gpus": query.stdout.strip().splitlines(),
            "cuda_version (driver)": cuda}


def section_stack(ctx: Context) -> None:
    import importlib.metadata as metadata
    import logging

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    r = ctx.rec.result
    r.update({"python": sys.version.split()[0], "platform": platform.platform(),
              "packages": versions, "nvidia_smi": _nvidia_smi(),
              "env": {k: os.environ.get(k) for k in (
                  "JAX_PLATFORMS", "TRITON_INTERPRET", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                  "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")}})
    ctx.rec.save()

    import jax
    r.update(device_info())
    r["devices"] = [str(d) for d in jax.devices()]
    r["jax_backend"] = jax.default_backend()
    try:
        r["platform_version"] = jax.devices()[0].client.platform_version
    except Exception as error:  # noqa: BLE001 - informative only
        r["platform_version"] = f"unavailable: {error}"
    r["memory"] = peak_memory()
    ctx.rec.save()
    try:
        import jax_triton
        r["jax_triton"] = {"imports": True, "version": getattr(jax_triton, "__version__", None)}
    except Exception as error:  # noqa: BLE001 - recorded: this is what the section asks
        r["jax_triton"] = {"imports": False, "error": f"{type(error).__name__}: {error}"}

    import importlib
    # The module (the package attribute `rasterizer.render` is the function).
    render_module = importlib.import_module("rasterizer.render")
    captured = []

    class Capture(logging.Handler):
        def emit(self, record):
            captured.append(record.getMessage())

    handler = Capture(logging.WARNING)
    logging.getLogger("rasterizer").addHandler(handler)
    try:
        r["backend_auto"] = render_module.resolve_backend("auto")
        r["triton_backend_problem"] = render_module.triton_backend_problem()
    finally:
        logging.getLogger("rasterizer").removeHandler(handler)
    r["backend_auto_warning"] = captured
    if not ctx.smoke and r["jax_backend"] == "gpu" and r["backend_auto"] != "triton":
        ctx.rec.error("stack", RuntimeError(
            f"backend='auto' resolves to {r['backend_auto']!r} on this GPU: the Triton "
            f"kernels will not be measured ({r['triton_backend_problem']})"))
    try:
        r["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as error:  # noqa: BLE001
        r["environment_info"] = f"unavailable: {error}"


# ------------------------------------------------------------------------------------------
# Section: correctness (template head)
# ------------------------------------------------------------------------------------------

TILE = 16


def naive_project(means, scales, quats, opacities, colors, world_to_camera, intrinsics,
                  width, height):
    """float64 numpy EWA projection of every Gaussian, written from the reference 3DGS rules
    (independent of rasterizer/projection.py): returns a dict of per-Gaussian arrays, with
    `keep` false for culled ones (depth <= 0.2, non-finite, det <= 0, off-image footprint)."""
    import numpy as np
    f64 = lambda x: np.asarray(x, np.float64)
    means, scales, quats, opacities, colors = map(f64, (means, scales, quats, opacities, colors))
    view, k = f64(world_to_camera), f64(intrinsics)
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    q = quats / np.linalg.norm(quats, axis=-1, keepdims=True)
    w, x, y, z = q.T
    rot = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)
    cov3 = np.einsum("nij,nj,nkj->nik", rot, scales ** 2, rot)
    r_view = view[:3, :3]
    t = means @ r_view.T + view[:3, 3]
    with np.errstate(all="ignore"):
        limx, limy = 1.3 * width / (2 * fx), 1.3 * height / (2 * fy)
        tx = np.clip(t[:, 0] / t[:, 2], -limx, limx) * t[:, 2]
        ty = np.clip(t[:, 1] / t[:, 2], -limy, limy) * t[:, 2]
        zeros = np.zeros_like(tx)
        jac = np.stack([np.stack([fx / t[:, 2], zeros, -fx * tx / t[:, 2] ** 2], -1),
                        np.stack([zeros, fy / t[:, 2], -fy * ty / t[:, 2] ** 2], -1)], -2)
        m = jac @ r_view
        cov2 = m @ cov3 @ np.swapaxes(m, -1, -2) + 0.3 * np.eye(2)
        det = cov2[:, 0, 0] * cov2[:, 1, 1] - cov2[:, 0, 1] ** 2
        mid = 0.5 * (cov2[:, 0, 0] + cov2[:, 1, 1])
        radius = np.ceil(3 * np.sqrt(mid + np.sqrt(np.maximum(0.1, mid * mid - det))))
        mu = np.stack([fx * t[:, 0] / t[:, 2] + cx, fy * t[:, 1] / t[:, 2] + cy], -1)
        conic = np.stack([cov2[:, 1, 1] / det, -cov2[:, 0, 1] / det, cov2[:, 0, 0] / det], -1)
        keep = (np.all(np.isfinite(t), -1) & (t[:, 2] > 0.2) & (det > 0)
                & np.isfinite(opacities) & np.all(np.isfinite(colors), -1))
        keep &= ~((mu[:, 0] + radius <= 0) | (mu[:, 0] - radius >= width)
                  | (mu[:, 1] + radius <= 0) | (mu[:, 1] - radius >= height))
        tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
        rect = np.stack([np.clip(np.floor((mu[:, 0] - radius) / TILE), 0, tiles_x),
                         np.clip(np.ceil((mu[:, 0] + radius) / TILE), 0, tiles_x),
                         np.clip(np.floor((mu[:, 1] - radius) / TILE), 0, tiles_y),
                         np.clip(np.ceil((mu[:, 1] + radius) / TILE), 0, tiles_y)], -1)
    return dict(depth=t[:, 2], mu=mu, conic=conic, rect=rect, keep=keep,
                opacities=opacities, colors=colors)


def naive_composite_tiles(proj, tiles, width, height, background, decisions=None):
    """float64 front-to-back compositing of the pixels of `tiles` [(tx, ty)], every Gaussian
    whose 3-sigma tile rectangle covers the tile, in (depth, index) order, with the reference
    rules (skip power > 0 or alpha < 1/255, alpha = min(0.99, o e^power), stop before
    T < 1e-4). Vectorised over a tile's pixels x its Gaussians. `decisions` (returned by a
    first call) freezes the discrete choices, so central differences measure the derivative of
    the smooth piece the analytic gradient belongs to. Returns ({(tx, ty): (rows, cols, color
    (P, C), alpha (P,), depth (P,))}, decisions)."""
    import numpy as np
    out, new_decisions = {}, {}
    background = np.asarray(background, np.float64)
    for tile in tiles:
        tx, ty = tile
        rows, cols = np.meshgrid(np.arange(ty * TILE, min((ty + 1) * TILE, height)),
                                 np.arange(tx * TILE, min((tx + 1) * TILE, width)),
                                 indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        if decisions is None:
            x0, x1, y0, y1 = proj["rect"].T
            members = np.nonzero(proj["keep"] & (x0 <= tx) & (tx < x1)
                                 & (y0 <= ty) & (ty < y1))[0]
            members = members[np.lexsort((members, proj["depth"][members]))]
        else:
            members = decisions[tile]["members"]
        dx = cols[:, None] + 0.5 - proj["mu"][members, 0]
        dy = rows[:, None] + 0.5 - proj["mu"][members, 1]
        a, b, c = proj["conic"][members].T
        power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
        raw = proj["opacities"][members] * np.exp(power)
        if decisions is None:
            clamped = raw > 0.99
            alpha = np.where(clamped, 0.99, raw)
            used = (power <= 0) & (alpha >= 1.0 / 255)
            keep_t = np.where(used, 1 - alpha, 1.0)
            before = np.cumprod(np.concatenate([np.ones((len(rows), 1)), keep_t[:, :-1]], 1), 1)
            stop = used & (before * (1 - alpha) < 1e-4)
            first_stop = np.where(stop.any(1), stop.argmax(1), len(members))
            composited = used & (np.arange(len(members)) < first_stop[:, None])
            new_decisions[tile] = {"members": members, "clamped": clamped,
                                   "composited": composited}
        else:
            clamped = decisions[tile]["clamped"]
            composited = decisions[tile]["composited"]
            alpha = np.where(clamped, 0.99, raw)
        keep_t = np.where(composited, 1 - alpha, 1.0)
        before = np.cumprod(np.concatenate([np.ones((len(rows), 1)), keep_t[:, :-1]], 1), 1)
        weight = np.where(composited, alpha * before, 0.0)
        final_t = before[:, -1] * keep_t[:, -1] if len(members) else np.ones(len(rows))
        color = weight @ proj["colors"][members] + final_t[:, None] * background
        depth = weight @ proj["depth"][members]
        out[tile] = (rows, cols, color, 1 - final_t, depth)
    return out, (new_decisions if decisions is None else decisions)


def _value_errors(actual, reference, depth_scale=1.0):
    import numpy as np
    err = np.abs(np.asarray(actual, np.float64) - np.asarray(reference, np.float64)) / depth_scale
    return {"max_abs": float(err.max()), "p999_abs": float(np.quantile(err, 0.999)),
            "mean_abs": float(err.mean())}


def _grad_errors(actual, reference):
    import numpy as np
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    norm = float(np.linalg.norm(r))
    return {"rel_l2": float(np.linalg.norm(a - r)) / max(norm, 1e-30),
            "max_abs_over_max_ref": float(np.abs(a - r).max()) / max(float(np.abs(r).max()),
                                                                     1e-30),
            "ref_norm": norm}


def template_head_scene(s, seed=0):
    """The template head's Gaussians (float32 numpy, fields of rasterizer.Gaussians without a
    batch axis) at UV resolutions s["face_resolution"] / s["mouth_resolution"]: the hand-made
    feature maps of experiments/render_head.py (flat discs on the surface, a baked texture)
    with random opacities (logits N(0.5, 1.5): some clamp at 0.99, many are translucent, so
    the stop rule and the clamp are both exercised), at a mild expression and jaw opening."""
    import jax
    import numpy as np

    from experiments import render_head
    from reta3d import binding, flame

    model = flame.load()
    head_binding = binding.HeadBinding.from_model(model, s["face_resolution"],
                                                  s["mouth_resolution"])
    face, mouth = render_head.procedural_features(model, head_binding, 1.0)
    rng = np.random.default_rng(seed)
    face[..., 13] = rng.normal(0.5, 1.5, face.shape[:-1])
    mouth[..., 13] = rng.normal(0.5, 1.5, mouth.shape[:-1])
    params = render_head.row_params({"expression": [1.0, -0.5, 0.5], "jaw_pose": [0.1, 0, 0]})
    gaussians, _ = jax.jit(lambda f, m, p: binding.head_gaussians(
        model, head_binding, f, m, p))(face, mouth, params)
    fields = {name: np.asarray(getattr(gaussians, name))[0] for name in
              ("means", "scales", "quats", "opacities", "colors")}
    return fields, head_binding.num_gaussians


def section_correctness(ctx: Context) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rasterizer import Camera, Gaussians, look_at_eg3d_label
    from rasterizer.render import render, resolve_backend

    s, rec, r = ctx.sizes, ctx.rec, ctx.rec.result
    tol = CORRECTNESS_TOLERANCES
    r["tolerances"] = tol
    r.update(device_info())
    start = time.perf_counter()
    fields, num = template_head_scene(s)
    res = s["image"]
    label = np.asarray(look_at_eg3d_label(s["yaw"], s["pitch"]), np.float32)
    camera32 = Camera.from_eg3d(jnp.asarray(label[None]), res)
    w2c = np.asarray(camera32.world_to_camera[0], np.float64)
    k = np.asarray(camera32.intrinsics[0], np.float64)
    rng = np.random.default_rng(1)
    background = rng.uniform(0, 1, 3).astype(np.float32)
    weights = (rng.normal(size=(1, res, res, 3)), rng.normal(size=(1, res, res)),
               rng.normal(size=(1, res, res)))
    r.update({"num_gaussians": num, "resolution": res,
              "scene_s": time.perf_counter() - start})
    progress(f"correctness: template head, {num} Gaussians at {res}^2")

    # Sample tiles for the per-pixel reference: the busiest half, and random non-empty ones.
    proj = naive_project(*(fields[n] for n in ("means", "scales", "quats", "opacities",
                                               "colors")), w2c, k, res, res)
    tiles_x = -(-res // TILE)
    counts = np.zeros((tiles_x, tiles_x), int)
    for x0, x1, y0, y1 in proj["rect"][proj["keep"]].astype(int):
        counts[x0:x1, y0:y1] += 1
    order = np.argsort(-counts.reshape(-1), kind="stable")
    nonempty = order[counts.reshape(-1)[order] > 0]
    busiest = list(nonempty[: (s["sample_tiles"] + 1) // 2])
    rest = [t for t in nonempty if t not in busiest]
    picked = busiest + list(rng.choice(rest, min(len(rest), s["sample_tiles"] - len(busiest)),
                                       replace=False))
    tiles = [(int(t // tiles_x), int(t % tiles_x)) for t in picked]
    mask = np.zeros((res, res), bool)
    for tx, ty in tiles:
        mask[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE] = True
    r["sample_tiles"] = {"tiles (tx, ty)": tiles, "pixels": int(mask.sum()),
                         "gaussians_per_tile": [int(counts[tx, ty]) for tx, ty in tiles],
                         "visible_gaussians": int(proj["keep"].sum()),
                         "tile_intersections": int(counts.sum())}
    masked = tuple(w * (mask if w.ndim == 3 else mask[..., None]) for w in weights)

    runs = {}

    def run(name, backend, dtype):
        start = time.perf_counter()
        f = {n: jnp.asarray(v, dtype) for n, v in fields.items()}
        camera = Camera(jnp.asarray(w2c[None], dtype), jnp.asarray(k[None], dtype), res, res)

        def loss(f, bg, wc, wa, wd):
            out = render(Gaussians(**f), camera, background=bg, backend=backend)
            value = jnp.sum(out.color * wc) + jnp.sum(out.alpha * wa) + jnp.sum(out.depth * wd)
            return value, (out.color, out.alpha, out.depth, out.overflow)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        outs = {}
        for which, w in (("full", weights), ("masked", masked)):
            (_, (color, alpha, depth, overflow)), (g, g_bg) = step(
                f, jnp.asarray(background, dtype), *(jnp.asarray(x, dtype) for x in w))
            grads = {n: np.asarray(g[n], np.float64) for n in fields}
            grads["background"] = np.asarray(g_bg, np.float64)
            outs[which] = dict(color=np.asarray(color[0], np.float64),
                               alpha=np.asarray(alpha[0], np.float64),
                               depth=np.asarray(depth[0], np.float64), grads=grads,
                               overflow=int(np.asarray(overflow).sum()))
        runs[name] = outs
        r.setdefault("runs", {})[name] = {
            "backend": backend, "dtype": jnp.dtype(dtype).name,
            "seconds (compile + 2 runs)": time.perf_counter() - start,
            "overflow": outs["full"]["overflow"]}
        progress(f"correctness: {name} rendered in {time.perf_counter() - start:.1f}s")

    rec.attempt("render triton float32", lambda: run("triton_f32", "triton", jnp.float32))
    rec.attempt("render jax float32", lambda: run("jax_f32", "jax", jnp.float32))

    def run64():
        enable_x64 = getattr(jax, "enable_x64", None)
        if enable_x64 is None:
            from jax.experimental import enable_x64
        with enable_x64(True):
            run("jax_f64", "jax", jnp.float64)
    rec.attempt("render jax float64", run64)
    r["backend_auto"] = resolve_backend("auto")

    checks = []

    def check(name, value, limit):
        ok = value is not None and value <= limit
        checks.append({"check": name, "value": value, "tolerance": limit, "pass": bool(ok)})

    depth_scale = 1.0
    if "jax_f64" in runs:
        depth_scale = max(1.0, float(np.abs(runs["jax_f64"]["full"]["depth"]).max()))
    # Whole image: float32 backends against float64, and triton against jax.
    pairs = [("triton_f32", "jax_f64", "f32"), ("jax_f32", "jax_f64", "f32"),
             ("triton_f32", "jax_f32", "triton_vs_jax")]
    comparisons = r.setdefault("whole_image", {})
    for a, b, kind in pairs:
        if a not in runs or b not in runs:
            continue
        entry = comparisons[f"{a} vs {b}"] = {"values": {}, "gradients": {}}
        for out in ("color", "alpha", "depth"):
            errs = _value_errors(runs[a]["full"][out], runs[b]["full"][out],
                                 depth_scale if out == "depth" else 1.0)
            entry["values"][out] = errs
            check(f"{a} vs {b}: {out} p99.9", errs["p999_abs"], tol["value_p999_f32"])
            check(f"{a} vs {b}: {out} max", errs["max_abs"], tol["value_max_f32"])
        for field in GRADIENT_FIELDS:
            errs = _grad_errors(runs[a]["full"]["grads"][field], runs[b]["full"]["grads"][field])
            entry["gradients"][field] = errs
            limit = tol["grad_rel_l2_f32" if kind == "f32" else "grad_rel_l2_triton_vs_jax"]
            check(f"{a} vs {b}: d/d{field} rel L2", errs["rel_l2"], limit)
    for name, outs in runs.items():
        check(f"{name}: tile intersections dropped", outs["full"]["overflow"], 0)
    rec.save()

    # Sample tiles: the float64 per-pixel renderer.
    start = time.perf_counter()
    reference, decisions = naive_composite_tiles(proj, tiles, res, res, background)
    per_pixel = r.setdefault("per_pixel_reference", {})
    per_pixel["seconds"] = time.perf_counter() - start
    for name, outs in runs.items():
        entry = per_pixel[name] = {}
        for index, out in ((2, "color"), (3, "alpha"), (4, "depth")):
            actual = np.concatenate([outs["full"][out][rows, cols]
                                     for rows, cols, *_ in reference.values()])
            expected = np.concatenate([ref[index] for ref in reference.values()])
            errs = _value_errors(actual, expected, depth_scale if out == "depth" else 1.0)
            entry[out] = errs
            if name.endswith("f64"):
                check(f"{name} vs per-pixel float64: {out} max", errs["max_abs"],
                      tol["value_max_f64"])
            else:
                check(f"{name} vs per-pixel float64: {out} p99.9", errs["p999_abs"],
                      tol["value_p999_f32"])
                check(f"{name} vs per-pixel float64: {out} max", errs["max_abs"],
                      tol["value_max_f32"])
    rec.save()

    # Directional derivatives of the sample tiles' loss: float64 central differences of the
    # per-pixel renderer (decisions frozen) against <gradient, v> of each backend.
    def tiles_loss(values):
        p = naive_project(*(values[n] for n in ("means", "scales", "quats", "opacities",
                                                "colors")), w2c, k, res, res)
        out, _ = naive_composite_tiles(p, tiles, res, res, values["background"], decisions)
        return sum(float(np.sum(weights[0][0][rows, cols] * color)
                         + np.sum(weights[1][0][rows, cols] * alpha)
                         + np.sum(weights[2][0][rows, cols] * depth))
                   for rows, cols, color, alpha, depth in out.values())

    base = {n: np.asarray(v, np.float64) for n, v in fields.items()}
    base["background"] = background.astype(np.float64)
    eps = 1e-6
    directional = r.setdefault("directional_derivatives", {"eps": eps})
    ref_name = "jax_f64" if "jax_f64" in runs else next(iter(runs), None)
    for field in GRADIENT_FIELDS:
        v = rng.normal(size=base[field].shape)
        plus = dict(base, **{field: base[field] + eps * v})
        minus = dict(base, **{field: base[field] - eps * v})
        numeric = (tiles_loss(plus) - tiles_loss(minus)) / (2 * eps)
        entry = directional[field] = {"finite_difference": numeric}
        scale = None
        if ref_name is not None:
            scale = float(np.sum(np.abs(runs[ref_name]["masked"]["grads"][field] * v)))
            entry["scale (sum |g_ref v|)"] = scale
        for name, outs in runs.items():
            analytic = float(np.sum(outs["masked"]["grads"][field] * v))
            error = abs(analytic - numeric) / max(scale or abs(numeric), 1e-30)
            entry[name] = {"analytic": analytic, "normalised_error": error}
            check(f"{name}: d/d{field} along a random direction vs float64 finite difference",
                  error, tol["directional_f64" if name.endswith("f64") else "directional_f32"])
    r["checks"] = checks
    failed = [c for c in checks if not c["pass"]]
    r["checks_passed"] = len(checks) - len(failed)
    r["checks_failed"] = len(failed)
    if failed:
        rec.error("checks", AssertionError(
            f"{len(failed)} of {len(checks)} correctness checks failed: "
            + "; ".join(f"{c['check']} = {c['value']} > {c['tolerance']}" for c in failed[:12])))


# ------------------------------------------------------------------------------------------
# Section: rasterizer benchmark
# ------------------------------------------------------------------------------------------

def section_rasterizer(ctx: Context) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.benchmark_rasterizer import frontal_camera, head_scene
    from rasterizer import Gaussians
    from rasterizer.render import render, resolve_backend

    s, rec, r = ctx.sizes, ctx.rec, ctx.rec.result
    r.update(device_info())
    r.update({"num_gaussians": s["num_gaussians"], "resolution": s["resolution"],
              "scene": "experiments/benchmark_rasterizer.py head_scene (ellipsoid shell), "
                       "EG3D frontal camera", "loss for the backward": "sum(color) + sum(alpha)",
              "capacity": "the renderer's default"})
    entries = r.setdefault("results", [])
    lowered, inputs = {}, {}
    for batch in s["batch_sizes"]:
        camera = frontal_camera(batch, s["resolution"])
        for channels in s["channels"]:
            scene = head_scene(s["num_gaussians"], channels, batch)
            gaussians = Gaussians(*map(jnp.asarray, scene))
            for backend in s["backends"]:
                def lower(backend=backend, gaussians=gaussians, camera=camera):
                    resolve_backend(backend)  # a clear error now, not deep in a trace
                    def forward(g, c):
                        out = render(g, c, backend=backend)
                        return out.color, out.overflow
                    fwd = jax.jit(forward)
                    def loss(g, c):
                        out = render(g, c, backend=backend)
                        return jnp.sum(out.color) + jnp.sum(out.alpha)
                    bwd = jax.jit(jax.grad(loss))
                    return fwd.lower(gaussians, camera), bwd.lower(gaussians, camera)
                key = (backend, batch, channels)
                low = rec.attempt(f"lower {key}", lower)
                if low is not None:
                    lowered[key + ("forward",)], lowered[key + ("forward_backward",)] = low
                    inputs[key] = (gaussians, camera)
        # Tile intersections per frame (the work the compositor does), from the float64
        # projection of the correctness section (no compile).
        scene = head_scene(s["num_gaussians"], 3, batch)
        counts = []
        for b in range(batch):
            proj = naive_project(*(x[b] for x in scene), np.asarray(camera.world_to_camera[b]),
                                 np.asarray(camera.intrinsics[b]), camera.width, camera.height)
            x0, x1, y0, y1 = proj["rect"][proj["keep"]].T
            counts.append(float(np.sum((x1 - x0) * (y1 - y0))))
        r.setdefault("intersections_per_frame", {})[str(batch)] = float(np.mean(counts))
    progress(f"rasterizer: compiling {len(lowered)} functions")
    start = time.perf_counter()
    compiled = compile_parallel(lowered, ctx.compile_workers)
    r["compile_wall_s"] = time.perf_counter() - start
    rec.save()
    for key, (gaussians, camera) in inputs.items():
        backend, batch, channels = key
        entry = {"backend": resolve_backend(backend), "batch": batch, "channels": channels}
        for mode in ("forward", "forward_backward"):
            fn, seconds = compiled[key + (mode,)]
            entry[f"{mode}_compile_s"] = seconds
            if isinstance(fn, Exception):
                rec.error(f"compile {key} {mode}", fn)
                continue
            timing = rec.attempt(f"time {key} {mode}", lambda fn=fn: time_calls(
                lambda: fn(gaussians, camera), s["warmup"], s["repeats"]))
            if timing is not None:
                entry[f"{mode}_ms"] = timing["median_ms"]
                entry[f"{mode}_min_max_ms"] = [timing["min_ms"], timing["max_ms"]]
        fn = compiled[key + ("forward",)][0]
        if not isinstance(fn, Exception):
            entry["overflow"] = np.asarray(fn(gaussians, camera)[1]).tolist()
        entry["memory_after"] = peak_memory()
        entries.append(entry)
        rec.save()
        progress(f"rasterizer: {backend} B={batch} C={channels}: "
                 f"fwd {entry.get('forward_ms', float('nan')):.3f} ms, "
                 f"fwd+bwd {entry.get('forward_backward_ms', float('nan')):.3f} ms")


# ------------------------------------------------------------------------------------------
# Section: Table 1(b)
# ------------------------------------------------------------------------------------------

PAPER_TABLE1B = {"hardware": "one NVIDIA RTX 2080 Ti, batch 1, 512x512 (paper Tab. 1b)",
                 "gen_fps": 203.0, "rend_fps": 129.9, "dri_fps": 79.2}


def section_table1b(ctx: Context) -> None:
    """Tab. 1(b) as experiments/benchmark.py measures it (its docstring has the protocol):
    Gen = generate_static + one animate (one jit); Rend = the rasterizer on those Gaussians;
    Dri = static part once per identity, then every frame (FLAME + G_d + binding + rasterizer,
    `inference.make_frame_fn`) dispatched back to back, blocked once; FPS = images / time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rasterizer
    from rasterizer.render import resolve_backend
    from reta3d import inference

    s, rec, r = ctx.sizes, ctx.rec, ctx.rec.result
    config = load_config(s["config"])
    config, generator, g_vars = inference.load_generator(config=config, random_init=True)
    model = generator.flame_model
    resolution = int(config.render.resolution)
    backend = config.render.backend
    background = jnp.full((3,), float(config.render.background), jnp.float32)
    frame_fn = inference.make_frame_fn(config, generator)
    frame_jit = getattr(frame_fn, "fn", frame_fn)   # RenderFunction or the jitted function
    r.update(device_info())
    r.update({"config": s["config"], "resolution": resolution,
              "num_gaussians": generator.num_gaussians, "backend": resolve_backend(backend),
              "weights": "random init", "dtype": config.model.dtype,
              "paper_reference (not measured here)": PAPER_TABLE1B})

    @jax.jit
    def gen_fn(g_vars, z, c, neutral):
        static = generator.generate_static(g_vars, z, c)
        gaussians, _ = generator.animate(g_vars, static, neutral)
        return gaussians

    @jax.jit
    def rend_fn(gaussians, labels):
        camera = rasterizer.Camera.from_eg3d(labels, resolution)
        out = rasterizer.render(gaussians, camera, background=background, backend=backend)
        return out.color, out.overflow    # overflow: intersections dropped (reported below)

    compiled_cache: Dict[Any, Any] = {}

    def measure(mode, batch, identities, frames):
        neutral = {k: np.repeat(v, batch, axis=0)
                   for k, v in _reta3d("neutral_flame")(model).items()}
        c = _reta3d("conditioning_labels")(config, batch)
        z = inference.latents_for_seeds(range(identities * batch), config.model.z_dim)
        z = z.reshape(identities, batch, -1)
        labels = np.repeat(_reta3d("frontal_label")()[None], batch, axis=0)
        sequence, _ = _reta3d("get_sequence")("builtin:talk", model, frames)
        num_frames = int(sequence["expression"].shape[0])
        sequence = {k: jnp.asarray(v) for k, v in sequence.items()}
        camera_labels = jnp.asarray(_reta3d("camera_path")("fixed", num_frames))
        index0 = jnp.asarray(0, jnp.int32)
        gaussians0 = jax.eval_shape(gen_fn, g_vars, z[0], c, neutral)
        static0 = jax.eval_shape(generator.jit_generate_static, g_vars, z[0], c)
        todo = {"gen": (gen_fn, (g_vars, z[0], c, neutral)),
                "rend": (rend_fn, (gaussians0, labels)),
                "static": (generator.jit_generate_static, (g_vars, z[0], c)),
                "frame": (frame_jit, (g_vars, static0, sequence, index0, camera_labels))}
        # Compilations are shared between the two modes where the shapes agree.
        keys = {name: (name, batch, num_frames if name == "frame" else None) for name in todo}
        lowered = {keys[name]: fn.lower(*args) for name, (fn, args) in todo.items()
                   if keys[name] not in compiled_cache}
        progress(f"table1b: {mode}: compiling {len(lowered)} functions")
        compiled_cache.update(compile_parallel(lowered, ctx.compile_workers))
        entry = {"batch": batch, "identities": identities, "frames": num_frames,
                 "flame_sequence": "builtin:talk", "repeats": s["repeats"],
                 "warmup": s["warmup"],
                 "compile_s": {name: compiled_cache[keys[name]][1] for name in todo}}
        fns = {}
        for name in todo:
            fn = compiled_cache[keys[name]][0]
            if isinstance(fn, Exception):
                raise fn
            fns[name] = fn

        gen_times, rend_times, all_gaussians = [], [], []
        for i in range(identities):
            t = time_calls(lambda: fns["gen"](g_vars, z[i], c, neutral), s["warmup"],
                           s["repeats"])
            gen_times.append(t["median_ms"])
            all_gaussians.append(fns["gen"](g_vars, z[i], c, neutral))
        for gaussians in all_gaussians:
            t = time_calls(lambda: fns["rend"](gaussians, labels), s["warmup"], s["repeats"])
            rend_times.append(t["median_ms"])
        # Dropped tile intersections make Rend and Dri look faster than they are (a
        # random-init generator at 512² can overflow the default capacity): reported beside.
        rend_overflow = np.stack([np.asarray(fns["rend"](g, labels)[1]) for g in all_gaussians])
        indices = [jnp.asarray(t, jnp.int32) for t in range(num_frames)]
        static = fns["static"](g_vars, z[0], c)
        for _ in range(s["warmup"]):
            jax.block_until_ready(fns["frame"](g_vars, static, sequence, index0, camera_labels))
        dri_times, frame_times = [], []
        for i in range(identities):
            start = time.perf_counter()
            static = fns["static"](g_vars, z[i], c)
            last = [fns["frame"](g_vars, static, sequence, t, camera_labels)
                    for t in indices][-1]
            jax.block_until_ready(last)
            dri_times.append(time.perf_counter() - start)
            static = jax.block_until_ready(fns["static"](g_vars, z[i], c))
            start = time.perf_counter()
            last = [fns["frame"](g_vars, static, sequence, t, camera_labels)
                    for t in indices][-1]
            jax.block_until_ready(last)
            frame_times.append(time.perf_counter() - start)
        gen_fps = 1e3 * batch / float(np.median(gen_times))
        rend_fps = 1e3 * batch / float(np.median(rend_times))
        entry.update({
            "gen_fps": gen_fps, "rend_fps": rend_fps,
            "dri_fps": float(np.median([num_frames * batch / t for t in dri_times])),
            "frame_path_fps (Dri without the static part)":
                float(np.median([num_frames * batch / t for t in frame_times])),
            "gen_plus_rend_fps (the paper's Dri relation)": 1 / (1 / gen_fps + 1 / rend_fps),
            "gen_ms_median": float(np.median(gen_times)),
            "rend_ms_median": float(np.median(rend_times)),
            "memory_after": peak_memory()})
        frame_overflow = np.asarray(fns["frame"](g_vars, static, sequence, index0,
                                                 camera_labels)[1])
        entry["rasterizer_overflow"] = {
            "rend": _reta3d("overflow_report")(rend_overflow, frame_fn.capacity),
            "dri (frame 0 of the last identity)": _reta3d("overflow_report")(
                frame_overflow, frame_fn.capacity)}
        if rend_overflow.any() or frame_overflow.any():
            entry["note"] = ("the rasterizer dropped tile intersections (rasterizer_overflow): "
                             "Rend and Dri are faster than a render of every intersection")
        r[mode] = entry
        progress(f"table1b: {mode}: Gen {entry['gen_fps']:.1f} Rend {entry['rend_fps']:.1f} "
                 f"Dri {entry['dri_fps']:.1f} FPS")

    rec.attempt("batch 1", lambda: measure("latency (batch 1, paper protocol)", 1,
                                           s["identities"], s["frames"]))
    rec.attempt("throughput", lambda: measure(
        f"throughput (batch {s['throughput_batch']})", s["throughput_batch"],
        s["throughput_identities"], s["throughput_frames"]))

    def ablation_dri():
        """Tab. 1(c)'s Dri column: the rows without G_d rerun G for every frame
        (configs/ablation.py; benchmark.py's Dri protocol at batch 1, one identity, the
        same frames as the batch-1 row above, which is + G_m + G_d)."""
        frames = s["frames"]
        sequence, _ = _reta3d("get_sequence")("builtin:talk", model, frames)
        sequence = {k: jnp.asarray(v) for k, v in sequence.items()}
        num_frames = int(sequence["expression"].shape[0])
        camera_labels = jnp.asarray(_reta3d("camera_path")("fixed", num_frames))
        indices = [jnp.asarray(t, jnp.int32) for t in range(num_frames)]
        rows = {}
        for row, mouth in (("Baseline", False), ("+ G_m", True)):
            row_config = load_config(s["config"])
            row_config.model.mouth_generator, row_config.model.dynamic_module = mouth, False
            _, row_gen, row_vars = inference.load_generator(config=row_config, random_init=True)
            row_frame = inference.make_frame_fn(row_config, row_gen)
            c = _reta3d("conditioning_labels")(row_config, 1)
            z = inference.latents_for_seeds([0], row_config.model.z_dim)
            start = time.perf_counter()
            static = jax.block_until_ready(row_gen.jit_generate_static(row_vars, z, c))
            jax.block_until_ready(row_frame(row_vars, static, sequence, indices[0], camera_labels))
            compile_s = time.perf_counter() - start
            times, frame_times = [], []
            for _ in range(max(1, s["warmup"]) + 2):
                start = time.perf_counter()
                static = jax.block_until_ready(row_gen.jit_generate_static(row_vars, z, c))
                frames_start = time.perf_counter()
                last = [row_frame(row_vars, static, sequence, t, camera_labels)
                        for t in indices][-1]
                jax.block_until_ready(last)
                times.append(time.perf_counter() - start)
                frame_times.append(time.perf_counter() - frames_start)
            kept = slice(max(1, s["warmup"]), None)
            rows[row] = {"dri_fps": num_frames / float(np.median(times[kept])),
                         "frame_path_fps (Dri without the static part)":
                             num_frames / float(np.median(frame_times[kept])),
                         "frames": num_frames, "compile_s": compile_s}
            progress(f"table1b: ablation {row}: Dri {rows[row]['dri_fps']:.1f} FPS")
        r["ablation (Tab. 1c Dri, random init, batch 1)"] = dict(
            rows, paper={"Baseline": 31.5, "+ G_m": 29.8, "+ G_m + G_d": 79.2})

    rec.attempt("ablation rows", ablation_dri)


# ------------------------------------------------------------------------------------------
# Section: networks (generate_static, animate) by precision
# ------------------------------------------------------------------------------------------

def section_networks(ctx: Context) -> None:
    import jax
    import numpy as np

    from reta3d import inference
    from reta3d.networks import generator as g

    s, rec, r = ctx.sizes, ctx.rec, ctx.rec.result
    config = load_config(s["config"])
    config, gen32, variables = inference.load_generator(config=config, random_init=True)
    model = gen32.flame_model
    r.update(device_info())
    r.update({"config": s["config"], "uv_resolution": gen32.config.uv_resolution,
              "mouth_resolution": gen32.config.mouth_resolution,
              "num_gaussians": gen32.num_gaussians, "weights": "random init",
              "precisions": {k: {"dtype": d, "matmul_precision": p or "default"}
                             for k, (d, p) in PRECISIONS.items()}})
    lowered, inputs = {}, {}
    for precision in s["precisions"]:
        dtype, matmul = PRECISIONS[precision]
        gen = gen32 if dtype == "float32" else g.RETA3DGenerator(
            gen32.config.replace(dtype=dtype), gen32.flame_model, gen32.head_binding)
        for batch in s["batch_sizes"]:
            rng = np.random.default_rng(batch)
            z = rng.normal(size=(batch, gen.config.z_dim)).astype(np.float32)
            c = _reta3d("conditioning_labels")(config, batch)
            flame = {k: np.repeat(v, batch, 0) for k, v in
                     _reta3d("neutral_flame")(model, expression=[0.5] * min(
                         3, model.num_expression), jaw=0.1).items()}
            context = (jax.default_matmul_precision(matmul) if matmul
                       else contextlib.nullcontext())
            with context:
                static = jax.eval_shape(gen.jit_generate_static, variables, z, c)
                lowered[("generate_static", precision, batch)] = \
                    gen.jit_generate_static.lower(variables, z, c)
                lowered[("animate", precision, batch)] = gen.jit_animate.lower(
                    variables, static, flame)
            inputs[(precision, batch)] = (gen, z, c, flame)
    progress(f"networks: compiling {len(lowered)} functions")
    start = time.perf_counter()
    compiled = compile_parallel(lowered, ctx.compile_workers)
    r["compile_wall_s"] = time.perf_counter() - start
    results = r.setdefault("results", [])
    for (precision, batch), (gen, z, c, flame) in inputs.items():
        fn_static, seconds_static = compiled[("generate_static", precision, batch)]
        fn_animate, seconds_animate = compiled[("animate", precision, batch)]
        for name, fn, seconds in (("generate_static", fn_static, seconds_static),
                                  ("animate", fn_animate, seconds_animate)):
            entry = {"function": name, "precision": precision, "batch": batch,
                     "compile_s": seconds}
            if isinstance(fn, Exception):
                rec.error(f"compile {name} {precision} batch {batch}", fn)
                continue
            if name == "generate_static":
                call = lambda fn=fn: fn(variables, z, c)
            else:
                static = fn_static(variables, z, c) if not isinstance(
                    fn_static, Exception) else None
                if static is None:
                    continue
                call = lambda fn=fn, static=static: fn(variables, static, flame)
            timing = rec.attempt(f"time {name} {precision} batch {batch}",
                                 lambda call=call: time_calls(call, s["warmup"], s["repeats"]))
            if timing is None:
                continue
            entry.update(timing)
            entry["per_item_ms"] = timing["median_ms"] / batch
            entry["items_per_s"] = 1e3 * batch / timing["median_ms"]
            results.append(entry)
            rec.save()
            progress(f"networks: {name} {precision} B={batch}: {timing['median_ms']:.3f} ms")
    r["memory_after"] = peak_memory()


# ------------------------------------------------------------------------------------------
# Section: training throughput
# ------------------------------------------------------------------------------------------

def _train(ctx: Context, dtype: str) -> None:
    """images/s of the paper-config training iteration (reta3d.train: make_steps,
    create_train_state, train_iteration; random batches as experiments/benchmark_train.py):
    G step + D step + R1 step / r1_interval, phases timed separately after warm-up, plus
    `r1_interval` real train_iteration calls end to end."""
    import jax
    import numpy as np

    from reta3d import train

    s, rec, r = ctx.sizes, ctx.rec, ctx.rec.result
    config = load_config(s["config"])
    config.model.dtype = dtype
    if config.loss.lambda_id > 0 and config.loss.vgg16 != "random" and \
            not pathlib.Path(config.loss.vgg16).is_file():
        config.loss.vgg16 = "random"    # the same cost as the pretrained weights
    r.update(device_info())
    r.update({"config": s["config"], "dtype": dtype, "render_resolution":
              config.render.resolution, "uv_resolution": config.model.uv_resolution,
              "vgg16": config.loss.vgg16, "r1_interval": config.loss.r1_interval,
              "paper_reference": "about 12 images/s per RTX A6000 (25M images in 6 days on 4 "
                                 "GPUs)"})
    start = time.perf_counter()
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    vgg = train.build_vgg_features(config)[0] if config.loss.lambda_id > 0 else None
    r["num_gaussians"] = generator.num_gaussians
    r["backend"] = train.resolve_backend(config.render.backend)
    num_devices = jax.local_device_count()
    batches = [int(config.train.batch_size)] + [b for b in s["batch_fallbacks"]
                                                 if b < config.train.batch_size]
    for global_batch in batches:
        if global_batch % num_devices:
            continue
        config.train.batch_size = global_batch
        attempt = r.setdefault("attempts", {})[str(global_batch)] = {}
        try:
            state = train.create_train_state(config, generator, discriminator,
                                             jax.random.PRNGKey(0))
            state = train.replicate(state)
            batch = train.random_batch(config, num_devices, global_batch // num_devices,
                                       np.random.default_rng(0))
            phases = train.phase_args(batch, num_devices)
            attempt["setup_s"] = time.perf_counter() - start
            attempt["render_capacity_start"] = train.render_capacity(config,
                                                                     generator.num_gaussians)
            attempt["render_capacity_limit"] = (train.BENCHMARK_CAPACITY_GROWTH
                                                * attempt["render_capacity_start"])
            last = {}

            def timed(phase):
                nonlocal state
                t = time.perf_counter()
                state, last[phase] = fns[phase](state, *phases[phase])
                jax.block_until_ready(last[phase])
                return time.perf_counter() - t

            # Time the step training runs: a warm-up whose renders drop tile intersections
            # (random init at 512²) grows the capacity and compiles again, as training does.
            while True:
                steps = train.make_steps(config, generator, discriminator, vgg)
                try:
                    lowered = {p: steps[p].lower(state, *args) for p, args in phases.items()}
                except Exception as error:  # noqa: BLE001 - e.g. a jax whose pmap cannot lower
                    lowered = None
                    attempt["aot"] = f"not available ({type(error).__name__}: {error}); the " \
                                     "phases compile on their first call (warm-up)"
                if lowered is None:
                    fns = {p: steps[p] for p in phases}
                else:
                    progress(f"train {dtype}: batch {global_batch}: compiling the 3 phases")
                    compiled = compile_parallel(lowered, ctx.compile_workers)
                    attempt.setdefault("compile_s", []).append(
                        {p: compiled[p][1] for p in phases})
                    for p in phases:
                        if isinstance(compiled[p][0], Exception):
                            raise compiled[p][0]
                    fns = {p: compiled[p][0] for p in phases}
                for _ in range(max(1, s["warmup"])):
                    for phase in phases:
                        timed(phase)
                warm_overflow = train.step_overflow(last["g_step"])
                grown = train.capacity_after(config, generator.num_gaussians, warm_overflow,
                                             attempt["render_capacity_limit"])
                if grown is None:
                    break
                attempt.setdefault("warm_up_overflow", []).append(
                    dict(warm_overflow, render_capacity=train.render_capacity(
                        config, generator.num_gaussians)))
                rec.save()     # kept if the section's time runs out while compiling again
                progress(f"train {dtype}: batch {global_batch}: the renders overflowed; "
                         f"capacity -> {grown}")
                train.set_render_capacity(config, grown)
            attempt["render_capacity"] = train.render_capacity(config, generator.num_gaussians)
            overflow = []

            def timed_g():
                seconds = timed("g_step")
                overflow.append(train.step_overflow(last["g_step"]))
                return seconds

            times = {p: float(np.median([(timed_g() if p == "g_step" else timed(p))
                                         for _ in range(s["repeats"])]))
                     for p in phases}
            attempt["render_overflow_max"] = max(o["render_overflow_max"] for o in overflow)
            attempt["render_dropped_fraction"] = max(o["render_dropped_fraction"]
                                                     for o in overflow)
            interval = config.loss.r1_interval
            iteration = times["g_step"] + times["d_step"] + times["d_reg_step"] / interval
            # End to end: r1_interval iterations of train.train_iteration (one R1 among them).
            t = time.perf_counter()
            metrics = None
            for step in range(1, interval + 1):
                state, metrics = train.train_iteration(fns, state, batch, 0.999, step,
                                                       interval)
            jax.block_until_ready(metrics)
            end_to_end = time.perf_counter() - t
            attempt.update({
                "ms_per_phase": {p: 1e3 * v for p, v in times.items()},
                "ms_per_iteration": 1e3 * iteration,
                "images_per_s": global_batch / iteration,
                "images_per_s_per_device": global_batch / iteration / num_devices,
                "end_to_end": {"iterations": interval, "seconds": end_to_end,
                               "images_per_s": interval * global_batch / end_to_end},
                "metrics_finite": bool(all(np.all(np.isfinite(np.asarray(v)))
                                           for v in metrics.values())),
                "memory": peak_memory()})
            r.update({"global_batch": global_batch, "num_devices": num_devices,
                      "images_per_s": attempt["images_per_s"],
                      "images_per_s_end_to_end": attempt["end_to_end"]["images_per_s"],
                      "peak_bytes_in_use": attempt["memory"]["peak_bytes_in_use"],
                      "render_capacity": attempt["render_capacity"],
                      "render_dropped_fraction": attempt["render_dropped_fraction"],
                      "bytes_limit": attempt["memory"]["bytes_limit"]})
            if attempt["render_overflow_max"] > 0:
                r["note"] = (f"the timed G steps dropped up to "
                             f"{100 * attempt['render_dropped_fraction']:.1f}% of an image's tile "
                             f"intersections at capacity {attempt['render_capacity']} (the "
                             "benchmarks grow it at most BENCHMARK_CAPACITY_GROWTH times; "
                             "training itself would grow it further): random-init Gaussians "
                             "are far larger than a trained head's")
            rec.save()
            progress(f"train {dtype}: batch {global_batch}: {attempt['images_per_s']:.2f} "
                     f"img/s, peak {attempt['memory']['peak_bytes_in_use']} bytes")
            return
        except Exception as error:  # noqa: BLE001 - out of memory: try the next batch size
            attempt["error"] = f"{type(error).__name__}: {str(error)[:1500]}"
            rec.save()
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error):
                raise
            progress(f"train {dtype}: batch {global_batch} ran out of memory")
            state = steps = None
    raise RuntimeError(f"train {dtype}: every batch size ran out of memory: {batches}")


def section_train_fp32(ctx: Context) -> None:
    _train(ctx, "float32")


def section_train_bf16(ctx: Context) -> None:
    _train(ctx, "bfloat16")


SECTION_FUNCTIONS = {"stack": section_stack, "correctness": section_correctness,
                     "rasterizer": section_rasterizer, "table1b": section_table1b,
                     "networks": section_networks, "train_fp32": section_train_fp32,
                     "train_bf16": section_train_bf16}


def _sizes_for(name: str, smoke: bool) -> Dict[str, Any]:
    table = SMOKE_SIZES if smoke else SIZES
    return dict(table.get("train" if name.startswith("train") else name, {}))


def run_section(name: str, out: pathlib.Path, smoke: bool, compile_workers: int) -> int:
    """The body of `gpu_suite.py --section=NAME`: runs one section, records everything in
    OUT/sections/NAME.json; an exception is recorded (status "error"), exit code 0 either way
    (the parent reads the JSON; a non-zero exit means the process itself died)."""
    (out / "sections").mkdir(parents=True, exist_ok=True)
    sizes = _sizes_for(name, smoke)
    rec = Recorder(out / "sections" / f"{name}.json", name, smoke, sizes)
    ctx = Context(name, rec, smoke, sizes, compile_workers)
    progress(f"{name}: started (pid {os.getpid()})")
    try:
        SECTION_FUNCTIONS[name](ctx)
    except Exception as error:  # noqa: BLE001 - recorded; the parent goes on
        rec.error(name, error)
    rec.finish()
    progress(f"{name}: {rec.data['status']} in {rec.data['seconds']:.1f}s")
    return 0


# ==========================================================================================
# The parent: runs the sections one by one
# ==========================================================================================

def _child_env(smoke: bool, cache_dir: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["GPU_SUITE_T0"] = str(_T0)
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env.update(JAX_PLATFORMS="cpu", TRITON_INTERPRET="1",
                   # Compile time dominates a CPU smoke run; the numbers mean nothing anyway.
                   JAX_DISABLE_MOST_OPTIMIZATIONS="1")
        # One CPU device (the test configuration forces two for the pmap tests): the smoke
        # training batch is sized for one.
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    return env


class Terminated(Exception):
    """SIGTERM reached the parent (e.g. from `timeout`): the current section is stopped and
    the JSON written with what was measured."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def _kill_group(proc) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_process(cmd, env, timeout, log_path: pathlib.Path, prefix: str = "",
                 on_tick: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Runs cmd in its own process group with output echoed to stdout and `log_path`; kills
    the group after `timeout` seconds (or when this process is interrupted); calls `on_tick`
    every 15 s while it runs. Returns returncode (None on timeout), wall seconds and the last
    lines of output."""
    start = time.perf_counter()
    tail: List[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
                tail.append(line)
                del tail[:-80]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        deadline = time.perf_counter() + max(1.0, timeout)
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(15.0, left))
                    break
                except subprocess.TimeoutExpired:
                    if on_tick is not None:
                        on_tick()
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            reader.join(timeout=10)
    return {"returncode": None if timed_out else proc.returncode, "timed_out": timed_out,
            "wall_s": time.perf_counter() - start, "output_tail": "".join(tail)[-4000:]}


def _read_section_json(name, out) -> Dict[str, Any]:
    try:
        return json.loads((out / "sections" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"section": name, "result": {}, "errors": []}


def run_child_section(name, out, smoke, timeout, compile_workers, cache_dir,
                      on_progress: Callable[[Dict[str, Any]], None]):
    """Runs one section in its own process (`--section=NAME`); `on_progress` gets the
    section's partial JSON every 15 s, so the suite's JSON follows the measurements."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--out={out}",
           f"--section={name}", f"--compile_workers={compile_workers}"]
    if smoke:
        cmd.append("--smoke")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    section_json = out / "sections" / f"{name}.json"
    if section_json.exists():
        section_json.unlink()
    try:
        proc = _run_process(cmd, _child_env(smoke, cache_dir), timeout,
                            out / "logs" / f"{name}.log",
                            on_tick=lambda: on_progress(_read_section_json(name, out)))
    except Terminated:
        data = _read_section_json(name, out)
        data["status"] = "terminated"
        data["errors"].append({"where": name, "error": "the suite was terminated (SIGTERM) "
                               "during this section; what it had measured is kept"})
        on_progress(data)
        raise
    data = _read_section_json(name, out)
    data["wall_s"] = proc["wall_s"]
    data["returncode"] = proc["returncode"]
    data["log"] = str(out / "logs" / f"{name}.log")
    if proc["timed_out"]:
        data["status"] = "timeout"
        data["errors"].append({"where": name, "error": f"timed out after {timeout:.0f}s "
                               "(budget); what it had measured is kept",
                               "output_tail": proc["output_tail"]})
    elif proc["returncode"] != 0 or data.get("status") not in ("ok", "error"):
        data["status"] = "crashed"
        data["errors"].append({"where": name, "error": f"the section's process exited with "
                               f"code {proc['returncode']} before finishing",
                               "output_tail": proc["output_tail"]})
    return data


def _junit_summary(path: pathlib.Path) -> Dict[str, Any]:
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = []
    for case in (c for suite in suites for c in suite.iter("testcase")):
        outcome, detail = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                detail = (element.get("message") or "")[:500]
        tests.append({"test": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "detail": detail})
    counts = {k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def run_pytest_section(out, smoke, timeout):
    """tests/test_rasterizer_triton.py on the GPU (jax_triton launcher), as a subprocess with a
    timeout; log in OUT/pytest_gpu.log, results from its junit XML."""
    xml = out / "pytest_gpu.xml"
    # `-o addopts=`: pytest.ini's --dist=loadgroup needs pytest-xdist, which a GPU machine
    # installed from the wheelhouse does not have (and one process is what this run wants).
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
           "-o", "addopts=", f"--junitxml={xml}", "tests/test_rasterizer_triton.py"]
    env = _child_env(False, None)
    if smoke:
        # The CPU stand-in: one interpreted-kernel test and the (skipping) GPU test.
        cmd += ["-k", "hand_computed or gpu"]
        env.update(JAX_PLATFORMS="cpu", TRITON_INTERPRET="1")
    else:
        # Compiling for sm_90 without a GPU proves nothing more on a machine that has one.
        cmd += ["-k", "not compile_for_cuda"]
        env.update(JAX_PLATFORMS="cuda", TRITON_INTERPRET="0")
    if xml.exists():
        xml.unlink()
    command_line = " ".join(f"{k}={env[k]}" for k in ("JAX_PLATFORMS", "TRITON_INTERPRET")) \
        + " " + " ".join(cmd[1:])
    progress(f"pytest: {command_line}")
    proc = _run_process(cmd, env, timeout, out / "pytest_gpu.log", prefix="  | ")
    data = {"section": "pytest", "smoke": smoke, "command": command_line,
            "log": str(out / "pytest_gpu.log"), "wall_s": proc["wall_s"],
            "returncode": proc["returncode"], "result": {}, "errors": []}
    try:
        data["result"] = _junit_summary(xml)
    except (OSError, ValueError) as error:
        data["errors"].append({"where": "pytest", "error": f"no junit XML: {error}",
                               "output_tail": proc["output_tail"]})
    if proc["timed_out"]:
        data["status"] = "timeout"
        data["errors"].append({"where": "pytest", "error": f"timed out after {timeout:.0f}s",
                               "output_tail": proc["output_tail"]})
    elif proc["returncode"] != 0:
        data["status"] = "error"
        data["errors"].append({"where": "pytest", "error": f"pytest exited with code "
                               f"{proc['returncode']}", "output_tail": proc["output_tail"]})
    else:
        data["status"] = "error" if data["errors"] else "ok"
    gpu_tests = [t for t in data["result"].get("tests", []) if "gpu" in (t["test"] or "")]
    data["result"]["gpu_test"] = gpu_tests
    if not smoke and data["status"] == "ok" and not any(t["outcome"] == "passed"
                                                         for t in gpu_tests):
        data["status"] = "error"
        data["errors"].append({"where": "pytest", "error": "the jax_triton GPU test did not "
                               f"run: {gpu_tests}"})
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", required=True, help="Output folder (created).")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes: checks that the suite runs (CI).")
    parser.add_argument("--sections", default=None,
                        help=f"Comma-separated subset, in this order: {','.join(SECTIONS)}.")
    parser.add_argument("--budget_s", type=float, default=None,
                        help=f"Seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}; "
                             f"--smoke {DEFAULT_SMOKE_BUDGET_S:.0f}).")
    parser.add_argument("--budgets", default="",
                        help="Per-section overrides, e.g. table1b=200,train_fp32=240.")
    parser.add_argument("--compile_workers", type=int, default=None,
                        help="Threads compiling in parallel (default: min(8, CPU count)).")
    parser.add_argument("--cache_dir", default=None,
                        help="JAX persistent compilation cache, shared by the sections and "
                             "by a re-run (default: $TMPDIR/reta3d_gpu_suite_cache; '' = off; "
                             "--smoke: off).")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    workers = args.compile_workers or min(8, os.cpu_count() or 1)
    if args.section:
        if args.section not in SECTION_FUNCTIONS:
            parser.error(f"--section must be one of {sorted(SECTION_FUNCTIONS)}")
        return run_section(args.section, out, args.smoke, workers)

    sections = list(SECTIONS) if args.sections is None else [
        s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    sections = [s for s in SECTIONS if s in sections]
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for item in filter(None, args.budgets.split(",")):
        key, _, value = item.partition("=")
        if key not in budgets:
            parser.error(f"--budgets: unknown section {key!r}")
        budgets[key] = float(value)
    total = args.budget_s or (DEFAULT_SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S)
    if args.cache_dir is None:
        cache_dir = None if args.smoke else str(
            pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "reta3d_gpu_suite_cache")
    else:
        cache_dir = args.cache_dir or None
    deadline = time.time() + total
    report_path = out / "gpu_suite.json"
    report = {
        "suite": "experiments/gpu_suite.py (issue 9)", "smoke": args.smoke,
        "note": ("SMOKE RUN on the CPU at tiny sizes: checks that the suite runs; the numbers "
                 "are meaningless" if args.smoke else "full run"),
        "started": _iso_now(), "argv": sys.argv, "host": platform.node(),
        "python": sys.version.split()[0], "budget_s": total, "section_budgets_s": budgets,
        "compile_workers": workers, "compilation_cache": cache_dir,
        "sections_requested": sections,
        "sections": {name: {"status": "pending"} for name in sections},
    }
    if args.smoke:
        report["not_run_in_smoke"] = {k: v for k, v in SMOKE_SKIPS.items() if k in sections}
        for name in report["not_run_in_smoke"]:
            report["sections"][name] = {"status": "skipped", "reason": SMOKE_SKIPS[name],
                                        "smoke_skip": True}
    write_json_atomic(report_path, report)
    signal.signal(signal.SIGTERM, _raise_terminated)
    progress(f"writing {report_path} ({'smoke, CPU' if args.smoke else 'full'}; budget "
             f"{total:.0f}s)")
    for name in sections:
        if report["sections"][name].get("status") == "skipped":
            continue
        left = deadline - time.time()
        if left < MIN_SECTION_S:
            report["sections"][name] = {"status": "skipped", "reason": f"out of time: "
                                        f"{left:.0f}s left of the {total:.0f}s budget"}
            write_json_atomic(report_path, report)
            progress(f"{name}: skipped (out of time)")
            continue
        timeout = min(budgets[name], left)
        progress(f"{name}: start (time limit {timeout:.0f}s)")
        report["sections"][name] = {"status": "running", "time_limit_s": timeout}
        write_json_atomic(report_path, report)

        def partial(data, name=name, timeout=timeout):
            """The running section's JSON so far, into the suite's JSON."""
            data.setdefault("status", "running")
            data["time_limit_s"] = timeout
            report["sections"][name] = data
            write_json_atomic(report_path, report)

        try:
            if name == "pytest":
                data = run_pytest_section(out, args.smoke, timeout)
            else:
                data = run_child_section(name, out, args.smoke, timeout, workers, cache_dir,
                                         partial)
        except Terminated:
            if name == "pytest":
                partial({"status": "terminated", "errors": [
                    {"where": name, "error": "the suite was terminated (SIGTERM)"}]})
            progress(f"{name}: terminated (SIGTERM); writing {report_path}")
            for later in sections[sections.index(name) + 1:]:
                report["sections"][later] = {"status": "skipped",
                                             "reason": "the suite was terminated (SIGTERM)"}
            break
        data["time_limit_s"] = timeout
        report["sections"][name] = data
        report["summary"] = {k: v.get("status") for k, v in report["sections"].items()}
        write_json_atomic(report_path, report)
        progress(f"{name}: {data['status']} ({data.get('wall_s', 0):.1f}s)")
    report["finished"] = _iso_now()
    report["wall_s"] = time.time() - _T0
    report["summary"] = {k: v.get("status") for k, v in report["sections"].items()}
    report["all_ok"] = all(v.get("status") == "ok" or v.get("smoke_skip")
                           for v in report["sections"].values())
    write_json_atomic(report_path, report)
    progress(f"done in {report['wall_s']:.0f}s: {report['summary']} -> {report_path}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
