"""FLAME in JAX: loading, linear blend skinning, vertex normals, the FLAME -> world map.

`load()` gives the embedded procedural template head (`reta3d.template_head`); `load(path,
uv_path)` reads a real FLAME model brought by the user (FLAME 2020 `generic_model.pkl`,
FLAME 2023 / 2023 Open `.pkl`, or an `.npz` with the same keys) plus FLAME's UV layout
(`head_template.obj`, or an `.npz` with `vt`, `ft`). The FLAME pickles hold chumpy
objects and a scipy.sparse `J_regressor`; they are read without chumpy (a restricted
unpickler stands in for chumpy and keeps each object's stored array).

`load(path)` without a UV layout is enough for linear blend skinning (`forward`, joints,
normals, `to_world`): converting sequences, fitting, metrics. The UV layout (`vt`, `ft`) and
the mouth rectangle are needed only to bind Gaussians to UV texels, so they are checked
lazily: reading `model.vt`, `model.ft` or `model.mouth_rect` on a model that lacks them
(which `reta3d.binding.face_binding` / `mouth_binding` / `HeadBinding.from_model` do) raises
a ValueError naming the model file and saying to pass uv_path= FLAME's head_template.obj.

`FlameModel.forward` is FLAME's linear blend skinning exactly as FLAME defines it (the
official `lbs`/`batch_rigid_transform`), in FLAME coordinates: metres, y up, the face
looking toward +z, the subject's left at +x. `FlameModel.to_world` maps FLAME
coordinates into the EG3D world in which the cameras live (see `WORLD_SCALE`).

Joints (5): 0 global (root), 1 neck, 2 jaw, 3 left eye (+x), 4 right eye; parents
(-1, 0, 1, 1, 1). Pose inputs are axis-angle vectors; `eye_pose` is (left, right).
NaN inputs are not checked at run time (that would break jit): they propagate to the
outputs.
"""
from __future__ import annotations

import _compat_pickle
import dataclasses
import functools
import pickle
from pathlib import Path
from typing import Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import errors

NUM_JOINTS = 5
FLAME_PARENTS = (-1, 0, 1, 1, 1)
NUM_POSE_FEATURES = 36        # (R_k - I) of the 4 non-root joints, row-major
DEFAULT_NUM_SHAPE = 300       # FLAME 2020 / 2023: 300 identity + 100 expression columns

# FLAME -> EG3D world similarity (no rotation): world = WORLD_SCALE * p + WORLD_TRANSLATION.
# EG3D's FFHQ cameras live in the Basel Face Model's canonical space scaled by 2.7 (camera
# radius 2.7, look-at (0, 0, 0.2), fx = 4.2647). Registering FLAME's template to that space
# (GGHead, Kirschstein et al. 2024, `flame_to_bfm_neutral`) gives scale 2.683, translation
# (0.003, 0.047, -0.002) and a rotation below 2 degrees; FLAME is y-up and faces +z like
# EG3D's world, so we keep the scale and the vertical offset and drop the rest. With it the
# nose tip (FLAME z ~ 0.07-0.085) lands at z ~ 0.2, at EG3D's look-at point and the centre
# of the frontal view; the head's centre sits near (0, 0.05, -0.07); crown to chin spans
# ~0.57 world units, ~85 % of the frontal view's height at the head (~0.70 at distance
# ~3), chin to hairline ~70 % (FFHQ-like crops, a little larger than 60 %). Both the
# template head and real FLAME use this transform.
WORLD_SCALE = 2.68
WORLD_TRANSLATION = (0.0, 0.047, 0.0)

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- rotations
@jax.jit
def rodrigues(axis_angle: jax.Array) -> jax.Array:
    """Rotation matrices from axis-angle vectors: (..., 3) -> (..., 3, 3) float32.

    R = I + sin(t)/t K + (1 - cos(t))/t^2 K^2 with K the cross-product matrix of the input
    and t its norm. Near t = 0 the Taylor series is used (and the norm is never evaluated
    at 0), so values and gradients are finite and exact there (dR = K(d axis_angle)).
    """
    axis_angle = jnp.asarray(axis_angle, jnp.float32)
    if axis_angle.ndim < 1 or axis_angle.shape[-1] != 3:
        raise ValueError(f"rodrigues expects axis-angle vectors (..., 3), got shape {axis_angle.shape}")
    x, y, z = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(axis_angle.shape[:-1] + (3, 3))
    angle_sq = jnp.sum(axis_angle * axis_angle, axis=-1)
    small = angle_sq < 1e-8
    safe_sq = jnp.where(small, 1.0, angle_sq)
    angle = jnp.sqrt(safe_sq)
    # (1 - cos t) / t^2 written as 2 sin^2(t/2) / t^2: no cancellation for small t.
    sin_term = jnp.where(small, 1.0 - angle_sq / 6.0, jnp.sin(angle) / angle)
    cos_term = jnp.where(small, 0.5 - angle_sq / 24.0, 2.0 * jnp.sin(0.5 * angle) ** 2 / safe_sq)
    eye = jnp.eye(3, dtype=jnp.float32)
    k2 = jnp.matmul(k, k, precision=_HIGHEST)
    return eye + sin_term[..., None, None] * k + cos_term[..., None, None] * k2


def _rigid_transform(rotations: jax.Array, joints: jax.Array, parents: Tuple[int, ...]):
    """FLAME/SMPL `batch_rigid_transform`.

    rotations (B, J, 3, 3), joints (B, J, 3) -> posed joints (B, J, 3) and the relative
    transforms (B, J, 4, 4) that map rest-pose points to posed points for each joint.
    """
    batch, num = joints.shape[:2]
    relative = joints.at[:, 1:].add(-joints[:, jnp.array(parents[1:])])
    local = jnp.concatenate([rotations, relative[..., None]], axis=-1)                  # (B, J, 3, 4)
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), (batch, num, 1, 4))
    local = jnp.concatenate([local, bottom], axis=-2)                                    # (B, J, 4, 4)
    chain = [local[:, 0]]
    for child in range(1, num):
        chain.append(jnp.matmul(chain[parents[child]], local[:, child], precision=_HIGHEST))
    world = jnp.stack(chain, axis=1)
    posed_joints = world[..., :3, 3]
    # Remove the rest-pose joint position: the transform then applies to rest vertices.
    shifted = jnp.einsum("bjmn,bjn->bjm", world[..., :3, :3], joints, precision=_HIGHEST)
    relative_transforms = world.at[..., :3, 3].add(-shifted)
    return posed_joints, relative_transforms


@functools.partial(jax.jit, static_argnames=("parents",))
def _linear_blend_skinning(v_template, shapedirs, exprdirs, posedirs, j_regressor, weights,
                           shape, expression, full_pose, parents):
    """FLAME's `lbs`: (B, V, 3) vertices and (B, J, 3) posed joints."""
    batch = shape.shape[0]
    v_shaped = (v_template[None]
                + jnp.einsum("vck,bk->bvc", shapedirs, shape, precision=_HIGHEST)
                + jnp.einsum("vck,bk->bvc", exprdirs, expression, precision=_HIGHEST))
    joints = jnp.einsum("jv,bvc->bjc", j_regressor, v_shaped, precision=_HIGHEST)
    rotations = rodrigues(full_pose)                                                  # (B, J, 3, 3)
    pose_feature = (rotations[:, 1:] - jnp.eye(3, dtype=jnp.float32)).reshape(batch, -1)
    v_posed = v_shaped + jnp.einsum("vck,bk->bvc", posedirs, pose_feature, precision=_HIGHEST)
    posed_joints, transforms = _rigid_transform(rotations, joints, parents)
    per_vertex = jnp.einsum("vj,bjmn->bvmn", weights, transforms, precision=_HIGHEST)
    vertices = (jnp.einsum("bvmn,bvn->bvm", per_vertex[..., :3, :3], v_posed, precision=_HIGHEST)
                + per_vertex[..., :3, 3])
    return vertices, posed_joints


# ----------------------------------------------------------------------------- normals
@jax.jit
def vertex_normals(vertices: jax.Array, faces: jax.Array) -> jax.Array:
    """Unit vertex normals: (..., V, 3) float32 vertices, (F, 3) int faces -> (..., V, 3).

    Each vertex sums the normals of its faces weighted by their areas (the unnormalised
    cross product), then normalises. Faces counter-clockwise seen from outside give outward
    normals. Vertices whose faces all have zero area (or that have no face) get (0, 0, 0),
    with finite gradients.
    """
    vertices = jnp.asarray(vertices, jnp.float32)
    faces = jnp.asarray(faces, jnp.int32)
    if vertices.ndim < 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertex_normals expects vertices (..., V, 3), got shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"vertex_normals expects faces (F, 3), got shape {faces.shape}")
    lead, num_vertices = vertices.shape[:-2], vertices.shape[-2]
    flat = vertices.reshape((-1, num_vertices, 3))
    corners = flat[:, faces]                                                          # (N, F, 3, 3)
    face_normals = jnp.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    ids = faces.T.reshape(-1)                                                          # corner-major
    contributions = jnp.tile(face_normals, (1, 3, 1))
    summed = jax.vmap(lambda c: jax.ops.segment_sum(c, ids, num_segments=num_vertices))(contributions)
    length_sq = jnp.sum(summed * summed, axis=-1, keepdims=True)
    nonzero = length_sq > 0
    normals = jnp.where(nonzero, summed / jnp.sqrt(jnp.where(nonzero, length_sq, 1.0)), 0.0)
    chex.assert_shape(normals, flat.shape)
    return normals.reshape(lead + (num_vertices, 3))


# ----------------------------------------------------------------------------- model
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["v_template", "shapedirs", "exprdirs", "posedirs", "J_regressor", "weights",
                 "faces", "uv_vt", "uv_ft"],
    meta_fields=["parents", "uv_mouth_rect", "world_scale", "world_translation", "name",
                 "uv_missing", "mouth_missing"],
)
@dataclasses.dataclass(frozen=True, eq=False)   # identity hash/eq: it holds arrays
class FlameModel:
    """A FLAME-layout head model (a pytree: arrays are leaves, the rest is static).

    v_template  (V, 3)      float32  rest vertices, FLAME coordinates (metres)
    shapedirs   (V, 3, S)   float32  identity blend shapes
    exprdirs    (V, 3, E)   float32  expression blend shapes
    posedirs    (V, 3, 36)  float32  pose correctives, coefficients (R_k - I), k = 1..4
    J_regressor (5, V)      float32  dense joint regressor
    weights     (V, 5)      float32  skinning weights
    faces       (F, 3)      int32    triangles, counter-clockwise seen from outside
    uv_vt       (T, 2)      float32  UV coordinates in [0, 1] (v up, as in OBJ files), or None
    uv_ft       (F, 3)      int32    UV index of each triangle corner, or None
    parents            tuple (-1, 0, 1, 1, 1)
    uv_mouth_rect      tuple (u0, v0, u1, v1): UV area of the 64x64 mouth patch, or None
    world_scale        float, world_translation tuple(3): FLAME -> EG3D world (`to_world`)
    name               str
    uv_missing         why uv_vt/uv_ft are None (the error `vt`/`ft` raise), else None
    mouth_missing      why uv_mouth_rect is None (the error `mouth_rect` raises), else None

    Read the UV layout through `vt`, `ft` and `mouth_rect`: they raise that error when the
    model was loaded without it (LBS does not need it; binding Gaussians to texels does).
    """

    v_template: jax.Array
    shapedirs: jax.Array
    exprdirs: jax.Array
    posedirs: jax.Array
    J_regressor: jax.Array
    weights: jax.Array
    faces: jax.Array
    uv_vt: Optional[jax.Array] = None
    uv_ft: Optional[jax.Array] = None
    parents: Tuple[int, ...] = FLAME_PARENTS
    uv_mouth_rect: Optional[Tuple[float, float, float, float]] = None
    world_scale: float = WORLD_SCALE
    world_translation: Tuple[float, float, float] = WORLD_TRANSLATION
    name: str = "flame"
    uv_missing: Optional[str] = None
    mouth_missing: Optional[str] = None

    @property
    def has_uv_layout(self) -> bool:
        """True when the model holds a UV layout (texels can be bound to it)."""
        return self.uv_vt is not None and self.uv_ft is not None

    @property
    def vt(self) -> jax.Array:
        """(T, 2) float32 UV coordinates; ValueError if the model was loaded without them."""
        if self.uv_vt is None:
            raise ValueError(self.uv_missing or f"head model '{self.name}' has no UV layout (vt)")
        return self.uv_vt

    @property
    def ft(self) -> jax.Array:
        """(F, 3) int32 UV corner indices; ValueError if the model was loaded without them."""
        if self.uv_ft is None:
            raise ValueError(self.uv_missing or f"head model '{self.name}' has no UV layout (ft)")
        return self.uv_ft

    @property
    def mouth_rect(self) -> Tuple[float, float, float, float]:
        """(u0, v0, u1, v1), the UV square of the mouth patch; ValueError if it is unknown
        (no UV layout, or a mouth opening that could not be located and no mouth_rect)."""
        if self.uv_mouth_rect is None:
            raise ValueError(self.mouth_missing or self.uv_missing
                             or f"head model '{self.name}' has no mouth rectangle")
        return self.uv_mouth_rect

    @property
    def num_shape(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def num_expression(self) -> int:
        return self.exprdirs.shape[-1]

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    def forward(self, shape=None, expression=None, global_pose=None, neck_pose=None,
                jaw_pose=None, eye_pose=None, return_joints: bool = False):
        """Posed vertices (B, V, 3) float32 in FLAME coordinates (and joints (B, 5, 3)).

        shape (B, <=S), expression (B, <=E): blend-shape coefficients; missing trailing
        coefficients count as zero. global_pose, neck_pose, jaw_pose (B, 3), eye_pose (B, 6)
        (left eye then right): axis-angle. None means zeros. B comes from whichever inputs
        are given (they must agree; 1 if none is). jit-, vmap- and grad-compatible (finite
        gradients at zero pose). NaN inputs are not checked; they propagate to the output.
        """
        inputs = {"shape": shape, "expression": expression, "global_pose": global_pose,
                  "neck_pose": neck_pose, "jaw_pose": jaw_pose, "eye_pose": eye_pose}
        widths = {"shape": self.num_shape, "expression": self.num_expression, "global_pose": 3,
                  "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
        arrays = {}
        for key, value in inputs.items():
            if value is None:
                continue
            value = jnp.asarray(value, jnp.float32)
            if value.ndim != 2:
                raise ValueError(f"FLAME {key} must be batched (B, k), got shape {value.shape}")
            if key in ("shape", "expression"):
                if value.shape[1] > widths[key]:
                    raise ValueError(f"FLAME {key} has {value.shape[1]} coefficients but the model "
                                     f"'{self.name}' holds {widths[key]}")
            elif value.shape[1] != widths[key]:
                raise ValueError(f"FLAME {key} must be (B, {widths[key]}), got shape {value.shape}")
            arrays[key] = value
        batches = {key: value.shape[0] for key, value in arrays.items()}
        if len(set(batches.values())) > 1:
            raise ValueError(f"FLAME inputs disagree on the batch size: {batches}")
        batch = next(iter(batches.values()), 1)

        def padded(key):
            value = arrays.get(key, jnp.zeros((batch, 0), jnp.float32))
            return jnp.pad(value, ((0, 0), (0, widths[key] - value.shape[1])))

        full_pose = jnp.stack([padded("global_pose"), padded("neck_pose"), padded("jaw_pose"),
                               padded("eye_pose")[:, :3], padded("eye_pose")[:, 3:]], axis=1)
        vertices, joints = _linear_blend_skinning(
            self.v_template, self.shapedirs, self.exprdirs, self.posedirs, self.J_regressor,
            self.weights, padded("shape"), padded("expression"), full_pose, self.parents)
        chex.assert_shape(vertices, (batch, self.num_vertices, 3))
        chex.assert_shape(joints, (batch, NUM_JOINTS, 3))
        return (vertices, joints) if return_joints else vertices

    def to_world(self, points: jax.Array) -> jax.Array:
        """FLAME coordinates (..., 3) -> EG3D world: world_scale * p + world_translation."""
        points = jnp.asarray(points, jnp.float32)
        if points.shape[-1:] != (3,):
            raise ValueError(f"to_world expects points (..., 3), got shape {points.shape}")
        return self.world_scale * points + jnp.asarray(self.world_translation, jnp.float32)

    def up_axis(self, global_pose=None, neck_pose=None) -> jax.Array:
        """The head's posed up direction (B, 3): R_global R_neck (0, 1, 0).

        World and FLAME directions coincide (the world map has no rotation).
        """
        poses = {k: v for k, v in (("global_pose", global_pose), ("neck_pose", neck_pose)) if v is not None}
        for key, value in list(poses.items()):
            value = jnp.asarray(value, jnp.float32)
            if value.ndim != 2 or value.shape[1] != 3:
                raise ValueError(f"up_axis: {key} must be (B, 3), got shape {value.shape}")
            poses[key] = value
        batches = {k: v.shape[0] for k, v in poses.items()}
        if len(set(batches.values())) > 1:
            raise ValueError(f"up_axis inputs disagree on the batch size: {batches}")
        batch = next(iter(batches.values()), 1)
        zeros = jnp.zeros((batch, 3), jnp.float32)
        rotation = jnp.matmul(rodrigues(poses.get("global_pose", zeros)),
                              rodrigues(poses.get("neck_pose", zeros)), precision=_HIGHEST)
        return rotation[..., :, 1]


# ----------------------------------------------------------------------------- loading
def load(path=None, uv_path=None, mouth_rect: Optional[Sequence[float]] = None,
         num_shape: Optional[int] = None) -> FlameModel:
    """Load a head model.

    path None: the embedded procedural template head (built once per process).
    path: a FLAME model, `.pkl` as distributed (FLAME 2020 generic_model.pkl, FLAME 2023,
      FLAME 2023 Open; read without chumpy) or `.npz` with keys v_template, shapedirs,
      posedirs, J_regressor, weights, kintree_table, f.
    uv_path: FLAME's UV layout, head_template.obj (vt lines and the texture indices of f
      lines) or an `.npz` with vt, ft; without it the model file's own vt/ft are used if it
      has them. Linear blend skinning does not need a UV layout: without one the model
      loads and `forward` works, and binding Gaussians to texels (`model.vt`, `model.ft`,
      `model.mouth_rect`, hence `reta3d.binding`) raises a ValueError naming the model file
      and saying to pass uv_path.
    mouth_rect: (u0, v0, u1, v1) of the mouth patch in UV; default: the template's, or for
      FLAME the UV bounding square of the lips around the mouth opening (when the opening
      cannot be located, `model.mouth_rect` raises a ValueError saying to pass mouth_rect).
    num_shape: shapedirs columns that are identity (the rest are expression); default 300
      for FLAME files and the template's own split for the template.
    Errors (missing file or key, wrong shape, non-finite values, UV faces that do not match
    the model, a malformed mouth_rect) raise FileNotFoundError / ValueError at load, naming
    the file and the problem.
    """
    if path is None:
        if uv_path is not None:
            raise ValueError("uv_path is only used with a FLAME model file (path); the embedded "
                             "template head has its own UV layout")
        if mouth_rect is None and num_shape is None:
            return _default_template()
        arrays = _template_arrays()
        source, name = "embedded template head", "template_head"
        uv = (arrays["vt"], arrays["ft"], None)
        default_split = int(arrays["num_shape"])
        default_rect = tuple(float(a) for a in arrays["mouth_rect"])
    else:
        path = Path(path)
        source, name = str(path), path.stem
        _require_file(path, "FLAME model")
        suffix = path.suffix.lower()
        if suffix == ".pkl":
            arrays = _read_flame_pickle(path)
        elif suffix == ".npz":
            arrays = _read_npz(path)
        else:
            raise errors.InputError(f"{path}: unsupported FLAME model file type '{suffix}' (expected .pkl or .npz)")
        if uv_path is not None:
            uv = _read_uv(Path(uv_path))
        elif "vt" in arrays and "ft" in arrays:
            uv = (arrays["vt"], arrays["ft"], None)
        else:
            uv = None   # enough for LBS; `FlameModel.vt` etc. explain what binding needs
        default_split, default_rect = DEFAULT_NUM_SHAPE, None
    return _build_model(arrays, uv, source, name, default_split if num_shape is None else num_shape,
                        mouth_rect if mouth_rect is not None else default_rect,
                        uv_source=str(uv_path) if uv_path is not None else source)


@functools.lru_cache(maxsize=1)
def _template_arrays():
    from reta3d import template_head
    return template_head.build_template_head()


@functools.lru_cache(maxsize=1)
def _default_template() -> FlameModel:
    return load(mouth_rect=tuple(float(a) for a in _template_arrays()["mouth_rect"]))


_REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


_FLAME_HINT = ("FLAME is not downloaded by this project: register at https://flame.is.tue.mpg.de/, "
               "download FLAME (generic_model.pkl / flame2023.pkl and head_template.obj), or use the "
               "embedded template head (no path)")


def _require_file(path: Path, what: str):
    if not path.exists():
        raise errors.MissingInputError(f"{what} file not found: {path} ({_FLAME_HINT})")
    if not path.is_file():
        raise errors.MissingInputError(f"{what} path is not a file: {path}")


def _build_model(arrays, uv, source, name, num_shape, mouth_rect, uv_source) -> FlameModel:
    for key in _REQUIRED_KEYS:
        if key not in arrays:
            raise errors.InputError(f"{source}: missing key '{key}' (a FLAME model has {', '.join(_REQUIRED_KEYS)})")
    get = {key: _as_array(arrays[key], key, source) for key in _REQUIRED_KEYS}

    v_template = _float_array(get["v_template"], "v_template", source)
    if v_template.ndim != 2 or v_template.shape[1] != 3:
        raise errors.InputError(f"{source}: v_template must be (V, 3), got shape {v_template.shape}")
    num_vertices = v_template.shape[0]

    shapedirs = _float_array(get["shapedirs"], "shapedirs", source)
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (num_vertices, 3):
        raise errors.InputError(f"{source}: shapedirs must be ({num_vertices}, 3, K), got shape {shapedirs.shape}")
    num_shape = int(num_shape)
    if not 0 < num_shape < shapedirs.shape[2]:
        raise errors.InputError(f"{source}: shapedirs has {shapedirs.shape[2]} columns; num_shape={num_shape} "
                         "must leave at least one expression column (FLAME: 300 shape + 100 expression)")

    posedirs = _float_array(get["posedirs"], "posedirs", source)
    if posedirs.shape == (num_vertices * 3, NUM_POSE_FEATURES):
        posedirs = posedirs.reshape(num_vertices, 3, NUM_POSE_FEATURES)
    if posedirs.shape != (num_vertices, 3, NUM_POSE_FEATURES):
        raise errors.InputError(f"{source}: posedirs must be ({num_vertices}, 3, 36) or ({num_vertices * 3}, 36), "
                         f"got shape {posedirs.shape}")

    regressor = _float_array(get["J_regressor"], "J_regressor", source)
    if regressor.shape != (NUM_JOINTS, num_vertices):
        raise errors.InputError(f"{source}: J_regressor must be (5, {num_vertices}), got shape {regressor.shape}")
    weights = _float_array(get["weights"], "weights", source)
    if weights.shape != (num_vertices, NUM_JOINTS):
        raise errors.InputError(f"{source}: weights must be ({num_vertices}, 5), got shape {weights.shape}")

    kintree = np.asarray(get["kintree_table"])
    if kintree.shape != (2, NUM_JOINTS) or kintree.dtype.kind not in "iu":
        raise errors.InputError(f"{source}: kintree_table must be (2, 5) integers, got {kintree.dtype} {kintree.shape}")
    parents = tuple(-1 if (p < 0 or p >= NUM_JOINTS) else int(p) for p in kintree[0].astype(np.int64))
    if parents != FLAME_PARENTS:
        raise errors.InputError(f"{source}: kintree_table parents {parents} are not FLAME's {FLAME_PARENTS}")

    faces = _index_array(get["f"], "f", source, num_vertices)
    vt = ft = uv_missing = mouth_missing = None
    if uv is None:
        uv_missing = (f"{source}: loaded without a UV layout. Linear blend skinning does not "
                      "need one, but binding Gaussians to UV texels does: pass "
                      "uv_path=head_template.obj to reta3d.flame.load (FLAME's UV layout from "
                      "https://flame.is.tue.mpg.de/, or an .npz with vt and ft), or "
                      "--config.head.flame_uv=head_template.obj when training")
    else:
        vt = _float_array(_as_array(uv[0], "vt", uv_source), "vt", uv_source)
        if vt.ndim != 2 or vt.shape[1] != 2:
            raise errors.InputError(f"{uv_source}: vt must be (T, 2), got shape {vt.shape}")
        if vt.min() < -1e-3 or vt.max() > 1.0 + 1e-3:
            raise errors.InputError(f"{uv_source}: UV coordinates must lie in [0, 1], found [{vt.min()}, {vt.max()}]")
        ft = _index_array(_as_array(uv[1], "ft", uv_source), "ft", uv_source, len(vt))
        if ft.shape[0] != faces.shape[0]:
            raise errors.InputError(f"{uv_source}: the UV layout has {ft.shape[0]} faces but the model {source} "
                             f"has {faces.shape[0]}: they must describe the same mesh")
        ft = _align_uv_faces(faces, ft, uv[2], source, uv_source)

    if mouth_rect is None and vt is not None:
        try:
            mouth_rect = _mouth_rect_from_mesh(v_template, faces, vt, ft, source)
        except ValueError as error:   # only the mouth patch needs it: report it when bound
            mouth_missing = str(error)
    elif mouth_rect is None:
        mouth_missing = uv_missing
    if mouth_rect is not None:
        mouth_rect = tuple(float(a) for a in np.asarray(mouth_rect, np.float64).reshape(-1))
        if (len(mouth_rect) != 4 or not np.all(np.isfinite(mouth_rect))
                or not (0.0 <= mouth_rect[0] < mouth_rect[2] <= 1.0
                        and 0.0 <= mouth_rect[1] < mouth_rect[3] <= 1.0)):
            raise errors.InputError(f"{source}: mouth_rect must be (u0, v0, u1, v1) inside [0, 1] with u0 < u1, "
                             f"v0 < v1; got {mouth_rect}")

    f32 = lambda a: jnp.asarray(a, jnp.float32)   # noqa: E731
    return FlameModel(
        v_template=f32(v_template), shapedirs=f32(shapedirs[..., :num_shape]),
        exprdirs=f32(shapedirs[..., num_shape:]), posedirs=f32(posedirs), J_regressor=f32(regressor),
        weights=f32(weights), faces=jnp.asarray(faces, jnp.int32),
        uv_vt=None if vt is None else f32(np.clip(vt, 0.0, 1.0)),
        uv_ft=None if ft is None else jnp.asarray(ft, jnp.int32), parents=FLAME_PARENTS,
        uv_mouth_rect=mouth_rect, world_scale=WORLD_SCALE, world_translation=WORLD_TRANSLATION,
        name=name, uv_missing=uv_missing, mouth_missing=mouth_missing)


def _float_array(value, key, source) -> np.ndarray:
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError) as error:
        raise errors.InputError(f"{source}: '{key}' is not a numeric array ({error})") from None
    if not np.all(np.isfinite(array)):
        raise errors.InputError(f"{source}: '{key}' contains non-finite values (NaN or inf)")
    return array


def _index_array(value, key, source, limit) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[1] != 3 or array.dtype.kind not in "iu":
        raise errors.InputError(f"{source}: '{key}' must be (F, 3) integer indices, got {array.dtype} {array.shape}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= limit):
        raise errors.InputError(f"{source}: '{key}' has indices outside [0, {limit})")
    return array


# --- pickles ------------------------------------------------------------------------------
class _ChumpyStandIn:
    """Takes the place of any chumpy class while unpickling; keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state


class _SparseStandIn:
    """Takes the place of scipy.sparse matrices (their pickled layout changed over versions)."""

    format = None

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state


@functools.lru_cache(maxsize=None)
def _sparse_stand_in(name: str):
    return type(name, (_SparseStandIn,), {"format": name[:3]})


_SAFE_BUILTINS = {"object", "set", "frozenset", "slice", "complex", "list", "dict", "tuple", "int",
                  "float", "str", "bytes", "bytearray", "bool"}


class _FlameUnpickler(pickle.Unpickler):
    """Reads FLAME pickles without chumpy; refuses classes outside numpy/scipy/chumpy."""

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        if module.startswith("scipy.sparse") and name[:3] in ("csc", "csr", "coo"):
            return _sparse_stand_in(name)
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        # Python 3 pickles bytes for protocols < 3 with _codecs.encode (harmless).
        if (module == "numpy" or module.startswith("numpy.")) or (module == "copyreg") \
                or (module == "_codecs" and name == "encode") \
                or (module == "collections" and name == "OrderedDict") \
                or (module == "builtins" and name in _SAFE_BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_flame_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = _FlameUnpickler(handle, encoding="latin1").load()
    except Exception as error:   # any failure to decode is a corrupt or foreign file
        raise errors.InputError(f"{path}: could not be read as a FLAME pickle ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise errors.InputError(f"{path}: a FLAME pickle holds a dict, found {type(data).__name__}")
    return {str(key): value for key, value in data.items()}


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as error:
        raise errors.InputError(f"{path}: could not be read as an .npz file ({type(error).__name__}: {error})") from None


def _as_array(value, key, source) -> np.ndarray:
    """numpy array from an array, list, chumpy stand-in or (stand-in) sparse matrix."""
    if isinstance(value, _ChumpyStandIn):
        state = value.__dict__.get("pickled_state")
        if isinstance(state, tuple):
            state = next((s for s in state if isinstance(s, dict)), None)
        if not isinstance(state, dict) or "x" not in state:
            raise errors.InputError(f"{source}: '{key}' is a chumpy expression without stored values; "
                             "re-save the model with chumpy installed (np.array(value) for each key)")
        return np.asarray(state["x"])
    if isinstance(value, _SparseStandIn):
        return _sparse_to_dense(value, key, source)
    if hasattr(value, "toarray"):
        return np.asarray(value.toarray())
    return np.asarray(value)


def _sparse_to_dense(value: _SparseStandIn, key, source) -> np.ndarray:
    from scipy import sparse
    state = value.__dict__.get("pickled_state")
    if isinstance(state, tuple):
        state = next((s for s in state if isinstance(s, dict)), None)
    try:
        shape = tuple(int(n) for n in state.get("_shape", state.get("shape")))
        if value.format == "coo":
            row = state.get("row", state.get("coords", (None, None))[0])
            col = state.get("col", state.get("coords", (None, None))[1])
            matrix = sparse.coo_matrix((state["data"], (row, col)), shape=shape)
        else:
            build = sparse.csc_matrix if value.format == "csc" else sparse.csr_matrix
            matrix = build((state["data"], state["indices"], state["indptr"]), shape=shape)
        return np.asarray(matrix.toarray())
    except Exception as error:
        raise errors.InputError(f"{source}: '{key}' is a sparse matrix that could not be rebuilt ({error})") from None


# --- UV files -----------------------------------------------------------------------------
def _read_uv(path: Path):
    """(vt (T, 2), ft (F, 3), faces (F, 3) or None) from an OBJ or an .npz with vt, ft."""
    _require_file(path, "UV layout")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = _read_npz(path)
        for key in ("vt", "ft"):
            if key not in data:
                raise errors.InputError(f"{path}: missing key '{key}' (a UV layout .npz has vt and ft)")
        return data["vt"], data["ft"], data.get("f")
    if suffix != ".obj":
        raise errors.InputError(f"{path}: unsupported UV layout file type '{suffix}' (expected .obj or .npz)")
    vt, ft, faces = [], [], []
    num_vertices = 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise errors.InputError(f"{path}: could not be read ({error})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "v":
            num_vertices += 1
        elif fields[0] == "vt":
            try:
                vt.append((float(fields[1]), float(fields[2])))
            except (IndexError, ValueError):
                raise errors.InputError(f"{path}:{number}: malformed vt line: {line.strip()!r}") from None
        elif fields[0] == "f":
            corners = fields[1:]
            if len(corners) != 3:
                raise errors.InputError(f"{path}:{number}: only triangles are supported, found a face with "
                                 f"{len(corners)} corners")
            vertex_ids, uv_ids = [], []
            for corner in corners:
                parts = corner.split("/")
                if len(parts) < 2 or not parts[1]:
                    raise errors.InputError(f"{path}:{number}: face corner {corner!r} has no texture index")
                try:
                    v_id, t_id = int(parts[0]), int(parts[1])
                except ValueError:
                    raise errors.InputError(f"{path}:{number}: malformed face corner {corner!r}") from None
                # OBJ indices are 1-based; negative ones count back from the latest element.
                vertex_ids.append(v_id - 1 if v_id > 0 else num_vertices + v_id)
                uv_ids.append(t_id - 1 if t_id > 0 else len(vt) + t_id)
            faces.append(vertex_ids)
            ft.append(uv_ids)
    if not vt or not ft:
        raise errors.InputError(f"{path}: no texture coordinates (vt lines and f lines with texture indices) found")
    return np.array(vt, np.float64), np.array(ft, np.int64), np.array(faces, np.int64)


def _align_uv_faces(model_faces, uv_faces, file_faces, source, uv_source):
    """Match the UV file's triangles to the model's (any face order, corners rotated
    consistently) and return ft in the model's face order and corner order."""
    if file_faces is None:
        return uv_faces
    file_faces = np.asarray(file_faces, np.int64)
    if file_faces.shape != model_faces.shape:
        raise errors.InputError(f"{uv_source}: the UV layout has {len(file_faces)} faces but the model {source} "
                         f"has {len(model_faces)}: they must describe the same mesh")
    lookup = {tuple(sorted(face)): k for k, face in enumerate(file_faces.tolist())}
    order = np.array([lookup.get(tuple(sorted(face)), -1) for face in model_faces.tolist()])
    if np.any(order < 0):
        k = int(np.argmin(order))
        raise errors.InputError(f"{uv_source}: face {k} of the model {source}, {tuple(model_faces[k])}, is not in "
                         "the UV file: the UV file does not match the model")
    file_faces, uv_faces = file_faces[order], uv_faces[order]
    aligned = np.empty_like(uv_faces)
    matched = np.zeros(len(model_faces), bool)
    for shift in range(3):
        same = np.all(np.roll(file_faces, -shift, axis=1) == model_faces, axis=1) & ~matched
        aligned[same] = np.roll(uv_faces, -shift, axis=1)[same]
        matched |= same
    if not matched.all():
        k = int(np.argmin(matched))
        raise errors.InputError(f"{uv_source}: face {k} uses vertices {tuple(file_faces[k])} (opposite winding) but "
                         f"face {k} of the model {source} is {tuple(model_faces[k])}: the UV file does not "
                         "match the model")
    return aligned


def _mouth_rect_from_mesh(vertices, faces, vt, ft, source):
    """UV square around the lips of a FLAME-like mesh with an open mouth.

    The mouth opening is the boundary loop (edges with one face) that straddles the
    midline in front (the neck opening is the largest loop, the eye openings are off the
    midline); the lips are the faces within ~1.2 loop widths of it.
    """
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    key = np.sort(edges, axis=1)
    unique, counts = np.unique(key, axis=0, return_counts=True)
    boundary = unique[counts == 1]
    if len(boundary) == 0:
        raise errors.InputError(f"{source}: cannot locate the mouth (the mesh has no open boundary), so the "
                         "mouth patch cannot be bound: pass mouth_rect=(u0, v0, u1, v1), its UV "
                         "square, to reta3d.flame.load")
    # Connected components of the boundary edges (union-find over vertex ids).
    parent = {int(v): int(v) for v in np.unique(boundary)}

    def find(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in boundary:
        parent[find(int(a))] = find(int(b))
    loops = {}
    for v in parent:
        loops.setdefault(find(v), []).append(v)
    loops = sorted((np.array(sorted(ids)) for ids in loops.values()), key=len)
    candidates = [ids for ids in loops[:-1]
                  if vertices[ids, 0].min() < 0.0 < vertices[ids, 0].max()]
    if not candidates:
        raise errors.InputError(f"{source}: cannot locate the mouth opening (no boundary loop straddles "
                         "the midline), so the mouth patch cannot be bound: pass "
                         "mouth_rect=(u0, v0, u1, v1), its UV square, to reta3d.flame.load")
    mouth = max(candidates, key=lambda ids: vertices[ids, 2].mean())
    centre = vertices[mouth].mean(axis=0)
    radius = 1.2 * (vertices[mouth, 0].max() - vertices[mouth, 0].min())
    near = np.linalg.norm(vertices[faces].mean(axis=1) - centre, axis=-1) < radius
    uv = vt[ft[near]].reshape(-1, 2)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    half = 0.5 * (hi - lo).max()
    middle = np.clip(0.5 * (lo + hi), half, 1.0 - half)
    return np.concatenate([middle - half, middle + half]).clip(0.0, 1.0)
