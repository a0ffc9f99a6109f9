"""Inference helpers shared by the sampling, animation, export and benchmark scripts.

The paper's inference split (Sec. 2.3): "the full generator is executed on the first frame to
obtain static textures, while subsequent frames require only the generation of dynamic
textures". Here that is

    static = generate_static_maps(generator, g_vars, z, c)        # once per identity (jit)
    frame_fn = make_frame_fn(config, generator)                      # one jitted per-frame fn:
    images = frame_fn(g_vars, static, sequence, t, camera_labels)   #   FLAME → G_d → binding → render

Contents
- `load_generator`: a trained generator (G_ema of a training workdir's latest checkpoint) or a
  randomly initialised one from a config.
- FLAME sequences: `load_flame_sequence` (.npz, layout below), `builtin_sequence`
  (builtin:talk | blink | nod | smile), `get_sequence` (either, from a command-line spec).
- Cameras: `frontal_label`, `orbit_labels`, `view_grid_labels` (EG3D 25-number labels).
- Rendering: `make_frame_fn` (per-frame path), `make_view_fn` (one pose, many cameras),
  `run_animation` (the per-frame loop with timing, or the real-time mode), `animate_to_video`
  (the whole job of experiments/animate.py).
- The .ply export lives in `reta3d.ply` (`write_ply`, `read_ply`).
- Video I/O: `write_video` (.mp4 through ffmpeg/libx264, .gif through ffmpeg's palette
  filters: exactly one video frame per input frame, identical frames included), `read_video`.

FLAME sequence file (.npz) layout; every array numeric and finite; T = number of frames:
    expression   (T, E)  expression coefficients; E > the model's count is cut to the model's
                         (extra coefficients do not exist in the model), fewer are zero-padded
    jaw_pose     (T, 3)  axis-angle
    neck_pose    (T, 3)  axis-angle
    global_pose  (T, 3)  axis-angle
    eye_pose     (T, 6)  axis-angle, left eye then right eye
    shape        (S,) or (T, S)  identity coefficients (optional; same rule as expression)
    fps          ()      frames per second of the recording (optional; the video's frame rate)
Missing arrays are zeros; at least one per-frame array is needed to define T, and all
per-frame arrays must have the same T. Any other key is an error (a misspelt "jaw" would
otherwise silently animate nothing).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import pathlib
import re
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")
POSE_WIDTHS = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
PER_FRAME_KEYS = ("expression", "jaw_pose", "neck_pose", "global_pose", "eye_pose")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SEQUENCES = ("talk", "blink", "nod", "smile")
DEFAULT_FPS = 30.0
DEFAULT_BUILTIN_FRAMES = 120


# ------------------------------------------------------------------------------------------
# Loading a generator
# ------------------------------------------------------------------------------------------

def load_config(config) -> Any:
    """A ConfigDict from a ConfigDict (returned as is), a `.py` config file (its
    `get_config()`) or a `.json` file (a training workdir's config.json)."""
    import ml_collections
    if isinstance(config, ml_collections.ConfigDict):
        return config
    path = pathlib.Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            return ml_collections.ConfigDict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid config JSON ({e})") from e
    if path.suffix == ".py":
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"_reta3d_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{path}: a config file must define get_config()")
        return module.get_config()
    raise ValueError(f"{path}: unsupported config file type '{path.suffix}' (expected .py or .json)")


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
        raise FileNotFoundError(f"training workdir not found: {workdir}")
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {workdir} is not a training workdir "
                                "(launch.py writes config.json there when training starts)")
    config = load_config(config_path)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise FileNotFoundError(f"no checkpoint in {checkpoints}: train first (launch.py saves "
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
        raise FileNotFoundError(f"no checkpoint in {checkpoints}")
    step, state, _ = restored
    logging.info("Loaded G_ema from %s at step %d", checkpoints, step)
    g_vars = jax.tree_util.tree_map(jnp.asarray, state.g_ema)
    return config, generator, g_vars


# ------------------------------------------------------------------------------------------
# Seeds, latents, cameras
# ------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list:
    """'0-3,7,10-11' → [0, 1, 2, 3, 7, 10, 11] (ranges inclusive, order kept, no duplicates)."""
    seeds = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"bad seed list {text!r}: '{part}' is not N or N-M (non-negative ints)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad seed range '{part}' in {text!r}: end < start")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    if not seeds:
        raise ValueError(f"empty seed list {text!r}")
    return seeds


def parse_floats(text: Optional[str], what: str) -> list:
    """'0.5,-1,2' → [0.5, -1.0, 2.0]; None or '' → []."""
    if text is None or str(text).strip() == "":
        return []
    try:
        values = [float(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError as e:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}") from e
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: values must be finite, got {text!r}")
    return values


def latents_for_seeds(seeds: Sequence[int], z_dim: int) -> np.ndarray:
    """(S, z_dim) float32, one standard normal latent per seed (numpy RandomState(seed), as
    StyleGAN2/EG3D's gen_images do, so a seed means the same z on every machine)."""
    return np.stack([np.random.RandomState(int(s)).randn(z_dim) for s in seeds]).astype(np.float32)


def frontal_label() -> np.ndarray:
    """(25,) float32 EG3D label of the frontal camera (radius 2.7, FFHQ intrinsics)."""
    from rasterizer.types import look_at_eg3d_label
    return look_at_eg3d_label(0.0, 0.0)


def conditioning_labels(config, batch: int) -> Optional[np.ndarray]:
    """The mapping network's camera condition for sampling: the frontal camera (B, 25), as
    EG3D samples with a fixed conditioning pose; None when the config has c_dim = 0."""
    if config.model.c_dim == 0:
        return None
    return np.repeat(frontal_label()[None], batch, axis=0)


def orbit_labels(num_frames: int, yaw_range: float = 0.35, pitch_range: float = 0.15,
                 pitch: float = 0.0) -> np.ndarray:
    """(T, 25) float32 camera labels of one full orbit around the head (EG3D's gen_videos
    path: yaw = yaw_range·sin(2πt), pitch = pitch + pitch_range·cos(2πt), t = i/T)."""
    from rasterizer.types import look_at_eg3d_label
    if num_frames < 1:
        raise ValueError(f"orbit needs at least one frame, got {num_frames}")
    t = np.arange(num_frames) / num_frames
    return np.stack([look_at_eg3d_label(yaw_range * math.sin(2 * math.pi * s),
                                        pitch + pitch_range * math.cos(2 * math.pi * s))
                     for s in t]).astype(np.float32)


def view_grid_labels(yaws: Sequence[float], pitches: Sequence[float]) -> np.ndarray:
    """(V, 25): a yaw sweep at pitch 0, then a pitch sweep at yaw 0 (views already in the yaw
    sweep are not repeated)."""
    from rasterizer.types import look_at_eg3d_label
    views = [(float(y), 0.0) for y in yaws]
    views += [(0.0, float(p)) for p in pitches if (0.0, float(p)) not in views]
    if not views:
        raise ValueError("view grid needs at least one yaw or pitch")
    return np.stack([look_at_eg3d_label(y, p) for y, p in views]).astype(np.float32)


def camera_path(kind: str, num_frames: int) -> np.ndarray:
    """(T, 25) labels for `--camera`: 'fixed' (frontal) or 'orbit' (one orbit over the clip)."""
    if kind == "fixed":
        return np.repeat(frontal_label()[None], num_frames, axis=0)
    if kind == "orbit":
        return orbit_labels(num_frames)
    raise ValueError(f"camera must be 'fixed' or 'orbit', got {kind!r}")


# ------------------------------------------------------------------------------------------
# FLAME sequences
# ------------------------------------------------------------------------------------------

def _fit_width(value: np.ndarray, width: int) -> np.ndarray:
    """Cut or zero-pad the last axis to `width` (blend-shape coefficients past the model's
    count do not exist in it; missing ones count as zero)."""
    value = value[..., :width]
    pad = width - value.shape[-1]
    if pad:
        value = np.concatenate([value, np.zeros(value.shape[:-1] + (pad,), value.dtype)], axis=-1)
    return value


def validate_flame_sequence(arrays: Mapping[str, Any], source: str, num_expression: int,
                            num_shape: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Checks a FLAME sequence and returns every FLAME key as (T, k) float32.

    arrays: the file's arrays (layout in the module docstring). num_expression / num_shape: the
    head model's coefficient counts (the output's expression / shape width). Raises ValueError
    naming `source` and the array for unknown keys, wrong ranks or widths, disagreeing frame
    counts, non-numeric or non-finite values, and for a sequence without per-frame arrays.
    """
    allowed = set(FLAME_KEYS) | {"fps"}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown array(s) {unknown}; a FLAME sequence holds "
                         f"{', '.join(PER_FRAME_KEYS)} (T, k), optional shape and fps")
    checked = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise ValueError(f"{source}: array '{key}' must be numeric, got dtype {value.dtype}")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.isfinite(value)))
            raise ValueError(f"{source}: array '{key}' has {bad} non-finite value(s) (NaN/inf)")
        checked[key] = value
    lengths = {}
    for key in PER_FRAME_KEYS:
        if key not in checked:
            continue
        value = checked[key]
        if value.ndim != 2:
            raise ValueError(f"{source}: array '{key}' must be (T, k) (one row per frame), got "
                             f"shape {value.shape}")
        if key in POSE_WIDTHS and value.shape[1] != POSE_WIDTHS[key]:
            raise ValueError(f"{source}: array '{key}' must be (T, {POSE_WIDTHS[key]}) axis-angle"
                             f"{' (left eye, right eye)' if key == 'eye_pose' else ''}, got "
                             f"shape {value.shape}")
        lengths[key] = value.shape[0]
    if not lengths:
        raise ValueError(f"{source}: no per-frame FLAME array (need at least one of "
                         f"{', '.join(PER_FRAME_KEYS)})")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{source}: arrays disagree on the number of frames: {lengths}")
    num_frames = next(iter(lengths.values()))
    if num_frames < 1:
        raise ValueError(f"{source}: the sequence has no frames")
    if "fps" in checked and (checked["fps"].size != 1 or float(checked["fps"].reshape(-1)[0]) <= 0):
        raise ValueError(f"{source}: 'fps' must be one positive number, got {checked['fps']!r}")

    out = {}
    for key, width in POSE_WIDTHS.items():
        out[key] = checked.get(key, np.zeros((num_frames, width)))
    out["expression"] = _fit_width(checked.get("expression", np.zeros((num_frames, 0))),
                                   int(num_expression))
    if "shape" in checked:
        shape = checked["shape"]
        if shape.ndim == 1:
            shape = np.repeat(shape[None], num_frames, axis=0)
        if shape.ndim != 2 or shape.shape[0] != num_frames:
            raise ValueError(f"{source}: array 'shape' must be (S,) or (T={num_frames}, S), got "
                             f"shape {checked['shape'].shape}")
        out["shape"] = shape if num_shape is None else _fit_width(shape, int(num_shape))
    else:
        out["shape"] = np.zeros((num_frames, 1 if num_shape is None else int(num_shape)))
    return {k: v.astype(np.float32) for k, v in out.items()}


def load_flame_sequence(path, num_expression: int, num_shape: Optional[int] = None
                        ) -> Tuple[Dict[str, np.ndarray], Optional[float]]:
    """A FLAME sequence file (.npz, layout in the module docstring) → (arrays (T, k) float32
    for every FLAME key, fps or None). Clear errors for a missing, unreadable or bad file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME sequence file not found: {path}")
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: a FLAME sequence must be an .npz file (layout: "
                         "reta3d/inference.py docstring)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as e:  # noqa: BLE001 - zip/npy errors have many types
        raise ValueError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from e
    sequence = validate_flame_sequence(arrays, str(path), num_expression, num_shape)
    fps = float(np.asarray(arrays["fps"]).reshape(-1)[0]) if "fps" in arrays else None
    return sequence, fps


def template_expression_index(model) -> Dict[str, int]:
    """Expression component name → index for the embedded template head (its named blend
    shapes, `reta3d.template_head.EXPRESSION_NAMES`); {} for any other model (FLAME's
    expression basis is a PCA without named components)."""
    from reta3d import template_head
    if getattr(model, "name", None) == "template_head" and \
            model.num_expression == len(template_head.EXPRESSION_NAMES):
        return {name: i for i, name in enumerate(template_head.EXPRESSION_NAMES)}
    return {}


def _bump(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A smooth pulse: sin² over [centre − width/2, centre + width/2], 0 elsewhere."""
    x = (t - centre) / width + 0.5
    return np.where((x > 0) & (x < 1), np.sin(np.pi * np.clip(x, 0, 1)) ** 2, 0.0)


def _ease(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def builtin_sequence(name: str, num_frames: int = DEFAULT_BUILTIN_FRAMES, num_expression: int = 16,
                     expression_index: Optional[Mapping[str, int]] = None,
                     fps: float = DEFAULT_FPS) -> Dict[str, np.ndarray]:
    """A procedural FLAME sequence → every FLAME key as (T, k) float32 (shape zeros (T, 1)).

    Motions (t in seconds at `fps`); `expression_index` names expression components (the
    template head's, see `template_expression_index`; for a real FLAME model, whatever the user
    maps, else {}):
      talk   jaw opening and closing at syllable rate (~3.5 Hz, varying loudness) with a small
             head sway; with named components also lips_part / mouth_stretch / lip_pucker /
             brow_raise.
      blink  the 'blink' component pulses to 1 (closed) for 0.25 s every ~1.3 s, and the gaze
             drifts left/right (eye_pose). FLAME has no eyelid joint or named blink component,
             so without 'blink' the lid pulse is replaced by a quick downward glance of both
             eyes at each blink time (the only eyelid-adjacent motion FLAME's pose can make).
      nod    neck pitch nods (±0.25 rad at 1 Hz, eased in and out) — pose only, same for
             every model.
      smile  'smile' (and 'squint', 'cheek_puff'·0.3) rises to 2 standard deviations, holds and
             relaxes, with a slight jaw opening; without a named 'smile' component only the jaw
             part remains (a warning is logged).
    """
    if name not in BUILTIN_SEQUENCES:
        raise ValueError(f"unknown builtin sequence '{BUILTIN_PREFIX}{name}' (choose from "
                         + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SEQUENCES) + ")")
    if num_frames < 1:
        raise ValueError(f"builtin:{name}: num_frames must be >= 1, got {num_frames}")
    index = dict(expression_index or {})
    for component, i in index.items():
        if not 0 <= int(i) < num_expression:
            raise ValueError(f"expression component '{component}' -> {i} is outside the model's "
                             f"{num_expression} expression coefficients")
    t = np.arange(num_frames) / float(fps)
    expression = np.zeros((num_frames, num_expression))
    poses = {k: np.zeros((num_frames, w)) for k, w in POSE_WIDTHS.items()}

    def drive(component, values):
        if component in index:
            expression[:, index[component]] += values

    if name == "talk":
        loudness = 0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t + 0.3)
        syllables = np.abs(np.sin(np.pi * 3.5 * t))
        poses["jaw_pose"][:, 0] = 0.02 + 0.14 * loudness * syllables
        poses["neck_pose"][:, 0] = 0.03 * np.sin(2 * np.pi * 0.4 * t)
        poses["neck_pose"][:, 1] = 0.05 * np.sin(2 * np.pi * 0.25 * t)
        drive("lips_part", 0.8 * syllables)
        drive("mouth_stretch", 0.6 * np.sin(2 * np.pi * 1.3 * t))
        drive("lip_pucker", 0.6 * np.maximum(0.0, -np.sin(2 * np.pi * 1.3 * t)))
        drive("brow_raise", 0.4 * np.maximum(0.0, np.sin(2 * np.pi * 0.5 * t)))
    elif name == "blink":
        period, first, width = 1.3, 0.3, 0.25
        lids = sum(_bump(t, c, width) for c in np.arange(first, t[-1] + width, period))
        gaze = 0.12 * np.sin(2 * np.pi * 0.3 * t)
        poses["eye_pose"][:, 1] = gaze
        poses["eye_pose"][:, 4] = gaze
        if "blink" in index:
            drive("blink", lids)
        else:
            poses["eye_pose"][:, 0] = 0.35 * lids
            poses["eye_pose"][:, 3] = 0.35 * lids
    elif name == "nod":
        duration = max(t[-1], 1e-6)
        envelope = _ease(t / min(0.5, duration / 4)) * _ease((duration - t) / min(0.5, duration / 4))
        poses["neck_pose"][:, 0] = 0.25 * envelope * np.sin(2 * np.pi * 1.0 * t)
    elif name == "smile":
        u = t / max(t[-1], 1e-6)
        amount = _ease(u / 0.35) * _ease((1.0 - u) / 0.3)
        poses["jaw_pose"][:, 0] = 0.05 * amount
        if "smile" in index:
            drive("smile", 2.0 * amount)
            drive("squint", 0.6 * amount)
            drive("cheek_puff", 0.3 * amount)
        else:
            logging.warning("builtin:smile: the head model has no named 'smile' expression "
                            "component; only the jaw opening is animated (name one with "
                            "expression_index / --expression_components)")
    out = dict(poses, expression=expression, shape=np.zeros((num_frames, 1)))
    return {k: v.astype(np.float32) for k, v in out.items()}


def parse_expression_components(text: Optional[str]) -> Dict[str, int]:
    """'smile=1,blink=7' → {'smile': 1, 'blink': 7}."""
    out = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"([A-Za-z_]\w*)=(\d+)", part)
        if match is None:
            raise ValueError(f"bad expression component '{part}' in {text!r} (expected name=index)")
        out[match.group(1)] = int(match.group(2))
    return out


def get_sequence(spec: str, model, num_frames: Optional[int] = None,
                 expression_index: Optional[Mapping[str, int]] = None
                 ) -> Tuple[Dict[str, np.ndarray], float]:
    """A FLAME sequence from `spec` ('builtin:NAME' or an .npz path) for `model` →
    (arrays (T, k) float32, fps). num_frames: the length of a builtin, or the most frames kept
    of a file (its first num_frames). expression_index: names of expression components (default:
    the template head's names, none for a real FLAME model)."""
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if expression_index is None:
        expression_index = template_expression_index(model)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        sequence = builtin_sequence(name, num_frames or DEFAULT_BUILTIN_FRAMES,
                                    model.num_expression, expression_index)
        sequence["shape"] = np.zeros((sequence["shape"].shape[0], model.num_shape), np.float32)
        return sequence, DEFAULT_FPS
    sequence, fps = load_flame_sequence(spec, model.num_expression, model.num_shape)
    if num_frames is not None:
        sequence = {k: v[:num_frames] for k, v in sequence.items()}
    return sequence, fps or DEFAULT_FPS


def neutral_flame(model, expression: Sequence[float] = (), jaw: float = 0.0) -> Dict[str, np.ndarray]:
    """One frame (1, k) per FLAME key: zeros, with optional expression coefficients (leading
    ones; more than the model holds is an error) and jaw opening angle (radians, about x)."""
    expression = np.asarray(expression, np.float32).reshape(-1)
    if expression.size > model.num_expression:
        raise ValueError(f"{expression.size} expression coefficients given but the head model "
                         f"'{model.name}' has {model.num_expression}")
    params = {k: np.zeros((1, w), np.float32) for k, w in POSE_WIDTHS.items()}
    params["expression"] = _fit_width(expression[None], model.num_expression).astype(np.float32)
    params["shape"] = np.zeros((1, model.num_shape), np.float32)
    params["jaw_pose"][0, 0] = jaw
    return params


# ------------------------------------------------------------------------------------------
# The static part and the per-frame path
# ------------------------------------------------------------------------------------------

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


def _to_uint8(color: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(color * 255.0), 0, 255).astype(jnp.uint8)


def _render_settings(config, resolution, backend):
    """(resolution, backend, background grey level) from the config unless overridden."""
    resolution = int(config.render.resolution if resolution is None else resolution)
    if resolution < 1:
        raise ValueError(f"render resolution must be >= 1, got {resolution}")
    backend = config.render.backend if backend is None else backend
    return resolution, backend, float(config.render.background)


def make_frame_fn(config, generator, resolution: Optional[int] = None,
                  backend: Optional[str] = None, use_dynamic: bool = True):
    """The jitted per-frame function of an animation:

        frame_fn(g_vars, static, sequence, index, camera_labels) → (S, H, W, 3) uint8

    static: StaticMaps of S identities; sequence: dict of (T, k) FLAME arrays (on device);
    index: () int32 frame number; camera_labels: (T, 25) EG3D labels (frame `index` is used,
    the same camera for every identity). Runs FLAME + G_d + binding (`generator.animate`) and the
    rasterizer only — never the mapping or synthesis networks. Memoised per (generator, render
    settings), so repeated calls share one compilation cache.
    """
    resolution, backend, background = _render_settings(config, resolution, backend)
    return _frame_fn(generator, resolution, backend, background, bool(use_dynamic))


@functools.lru_cache(maxsize=16)
def _frame_fn(generator, resolution: int, backend: str, background: float, use_dynamic: bool):
    import rasterizer
    background = jnp.full((3,), background, jnp.float32)

    def frame_fn(g_vars, static, sequence, index, camera_labels):
        batch = static.face.shape[0]
        flame = {k: jnp.broadcast_to(v[index], (batch,) + v.shape[1:]) for k, v in sequence.items()}
        gaussians, _ = generator.animate(g_vars, static, flame, use_dynamic=use_dynamic)
        camera = rasterizer.Camera.from_eg3d(camera_labels[index], resolution)
        out = rasterizer.render(gaussians, camera, background=background, backend=backend)
        return _to_uint8(out.color)

    return jax.jit(frame_fn)


def make_view_fn(config, generator, resolution: Optional[int] = None,
                 backend: Optional[str] = None):
    """jitted (g_vars, static (1 identity), flame (dict of (1, k)), labels (V, 25)) →
    (V, H, W, 3) uint8: one pose (one `animate`) seen by V cameras. Memoised like
    `make_frame_fn`."""
    resolution, backend, background = _render_settings(config, resolution, backend)
    return _view_fn(generator, resolution, backend, background)


@functools.lru_cache(maxsize=16)
def _view_fn(generator, resolution: int, backend: str, background: float):
    import rasterizer
    background = jnp.full((3,), background, jnp.float32)

    def view_fn(g_vars, static, flame, labels):
        chex.assert_shape(static.face, (1, None, None, None))
        gaussians, _ = generator.animate(g_vars, static, flame)
        single = jax.tree_util.tree_map(lambda x: x[0], gaussians)
        camera = rasterizer.Camera.from_eg3d(labels, resolution)
        out = rasterizer.render(single, camera, background=background, backend=backend)
        return _to_uint8(out.color)

    return jax.jit(view_fn)


def render_views(view_fn, g_vars, static, flame, labels: np.ndarray, chunk: int = 8) -> np.ndarray:
    """All views (V, H, W, 3) uint8, rendered `chunk` cameras at a time (short chunks padded,
    so one compilation serves every call whatever V)."""
    labels = np.asarray(labels, np.float32)
    chex.assert_shape(labels, (None, 25))
    num = labels.shape[0]
    chunk = max(1, int(chunk))
    images = []
    for start in range(0, num, chunk):
        part = labels[start:start + chunk]
        if part.shape[0] < chunk:
            part = np.concatenate([part, np.repeat(part[-1:], chunk - part.shape[0], axis=0)])
        images.append(np.asarray(view_fn(g_vars, static, flame, part)))
    return np.concatenate(images)[:num]


def run_animation(frame_fn, g_vars, static, sequence: Mapping[str, np.ndarray],
                  camera_labels: np.ndarray, realtime: bool = False):
    """Runs the per-frame path over a sequence → (frames (T, S, H, W, 3) uint8, timing).

    Default: each frame is timed on its own (dispatch → block_until_ready); frame 0 includes the
    compilation and is reported separately. realtime: every frame is dispatched back to back
    with no host sync and the clock stops at ONE block_until_ready on the last frame (after one
    untimed warm-up frame that compiles) → sustained FPS; frames are fetched afterwards.
    timing: frames, identities, mode, per-frame ms (default mode), total seconds, fps.
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
        frames = np.stack([np.asarray(o) for o in outputs])
        return frames, timing
    frames, frame_ms = [], []
    for i in indices:
        start = time.perf_counter()
        out = jax.block_until_ready(frame_fn(g_vars, static, sequence, i, camera_labels))
        frame_ms.append(1e3 * (time.perf_counter() - start))
        frames.append(np.asarray(out))
    steady = frame_ms[1:] or frame_ms
    timing.update(first_frame_ms_incl_compile=frame_ms[0], frame_ms=frame_ms,
                  median_frame_ms=float(np.median(steady)),
                  fps=1e3 / float(np.median(steady)),
                  total_s=sum(frame_ms) / 1e3,
                  note="each frame dispatched and blocked on its own; fps from the median "
                       "frame time excluding frame 0 (compilation)")
    return np.stack(frames), timing


def animate_to_video(config, generator, g_vars, seeds: Sequence[int], sequence_spec: str, out,
                     num_frames: Optional[int] = None, camera: str = "fixed",
                     realtime: bool = False, truncation_psi: float = 1.0,
                     fps: Optional[float] = None, resolution: Optional[int] = None,
                     backend: Optional[str] = None,
                     expression_index: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """The animation job of `experiments/animate.py`: S identities side by side driven by one
    FLAME sequence → a video at `out` (.mp4 / .gif) with exactly one frame per FLAME frame, and
    the timing JSON next to it (`timing_path(out)`). Returns that JSON's content.

    The static generator runs once per identity (`generate_static_maps`); every frame runs one
    jitted per-frame function (`make_frame_fn`: FLAME + G_d + binding + rasterizer).
    """
    out = pathlib.Path(out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{out}: the animation output must end in {' or '.join(VIDEO_SUFFIXES)}")
    sequence, sequence_fps = get_sequence(sequence_spec, generator.flame_model, num_frames,
                                          expression_index)
    num = int(sequence["expression"].shape[0])
    labels = camera_path(camera, num)
    z = latents_for_seeds(seeds, config.model.z_dim)
    start = time.perf_counter()
    static = jax.block_until_ready(generate_static_maps(
        generator, g_vars, z, conditioning_labels(config, len(seeds)), truncation_psi))
    static_s = time.perf_counter() - start
    frame_fn = make_frame_fn(config, generator, resolution, backend)
    frames, timing = run_animation(frame_fn, g_vars, static, sequence, labels, realtime)
    fps = float(fps or sequence_fps)
    write_video(out, side_by_side(frames), fps)
    timing = dict(timing, video=str(out), sequence=sequence_spec, seeds=list(map(int, seeds)),
                  camera=camera, video_fps=fps, resolution=int(frames.shape[2]),
                  num_gaussians=generator.num_gaussians,
                  static_s_all_identities_incl_compile=static_s, **device_description())
    timing_file = timing_path(out)
    timing_file.write_text(json.dumps(timing, indent=2))
    return timing


def side_by_side(frames: np.ndarray) -> np.ndarray:
    """(T, S, H, W, 3) → (T, H, S·W, 3): identities left to right."""
    chex.assert_rank(frames, 5)
    t, s, h, w, c = frames.shape
    return frames.transpose(0, 2, 1, 3, 4).reshape(t, h, s * w, c)


def image_grid(images: np.ndarray) -> np.ndarray:
    """(rows, cols, H, W, 3) → (rows·H, cols·W, 3)."""
    chex.assert_rank(images, 5)
    r, c, h, w, ch = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


# ------------------------------------------------------------------------------------------
# Video I/O
# ------------------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".mp4", ".gif")


@contextlib.contextmanager
def _ffmpeg_subprocess():
    """Silences Python's fork warning for ffmpeg: a separate program started by fork+exec, so
    the forked child runs no JAX code (the warning's deadlock cannot happen)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def write_video(path, frames: np.ndarray, fps: float = DEFAULT_FPS) -> pathlib.Path:
    """frames (T, H, W, 3) uint8 → `path` (.mp4: H.264 yuv420p, odd sizes padded by one edge
    pixel; .gif: ffmpeg palettegen/paletteuse, one palette for the clip). ffmpeg writes every
    frame, so the file has exactly T frames even when consecutive frames are identical (Pillow's
    GIF writer would merge those)."""
    import imageio_ffmpeg
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: video output must end in {' or '.join(VIDEO_SUFFIXES)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"write_video expects (T>=1, H, W, 3) uint8 frames, got "
                         f"{frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        kwargs = dict(codec="libx264", pix_fmt_out="yuv420p", quality=8, macro_block_size=2,
                      output_params=["-movflags", "+faststart"])
    else:
        kwargs = dict(codec="gif", pix_fmt_out="pal8", quality=None, macro_block_size=1,
                      output_params=["-vf", "split[a][b];[a]palettegen=stats_mode=full[p];"
                                            "[b][p]paletteuse=dither=sierra2_4a", "-loop", "0"])
    height, width = frames.shape[1:3]
    with _ffmpeg_subprocess():
        writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=float(fps),
                                             ffmpeg_log_level="error", **kwargs)
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path


def read_video(path) -> np.ndarray:
    """All frames of a .mp4 / .gif as (T, H, W, 3) uint8."""
    import imageio.v2 as imageio
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if path.suffix.lower() == ".gif":
        frames = imageio.mimread(path, memtest=False)
        return np.stack([np.asarray(f)[..., :3] for f in frames])
    with _ffmpeg_subprocess():
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            return np.stack([np.asarray(f) for f in reader])
        finally:
            reader.close()


def timing_path(video_path) -> pathlib.Path:
    """Where the per-frame timing JSON of a video goes: NAME.mp4 → NAME_timing.json."""
    video_path = pathlib.Path(video_path)
    return video_path.with_name(video_path.stem + "_timing.json")


def device_description() -> Dict[str, str]:
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform,
            "num_devices": str(jax.device_count())}
