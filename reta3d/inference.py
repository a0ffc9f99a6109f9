"""Inference: loading a generator, the static part, the per-frame path, the animation job.

The paper's inference split (Sec. 2.3): "the full generator is executed on the first frame to
obtain static textures, while subsequent frames require only the generation of dynamic
textures". Here that is

    static = generate_static_maps(generator, g_vars, z, c)        # once per identity (jit)
    frame_fn = make_frame_fn(config, generator)                      # one jitted per-frame fn:
    images, overflow = frame_fn(g_vars, static, sequence, t, labels) #   FLAME → G_d → binding → render

Contents
- `load_generator`: a trained generator (G_ema of a training workdir's latest checkpoint) or a
  randomly initialised one from a config; `load_config`.
- `latents_for_seeds`, `generate_static_maps`: seeds → z → the static maps of each identity.
- Rendering: `make_frame_fn` (per-frame path), `make_view_fn` (one pose, many cameras),
  `render_views`, `run_animation` (the per-frame loop with timing, or the real-time mode),
  `animate_to_video` (the whole job of experiments/animate.py).
- Rasterizer overflow: every render function also returns the tile intersections each image
  dropped (`rasterizer.RenderOutput.overflow`); `overflow_report` sums them for the scripts'
  JSON (`reta3d.cli.warn_overflow` prints the warning line).
- `device_description` for the scripts' JSON.

Elsewhere: FLAME sequences in `reta3d.sequences`, camera paths in `reta3d.cameras`, videos and
image tiling in `reta3d.video`, the .ply export in `reta3d.ply`, flags and list parsers of the
scripts in `reta3d.cli`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import atomic_files, errors
from reta3d.cameras import camera_path, conditioning_labels
from reta3d.sequences import get_sequence
from reta3d.video import check_output_suffix, side_by_side, timing_path, write_video


# ------------------------------------------------------------------------------------------
# Loading a generator
# ------------------------------------------------------------------------------------------

def load_config(config) -> Any:
    """A ConfigDict from a ConfigDict (returned as is), a `.py` config file (its
    `get_config()`; "file.py:ARG" calls `get_config(ARG)`, as ml_collections' config flags
    do, e.g. configs/ablation.py:baseline) or a `.json` file (a training workdir's config.json)."""
    import ml_collections
    if isinstance(config, ml_collections.ConfigDict):
        return config
    path, arg = pathlib.Path(config), None
    if not path.is_file() and ".py:" in str(config):
        name, _, arg = str(config).partition(".py:")
        path = pathlib.Path(name + ".py")
    if not path.is_file():
        raise errors.MissingInputError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            return ml_collections.ConfigDict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise errors.InputError(f"{path}: not a valid config JSON ({e})") from e
    if path.suffix == ".py":
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"_reta3d_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise errors.InputError(f"{path}: a config file must define get_config()")
        return module.get_config() if arg is None else module.get_config(arg)
    raise errors.InputError(f"{path}: unsupported config file type '{path.suffix}' (expected .py or .json)")


def load_generator(workdir=None, config=None, random_init: bool = False, seed: int = 0):
    """The generator to sample from → (config, generator, g_vars).

    workdir: a training workdir (`launch.py --workdir`): its config.json and the G_ema weights
      of its latest checkpoint that restores (the template state is built abstractly with
      `jax.eval_shape(create_train_state)`, so nothing is initialised or compiled for it).
    config: a ConfigDict or a config file path (.py / .json), with random_init=True: fresh
      weights from `generator.init(PRNGKey(seed))` (for speed work without a trained model; G_d
      starts at ΔF = 0).
    Exactly one of workdir / config; random_init only with config. Errors name the missing
    workdir, config.json or checkpoint.
    """
    from reta3d import train
    if (workdir is None) == (config is None):
        raise ValueError("load_generator: pass exactly one of workdir= (a trained model) or "
                         "config= (with random_init=True), got "
                         + ("both" if workdir is not None else "neither"))
    if config is not None:
        if not random_init:
            raise ValueError("load_generator: a config alone has no trained weights: pass "
                             "random_init=True (random weights) or workdir= (a training run)")
        config = load_config(config)
        generator = train.build_generator(config)
        return config, generator, generator.init(jax.random.PRNGKey(seed))
    if random_init:
        raise ValueError("load_generator: random_init=True ignores a workdir's checkpoint; pass "
                         "config= instead (e.g. the workdir's config.json)")

    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise errors.MissingInputError(
            f"training workdir not found: {workdir} (train one with launch.py --workdir=...; "
            "for random weights pass --config=... --random_init instead)")
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise errors.MissingInputError(
            f"{config_path} not found: {workdir} is not a training workdir "
            "(launch.py writes config.json there when training starts)")
    config = load_config(config_path)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise errors.MissingInputError(
            f"no checkpoint in {checkpoints}: train first (launch.py saves "
            "every config.train.checkpoint_every steps)")
    from reta3d.checkpoint import Checkpointer
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    template = jax.eval_shape(
        lambda rng: train.create_train_state(config, generator, discriminator, rng),
        jax.random.PRNGKey(0))
    checkpointer = Checkpointer(workdir)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise errors.MissingInputError(f"no checkpoint in {checkpoints}")
    step, state, _ = restored
    logging.info("Loaded G_ema from %s at step %d", checkpoints, step)
    g_vars = jax.tree_util.tree_map(jnp.asarray, state.g_ema)
    return config, generator, g_vars


# ------------------------------------------------------------------------------------------
# The static part
# ------------------------------------------------------------------------------------------

def latents_for_seeds(seeds: Sequence[int], z_dim: int) -> np.ndarray:
    """(S, z_dim) float32, one standard normal latent per seed (numpy RandomState(seed), as
    StyleGAN2/EG3D's gen_images do, so a seed means the same z on every machine)."""
    return np.stack([np.random.RandomState(int(s)).randn(z_dim) for s in seeds]).astype(np.float32)


def generate_static_maps(generator, g_vars, z: np.ndarray, c: Optional[np.ndarray],
                         truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None):
    """StaticMaps for S identities: `generator.jit_generate_static` ONCE per identity (batch 1,
    so one compilation serves any S), concatenated → face (S, R, R, 14), mouth (S, Rm, Rm, 14)."""
    z = np.asarray(z, np.float32)
    chex.assert_rank(z, 2)
    parts = []
    for i in range(z.shape[0]):
        ci = None if c is None else np.asarray(c[i:i + 1], np.float32)
        parts.append(generator.jit_generate_static(g_vars, z[i:i + 1], ci,
                                                   truncation_psi=float(truncation_psi),
                                                   truncation_cutoff=truncation_cutoff))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


# ------------------------------------------------------------------------------------------
# The per-frame path and other render functions
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class RenderFunction:
    """A jitted render function and the settings it was built with (`make_frame_fn`,
    `make_view_fn`). Calling it calls `fn`, which returns (images uint8, overflow int32);
    `capacity` is the rasterizer's tile-intersection slots per image that overflow counts
    refer to (`overflow_report`)."""

    fn: Callable
    resolution: int
    backend: str
    capacity: int

    def __call__(self, *args):
        return self.fn(*args)


def _to_uint8(color: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(color * 255.0), 0, 255).astype(jnp.uint8)


def _render_settings(config, generator, resolution, backend, capacity):
    """(resolution, backend, background grey level, capacity) from the config unless
    overridden; capacity None → the rasterizer's default for the generator's N Gaussians. The
    backend is resolved ("auto" → the one that runs, `rasterizer.render.resolve_backend`), so
    what a report names is what rendered."""
    from rasterizer import binning
    from rasterizer.render import resolve_backend
    resolution = int(config.render.resolution if resolution is None else resolution)
    if resolution < 1:
        raise ValueError(f"render resolution must be >= 1, got {resolution}")
    backend = resolve_backend(config.render.backend if backend is None else backend)
    if capacity is None:
        capacity = binning.default_capacity(generator.num_gaussians, resolution, resolution)
    if int(capacity) < 1:
        raise ValueError(f"rasterizer capacity must be >= 1, got {capacity}")
    return resolution, backend, float(config.render.background), int(capacity)


def make_frame_fn(config, generator, resolution: Optional[int] = None,
                  backend: Optional[str] = None, use_dynamic: bool = True,
                  capacity: Optional[int] = None) -> RenderFunction:
    """The jitted per-frame function of an animation:

        frame_fn(g_vars, static, sequence, index, camera_labels)
            → (images (S, H, W, 3) uint8, overflow (S,) int32)

    static: StaticMaps of S identities; sequence: dict of (T, k) FLAME arrays (on device);
    index: () int32 frame number; camera_labels: (T, 25) EG3D labels (frame `index` is used,
    the same camera for every identity). Runs FLAME + G_d + binding (`generator.animate`) and the
    rasterizer only — never the mapping or synthesis networks. overflow: tile intersections
    each image dropped (beyond `capacity` slots per image; None = the rasterizer's default
    for the generator's Gaussian count). resolution / backend default to the config's
    `render` settings. The jitted function is memoised per (generator, render settings), so
    repeated calls share one compilation cache. Its uint8 images carry no gradient: to
    differentiate, call `generator.animate` and `rasterizer.render` inside your own jax.grad
    (README, "Using RETA3D from Python").
    """
    resolution, backend, background, capacity = _render_settings(
        config, generator, resolution, backend, capacity)
    fn = _frame_fn(generator, resolution, backend, background, bool(use_dynamic), capacity)
    return RenderFunction(fn, resolution, backend, capacity)


@functools.lru_cache(maxsize=16)
def _frame_fn(generator, resolution: int, backend: str, background: float, use_dynamic: bool,
              capacity: int):
    import rasterizer
    background = jnp.full((3,), background, jnp.float32)

    def frame_fn(g_vars, static, sequence, index, camera_labels):
        batch = static.face.shape[0]
        flame = {k: jnp.broadcast_to(v[index], (batch,) + v.shape[1:]) for k, v in sequence.items()}
        gaussians, _ = generator.animate(g_vars, static, flame, use_dynamic=use_dynamic)
        camera = rasterizer.Camera.from_eg3d(camera_labels[index], resolution)
        out = rasterizer.render(gaussians, camera, background=background, backend=backend,
                                capacity=capacity)
        return _to_uint8(out.color), out.overflow

    return jax.jit(frame_fn)


def make_view_fn(config, generator, resolution: Optional[int] = None,
                 backend: Optional[str] = None, capacity: Optional[int] = None
                 ) -> RenderFunction:
    """jitted (g_vars, static (1 identity), flame (dict of (1, k)), labels (V, 25)) →
    (images (V, H, W, 3) uint8, overflow (V,) int32): one pose (one `animate`) seen by V
    cameras. Settings and memoisation as in `make_frame_fn`."""
    resolution, backend, background, capacity = _render_settings(
        config, generator, resolution, backend, capacity)
    return RenderFunction(_view_fn(generator, resolution, backend, background, capacity),
                          resolution, backend, capacity)


@functools.lru_cache(maxsize=16)
def _view_fn(generator, resolution: int, backend: str, background: float, capacity: int):
    import rasterizer
    background = jnp.full((3,), background, jnp.float32)

    def view_fn(g_vars, static, flame, labels):
        chex.assert_shape(static.face, (1, None, None, None))
        gaussians, _ = generator.animate(g_vars, static, flame)
        single = jax.tree_util.tree_map(lambda x: x[0], gaussians)
        camera = rasterizer.Camera.from_eg3d(labels, resolution)
        out = rasterizer.render(single, camera, background=background, backend=backend,
                                capacity=capacity)
        return _to_uint8(out.color), out.overflow

    return jax.jit(view_fn)


def render_views(view_fn, g_vars, static, flame, labels: np.ndarray, chunk: int = 8
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """All views → (images (V, H, W, 3) uint8, overflow (V,) int64), rendered `chunk`
    cameras at a time (short chunks padded, so one compilation serves every call whatever V;
    the padding's images and counts are dropped)."""
    labels = np.asarray(labels, np.float32)
    chex.assert_shape(labels, (None, 25))
    num = labels.shape[0]
    chunk = max(1, int(chunk))
    images, overflow = [], []
    for start in range(0, num, chunk):
        part = labels[start:start + chunk]
        if part.shape[0] < chunk:
            part = np.concatenate([part, np.repeat(part[-1:], chunk - part.shape[0], axis=0)])
        part_images, part_overflow = view_fn(g_vars, static, flame, part)
        images.append(np.asarray(part_images))
        overflow.append(np.asarray(part_overflow, np.int64))
    return np.concatenate(images)[:num], np.concatenate(overflow)[:num]


def overflow_report(overflow, capacity: int) -> Dict[str, Any]:
    """Summary of the tile intersections that the rasterizer dropped over many images.

    overflow: per-image counts, any shape (e.g. (T, S) for T frames of S identities), from
      `rasterizer.RenderOutput.overflow`: each image's intersections beyond `capacity`.
    capacity: the intersection slots per image those renders had.
    → {"capacity", "images", "images_with_overflow", "dropped_tile_intersections" (the sum),
       "max_dropped_fraction", "capacity_needed"}.
    The binning counts every intersection before it cuts at the capacity, so an image that
    overflowed by o had exactly capacity + o intersections: its dropped fraction
    o / (capacity + o) is exact, and capacity_needed = capacity + max(o) is the smallest
    capacity at which no image would have overflowed (with no overflow: the capacity itself,
    an upper bound). Images that fit report no count of their own, so no overall fraction of
    all intersections can be given.
    """
    counts = np.asarray(jax.device_get(overflow), np.int64).reshape(-1)
    capacity = int(capacity)
    over = counts[counts > 0]
    worst = int(over.max()) if over.size else 0
    return {"capacity": capacity, "images": int(counts.size),
            "images_with_overflow": int(over.size),
            "dropped_tile_intersections": int(counts.sum()),
            "max_dropped_fraction": worst / (capacity + worst),
            "capacity_needed": capacity + worst}


def run_animation(frame_fn: RenderFunction, g_vars, static, sequence: Mapping[str, np.ndarray],
                  camera_labels: np.ndarray, realtime: bool = False):
    """Runs the per-frame path over a sequence → (frames (T, S, H, W, 3) uint8, timing).

    Default: each frame is timed on its own (dispatch → block_until_ready); frame 0 includes the
    compilation and is reported separately. realtime: every frame is dispatched back to back
    with no host sync and the clock stops at ONE block_until_ready on the last frame (after one
    untimed warm-up frame that compiles) → sustained FPS; frames are fetched afterwards.
    timing: frames, identities, mode, per-frame ms (default mode), total seconds, fps, and
    "rasterizer_overflow" (`overflow_report` over every frame and identity, with
    `frame_fn.capacity`).
    """
    sequence = {k: jnp.asarray(v, jnp.float32) for k, v in sequence.items()}
    camera_labels = jnp.asarray(camera_labels, jnp.float32)
    num_frames = int(next(iter(sequence.values())).shape[0])
    chex.assert_shape(camera_labels, (num_frames, 25))
    identities = int(static.face.shape[0])
    indices = [jnp.asarray(t, jnp.int32) for t in range(num_frames)]
    timing: Dict[str, Any] = {"frames": num_frames, "identities": identities,
                              "mode": "realtime" if realtime else "per_frame"}
    if realtime:
        start = time.perf_counter()
        jax.block_until_ready(frame_fn(g_vars, static, sequence, indices[0], camera_labels))
        timing["compile_and_first_frame_s"] = time.perf_counter() - start
        start = time.perf_counter()
        outputs = [frame_fn(g_vars, static, sequence, i, camera_labels) for i in indices]
        jax.block_until_ready(outputs[-1])
        total = time.perf_counter() - start
        timing.update(total_s=total, fps=num_frames / total,
                      identity_frames_per_s=num_frames * identities / total,
                      note="all frames dispatched back to back, one block_until_ready at the end")
        frames = np.stack([np.asarray(images) for images, _ in outputs])
        overflow = np.stack([np.asarray(counts) for _, counts in outputs])
    else:
        frames, overflow, frame_ms = [], [], []
        for i in indices:
            start = time.perf_counter()
            images, counts = jax.block_until_ready(
                frame_fn(g_vars, static, sequence, i, camera_labels))
            frame_ms.append(1e3 * (time.perf_counter() - start))
            frames.append(np.asarray(images))
            overflow.append(np.asarray(counts))
        steady = frame_ms[1:] or frame_ms
        timing.update(first_frame_ms_incl_compile=frame_ms[0], frame_ms=frame_ms,
                      median_frame_ms=float(np.median(steady)),
                      fps=1e3 / float(np.median(steady)),
                      total_s=sum(frame_ms) / 1e3,
                      note="each frame dispatched and blocked on its own; fps from the median "
                           "frame time excluding frame 0 (compilation)")
        frames, overflow = np.stack(frames), np.stack(overflow)
    timing["rasterizer_overflow"] = overflow_report(overflow, frame_fn.capacity)
    return frames, timing


def animate_to_video(config, generator, g_vars, seeds: Sequence[int], sequence_spec: str, out,
                     num_frames: Optional[int] = None, camera: str = "fixed",
                     realtime: bool = False, truncation_psi: float = 1.0,
                     fps: Optional[float] = None, resolution: Optional[int] = None,
                     backend: Optional[str] = None,
                     expression_index: Optional[Mapping[str, int]] = None,
                     capacity: Optional[int] = None, static=None,
                     shape: Optional[np.ndarray] = None,
                     identity: Optional[str] = None) -> Dict[str, Any]:
    """The animation job of `experiments/animate.py`: S identities side by side driven by one
    FLAME sequence → a video at `out` (.mp4 / .gif) with exactly one frame per FLAME frame, and
    the timing JSON next to it (`reta3d.video.timing_path(out)`). Returns that JSON's content
    (`run_animation`'s timing, with its "rasterizer_overflow", plus the job's settings).

    The static generator runs once per identity (`generate_static_maps`); every frame runs one
    jitted per-frame function (`make_frame_fn`: FLAME + G_d + binding + rasterizer).
    static: StaticMaps given instead of seeds (e.g. an inverted identity,
    `reta3d.inversion.load_identity`; `seeds` is then ignored); shape: (S,) or (1, S) FLAME
    shape replacing the sequence's on every frame (the identity's own head); identity: a name
    recorded in the JSON.
    """
    out = check_output_suffix(out, "the animation output")
    sequence, sequence_fps = get_sequence(sequence_spec, generator.flame_model, num_frames,
                                          expression_index)
    num = int(sequence["expression"].shape[0])
    labels = camera_path(camera, num)
    if shape is not None:
        sequence = dict(sequence, shape=np.repeat(np.asarray(shape, np.float32).reshape(1, -1),
                                                  num, axis=0))
    start = time.perf_counter()
    if static is None:
        z = latents_for_seeds(seeds, config.model.z_dim)
        static = jax.block_until_ready(generate_static_maps(
            generator, g_vars, z, conditioning_labels(config, len(seeds)), truncation_psi))
    else:
        seeds = []
    static_s = time.perf_counter() - start
    frame_fn = make_frame_fn(config, generator, resolution, backend, capacity=capacity)
    frames, timing = run_animation(frame_fn, g_vars, static, sequence, labels, realtime)
    fps = float(fps or sequence_fps)
    write_video(out, side_by_side(frames), fps)
    timing = dict(timing, video=str(out), sequence=sequence_spec, seeds=list(map(int, seeds)),
                  camera=camera, video_fps=fps, resolution=int(frames.shape[2]),
                  num_gaussians=generator.num_gaussians, backend=frame_fn.backend,
                  static_s_all_identities_incl_compile=static_s, **device_description())
    if identity is not None:
        timing["identity"] = str(identity)
    timing_file = timing_path(out)
    atomic_files.write_text(timing_file, json.dumps(timing, indent=2))
    return timing


def device_description() -> Dict[str, str]:
    """{"device": kind of the first JAX device, "platform": cpu/gpu/..., "num_devices"}."""
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform,
            "num_devices": str(jax.device_count())}
