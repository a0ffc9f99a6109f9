"""An interactive viewer in the browser: a generated head driven by FLAME controls, rendered by
the project's per-frame path from the browser's camera (`experiments/viewer.py`; viser serves
the page).

The logic, testable without a browser:
- `ViewerState`: every control of the page (identity, expression, pose, gaze, sequence player,
  G_d toggle, camera) as one frozen dataclass; two equal states render the same picture.
- `flame_from_state(state, model, sequence)`: the state's FLAME parameters, one frame (1, k).
- `camera_label_from_viser(position, wxyz | look_at+up, fov)`: the browser's camera as an
  EG3D 25-number label; `fit_to_aspect` pads the square render to the browser's canvas.
- `Renderer`: holds the generator, its variables and the static maps of each (seed, psi), and
  renders a state with `inference.make_frame_fn` (FLAME → G_d → binding → rasterizer; both the
  G_d-on and G_d-off functions are kept compiled) → uint8 image and its timing.
- `benchmark`: the per-frame time of the viewer's renders, without a browser.
- `RenderLoop`: a render thread that always renders the LATEST requested state: a burst of
  slider or camera events becomes one render, stale states are dropped, an unchanged state is
  not rendered again.
- `Viewer`: the viser server, its GUI and callbacks (imports viser only when built).

World frame. The viser scene is told that +y is up (`scene.set_up_direction("+y")`), and its
world IS this project's EG3D world (identity mapping): y up, the face looking towards +z, the
head around the origin (nose tip near (0, 0, 0.2)). viser reports the camera as
R_world_camera (quaternion wxyz) and position with OpenCV axes (x right, y down, z forward),
which is exactly the EG3D label's cam2world. The browser starts at the frontal EG3D camera:
position (0, 0, 2.7), looking at (0, 0, 0.2), up +y, vertical field of view
2·atan(0.5 / 4.2647) = 13.4° (FFHQ's focal length), so its label equals
`rasterizer.types.look_at_eg3d_label(0, 0)` (viser's client reports its own default view
for a moment before it applies the server's initial camera). viser orbits around its look-at
point (0, 0, 0.2) while EG3D's look-at sampler puts the camera on a sphere around the origin;
the label is whatever camera the browser has, so both are rendered exactly.

Image. The render is square (`config.render.resolution`, or --resolution) and spans the
browser's vertical field of view (normalised fx = fy = 0.5 / tan(fov/2), cx = cy = 0.5). viser
stretches a background image over the whole canvas, so the square is padded left and right
with the render's background colour to the canvas's aspect (cropped for a portrait canvas):
the head is drawn undistorted at the centre of the view; what lies outside the square's
frustum is not rendered. The raw square image is also shown in the control panel.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import pathlib
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from reta3d import errors
from reta3d.sequences import (BUILTIN_PREFIX, BUILTIN_SEQUENCES, POSE_WIDTHS,
                              template_expression_index)

# The frontal EG3D camera (rasterizer.types.look_at_eg3d_label(0, 0)) as a viser camera.
FRONTAL_POSITION = (0.0, 0.0, 2.7)
FRONTAL_LOOK_AT = (0.0, 0.0, 0.2)
WORLD_UP = (0.0, 1.0, 0.0)
FFHQ_FOCAL = 4.2647
NUM_FLAME_EXPRESSION_SLIDERS = 10   # a real FLAME model: its first 10 PCA components
BUILTIN_SPECS = tuple(BUILTIN_PREFIX + name for name in BUILTIN_SEQUENCES)
NO_SEQUENCE = "none"


def fov_from_focal(focal: float = FFHQ_FOCAL) -> float:
    """Vertical field of view (radians) of a normalised focal length (focal / image height)."""
    return 2.0 * math.atan(0.5 / float(focal))


def focal_from_fov(fov: float) -> float:
    """Normalised focal length (focal / image height) of a vertical field of view (radians)."""
    if not 0.0 < float(fov) < math.pi:
        raise ValueError(f"field of view must be in (0, pi) radians, got {fov}")
    return 0.5 / math.tan(0.5 * float(fov))


FRONTAL_FOV = fov_from_focal(FFHQ_FOCAL)


# ------------------------------------------------------------------------------------------
# The state of the controls
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ViewerState:
    """Every control of the viewer (hashable; equal states render the same image).

    seed, psi: the identity (latent of `inference.latents_for_seeds([seed])`, truncation psi).
    expression: values of the expression sliders, in the order of `expression_components`
      (the template head's named components; the first 10 of a real FLAME); missing = 0.
    jaw: jaw opening (radians, rotation of jaw_pose about x; > 0 opens the mouth).
    neck, rotation: (yaw, pitch, roll) radians of the neck joint and of the whole head (global
      pose): yaw about +y (the face turns to the subject's left, the image's right in the
      frontal view), pitch about +x (> 0 looks down), roll about +z; composed as
      R = Ry(yaw)·Rx(pitch)·Rz(roll) and written as axis-angle.
    gaze: (yaw, pitch) radians of both eyes (same convention; eye_pose of both eyes).
    use_dynamic: G_d on (the paper's animated textures) or off (the static maps only).
    sequence: None, 'builtin:NAME' or an .npz path; frame: its frame (clamped to its length).
      With a sequence, the sliders add to (compose with) the sequence's frame.
    camera: EG3D 25-number label (tuple) of the browser's camera, None = the frontal camera.
    aspect: the browser canvas's width / height (the displayed image is padded to it).
    """

    seed: int = 0
    psi: float = 1.0
    expression: Tuple[float, ...] = ()
    jaw: float = 0.0
    neck: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    gaze: Tuple[float, float] = (0.0, 0.0)
    use_dynamic: bool = True
    sequence: Optional[str] = None
    frame: int = 0
    camera: Optional[Tuple[float, ...]] = None
    aspect: float = 1.0

    def replace(self, **changes) -> "ViewerState":
        return dataclasses.replace(self, **changes)


def expression_components(model) -> List[Tuple[str, int]]:
    """The expression sliders of a head model: (name, coefficient index) in index order — the
    template head's named components (`sequences.template_expression_index`), or for a real
    FLAME model (a PCA basis without names) its first 10 components 'expression 0'..'9'."""
    named = template_expression_index(model)
    if named:
        return sorted(named.items(), key=lambda item: item[1])
    count = min(NUM_FLAME_EXPRESSION_SLIDERS, int(model.num_expression))
    return [(f"expression {i}", i) for i in range(count)]


def euler_to_axis_angle(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """(3,) axis-angle of R = Ry(yaw)·Rx(pitch)·Rz(roll) (radians)."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_euler("YXZ", [yaw, pitch, roll]).as_rotvec()


def _compose(slider: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Axis-angle of R(slider)·R(base)."""
    from scipy.spatial.transform import Rotation
    if not np.any(slider):
        return np.asarray(base, np.float64)
    return (Rotation.from_rotvec(slider) * Rotation.from_rotvec(base)).as_rotvec()


def flame_from_state(state: ViewerState, model,
                     sequence: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The FLAME parameters of a state → dict of (1, k) float32: shape (zeros: a sequence
    drives the motion only, as in animate.py and reenact.py; an inverted identity's own shape
    is put in by the renderer), expression, global_pose, neck_pose, jaw_pose, eye_pose (left
    then right eye).

    Without a sequence: zeros plus the sliders. With one (a dict of (T, k) arrays, as
    `sequences.get_sequence` returns), its frame `state.frame` (clamped to [0, T-1]) plus the
    sliders: expression sliders add to the frame's coefficients, rotations compose with the
    frame's (slider rotation applied after the frame's)."""
    components = expression_components(model)
    if len(state.expression) > len(components):
        raise ValueError(f"{len(state.expression)} expression values but the head model "
                         f"'{getattr(model, 'name', '?')}' has {len(components)} sliders")
    if sequence is not None:
        length = int(next(iter(sequence.values())).shape[0])
        t = min(max(int(state.frame), 0), length - 1)
        base = {k: np.asarray(v[t], np.float64) for k, v in sequence.items()}
    else:
        base = {}
    out = {k: np.array(base.get(k, np.zeros(w)), np.float64) for k, w in POSE_WIDTHS.items()}
    expression = np.zeros(int(model.num_expression))
    if "expression" in base:
        width = min(expression.size, base["expression"].size)
        expression[:width] = base["expression"][:width]
    for (_, index), value in zip(components, state.expression):
        expression[index] += float(value)
    shape = np.zeros(int(model.num_shape))
    out["global_pose"] = _compose(euler_to_axis_angle(*state.rotation), out["global_pose"])
    out["neck_pose"] = _compose(euler_to_axis_angle(*state.neck), out["neck_pose"])
    out["jaw_pose"] = _compose(np.array([float(state.jaw), 0.0, 0.0]), out["jaw_pose"])
    gaze = euler_to_axis_angle(state.gaze[0], state.gaze[1])
    out["eye_pose"] = np.concatenate([_compose(gaze, out["eye_pose"][:3]),
                                      _compose(gaze, out["eye_pose"][3:])])
    out["expression"], out["shape"] = expression, shape
    return {k: np.asarray(v, np.float32)[None] for k, v in out.items()}


def flame_npz_bytes(flame: Mapping[str, np.ndarray]) -> bytes:
    """A one-frame FLAME sequence file (.npz, `reta3d.sequences` layout: expression (1, E),
    jaw_pose, neck_pose, global_pose (1, 3), eye_pose (1, 6), shape (1, S)) as bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32).reshape(1, -1) for k, v in flame.items()})
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) → PNG bytes."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ply_bytes(gaussians, sh_degree: int = 0) -> bytes:
    """One set of Gaussians (N, ·) → a standard 3DGS .ply (`reta3d.ply.write_ply`) as bytes."""
    from reta3d import ply
    with tempfile.TemporaryDirectory(prefix="reta3d-viewer-") as tmp:
        path = ply.write_ply(pathlib.Path(tmp) / "head.ply", gaussians, sh_degree=sh_degree)
        return path.read_bytes()


# ------------------------------------------------------------------------------------------
# The camera
# ------------------------------------------------------------------------------------------

def quaternion_to_matrix(wxyz) -> np.ndarray:
    """(w, x, y, z) → 3x3 rotation matrix (the quaternion is normalised first)."""
    w, x, y, z = np.asarray(wxyz, np.float64) / np.linalg.norm(wxyz)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def look_at_rotation(position, look_at, up=WORLD_UP) -> np.ndarray:
    """3x3 R_world_camera (columns: camera x right, y down, z forward in world coordinates) of
    a camera at `position` looking at `look_at` with `up` as the image's up — EG3D's
    `create_cam2world_matrix` construction."""
    forward = np.asarray(look_at, np.float64) - np.asarray(position, np.float64)
    norm = np.linalg.norm(forward)
    if norm == 0.0:
        raise ValueError("camera look_at equals its position")
    forward /= norm
    right = np.cross(forward, np.asarray(up, np.float64))   # = -cross(up, forward)
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("camera up direction is parallel to the view direction")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)


def camera_label_from_viser(position, wxyz=None, fov: float = FRONTAL_FOV, *, look_at=None,
                            up=WORLD_UP) -> np.ndarray:
    """viser's camera → (25,) float32 EG3D label for a square render of its vertical view.

    position: the camera centre in viser's world (= EG3D world, see the module docstring).
    wxyz: viser's `camera.wxyz`, R_world_camera with OpenCV axes; or, instead, look_at (and
      up) as in EG3D's look-at construction.
    fov: viser's `camera.fov`, the VERTICAL field of view (radians); the square image spans it
      (normalised fx = fy = 0.5 / tan(fov/2), cx = cy = 0.5).
    """
    if (wxyz is None) == (look_at is None):
        raise ValueError("camera_label_from_viser: pass exactly one of wxyz or look_at")
    rotation = quaternion_to_matrix(wxyz) if wxyz is not None else \
        look_at_rotation(position, look_at, up)
    cam2world = np.eye(4)
    cam2world[:3, :3] = rotation
    cam2world[:3, 3] = np.asarray(position, np.float64)
    focal = focal_from_fov(fov)
    k = np.array([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]])
    return np.concatenate([cam2world.reshape(-1), k.reshape(-1)]).astype(np.float32)


def frontal_label() -> np.ndarray:
    """The initial browser camera's label (= `look_at_eg3d_label(0, 0)`)."""
    return camera_label_from_viser(FRONTAL_POSITION, look_at=FRONTAL_LOOK_AT, fov=FRONTAL_FOV)


def fit_to_aspect(image: np.ndarray, aspect: float, fill: int) -> np.ndarray:
    """A square (H, H, 3) render → (H, round(H·aspect), 3): padded left and right with `fill`
    (aspect > 1) or cropped at the centre (aspect < 1), so that viser's background image,
    stretched over the canvas, shows the render undistorted at the centre."""
    height, width = image.shape[:2]
    target = max(1, int(round(height * float(aspect)))) if aspect and aspect > 0 else width
    if target == width:
        return image
    if target < width:
        left = (width - target) // 2
        return image[:, left:left + target]
    left = (target - width) // 2
    out = np.full((height, target) + image.shape[2:], fill, image.dtype)
    out[:, left:left + width] = image
    return out


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Frame:
    """One rendered state: image uint8 (R, R, 3); frame_ms: the per-frame path (FLAME arrays
    to the device, FLAME + G_d + binding + rasterizer, image back), static_ms: the static
    generator when this state's (seed, psi) was new (else 0); overflow: tile intersections
    the rasterizer dropped."""

    image: np.ndarray
    frame_ms: float
    static_ms: float
    overflow: int

    @property
    def fps(self) -> float:
        return 1e3 / self.frame_ms if self.frame_ms > 0 else float("inf")


class Renderer:
    """Renders `ViewerState`s of one generator with the project's per-frame path.

    The static maps of each (seed, psi) are generated once (`inference.generate_static_maps`,
    the last `static_cache` identities kept); FLAME sequences are loaded once per spec; the
    per-frame functions of `inference.make_frame_fn` with G_d on and off are both kept, each
    compiled on its first use (`warm_up` compiles them ahead). Thread-safe (one lock)."""

    def __init__(self, config, generator, g_vars, resolution: Optional[int] = None,
                 backend: Optional[str] = None, capacity: Optional[int] = None,
                 static_cache: int = 4, identity: Optional[str] = None):
        """identity: an inverted identity (`experiments/invert.py`'s identity.npz): it is shown
        instead of the seeds (its static maps, its PTI-tuned weights if any, its FLAME shape)."""
        from reta3d import inference
        self.identity = identity
        self.identity_static, self.identity_shape = None, None
        if identity is not None:
            from reta3d import inversion
            g_vars, self.identity_static = inversion.load_identity(identity, generator, g_vars)
            self.identity_shape = inversion.read_identity(identity).shape
        self.config, self.generator, self.g_vars = config, generator, g_vars
        self.model = generator.flame_model
        self.components = expression_components(self.model)
        self.frame_fns = {flag: inference.make_frame_fn(config, generator, resolution, backend,
                                                        use_dynamic=flag, capacity=capacity)
                          for flag in (True, False)}
        self.resolution = self.frame_fns[True].resolution
        self.backend = self.frame_fns[True].backend
        self.background = int(round(255 * float(config.render.background)))
        self._static: "collections.OrderedDict[Tuple[int, float], Any]" = collections.OrderedDict()
        self._static_cache = max(1, int(static_cache))
        self._sequences: Dict[str, Tuple[Dict[str, np.ndarray], float]] = {}
        self._lock = threading.RLock()

    @property
    def num_gaussians(self) -> int:
        return int(self.generator.num_gaussians)

    @property
    def frame_kind(self) -> str:
        return str(self.generator.config.frame_kind)

    def static_maps(self, seed: int, psi: float) -> Tuple[Any, float]:
        """(StaticMaps of one identity, milliseconds spent generating them: 0 when cached)."""
        import jax
        from reta3d import cameras, inference
        key = (int(seed), float(psi))
        if self.identity_static is not None:
            return self.identity_static, 0.0
        with self._lock:
            if key in self._static:
                self._static.move_to_end(key)
                return self._static[key], 0.0
            start = time.perf_counter()
            z = inference.latents_for_seeds([key[0]], self.config.model.z_dim)
            static = jax.block_until_ready(inference.generate_static_maps(
                self.generator, self.g_vars, z, cameras.conditioning_labels(self.config, 1),
                key[1]))
            self._static[key] = static
            while len(self._static) > self._static_cache:
                self._static.popitem(last=False)
            return static, 1e3 * (time.perf_counter() - start)

    def sequence(self, spec: str) -> Tuple[Dict[str, np.ndarray], float]:
        """(FLAME arrays (T, k), fps) of 'builtin:NAME' or an .npz path (loaded once; the
        errors of `sequences.get_sequence` for a missing or malformed file)."""
        from reta3d.sequences import get_sequence
        with self._lock:
            if spec not in self._sequences:
                self._sequences[spec] = get_sequence(spec, self.model)
            return self._sequences[spec]

    def flame(self, state: ViewerState) -> Dict[str, np.ndarray]:
        sequence = self.sequence(state.sequence)[0] if state.sequence else None
        flame = flame_from_state(state, self.model, sequence)
        if self.identity_shape is not None:
            from reta3d import inversion
            flame = inversion.with_identity_shape(flame, self.identity_shape)
        return flame

    @staticmethod
    def label(state: ViewerState) -> np.ndarray:
        return frontal_label() if state.camera is None else np.asarray(state.camera, np.float32)

    def render(self, state: ViewerState) -> Frame:
        """Renders a state → Frame (the square image and its timing)."""
        import jax.numpy as jnp
        with self._lock:
            static, static_ms = self.static_maps(state.seed, state.psi)
            flame = self.flame(state)
            label = self.label(state)
            frame_fn = self.frame_fns[bool(state.use_dynamic)]
            start = time.perf_counter()
            images, overflow = frame_fn(self.g_vars, static,
                                        {k: jnp.asarray(v) for k, v in flame.items()},
                                        jnp.asarray(0, jnp.int32), jnp.asarray(label[None]))
            image = np.asarray(images[0])
            frame_ms = 1e3 * (time.perf_counter() - start)
            return Frame(image, frame_ms, static_ms, int(np.asarray(overflow)[0]))

    def gaussians(self, state: ViewerState):
        """The state's Gaussians (rasterizer.Gaussians, (N, ·) numpy, EG3D world)."""
        import jax
        with self._lock:
            static, _ = self.static_maps(state.seed, state.psi)
            gaussians, _ = self.generator.jit_animate(self.g_vars, static, self.flame(state),
                                                      use_dynamic=bool(state.use_dynamic))
            return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), gaussians)

    def warm_up(self, state: Optional[ViewerState] = None,
                use_dynamic: Sequence[bool] = (True, False)) -> Dict[str, float]:
        """Compiles the static generator and the per-frame functions (G_d on/off) by rendering
        `state` → {"static_ms", "compile_ms_gd_on", "compile_ms_gd_off"} (what was run)."""
        state = state or ViewerState()
        timings = {}
        for flag in use_dynamic:
            start = time.perf_counter()
            frame = self.render(state.replace(use_dynamic=bool(flag)))
            if frame.static_ms:
                timings["static_ms"] = frame.static_ms
            timings[f"compile_ms_gd_{'on' if flag else 'off'}"] = \
                1e3 * (time.perf_counter() - start) - frame.static_ms
        return timings


def benchmark(renderer: Renderer, num_frames: int = 60, sequence: str = "builtin:talk",
              use_dynamic: bool = True) -> Dict[str, Any]:
    """The viewer's frame time without the browser: renders `num_frames` consecutive frames
    of `sequence` from the frontal camera, each a new state as the player makes them, after
    one untimed frame (compilation, static maps) → {"median_frame_ms", "fps" (1000 / median),
    "p90_frame_ms", "frames", "resolution", "backend", "num_gaussians", "use_dynamic"}.
    Each frame is timed as the viewer times it (`Frame.frame_ms`: FLAME arrays to the
    device, the per-frame path, the image back to the host); PNG/JPEG encoding and the
    websocket are not included (the page shows those as "encode/send")."""
    state = ViewerState(sequence=sequence, use_dynamic=use_dynamic)
    renderer.render(state.replace(frame=-1, jaw=0.01))         # compile, static maps
    times = [renderer.render(state.replace(frame=i)).frame_ms for i in range(int(num_frames))]
    median = float(np.median(times))
    return {"median_frame_ms": median, "fps": 1e3 / median,
            "p90_frame_ms": float(np.percentile(times, 90)), "frames": len(times),
            "sequence": sequence, "resolution": renderer.resolution,
            "backend": renderer.backend, "num_gaussians": renderer.num_gaussians,
            "use_dynamic": bool(use_dynamic)}


class RenderLoop:
    """A render thread that renders the LATEST requested state.

    `request(state)` only records the state and wakes the thread; while a render runs, newer
    requests replace each other (the replaced ones are counted in `dropped` and never
    rendered), and a state equal to the last rendered one is skipped. After each render,
    `on_frame(state, result)` runs on the render thread; an exception from `render` goes to
    `on_error(state, exception)` (default: logged) and the loop goes on."""

    def __init__(self, render: Callable[[Any], Any], on_frame: Callable[[Any, Any], None],
                 on_error: Optional[Callable[[Any, BaseException], None]] = None,
                 name: str = "reta3d-viewer-render"):
        self._render, self._on_frame = render, on_frame
        self._on_error = on_error or (lambda state, e: logging.exception(
            "viewer: rendering failed", exc_info=e))
        self._cond = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self._stopped = False
        self._last: Any = None
        self._has_last = False
        self.rendered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "RenderLoop":
        self._thread.start()
        return self

    def request(self, state) -> None:
        with self._cond:
            if self._has_pending:
                self.dropped += 1
            self._pending, self._has_pending = state, True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                state, self._has_pending, self._pending = self._pending, False, None
                if self._has_last and state == self._last:
                    self._cond.notify_all()      # nothing to do: wake wait_idle
                    continue
                self._busy = True
            try:
                result = self._render(state)
                self._on_frame(state, result)
            except Exception as e:  # noqa: BLE001 - reported, the loop goes on
                self._on_error(state, e)
            with self._cond:
                self._last, self._has_last, self._busy = state, True, False
                self.rendered += 1
                self._cond.notify_all()

    @property
    def last_state(self):
        return self._last

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Blocks until nothing is pending or rendering; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._has_pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the thread (after the render in progress, if any) and joins it."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)


# ------------------------------------------------------------------------------------------
# The viser application
# ------------------------------------------------------------------------------------------

class Viewer:
    """The browser viewer: a viser server on host:port, its controls, the render thread and
    the sequence player. `start()` serves (returns self), `stop()` shuts everything down and
    joins its threads. One view is shared by every connected browser (the camera of the
    browser that moved last is rendered; images go to all)."""

    def __init__(self, renderer: Renderer, host: str = "127.0.0.1", port: int = 8080,
                 initial: Optional[ViewerState] = None, verbose: bool = False):
        self.renderer = renderer
        self.host, self.port, self.verbose = host, int(port), verbose
        initial = initial or ViewerState()
        self._state = initial.replace(
            expression=tuple(initial.expression) + (0.0,) * (len(renderer.components)
                                                              - len(initial.expression)))
        self._state_lock = threading.RLock()
        self._last: Optional[Tuple[ViewerState, Frame]] = None
        self._last_lock = threading.Lock()
        self.errors: List[str] = []
        self.server = None
        self._loop = RenderLoop(renderer.render, self._on_frame, self._on_error)
        self._player_stop = threading.Event()
        self._player = threading.Thread(target=self._play, name="reta3d-viewer-player",
                                        daemon=True)
        self._playing = False
        self._play_origin = (0.0, 0)    # (monotonic time, frame) the playback counts from
        self._player_frame = None
        self._handles: Dict[str, Any] = {}
        self._shown = collections.deque(maxlen=64)   # display times of the latest frames

    # -- public -------------------------------------------------------------------------------
    @property
    def state(self) -> ViewerState:
        with self._state_lock:
            return self._state

    @property
    def last_frame(self) -> Optional[Tuple[ViewerState, Frame]]:
        """(state, Frame) of the latest render shown."""
        with self._last_lock:
            return self._last

    @property
    def controls(self) -> Mapping[str, Any]:
        """The viser GUI handles by name (after `start`): seed, psi, gd, jaw, expression (list),
        neck / rotation (yaw, pitch, roll lists), gaze (list), sequence, path, load, play,
        frame, reset_pose, reset_camera, save_png, save_ply, save_npz, stats, image,
        sequence_status. Setting a handle's value (a button's to True) acts as the page does."""
        return self._handles

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def render_loop(self) -> RenderLoop:
        return self._loop

    def update(self, **changes) -> ViewerState:
        """Changes the state (fields of ViewerState) and requests a render of it."""
        with self._state_lock:
            self._state = self._state.replace(**changes)
            state = self._state
        self._loop.request(state)
        return state

    def start(self) -> "Viewer":
        try:
            import viser
        except ImportError as error:
            raise errors.MissingDependencyError(
                "the viewer needs viser: pip install -r requirements-viewer.txt") from error
        server = viser.ViserServer(host=self.host, port=self.port, verbose=self.verbose)
        self.server = server
        self.port = server.get_port()
        server.gui.configure_theme(show_share_button=False, control_width="medium")
        server.scene.set_up_direction("+y")
        server.scene.world_axes.visible = False
        server.initial_camera.up = WORLD_UP
        server.initial_camera.position = FRONTAL_POSITION
        server.initial_camera.look_at = FRONTAL_LOOK_AT
        server.initial_camera.fov = FRONTAL_FOV
        self._build_gui(server)
        server.on_client_connect(self._on_connect)
        self._loop.start()
        self._player.start()
        self._loop.request(self.state)
        return self

    def stop(self) -> None:
        self._player_stop.set()
        if self._player.is_alive():
            self._player.join(10.0)
        self._loop.stop()
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            # viser's stop() shuts its callback pool without waiting; wait for its workers
            # (callbacks already running finish) so that nothing outlives the viewer.
            executor = getattr(server, "_thread_executor", None)
            if executor is not None:
                executor.shutdown(wait=True)

    def __enter__(self) -> "Viewer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- GUI ----------------------------------------------------------------------------------
    def _build_gui(self, server) -> None:
        r, s, gui, h = self.renderer, self.state, server.gui, self._handles
        gui.add_markdown(f"**RETA3D** · {r.num_gaussians} Gaussians · frame kind "
                         f"`{r.frame_kind}` · {r.resolution}² · backend `{r.backend}`")
        h["stats"] = gui.add_markdown("rendering…")
        h["image"] = gui.add_image(np.full((r.resolution, r.resolution, 3), r.background,
                                           np.uint8), label=None, format="png")
        with gui.add_folder("Identity"):
            if r.identity is not None:
                gui.add_markdown(f"Inverted identity `{pathlib.Path(r.identity).name}` "
                                 "(seed and psi do not apply)")
            h["seed"] = gui.add_number("Seed", int(s.seed), min=0, step=1,
                                       disabled=r.identity is not None)
            h["psi"] = gui.add_slider("Truncation psi", 0.0, 1.0, 0.05, float(s.psi),
                                      disabled=r.identity is not None)
            has_gd = r.generator.config.dynamic_module
            h["gd"] = gui.add_checkbox(
                "G_d (dynamic)", bool(s.use_dynamic), disabled=not has_gd,
                hint="The dynamic texture module; off: the static maps only" if has_gd else
                f"This generator ({r.generator.config.ablation_row}, Tab. 1c) has no G_d: "
                "the expression drives G itself")
        with gui.add_folder("Expression"):
            h["jaw"] = gui.add_slider("Jaw opening", 0.0, 0.6, 0.01, float(s.jaw))
            h["expression"] = [gui.add_slider(name.replace("_", " "), -3.0, 3.0, 0.05,
                                              float(value))
                               for (name, _), value in zip(r.components, s.expression)]
        with gui.add_folder("Pose and gaze"):
            for key, what in (("neck", "Neck"), ("rotation", "Head")):
                h[key] = [gui.add_slider(f"{what} {axis}", -0.8, 0.8, 0.01, float(v))
                          for axis, v in zip(("yaw", "pitch", "roll"), getattr(s, key))]
            h["gaze"] = [gui.add_slider(f"Gaze {axis}", -0.5, 0.5, 0.01, float(v))
                         for axis, v in zip(("yaw", "pitch"), s.gaze)]
            h["reset_pose"] = gui.add_button("Reset expression and pose")
        with gui.add_folder("FLAME sequence"):
            options = [NO_SEQUENCE, *BUILTIN_SPECS]
            if s.sequence and s.sequence not in options:
                options.append(s.sequence)
            h["sequence"] = gui.add_dropdown("Sequence", options,
                                             initial_value=s.sequence or NO_SEQUENCE)
            h["path"] = gui.add_text("File (.npz)", "",
                                     hint="A FLAME sequence .npz on the server, e.g. from "
                                          "experiments/track_video.py")
            h["load"] = gui.add_button("Load file")
            h["play"] = gui.add_button("Play", disabled=not s.sequence)
            last_frame = max(self._sequence_length(s.sequence) - 1, 1)
            h["frame"] = gui.add_slider("Frame", 0, last_frame, 1, int(s.frame),
                                        disabled=not s.sequence)
            h["sequence_status"] = gui.add_markdown("")
        with gui.add_folder("Camera and files"):
            h["reset_camera"] = gui.add_button("Reset camera (frontal)")
            h["save_png"] = gui.add_button("Save image (.png)")
            h["save_ply"] = gui.add_button("Save Gaussians (.ply)")
            h["save_npz"] = gui.add_button("Save FLAME parameters (.npz)")

        for key in ("seed", "psi", "gd", "jaw", "frame"):
            h[key].on_update(self._on_control)
        for key in ("expression", "neck", "rotation", "gaze"):
            for handle in h[key]:
                handle.on_update(self._on_control)
        h["sequence"].on_update(self._on_sequence)
        h["load"].on_click(self._on_load)
        h["play"].on_click(self._on_play)
        h["reset_pose"].on_click(self._on_reset_pose)
        h["reset_camera"].on_click(lambda event: self._reset_camera(event.client))
        h["save_png"].on_click(self._on_save_png)
        h["save_ply"].on_click(self._on_save_ply)
        h["save_npz"].on_click(self._on_save_npz)

    def _sequence_length(self, spec: Optional[str]) -> int:
        if not spec:
            return 1
        return int(self.renderer.sequence(spec)[0]["expression"].shape[0])

    def _on_control(self, _event=None) -> None:
        h = self._handles
        with self._state_lock:
            self.update(
                seed=max(0, int(round(float(h["seed"].value)))),
                psi=float(h["psi"].value), use_dynamic=bool(h["gd"].value),
                jaw=float(h["jaw"].value),
                expression=tuple(float(x.value) for x in h["expression"]),
                neck=tuple(float(x.value) for x in h["neck"]),
                rotation=tuple(float(x.value) for x in h["rotation"]),
                gaze=tuple(float(x.value) for x in h["gaze"]),
                frame=int(h["frame"].value))
            if self._playing and self._player_frame != int(h["frame"].value):
                # The user moved the scrubber while playing: play on from there.
                self._play_origin = (time.monotonic(), int(h["frame"].value))

    def _on_sequence(self, _event=None) -> None:
        spec = self._handles["sequence"].value
        self._select_sequence(None if spec == NO_SEQUENCE else spec)

    def _select_sequence(self, spec: Optional[str]) -> None:
        h = self._handles
        status = ""
        try:
            length = self._sequence_length(spec)
            fps = self.renderer.sequence(spec)[1] if spec else 0.0
        except (OSError, ValueError) as e:
            h["sequence_status"].content = f"**error:** {e}"
            h["sequence"].value = NO_SEQUENCE
            return
        if spec:
            status = f"{length} frames at {fps:g} fps; the sliders add to each frame"
        with self._state_lock:
            self._playing = False
            h["play"].label = "Play"
            h["play"].disabled = not spec
            h["frame"].disabled = not spec
            self._state = self._state.replace(sequence=spec, frame=0)
            h["frame"].value = 0
            h["frame"].max = max(length - 1, 1)
            h["sequence_status"].content = status
            self.update()

    def _on_load(self, _event=None) -> None:
        h = self._handles
        path = str(h["path"].value).strip()
        if not path:
            h["sequence_status"].content = "**error:** type the path of an .npz file first"
            return
        try:
            self.renderer.sequence(path)
        except (OSError, ValueError) as e:
            h["sequence_status"].content = f"**error:** {e}"
            return
        if path not in h["sequence"].options:
            h["sequence"].options = tuple(h["sequence"].options) + (path,)
        if h["sequence"].value == path:
            self._select_sequence(path)
        else:
            h["sequence"].value = path   # → _on_sequence

    def _on_play(self, _event=None) -> None:
        h = self._handles
        with self._state_lock:
            if not self.state.sequence:
                return
            self._playing = not self._playing
            h["play"].label = "Pause" if self._playing else "Play"
            self._play_origin = (time.monotonic(), int(self.state.frame))

    def _play(self) -> None:
        """The player thread: while playing, moves the frame scrubber in real time at the
        sequence's fps (frames whose render is not done in time are skipped: the render loop
        draws the latest state)."""
        while not self._player_stop.wait(1.0 / 120.0):
            with self._state_lock:
                spec = self.state.sequence
                if not self._playing or not spec:
                    continue
                arrays, fps = self.renderer.sequence(spec)
                length = int(arrays["expression"].shape[0])
                start_time, start_frame = self._play_origin
                frame = (start_frame + int((time.monotonic() - start_time) * fps)) % length
                if frame != self.state.frame:
                    self._player_frame = frame
                    self._handles["frame"].value = frame     # → _on_control → render request

    def _on_reset_pose(self, _event=None) -> None:
        h = self._handles
        with self._state_lock:
            for handle in [h["jaw"], *h["expression"], *h["neck"], *h["rotation"], *h["gaze"]]:
                handle.value = 0.0

    # -- camera -------------------------------------------------------------------------------
    def _on_connect(self, client) -> None:
        client.camera.on_update(self._on_camera)

    def _on_camera(self, camera) -> None:
        try:
            label = camera_label_from_viser(camera.position, camera.wxyz, camera.fov)
            aspect = float(camera.aspect) if camera.image_height else 1.0
        except (ValueError, ZeroDivisionError) as e:
            logging.warning("viewer: ignoring a camera update: %s", e)
            return
        self.update(camera=tuple(float(x) for x in label), aspect=aspect)

    @staticmethod
    def _reset_camera(client) -> None:
        if client is None:
            return
        with client.atomic():
            client.camera.up_direction = WORLD_UP
            client.camera.fov = FRONTAL_FOV
            client.camera.position = FRONTAL_POSITION
            client.camera.look_at = FRONTAL_LOOK_AT

    # -- frames -------------------------------------------------------------------------------
    def _on_frame(self, state: ViewerState, frame: Frame) -> None:
        start = time.perf_counter()
        server = self.server
        if server is None:
            return
        server.scene.set_background_image(
            fit_to_aspect(frame.image, state.aspect, self.renderer.background), format="jpeg",
            jpeg_quality=92)
        self._handles["image"].image = frame.image
        with self._last_lock:
            self._last = (state, frame)
        show_ms = 1e3 * (time.perf_counter() - start)
        now = time.monotonic()
        self._shown.append(now)
        recent = [t for t in self._shown if now - t <= 2.0]
        shown = (f" · shown {(len(recent) - 1) / (recent[-1] - recent[0]):.1f} FPS"
                 if len(recent) >= 3 and recent[-1] > recent[0] else "")
        static = f" · new identity {frame.static_ms:.0f} ms" if frame.static_ms else ""
        overflow = f" · **{frame.overflow} tile intersections dropped**" if frame.overflow else ""
        self._handles["stats"].content = (
            f"frame **{frame.frame_ms:.1f} ms ({frame.fps:.1f} FPS)** · "
            f"+{show_ms:.1f} ms encode/send{shown}{static}{overflow}")

    def _on_error(self, state: ViewerState, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        logging.error("viewer: rendering failed: %s", message)
        self.errors.append(message)
        if self.server is not None:
            self._handles["stats"].content = f"**render error:** {message}"

    # -- downloads ----------------------------------------------------------------------------
    def _send(self, event, filename: str, content: bytes) -> None:
        target = event.client if event.client is not None else self.server
        target.send_file_download(filename, content, save_immediately=True)

    def _on_save_png(self, event) -> None:
        last = self.last_frame
        if last is not None:
            self._send(event, f"reta3d_seed{last[0].seed}.png", png_bytes(last[1].image))

    def _on_save_ply(self, event) -> None:
        state = self.state
        self._send(event, f"reta3d_seed{state.seed}.ply",
                   ply_bytes(self.renderer.gaussians(state)))

    def _on_save_npz(self, event) -> None:
        state = self.state
        self._send(event, f"reta3d_flame_seed{state.seed}.npz",
                   flame_npz_bytes(self.renderer.flame(state)))
