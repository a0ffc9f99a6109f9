"""FLAME sequences that drive an animation: built-in motions, `.npz` files, validation.

`get_sequence(spec, model)` is the entry point: 'builtin:talk' | 'builtin:blink' | 'builtin:nod'
| 'builtin:smile' (procedural, `builtin_sequence`) or the path of an `.npz` file
(`load_flame_sequence`); either way every FLAME key comes back as a (T, k) float32 array with
the head model's coefficient counts. `neutral_flame` is one frame at rest (optionally with
some expression coefficients and a jaw opening); `template_expression_index` names the embedded
template head's expression components ('smile', 'blink', 'lips_part', …).

FLAME sequence file (.npz) layout; every array numeric and finite; T = number of frames:
    expression   (T, E)  expression coefficients; E > the model's count is cut to the model's
                         (extra coefficients do not exist in the model), fewer are zero-padded
    jaw_pose     (T, 3)  axis-angle (radians)
    neck_pose    (T, 3)  axis-angle
    global_pose  (T, 3)  axis-angle
    eye_pose     (T, 6)  axis-angle, left eye then right eye
    shape        (S,) or (T, S)  identity coefficients (optional; same rule as expression)
    fps          ()      frames per second of the recording (optional; the video's frame rate)
Written by `experiments/track_video.py` as well (optional; read by `load_tracking`, not part of
the FLAME sequence itself):
    camera_labels (T, 25) the same head pose as EG3D camera labels with the head rotation
                          absorbed into the camera (what a dataset's dataset.json holds); do not
                          combine them with global_pose, which already turns the head
    face_found    (T,)    1 where a face was detected in the frame, 0 where the frame's
                          parameters were interpolated from its neighbours
    yaw_pitch_roll_deg (T, 3) the head's orientation relative to the camera (degrees)
Missing arrays are zeros; at least one per-frame array is needed to define T, and all
per-frame arrays must have the same T. Any other key is an error (a misspelt "jaw" would
otherwise silently animate nothing).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from reta3d import errors

FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")
POSE_WIDTHS = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
PER_FRAME_KEYS = ("expression", "jaw_pose", "neck_pose", "global_pose", "eye_pose")
# Per-frame extras of tracked sequences: (T, 25), (T,), (T, 3).
TRACKING_KEYS = {"camera_labels": 25, "face_found": None, "yaw_pitch_roll_deg": 3}
BUILTIN_PREFIX = "builtin:"
BUILTIN_SEQUENCES = ("talk", "blink", "nod", "smile")
DEFAULT_FPS = 30.0
DEFAULT_BUILTIN_FRAMES = 120


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
    allowed = set(FLAME_KEYS) | {"fps"} | set(TRACKING_KEYS)
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise errors.InputError(f"{source}: unknown array(s) {unknown}; a FLAME sequence holds "
                         f"{', '.join(PER_FRAME_KEYS)} (T, k), optional shape, fps and the "
                         f"tracking extras {sorted(TRACKING_KEYS)}")
    checked = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise errors.InputError(f"{source}: array '{key}' must be numeric, got dtype {value.dtype}")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.isfinite(value)))
            raise errors.InputError(f"{source}: array '{key}' has {bad} non-finite value(s) (NaN/inf)")
        checked[key] = value
    lengths = {}
    for key in PER_FRAME_KEYS:
        if key not in checked:
            continue
        value = checked[key]
        if value.ndim != 2:
            raise errors.InputError(f"{source}: array '{key}' must be (T, k) (one row per frame), got "
                             f"shape {value.shape}")
        if key in POSE_WIDTHS and value.shape[1] != POSE_WIDTHS[key]:
            raise errors.InputError(f"{source}: array '{key}' must be (T, {POSE_WIDTHS[key]}) axis-angle"
                             f"{' (left eye, right eye)' if key == 'eye_pose' else ''}, got "
                             f"shape {value.shape}")
        lengths[key] = value.shape[0]
    if not lengths:
        raise errors.InputError(f"{source}: no per-frame FLAME array (need at least one of "
                         f"{', '.join(PER_FRAME_KEYS)})")
    if len(set(lengths.values())) > 1:
        raise errors.InputError(f"{source}: arrays disagree on the number of frames: {lengths}")
    num_frames = next(iter(lengths.values()))
    if num_frames < 1:
        raise errors.InputError(f"{source}: the sequence has no frames")
    for key, width in TRACKING_KEYS.items():
        if key in checked:
            expected = (num_frames,) if width is None else (num_frames, width)
            if checked[key].shape != expected:
                raise errors.InputError(f"{source}: array '{key}' must be {expected} (one row per "
                                 f"frame), got shape {checked[key].shape}")
    if "fps" in checked and (checked["fps"].size != 1 or float(checked["fps"].reshape(-1)[0]) <= 0):
        raise errors.InputError(f"{source}: 'fps' must be one positive number, got {checked['fps']!r}")

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
            raise errors.InputError(f"{source}: array 'shape' must be (S,) or (T={num_frames}, S), got "
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
        raise errors.MissingInputError(f"FLAME sequence file not found: {path}")
    if path.suffix.lower() != ".npz":
        raise errors.InputError(f"{path}: a FLAME sequence must be an .npz file (layout: "
                         "reta3d/sequences.py docstring)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as e:  # noqa: BLE001 - zip/npy errors have many types
        raise errors.InputError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from e
    sequence = validate_flame_sequence(arrays, str(path), num_expression, num_shape)
    fps = float(np.asarray(arrays["fps"]).reshape(-1)[0]) if "fps" in arrays else None
    return sequence, fps


def load_tracking(path) -> Dict[str, np.ndarray]:
    """The tracking extras of a sequence file written by `experiments/track_video.py`:
    {"camera_labels": (T, 25) float32, "face_found": (T,) bool, "yaw_pitch_roll_deg": (T, 3)
    float32}, each only if present.
    The file is validated as a FLAME sequence first (same errors as `load_flame_sequence`)."""
    load_flame_sequence(path, num_expression=1)
    with np.load(path, allow_pickle=False) as data:
        out = {}
        if "camera_labels" in data.files:
            out["camera_labels"] = np.asarray(data["camera_labels"], np.float32)
        if "face_found" in data.files:
            out["face_found"] = np.asarray(data["face_found"]) > 0.5
        if "yaw_pitch_roll_deg" in data.files:
            out["yaw_pitch_roll_deg"] = np.asarray(data["yaw_pitch_roll_deg"], np.float32)
    return out


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
      smile  'smile' rises to 2 standard deviations ('squint' to 0.6, 'cheek_puff' to 0.3),
             holds and relaxes, with a slight jaw opening (0.05 rad); without a named 'smile' component only the jaw
             part remains (a warning is logged).
    """
    check_spec(BUILTIN_PREFIX + name)
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


def check_spec(spec: str) -> None:
    """Raises ValueError for an unknown 'builtin:NAME' or a file that is not an .npz (e.g. a
    video: saying how to track it) and FileNotFoundError for a sequence file that is not there
    (saying where such files come from), before anything is loaded."""
    choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SEQUENCES)
    if spec.startswith(BUILTIN_PREFIX):
        if spec[len(BUILTIN_PREFIX):] not in BUILTIN_SEQUENCES:
            raise ValueError(f"unknown builtin sequence '{spec}' (choose from {choices})")
    elif not pathlib.Path(spec).is_file():
        raise errors.MissingInputError(
            f"FLAME sequence file not found: {spec}. A sequence .npz comes from "
            "experiments/track_video.py (a video of a face), the viewer's 'Save FLAME parameters' "
            f"button, or your own arrays (layout: experiments/animate.py --help); builtins: {choices}")
    elif pathlib.Path(spec).suffix.lower() != ".npz":
        raise ValueError(
            f"{spec} is not a FLAME sequence (.npz). For a video of a face, track it first "
            "(experiments/track_video.py --video=CLIP --out=CLIP.npz), or drive heads from it "
            "directly with experiments/reenact.py")


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
    ones; more than the model holds is an error; in standard deviations of the model's
    expression basis) and jaw opening angle (radians, about x). The embedded template head
    names its components (`template_expression_index(model)["smile"]`); FLAME's are PCA."""
    expression = np.asarray(expression, np.float32).reshape(-1)
    if expression.size > model.num_expression:
        raise ValueError(f"{expression.size} expression coefficients given but the head model "
                         f"'{model.name}' has {model.num_expression}")
    params = {k: np.zeros((1, w), np.float32) for k, w in POSE_WIDTHS.items()}
    params["expression"] = _fit_width(expression[None], model.num_expression).astype(np.float32)
    params["shape"] = np.zeros((1, model.num_shape), np.float32)
    params["jaw_pose"][0, 0] = jaw
    return params

