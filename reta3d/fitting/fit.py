"""Fit FLAME (or the template head) and an EG3D camera to 68 2D landmarks, in JAX.

Unknowns, per frame t: the head's rigid motion relative to the canonical FFHQ camera
(`look_at_eg3d_label(0, 0)`: radius 2.7, looking at (0, 0, 0.2); fixed FFHQ intrinsics
fx = fy = 4.2647, cx = cy = 0.5), expression, jaw pose, neck pose; per person (or per frame
with shared_shape=False): FLAME shape. Only the first `num_shape` / `num_expression`
coefficients are fitted (default 100 / 50, what the dataset layout stores; fewer when the
model has fewer).

Model of a landmark (world = EG3D world, `FlameModel.to_world`):
    p      = landmarks_3d(FLAME(shape, expression, global 0, neck, jaw), embedding, yaw)
             (yaw: DECA's yaw of R @ R_neck, the contour blended between whole degrees)
    w      = R (to_world(p) - c) + c + t       head rigid motion, rotating about c, the
                                                centroid of the rest-pose landmarks
    pixels = K [R0 | t0] w                      canonical camera, K = FFHQ intrinsics x size
The rigid motion is then absorbed into the camera: the returned label is
    cam2world = M^-1 @ cam2world0,   M = [[R, c + t - R c], [0, 0, 0, 1]],
so the head itself stays at global_pose = 0, as EG3D / Next3D datasets expect
(`reta3d.data.folder`: global_pose is usually zero because the camera absorbs it).

Loss (summed over frames; image-size independent: residuals are fractions of the image
size, divided by `landmark_sigma`):
    data        sum_i w_ti rho(|r_ti| / landmark_sigma)      pseudo-Huber rho(u) =
                2 c^2 (sqrt(1 + u^2/c^2) - 1), c = robust_scale: quadratic (u^2) for small
                residuals, linear beyond c sigma, so a wrong point pulls with bounded force
    priors      |shape|^2 + |expression|^2 (both ~N(0, 1) per coefficient in FLAME and in
                the template), jaw (x, the opening: sigma 0.3 rad, and closing past 0:
                sigma 0.02 rad; y, z: sigma 0.02 rad), neck (sigma 0.03 rad: for landmarks
                it is nearly the same as the rigid rotation), all / 2 (Gaussian NLLs)
    temporal    temporal_weight / 2 sum_t |second difference / scale|^2 of rotation (scale
                0.01 rad), translation (0.005), jaw and neck (0.01 rad), expression (0.1):
                for video frames; 0 for unrelated photos
Optimiser: optax L-BFGS (zoom line search, memory 20), all steps inside one jit (lax.scan
over rounds, each a lax.scan of L-BFGS steps from a fresh memory). The first round moves
only the rigid pose from a closed-form start (a weak-perspective Procrustes fit of the
rest-pose landmarks), later rounds move everything. With a dynamic jaw contour the contour
follows the head's current yaw continuously (`embedding.dynamic_rows_blend`), so the
contour's sliding is part of the model the optimiser sees. Chosen by measurement: on 16
template cases L-BFGS reaches a lower loss in 300 steps (0.3 s) than Adam in 3000 (2 s).
Measured on the template head (512^2, N(0, 1 px) noise, yaw +-30, pitch/roll +-15 degrees,
jaw 0-0.3 rad, shape and expression ~N(0, 0.7^2)): yaw/pitch/roll within ~1 degree, jaw
within ~0.035 rad; one photo ~0.3 s on a 2-core CPU after a ~8 s compile (tests/test_fitting.py).

Pixel coordinates are image coordinates (x right, y down) with pixel (row i, col j)
centred at (j + 0.5, i + 0.5), as in rasterizer/types.py; the principal point cx = cy = 0.5
is the image centre (size / 2). `reta3d.fitting.landmarks` returns dlib's points in this
convention (dlib's integer pixel indices + 0.5).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reta3d import flame
from reta3d.fitting.embedding import NUM_CONTOUR, NUM_LANDMARKS, LandmarkEmbedding, dynamic_rows_blend

FFHQ_FOCAL = 4.2647
CAMERA_RADIUS = 2.7
DEFAULT_NUM_SHAPE = 100
DEFAULT_NUM_EXPRESSION = 50

# Prior standard deviations (radians).
JAW_OPEN_SIGMA = 0.3
JAW_CLOSE_SIGMA = 0.02     # closing past the rest pose: the lips would interpenetrate
JAW_SIDE_SIGMA = 0.02
NECK_SIGMA = 0.03
# Temporal scales of the second differences.
TEMPORAL_SCALES = {"rotation": 0.01, "translation": 0.005, "jaw": 0.01, "neck": 0.01,
                   "expression": 0.1}
# Internal parameter units (the optimiser sees physical value / unit): chosen so that one
# unit moves the landmarks by roughly the same few pixels for every parameter, which keeps
# L-BFGS's first steps well scaled.
_UNITS = {"rotation": 0.05, "translation": np.array([0.01, 0.01, 0.2]), "jaw": 0.05, "neck": 0.05,
          "expression": 1.0, "shape": 1.0}
_MIN_POINTS = 6            # weighted landmarks a frame needs (the rigid start has 6 unknowns)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- cameras
def canonical_label() -> np.ndarray:
    """(25,) float32: the canonical FFHQ camera, `look_at_eg3d_label(0, 0)` (radius 2.7)."""
    from rasterizer.types import look_at_eg3d_label
    return look_at_eg3d_label(0.0, 0.0, radius=CAMERA_RADIUS, focal=FFHQ_FOCAL)


def project(points_world, labels, image_size) -> jax.Array:
    """Pinhole projection of world points through EG3D labels: (B, N, 3) -> (B, N, 2) float32.

    labels (B, 25): cam2world (4x4 row-major, OpenCV axes) + intrinsics normalised by the
    image size (EG3D's label, `rasterizer.Camera.from_eg3d`). image_size: pixels (square
    images). Output: image coordinates (x, y) in pixels, pixel (row i, col j) centred at
    (j + 0.5, i + 0.5), so the principal point cx = 0.5 lands at size / 2. Points behind the
    camera are not handled (divide by a negative depth). jit-compatible.
    """
    points_world = jnp.asarray(points_world, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if points_world.ndim != 3 or points_world.shape[-1] != 3:
        raise ValueError(f"project expects points (B, N, 3), got shape {points_world.shape}")
    if labels.ndim != 2 or labels.shape != (points_world.shape[0], 25):
        raise ValueError(f"project expects labels (B, 25) = ({points_world.shape[0]}, 25), got shape {labels.shape}")
    world_to_camera = jnp.linalg.inv(labels[:, :16].reshape(-1, 4, 4))
    intrinsics = labels[:, 16:].reshape(-1, 3, 3) * _intrinsics_scale(image_size)
    return _project(points_world, world_to_camera, intrinsics)


def _intrinsics_scale(image_size):
    """Normalised -> pixel intrinsics: fx, cx scale with the size; the last row stays (0, 0, 1)."""
    size = jnp.asarray(image_size, jnp.float32)
    return jnp.stack([jnp.stack([size, 0.0 * size, size]), jnp.stack([0.0 * size, size, size]),
                      jnp.array([0.0, 0.0, 1.0], jnp.float32)])


def _project(points, world_to_camera, intrinsics):
    cam = (jnp.einsum("bij,bnj->bni", world_to_camera[:, :3, :3], points, precision=_HIGHEST)
           + world_to_camera[:, None, :3, 3])
    uvw = jnp.einsum("bij,bnj->bni", intrinsics, cam, precision=_HIGHEST)
    return uvw[..., :2] / uvw[..., 2:3]


def head_rotation_angles(rotation) -> np.ndarray:
    """Yaw, pitch, roll (degrees) of head rotations (..., 3, 3) -> (..., 3) float64.

    R = R_y(yaw) R_x(pitch) R_z(roll) in FLAME / world axes (y up, face toward +z, seen by a
    camera on +z): yaw > 0 turns the face toward the subject's left (the image right),
    pitch > 0 tilts the face down, roll > 0 raises the subject's left side (the image right).
    """
    r = np.asarray(rotation, np.float64)
    yaw = np.arctan2(r[..., 0, 2], r[..., 2, 2])
    pitch = np.arcsin(np.clip(-r[..., 1, 2], -1.0, 1.0))
    roll = np.arctan2(r[..., 1, 0], r[..., 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def rotation_from_angles(yaw_pitch_roll_deg) -> np.ndarray:
    """Inverse of `head_rotation_angles`: (..., 3) degrees -> (..., 3, 3) float64."""
    y, p, r = np.moveaxis(np.radians(np.asarray(yaw_pitch_roll_deg, np.float64)), -1, 0)
    one, zero = np.ones_like(y), np.zeros_like(y)
    ry = np.stack([np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], -1)
    rx = np.stack([one, zero, zero, zero, np.cos(p), -np.sin(p), zero, np.sin(p), np.cos(p)], -1)
    rz = np.stack([np.cos(r), -np.sin(r), zero, np.sin(r), np.cos(r), zero, zero, zero, one], -1)
    shape = y.shape + (3, 3)
    return ry.reshape(shape) @ rx.reshape(shape) @ rz.reshape(shape)


def _deca_yaw(rotation):
    """DECA's `rot_mat_to_euler`: the rotation about y, (..., 3, 3) -> (...,) radians."""
    return jnp.arctan2(-rotation[..., 2, 0], jnp.sqrt(rotation[..., 0, 0] ** 2 + rotation[..., 1, 0] ** 2))


def _rigid_matrix(rotation, translation, centre):
    """(T, 4, 4) float64 M = [[R, c + t - R c], [0, 1]] (numpy)."""
    matrix = np.tile(np.eye(4), (len(rotation), 1, 1))
    matrix[:, :3, :3] = rotation
    matrix[:, :3, 3] = centre + translation - rotation @ centre
    return matrix


def _axis_angle(rotation) -> np.ndarray:
    """Log map (numpy): rotation matrices (T, 3, 3) -> axis-angle (T, 3)."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(np.asarray(rotation, np.float64)).as_rotvec()


def _rotation_matrix(axis_angle) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(np.asarray(axis_angle, np.float64)).as_matrix()


# ----------------------------------------------------------------------------- landmark rig
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["v_template", "shapedirs", "exprdirs", "posedirs", "weights", "joints", "joint_shapedirs",
                 "joint_exprdirs", "static_ids", "static_bary", "dynamic_ids", "dynamic_bary", "centre"],
    meta_fields=["parents", "world_scale", "world_translation"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class _LandmarkRig:
    """FLAME restricted to the vertices the landmarks use (exact: joints are regressed from
    the whole mesh through precomputed J_regressor @ blend shapes)."""
    v_template: jax.Array        # (U, 3)
    shapedirs: jax.Array         # (U, 3, S')
    exprdirs: jax.Array          # (U, 3, E')
    posedirs: jax.Array          # (U, 3, 36)
    weights: jax.Array           # (U, 5)
    joints: jax.Array            # (5, 3)      J_regressor @ v_template
    joint_shapedirs: jax.Array   # (5, 3, S')
    joint_exprdirs: jax.Array    # (5, 3, E')
    static_ids: jax.Array        # (68, 3) int32  local vertex ids of each landmark's triangle
    static_bary: jax.Array       # (68, 3)
    dynamic_ids: Optional[jax.Array]    # (79, 17, 3) int32 or None
    dynamic_bary: Optional[jax.Array]   # (79, 17, 3) or None
    centre: jax.Array            # (3,) world rotation centre: rest-pose landmark centroid
    parents: tuple
    world_scale: float
    world_translation: tuple


def _build_rig(model, embedding: LandmarkEmbedding, num_shape: int, num_expression: int) -> _LandmarkRig:
    faces = np.asarray(model.faces)
    static = faces[np.asarray(embedding.face_index)]                            # (68, 3)
    used = [static.reshape(-1)]
    dynamic = None
    if embedding.dynamic_face_index is not None:
        dynamic = faces[np.asarray(embedding.dynamic_face_index)]                 # (79, 17, 3)
        used.append(dynamic.reshape(-1))
    ids, inverse = np.unique(np.concatenate(used), return_inverse=True)
    static_local = inverse[:static.size].reshape(static.shape)
    dynamic_local = None if dynamic is None else inverse[static.size:].reshape(dynamic.shape)
    regressor = np.asarray(model.J_regressor, np.float64)
    shapedirs = np.asarray(model.shapedirs, np.float64)[..., :num_shape]
    exprdirs = np.asarray(model.exprdirs, np.float64)[..., :num_expression]
    v_template = np.asarray(model.v_template, np.float64)
    contour_ok = embedding.has_contour
    rest = np.einsum("lkc,lk->lc", v_template[static], np.asarray(embedding.barycentric, np.float64))
    rest = rest[0 if contour_ok else NUM_CONTOUR:]
    centre = model.world_scale * rest.mean(axis=0) + np.asarray(model.world_translation)
    f32 = lambda a: jnp.asarray(a, jnp.float32)   # noqa: E731
    return _LandmarkRig(
        v_template=f32(v_template[ids]), shapedirs=f32(shapedirs[ids]), exprdirs=f32(exprdirs[ids]),
        posedirs=f32(np.asarray(model.posedirs)[ids]), weights=f32(np.asarray(model.weights)[ids]),
        joints=f32(regressor @ v_template),
        joint_shapedirs=f32(np.einsum("jv,vck->jck", regressor, shapedirs)),
        joint_exprdirs=f32(np.einsum("jv,vck->jck", regressor, exprdirs)),
        static_ids=jnp.asarray(static_local, jnp.int32), static_bary=f32(embedding.barycentric),
        dynamic_ids=None if dynamic_local is None else jnp.asarray(dynamic_local, jnp.int32),
        dynamic_bary=None if dynamic_local is None else f32(embedding.dynamic_barycentric),
        centre=f32(centre), parents=tuple(model.parents), world_scale=float(model.world_scale),
        world_translation=tuple(float(a) for a in model.world_translation))


def _rig_landmarks(rig: _LandmarkRig, shape, expression, jaw, neck, yaw):
    """FLAME-space landmarks (T, 68, 3) at global pose 0 (FLAME's LBS on the rig's vertices).

    shape (T, S'), expression (T, E'), jaw, neck (T, 3); yaw (T,) radians: the head's yaw
    for the dynamic contour, blended between the two nearest rows (ignored without one).
    """
    batch = shape.shape[0]
    v_shaped = (rig.v_template[None]
                + jnp.einsum("vck,bk->bvc", rig.shapedirs, shape, precision=_HIGHEST)
                + jnp.einsum("vck,bk->bvc", rig.exprdirs, expression, precision=_HIGHEST))
    joints = (rig.joints[None]
              + jnp.einsum("jck,bk->bjc", rig.joint_shapedirs, shape, precision=_HIGHEST)
              + jnp.einsum("jck,bk->bjc", rig.joint_exprdirs, expression, precision=_HIGHEST))
    zeros = jnp.zeros((batch, 3), jnp.float32)
    full_pose = jnp.stack([zeros, neck, jaw, zeros, zeros], axis=1)
    rotations = flame.rodrigues(full_pose)
    pose_feature = (rotations[:, 1:] - jnp.eye(3, dtype=jnp.float32)).reshape(batch, -1)
    v_posed = v_shaped + jnp.einsum("vck,bk->bvc", rig.posedirs, pose_feature, precision=_HIGHEST)
    _, transforms = flame._rigid_transform(rotations, joints, rig.parents)
    per_vertex = jnp.einsum("vj,bjmn->bvmn", rig.weights, transforms, precision=_HIGHEST)
    vertices = (jnp.einsum("bvmn,bvn->bvm", per_vertex[..., :3, :3], v_posed, precision=_HIGHEST)
                + per_vertex[..., :3, 3])
    points = jnp.einsum("blkc,lk->blc", vertices[:, rig.static_ids], rig.static_bary, precision=_HIGHEST)
    if rig.dynamic_ids is not None:
        row0, row1, alpha = dynamic_rows_blend(yaw)

        def contour(rows):
            ids, bary = rig.dynamic_ids[rows], rig.dynamic_bary[rows]             # (T, 17, 3)
            corners = jax.vmap(lambda v, i: v[i])(vertices, ids)                  # (T, 17, 3, 3)
            return jnp.einsum("blkc,blk->blc", corners, bary, precision=_HIGHEST)

        blend = (1.0 - alpha)[:, None, None] * contour(row0) + alpha[:, None, None] * contour(row1)
        points = points.at[:, :NUM_CONTOUR].set(blend)
    return points


def _physical(params, shared_shape, num_frames):
    """Internal (unit-scaled) parameters -> physical ones; shape broadcast to (T, S')."""
    out = {key: value * jnp.asarray(_UNITS[key], jnp.float32) for key, value in params.items()}
    if shared_shape:
        out["shape"] = jnp.broadcast_to(out["shape"][None], (num_frames,) + out["shape"].shape)
    return out


def _pixels(rig, phys, world_to_camera, intrinsics):
    rotation = flame.rodrigues(phys["rotation"])                                  # (T, 3, 3)
    # The contour follows the head's yaw relative to the camera (rigid rotation then neck).
    yaw = _deca_yaw(jnp.matmul(rotation, flame.rodrigues(phys["neck"]), precision=_HIGHEST))
    points = _rig_landmarks(rig, phys["shape"], phys["expression"], phys["jaw"], phys["neck"], yaw)
    world = rig.world_scale * points + jnp.asarray(rig.world_translation, jnp.float32)
    moved = (jnp.einsum("tij,tnj->tni", rotation, world - rig.centre, precision=_HIGHEST)
             + rig.centre + phys["translation"][:, None])
    num = moved.shape[0]
    return _project(moved, jnp.broadcast_to(world_to_camera, (num, 4, 4)),
                    jnp.broadcast_to(intrinsics, (num, 3, 3)))


def _second_difference(x):
    return x[2:] - 2.0 * x[1:-1] + x[:-2]


def _loss(params, rig, targets, weights, image_size, world_to_camera, intrinsics, hyper,
          shared_shape):
    num_frames = targets.shape[0]
    phys = _physical(params, shared_shape, num_frames)
    pixels = _pixels(rig, phys, world_to_camera, intrinsics)
    u2 = jnp.sum(((pixels - targets) / (image_size * hyper["landmark_sigma"])) ** 2, axis=-1)
    c2 = hyper["robust_scale"] ** 2
    data = jnp.sum(weights * 2.0 * c2 * (jnp.sqrt(1.0 + u2 / c2) - 1.0))
    jaw, neck = phys["jaw"], phys["neck"]
    # params["shape"] is (S',) or (T, S'): a shared shape's prior counts once.
    prior = (hyper["shape_prior"] * jnp.sum(params["shape"] ** 2)
             + hyper["expression_prior"] * jnp.sum(phys["expression"] ** 2)
             + jnp.sum((jnp.maximum(jaw[:, 0], 0.0) / JAW_OPEN_SIGMA) ** 2)
             + jnp.sum((jnp.minimum(jaw[:, 0], 0.0) / JAW_CLOSE_SIGMA) ** 2)
             + jnp.sum((jaw[:, 1:] / JAW_SIDE_SIGMA) ** 2)
             + jnp.sum((neck / NECK_SIGMA) ** 2))
    temporal = 0.0
    if num_frames >= 3:
        for key, scale in TEMPORAL_SCALES.items():
            temporal = temporal + jnp.sum((_second_difference(phys[key]) / scale) ** 2)
    return 0.5 * (data + prior + hyper["temporal_weight"] * temporal)


@functools.partial(jax.jit, static_argnames=("shared_shape", "num_rounds", "steps_per_round"))
def _optimise(params, rig, targets, weights, image_size, world_to_camera, intrinsics, hyper,
              rigid_first, *, shared_shape, num_rounds, steps_per_round):
    """Rounds of L-BFGS: round 0 moves only the rigid pose when rigid_first is set."""
    solver = optax.lbfgs(memory_size=20)
    rigid_keys = ("rotation", "translation")

    def run_round(params, round_index):
        frozen = jnp.logical_and(rigid_first, round_index == 0)
        start = params

        def objective(p):
            # Frozen parameters stay at the round's start: their gradient is exactly zero.
            p = {k: (v if k in rigid_keys else jnp.where(frozen, start[k], v)) for k, v in p.items()}
            return _loss(p, rig, targets, weights, image_size, world_to_camera, intrinsics,
                         hyper, shared_shape)

        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
            return (optax.apply_updates(p, updates), state), value

        (params, _), values = jax.lax.scan(step, (params, solver.init(params)), None, length=steps_per_round)
        return params, values[-1]

    params, losses = jax.lax.scan(run_round, params, jnp.arange(num_rounds))
    phys = _physical(params, shared_shape, targets.shape[0])
    pixels = _pixels(rig, phys, world_to_camera, intrinsics)
    final = _loss(params, rig, targets, weights, image_size, world_to_camera, intrinsics, hyper,
                  shared_shape)
    return params, pixels, losses, final


# ----------------------------------------------------------------------------- result
@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """Fitted FLAME parameters and cameras for T frames (numpy float32 arrays).

    shape                 (S',) shared, or (T, S') with shared_shape=False
    expression            (T, E')
    jaw_pose, neck_pose   (T, 3)  axis-angle, radians
    global_pose           (T, 3)  zeros: the head's rotation is in the camera
    eye_pose              (T, 6)  zeros (landmarks do not see the gaze)
    labels                (T, 25) EG3D labels (cam2world with the head's rigid motion
                          inverted onto the canonical camera, FFHQ intrinsics)
    yaw_pitch_roll_deg    (T, 3)  the head's orientation relative to the camera (rigid
                          rotation times neck pose), `head_rotation_angles` convention
    fitted_landmarks      (T, 68, 2) pixels, the model's landmarks through `labels`
    reprojection_error_px (T,)    mean distance (pixels) to the input over landmarks of
                          non-zero weight
    rotation, translation (T, 3)  the head's rigid motion (axis-angle; world units) relative
                          to the canonical camera, about `centre` (3,), world units
    loss                  float, the final objective value
    """

    shape: np.ndarray
    expression: np.ndarray
    jaw_pose: np.ndarray
    neck_pose: np.ndarray
    global_pose: np.ndarray
    eye_pose: np.ndarray
    labels: np.ndarray
    yaw_pitch_roll_deg: np.ndarray
    fitted_landmarks: np.ndarray
    reprojection_error_px: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    centre: np.ndarray
    loss: float

    @property
    def num_frames(self) -> int:
        return int(self.expression.shape[0])

    def frame_shape(self, i: int) -> np.ndarray:
        """(S',) shape coefficients of frame i."""
        return self.shape if self.shape.ndim == 1 else self.shape[i]

    def to_flame_dict(self, i: int) -> dict:
        """Frame i as a flame.json entry (`reta3d.data.folder`): lists of floats."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range [0, {self.num_frames})")
        as_list = lambda a: [float(x) for x in np.asarray(a).reshape(-1)]   # noqa: E731
        return {"shape": as_list(self.frame_shape(i)), "expression": as_list(self.expression[i]),
                "global_pose": as_list(self.global_pose[i]), "neck_pose": as_list(self.neck_pose[i]),
                "jaw_pose": as_list(self.jaw_pose[i]), "eye_pose": as_list(self.eye_pose[i])}

    def flame_arrays(self) -> dict:
        """(T, k) float32 arrays per FLAME key (shape repeated per frame when shared), as
        `reta3d.data.folder.write_folder(flame=...)` takes them."""
        shape = np.broadcast_to(self.shape, (self.num_frames, self.shape.shape[-1]))
        out = {"shape": shape, "expression": self.expression, "global_pose": self.global_pose,
               "neck_pose": self.neck_pose, "jaw_pose": self.jaw_pose, "eye_pose": self.eye_pose}
        return {key: np.array(value, np.float32) for key, value in out.items()}

    def sequence_arrays(self, fps: Optional[float] = None) -> dict:
        """The arrays of a FLAME sequence .npz (`reta3d.sequences` layout), float32."""
        out = {"shape": self.shape, "expression": self.expression, "jaw_pose": self.jaw_pose,
               "neck_pose": self.neck_pose, "global_pose": self.global_pose, "eye_pose": self.eye_pose}
        out = {key: np.asarray(value, np.float32) for key, value in out.items()}
        if fps is not None:
            out["fps"] = np.asarray(fps, np.float32)
        return out


# ----------------------------------------------------------------------------- fitting
def fit_landmarks(model, embedding: LandmarkEmbedding, landmarks, image_size: int, *, weights=None,
                  shared_shape: bool = True, temporal_weight: float = 0.0, num_steps: int = 300,
                  init: Optional[FitResult] = None, num_shape: int = DEFAULT_NUM_SHAPE,
                  num_expression: int = DEFAULT_NUM_EXPRESSION, landmark_sigma: float = 0.004,
                  robust_scale: float = 3.0, shape_prior: float = 1.0, expression_prior: float = 1.0,
                  num_rounds: int = 4) -> FitResult:
    """Fit FLAME parameters and EG3D cameras to 68-point landmarks of T frames.

    model: `reta3d.flame.FlameModel` (the template head or a real FLAME); embedding: its
      `LandmarkEmbedding` (`template_embedding()`, `load_embedding(...)`).
    landmarks: (T, 68, 2) float32 pixels, (x, y) image coordinates with pixel centres at
      (j + 0.5, i + 0.5) (module docstring), in square images of image_size pixels (the
      crops the cameras are for). Must be finite: give a missing point any finite value and
      weight 0.
    weights: (T, 68) >= 0 confidences (default 1); points 0-16 get weight 0 when the
      embedding has no jaw contour. Each frame needs >= 6 points of non-zero weight.
    shared_shape: one shape for all frames (one person) or one per frame.
    temporal_weight: weight of the second-difference smoothness term (video); 0 for photos.
    num_steps: L-BFGS steps in all, split over num_rounds rounds (the first rigid-only
      unless init is given).
    init: a previous FitResult for the same T frames (warm start: its pose, shape,
      expression, jaw and neck); default: closed-form rigid start, zero coefficients.
    num_shape / num_expression: coefficients fitted (capped at the model's counts).
    landmark_sigma: landmark noise as a fraction of the image size (0.004 = 2 px at 512);
      it sets the data term against the N(0, 1) priors. robust_scale: pseudo-Huber knee in
      sigmas. shape_prior / expression_prior: multipliers of the priors.
    Returns a FitResult. Raises ValueError for wrong shapes, non-finite landmarks or weights,
    negative weights, image_size <= 0, too few weighted points, an embedding for another
    mesh, or bad settings.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be (T, 68, 2) pixels, got shape {landmarks.shape} "
                         "(one photo: landmarks[None])")
    num_frames = landmarks.shape[0]
    if num_frames == 0:
        raise ValueError("landmarks hold no frames (T = 0)")
    if not np.all(np.isfinite(landmarks)):
        bad = np.argwhere(~np.isfinite(landmarks).all(axis=-1))
        raise ValueError(f"landmarks contain non-finite values (NaN/inf) at (frame, point) {bad[:5].tolist()}; "
                         "give missing points a finite value and weight 0")
    if weights is None:
        weights = np.ones((num_frames, NUM_LANDMARKS))
    weights = np.array(weights, np.float64)
    if weights.shape != (num_frames, NUM_LANDMARKS):
        raise ValueError(f"weights must be (T, 68) = ({num_frames}, 68), got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or weights.min() < 0:
        raise ValueError("weights must be finite and >= 0")
    if not embedding.has_contour:
        weights[:, :NUM_CONTOUR] = 0.0
    counts = (weights > 0).sum(axis=1)
    if counts.min() < _MIN_POINTS:
        raise ValueError(f"frame {int(np.argmin(counts))} has {int(counts.min())} landmarks of non-zero weight; "
                         f"at least {_MIN_POINTS} are needed")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
        raise ValueError(f"num_rounds must be a positive integer, got {num_rounds!r}")
    for name, value in (("landmark_sigma", landmark_sigma), ("robust_scale", robust_scale)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    for name, value in (("temporal_weight", temporal_weight), ("shape_prior", shape_prior),
                        ("expression_prior", expression_prior)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    face_index = np.asarray(embedding.face_index)
    if face_index.shape != (NUM_LANDMARKS,) or face_index.max() >= model.num_faces or face_index.min() < 0:
        raise ValueError(f"the landmark embedding ({embedding.source}) does not fit the head model "
                         f"'{model.name}' ({model.num_faces} faces)")
    num_shape = int(min(num_shape, model.num_shape))
    num_expression = int(min(num_expression, model.num_expression))
    if num_shape < 1 or num_expression < 1:
        raise ValueError("num_shape and num_expression must be >= 1")

    rig = _rig_cache(model, embedding, num_shape, num_expression)
    label0 = canonical_label()
    cam2world0 = label0[:16].reshape(4, 4).astype(np.float64)
    world_to_camera = np.linalg.inv(cam2world0)
    intrinsics = label0[16:].reshape(3, 3).astype(np.float64) * np.asarray(_intrinsics_scale(image_size))
    centre = np.asarray(rig.centre, np.float64)

    if init is not None and not isinstance(init, FitResult):
        raise ValueError(f"init must be a FitResult from an earlier fit, got {type(init).__name__}")
    if init is not None:
        params, rigid_first = _params_from_result(init, num_frames, num_shape, num_expression, shared_shape,
                                                  cam2world0, centre), False
    else:
        rotation, translation = _rigid_start(rig, landmarks, weights, world_to_camera, intrinsics)
        params = {"rotation": _axis_angle(rotation), "translation": translation,
                  "expression": np.zeros((num_frames, num_expression)), "jaw": np.zeros((num_frames, 3)),
                  "neck": np.zeros((num_frames, 3)),
                  "shape": np.zeros((num_shape,) if shared_shape else (num_frames, num_shape))}
        rigid_first = True
    params = {key: jnp.asarray(value / np.asarray(_UNITS[key]), jnp.float32) for key, value in params.items()}
    hyper = {key: jnp.asarray(value, jnp.float32) for key, value in (
        ("landmark_sigma", landmark_sigma), ("robust_scale", robust_scale), ("shape_prior", shape_prior),
        ("expression_prior", expression_prior), ("temporal_weight", temporal_weight))}
    steps_per_round = max(1, -(-int(num_steps) // int(num_rounds)))
    params, pixels, _, final = _optimise(
        params, rig, jnp.asarray(landmarks, jnp.float32), jnp.asarray(weights, jnp.float32),
        jnp.asarray(float(image_size), jnp.float32), jnp.asarray(world_to_camera, jnp.float32),
        jnp.asarray(intrinsics, jnp.float32), hyper, jnp.asarray(rigid_first),
        shared_shape=bool(shared_shape), num_rounds=int(num_rounds), steps_per_round=steps_per_round)
    return _result(params, pixels, float(final), landmarks, weights, centre, cam2world0, label0)


@functools.lru_cache(maxsize=8)
def _rig_cache(model, embedding, num_shape, num_expression):
    return _build_rig(model, embedding, num_shape, num_expression)


def _rigid_start(rig, landmarks, weights, world_to_camera, intrinsics):
    """Closed-form rigid pose per frame: weak-perspective Procrustes of the rest-pose landmarks.

    Normalised image coordinates (K^-1 pixels, y flipped to world up) ~ s R[:2] (X - X0) + m,
    solved as a weighted affine fit whose 2x3 part is projected to s x (orthonormal rows) by
    an SVD; depth 1 / s. Returns rotation (T, 3, 3) and translation (T, 3) of the head about
    the rig's centre, in world units, for the canonical camera.
    """
    num = landmarks.shape[0]
    world = _rest_world(rig)
    centre = np.asarray(rig.centre, np.float64)
    camera_rotation = world_to_camera[:3, :3]
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    rotations = np.zeros((num, 3, 3))
    translations = np.zeros((num, 3))
    for t in range(num):
        w = weights[t]
        # Rays in the canonical camera, rotated into world axes (x right, y up).
        rays = np.stack([(landmarks[t, :, 0] - cx) / fx, (landmarks[t, :, 1] - cy) / fy,
                         np.ones(NUM_LANDMARKS)], -1) @ camera_rotation        # world directions
        target = np.stack([rays[:, 0] / -rays[:, 2], rays[:, 1] / -rays[:, 2]], -1)
        points = world - centre
        design = np.concatenate([points, np.ones((NUM_LANDMARKS, 1))], -1) * np.sqrt(w)[:, None]
        solution, *_ = np.linalg.lstsq(design, target * np.sqrt(w)[:, None], rcond=None)
        affine, offset = solution[:3].T, solution[3]                               # (2, 3), (2,)
        u, sv, vt = np.linalg.svd(affine, full_matrices=False)
        rows = u @ vt
        scale = sv.mean()
        rotation = np.stack([rows[0], rows[1], np.cross(rows[0], rows[1])])
        # The camera looks along -z from z = CAMERA_RADIUS: depth of the centre = 1 / scale.
        depth = 1.0 / max(scale, 1e-6)
        moved_centre = np.array([offset[0] * depth, offset[1] * depth, CAMERA_RADIUS - depth])
        rotations[t] = rotation
        translations[t] = moved_centre - centre
    return rotations, translations


def _rest_world(rig) -> np.ndarray:
    """(68, 3) float64 world landmarks of the rest head (zero coefficients and poses; the
    contour at yaw 0), in numpy: at rest, LBS leaves the template vertices in place."""
    vertices = np.asarray(rig.v_template, np.float64)
    rest = np.einsum("lkc,lk->lc", vertices[np.asarray(rig.static_ids)], np.asarray(rig.static_bary, np.float64))
    if rig.dynamic_ids is not None:
        rest[:NUM_CONTOUR] = np.einsum("lkc,lk->lc", vertices[np.asarray(rig.dynamic_ids)[0]],
                                       np.asarray(rig.dynamic_bary, np.float64)[0])
    return rig.world_scale * rest + np.asarray(rig.world_translation)


def _params_from_result(init: FitResult, num_frames, num_shape, num_expression, shared_shape, cam2world0,
                        centre):
    if init.num_frames != num_frames:
        raise ValueError(f"init has {init.num_frames} frames, the landmarks {num_frames}")

    def fit_width(a, width):
        a = np.asarray(a, np.float64)[..., :width]
        return np.concatenate([a, np.zeros(a.shape[:-1] + (width - a.shape[-1],))], -1)

    labels = np.asarray(init.labels, np.float64)
    # label = M^-1 cam2world0  =>  M = cam2world0 @ inv(label).
    matrix = cam2world0[None] @ np.linalg.inv(labels[:, :16].reshape(-1, 4, 4))
    rotation = matrix[:, :3, :3]
    translation = matrix[:, :3, 3] - centre + rotation @ centre
    shape = fit_width(init.shape, num_shape)
    if shared_shape and shape.ndim == 2:
        shape = shape.mean(axis=0)
    elif not shared_shape and shape.ndim == 1:
        shape = np.tile(shape, (num_frames, 1))
    return {"rotation": _axis_angle(rotation), "translation": translation,
            "expression": fit_width(init.expression, num_expression), "jaw": np.asarray(init.jaw_pose, np.float64),
            "neck": np.asarray(init.neck_pose, np.float64), "shape": shape}


def _result(params, pixels, final, landmarks, weights, centre, cam2world0, label0) -> FitResult:
    phys = {key: np.asarray(value, np.float64) * np.asarray(_UNITS[key]) for key, value in params.items()}
    num = landmarks.shape[0]
    rotation = _rotation_matrix(phys["rotation"])
    matrix = _rigid_matrix(rotation, phys["translation"], centre)
    cam2world = np.linalg.inv(matrix) @ cam2world0[None]
    labels = np.concatenate([cam2world.reshape(num, 16), np.tile(label0[16:], (num, 1))], axis=1)
    pixels = np.asarray(pixels, np.float64)
    distance = np.linalg.norm(pixels - landmarks, axis=-1)
    used = weights > 0
    error = (distance * used).sum(axis=1) / used.sum(axis=1)
    head = rotation @ _rotation_matrix(phys["neck"])
    f32 = lambda a: np.asarray(a, np.float32)   # noqa: E731
    return FitResult(
        shape=f32(phys["shape"]), expression=f32(phys["expression"]), jaw_pose=f32(phys["jaw"]),
        neck_pose=f32(phys["neck"]), global_pose=np.zeros((num, 3), np.float32),
        eye_pose=np.zeros((num, 6), np.float32), labels=f32(labels),
        yaw_pitch_roll_deg=f32(head_rotation_angles(head)), fitted_landmarks=f32(pixels),
        reprojection_error_px=f32(error), rotation=f32(phys["rotation"]), translation=f32(phys["translation"]),
        centre=f32(centre), loss=float(final))
