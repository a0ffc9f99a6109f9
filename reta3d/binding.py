"""Gaussians bound to UV texels of the FLAME mesh, on consecutive local frames (Sec. 2.1).

Pipeline (per animation frame):

    UV feature map (B, R, R, 14) ──gather valid texels──► (B, M, 14)
    posed world-space mesh ──► texel surface points p (B, M, 3), local frames C (B, M, 3, 3)
    decode: μ = p + γp·tanh(o)·C,  rotation = C·R(q),  scale = exp(s + ln γs),
            opacity = sigmoid(σ),  color = sigmoid(c)

Two halves:

1. Host side (numpy, once per model and resolution, cached): `build_texel_binding`
   rasterises the UV triangles (`vt`/`ft`) onto an R×R texel grid and records, for every
   texel whose centre lies inside a UV triangle, the triangle and the barycentric weights of
   its three corners. These arrays are static constants closed over by jitted code.
2. Device side (jnp, batched, differentiable, jit-able): `local_frames`, `decode_gaussians`,
   `head_gaussians`.

Texel grid: texel (row i, col j) has its centre at
    u = u0 + (j + 0.5) / R · (u1 − u0),    v = v1 − (i + 0.5) / R · (v1 − v0)
for the rectangle rect = (u0, v0, u1, v1); row 0 is the top (high v), like an image of the
UV map (OBJ convention: v points up).

Frame convention: a frame C (3, 3) holds the local axes as COLUMNS, C = [x | y | z], so a
local offset o maps to world as C @ o. The paper writes the row-vector form "o·C" with the
axes as rows; both are the same linear map. C is orthonormal and right-handed (det +1).

Barycentric weights `bary[:, k]` weight corner k of the face (`faces[f, k]` in 3D,
`ft[f, k]` in UV); the paper's (u, v, 1 − u − v) for (p⁰, p¹, p²).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rasterizer.types import Gaussians

GAMMA_P = 0.25                  # offset range: μ = p + γp·tanh(o)·C
GAMMA_S = math.exp(-5.5)        # target scale: raw scale 0 ↦ γs
NUM_FEATURE_CHANNELS = 14
# Channel layout of a UV feature map (DESIGN.md), in order.
FEATURE_LAYOUT: Tuple[Tuple[str, int], ...] = (
    ("offset", 3), ("scale", 3), ("quat", 4), ("color", 3), ("opacity", 1))
FRAME_KINDS = ("consecutive", "naive", "global")
FLAME_PARAM_NAMES = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")

# |up × n|² below this counts as n ∥ up (angle < ~1e-3 rad) for the consecutive frame.
_DEGENERATE_CROSS_SQ = 1e-6
# Texel centres within this barycentric distance of a triangle count as inside, so that
# centres lying exactly on a shared UV edge are not lost to rounding.
_INSIDE_TOLERANCE = 1e-7
# Candidate (texel, triangle) pairs processed at once while rasterising the UV map.
_MAX_CANDIDATES_PER_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------
# Host side: which texels carry a Gaussian, and where on the mesh they sit.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class TexelBinding:
    """Valid texels of an R×R UV grid over `rect`, each bound to one mesh triangle.

    resolution  R (int)
    rect        (u0, v0, u1, v1) floats: the UV rectangle the grid covers
    valid       (R, R)  bool     True where the texel centre lies inside some UV triangle
    texel_rc    (M, 2)  int32    (row, col) of each valid texel, row-major order
    face_index  (M,)    int32    triangle each texel is bound to
    bary        (M, 3)  float32  barycentric weights of that triangle's corners 0, 1, 2

    Identity-hashed (eq=False), so it can be a static argument or a closed-over constant.
    """

    resolution: int
    rect: Tuple[float, float, float, float]
    valid: np.ndarray
    texel_rc: np.ndarray
    face_index: np.ndarray
    bary: np.ndarray

    @property
    def num_texels(self) -> int:
        """M, the number of valid texels (= Gaussians)."""
        return int(self.face_index.shape[0])

    @functools.cached_property
    def flat_index(self) -> np.ndarray:
        """(M,) int32 index of each valid texel in the row-major flattened R×R grid."""
        index = (self.texel_rc[:, 0] * self.resolution + self.texel_rc[:, 1]).astype(np.int32)
        index.setflags(write=False)
        return index

    def texel_uv(self) -> np.ndarray:
        """(M, 2) float64 UV coordinates of the valid texels' centres."""
        u0, v0, u1, v1 = self.rect
        r = self.resolution
        u = u0 + (self.texel_rc[:, 1] + 0.5) / r * (u1 - u0)
        v = v1 - (self.texel_rc[:, 0] + 0.5) / r * (v1 - v0)
        return np.stack([u, v], axis=-1)


def _check_uv_mesh(vt: np.ndarray, ft: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    vt = np.asarray(vt)
    ft = np.asarray(ft)
    if vt.ndim != 2 or vt.shape[1] != 2:
        raise ValueError(f"vt must be (T, 2) UV coordinates, got shape {vt.shape}")
    if not np.all(np.isfinite(vt)):
        raise ValueError("vt contains NaN or inf UV coordinates")
    if ft.ndim != 2 or ft.shape[1] != 3:
        raise ValueError(f"ft must be (F, 3) UV indices per face corner, got shape {ft.shape}")
    if not np.issubdtype(ft.dtype, np.integer):
        raise ValueError(f"ft must hold integer indices, got dtype {ft.dtype}")
    if ft.size and (ft.min() < 0 or ft.max() >= vt.shape[0]):
        raise ValueError(
            f"ft indices must lie in [0, {vt.shape[0]}) (number of vt rows), "
            f"got range [{ft.min()}, {ft.max()}]")
    return vt.astype(np.float64), ft.astype(np.int64)


def build_texel_binding(vt, ft, resolution: int,
                        rect: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> TexelBinding:
    """Rasterise the UV triangles onto an R×R texel grid over `rect` (numpy, host side).

    vt (T, 2) float UV coordinates (v up); ft (F, 3) int UV index of each face corner;
    resolution R; rect (u0, v0, u1, v1). A texel is valid iff its centre lies inside some
    UV triangle; where triangles overlap (or share an edge through the centre) the one
    containing the centre most deeply (largest minimum barycentric) wins. Zero-area UV
    triangles are skipped. Vectorised over per-triangle bounding boxes.
    """
    vt, ft = _check_uv_mesh(vt, ft)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
            or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    resolution = int(resolution)
    rect = tuple(float(x) for x in rect)
    if len(rect) != 4 or not all(np.isfinite(rect)) or rect[2] <= rect[0] or rect[3] <= rect[1]:
        raise ValueError(f"rect must be (u0, v0, u1, v1) with u1 > u0 and v1 > v0, got {rect}")
    u0, v0, u1, v1 = rect
    r = resolution

    # Continuous texel coordinates: texel (i, j)'s centre sits at (x, y) = (j, i). The map
    # from UV is affine, and barycentric weights are affine-invariant, so they can be
    # computed here directly.
    x = (vt[:, 0] - u0) / (u1 - u0) * r - 0.5
    y = (v1 - vt[:, 1]) / (v1 - v0) * r - 0.5
    corners = np.stack([x, y], axis=-1)[ft]                        # (F, 3, 2)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])

    lo = corners.min(axis=1)
    hi = corners.max(axis=1)
    col0 = np.clip(np.ceil(lo[:, 0] - 1e-9), 0, r - 1).astype(np.int64)
    col1 = np.clip(np.floor(hi[:, 0] + 1e-9), 0, r - 1).astype(np.int64)
    row0 = np.clip(np.ceil(lo[:, 1] - 1e-9), 0, r - 1).astype(np.int64)
    row1 = np.clip(np.floor(hi[:, 1] + 1e-9), 0, r - 1).astype(np.int64)
    # Clipping can turn an outside box into a one-texel strip at the border; the inside
    # test below rejects those, so only empty/degenerate boxes need skipping here.
    keep = (np.abs(area2) > 1e-12) & (hi[:, 0] >= -0.5) & (lo[:, 0] <= r - 0.5) \
        & (hi[:, 1] >= -0.5) & (lo[:, 1] <= r - 0.5) & (col1 >= col0) & (row1 >= row0)
    faces_kept = np.nonzero(keep)[0]
    widths = col1[faces_kept] - col0[faces_kept] + 1
    counts = widths * (row1[faces_kept] - row0[faces_kept] + 1)

    found_texel, found_face, found_bary, found_score = [], [], [], []
    ends = np.cumsum(counts)
    start = 0
    while start < faces_kept.size:
        # Chunk over faces so the candidate arrays stay bounded for huge UV triangles.
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _MAX_CANDIDATES_PER_CHUNK,
                                                  side="right")))
        sel = slice(start, stop)
        fk, cnt, wid = faces_kept[sel], counts[sel], widths[sel]
        owner = np.repeat(np.arange(fk.size), cnt)
        local = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        face = fk[owner]
        col = col0[face] + local % wid[owner]
        row = row0[face] + local // wid[owner]
        px, py = col.astype(np.float64), row.astype(np.float64)
        ax, ay = a[face, 0], a[face, 1]
        bx, by = b[face, 0], b[face, 1]
        cx, cy = c[face, 0], c[face, 1]
        d = area2[face]
        w0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) / d
        w1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) / d
        w2 = 1.0 - w0 - w1
        w = np.stack([w0, w1, w2], axis=-1)
        score = w.min(axis=-1)
        inside = score >= -_INSIDE_TOLERANCE
        found_texel.append(row[inside] * r + col[inside])
        found_face.append(face[inside])
        found_bary.append(w[inside])
        found_score.append(score[inside])
        start = stop

    if found_texel:
        texel = np.concatenate(found_texel)
        face = np.concatenate(found_face)
        w = np.concatenate(found_bary)
        score = np.concatenate(found_score)
    else:
        texel = np.zeros((0,), np.int64)
        face = np.zeros((0,), np.int64)
        w = np.zeros((0, 3), np.float64)
        score = np.zeros((0,), np.float64)
    # Sorted by texel, then deepest containment first, then lowest face index (determinism).
    order = np.lexsort((face, -score, texel))
    texel, face, w = texel[order], face[order], w[order]
    first = np.ones(texel.shape, bool)
    first[1:] = texel[1:] != texel[:-1]
    texel, face, w = texel[first], face[first], w[first]
    # The tolerance admits tiny negative weights; project back onto the simplex.
    w = np.clip(w, 0.0, None)
    w /= w.sum(axis=-1, keepdims=True)

    valid = np.zeros((r * r,), bool)
    valid[texel] = True
    arrays = {"valid": valid.reshape(r, r),
              "texel_rc": np.stack([texel // r, texel % r], axis=-1).astype(np.int32),
              "face_index": face.astype(np.int32), "bary": w.astype(np.float32)}
    for array in arrays.values():
        array.setflags(write=False)     # bindings are cached and shared
    return TexelBinding(resolution=r, rect=rect, **arrays)


_BINDING_CACHE: Dict[Any, TexelBinding] = {}
_BINDING_CACHE_LOCK = threading.Lock()


def _model_key(model) -> Tuple[Any, str]:
    # Hash the UV layout itself: two models with the same name but different UV files
    # (template vs. a real FLAME) must not share bindings.
    digest = hashlib.sha1()
    for array in (np.asarray(model.vt), np.asarray(model.ft)):
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return getattr(model, "name", None), digest.hexdigest()


def _cached_binding(model, resolution: int, rect: Sequence[float]) -> TexelBinding:
    key = (_model_key(model), int(resolution), tuple(float(x) for x in rect))
    with _BINDING_CACHE_LOCK:
        cached = _BINDING_CACHE.get(key)
    if cached is None:
        cached = build_texel_binding(model.vt, model.ft, resolution, rect)
        with _BINDING_CACHE_LOCK:
            _BINDING_CACHE.setdefault(key, cached)
    return cached


def face_binding(model, resolution: int = 256) -> TexelBinding:
    """Binding of the whole UV map [0, 1]² at R = `resolution` (cached per model and R)."""
    return _cached_binding(model, resolution, (0.0, 0.0, 1.0, 1.0))


def mouth_binding(model, resolution: int = 64) -> TexelBinding:
    """Binding of the mouth patch `model.mouth_rect` at R = `resolution` (cached)."""
    return _cached_binding(model, resolution, tuple(model.mouth_rect))


def texel_spacing(model, texel_binding: TexelBinding) -> float:
    """Median distance (EG3D world units) between the surface points of horizontally or
    vertically adjacent valid texels, on the model's rest mesh (`v_template` → `to_world`).

    This is what the paper calls "the average distance between adjacent sampled Gaussians"
    (Sec. 2.1, the definition of γs). The median, not the mean: pairs that straddle a UV seam
    are far apart in 3D and would dominate a mean. Host-side numpy, float64.
    """
    vertices = np.asarray(model.to_world(jnp.asarray(model.v_template)[None]), np.float64)[0]
    faces = np.asarray(model.faces)
    corners = vertices[faces[texel_binding.face_index]]            # (M, 3, 3)
    points = np.einsum("mk,mkd->md", texel_binding.bary.astype(np.float64), corners)
    r = texel_binding.resolution
    grid = np.full((r, r, 3), np.nan)
    grid[texel_binding.texel_rc[:, 0], texel_binding.texel_rc[:, 1]] = points
    distances = np.concatenate([
        np.linalg.norm(grid[:, 1:] - grid[:, :-1], axis=-1).ravel(),
        np.linalg.norm(grid[1:] - grid[:-1], axis=-1).ravel()])
    distances = distances[np.isfinite(distances)]
    if distances.size == 0:
        raise ValueError(f"the {r}x{r} binding over {texel_binding.rect} has no two adjacent "
                         "valid texels: cannot measure the texel spacing")
    return float(np.median(distances))


@dataclasses.dataclass(frozen=True, eq=False)
class HeadBinding:
    """The face map binding (R = 256 in the paper) and the mouth patch binding (R = 64).

    Gaussians are ordered face first, then mouth.

    face_log_gamma_s / mouth_log_gamma_s: ln γs, the target scale of each map's Gaussians
    (raw scale 0 ↦ γs, and L_scale pulls towards it). The paper sets γs = e^−5.5 as "the
    average distance between adjacent sampled Gaussians" of its 256² FLAME map; γs therefore
    follows the texel spacing, which changes with the UV resolution and the head model, so
    `from_model` measures it (`texel_spacing`) at the configured resolution.
    """

    face: TexelBinding
    mouth: TexelBinding
    face_log_gamma_s: float = math.log(GAMMA_S)
    mouth_log_gamma_s: float = math.log(GAMMA_S)

    @classmethod
    def from_model(cls, model, face_resolution: int = 256, mouth_resolution: int = 64,
                   log_gamma_s: Optional[float] = None) -> "HeadBinding":
        """Bindings at the given resolutions; ln γs per map is the log of its measured texel
        spacing (`texel_spacing`), or `log_gamma_s` for both maps when given (e.g. −5.5 to
        use the paper's constant as is)."""
        face = face_binding(model, face_resolution)
        mouth = mouth_binding(model, mouth_resolution)
        if log_gamma_s is None:
            face_log = math.log(_cached_spacing(model, face))
            mouth_log = math.log(_cached_spacing(model, mouth))
        else:
            face_log = mouth_log = float(log_gamma_s)
        return cls(face=face, mouth=mouth, face_log_gamma_s=face_log, mouth_log_gamma_s=mouth_log)

    @property
    def num_face(self) -> int:
        return self.face.num_texels

    @property
    def num_mouth(self) -> int:
        return self.mouth.num_texels

    @property
    def num_gaussians(self) -> int:
        return self.num_face + self.num_mouth

    @property
    def log_gamma_s(self) -> np.ndarray:
        """(N,) float32: ln γs of every Gaussian, face first then mouth."""
        return np.concatenate([np.full((self.num_face,), self.face_log_gamma_s, np.float32),
                               np.full((self.num_mouth,), self.mouth_log_gamma_s, np.float32)])


_SPACING_CACHE: Dict[Any, float] = {}


def _cached_spacing(model, texel_binding: TexelBinding) -> float:
    # The rest mesh enters the spacing too, so key on it as well as the UV layout.
    digest = hashlib.sha1(np.ascontiguousarray(np.asarray(model.v_template)).tobytes())
    key = (_model_key(model), digest.hexdigest(), texel_binding.resolution, texel_binding.rect,
           float(model.world_scale))
    with _BINDING_CACHE_LOCK:
        cached = _SPACING_CACHE.get(key)
    if cached is None:
        cached = texel_spacing(model, texel_binding)
        with _BINDING_CACHE_LOCK:
            _SPACING_CACHE.setdefault(key, cached)
    return cached


# ----------------------------------------------------------------------------------------
# Device side: texel ↔ UV map, surface points, frames.
# ----------------------------------------------------------------------------------------

def _check_uv_map(uv_map: jax.Array, binding: TexelBinding, name: str) -> None:
    if uv_map.ndim != 4:
        raise ValueError(f"{name} must be (B, R, R, C), got shape {uv_map.shape}")
    r = binding.resolution
    if uv_map.shape[1:3] != (r, r):
        raise ValueError(
            f"{name} has resolution {uv_map.shape[1]}x{uv_map.shape[2]} but its binding was "
            f"built for {r}x{r} texels")


def gather_texels(uv_map: jax.Array, binding: TexelBinding) -> jax.Array:
    """Values at the valid texels: uv_map (B, R, R, C) -> (B, M, C), row-major texel order."""
    uv_map = jnp.asarray(uv_map)
    _check_uv_map(uv_map, binding, "uv_map")
    batch, r, _, channels = uv_map.shape
    return jnp.take(uv_map.reshape(batch, r * r, channels), binding.flat_index, axis=1)


def scatter_texels(values: jax.Array, binding: TexelBinding) -> jax.Array:
    """Inverse of `gather_texels`: values (B, M, C) -> (B, R, R, C), zeros at invalid texels."""
    values = jnp.asarray(values)
    chex.assert_rank(values, 3)
    if values.shape[1] != binding.num_texels:
        raise ValueError(
            f"values has {values.shape[1]} texels but the binding has {binding.num_texels}")
    batch, _, channels = values.shape
    r = binding.resolution
    grid = jnp.zeros((batch, r * r, channels), values.dtype)
    grid = grid.at[:, binding.flat_index].set(values, unique_indices=True)
    return grid.reshape(batch, r, r, channels)


def split_features(features_at_texels: jax.Array) -> Dict[str, jax.Array]:
    """Raw (pre-activation) channels of (B, M, 14) features.

    Returns offset (B, M, 3), scale (B, M, 3), quat (B, M, 4) wxyz, color (B, M, 3),
    opacity (B, M, 1).
    """
    features_at_texels = jnp.asarray(features_at_texels)
    if features_at_texels.ndim != 3 or features_at_texels.shape[-1] != NUM_FEATURE_CHANNELS:
        raise ValueError(
            f"features must be (B, M, {NUM_FEATURE_CHANNELS}) (offset 3, scale 3, quat 4, "
            f"color 3, opacity 1), got shape {features_at_texels.shape}")
    out, start = {}, 0
    for name, width in FEATURE_LAYOUT:
        out[name] = features_at_texels[..., start:start + width]
        start += width
    return out


def _texel_corner_ids(faces, binding: TexelBinding, num_vertices: int):
    """(M, 3) vertex ids of each texel's triangle; numpy when `faces` is concrete."""
    if isinstance(faces, jax.core.Tracer):
        chex.assert_shape(faces, (None, 3))
        return jnp.take(faces, binding.face_index, axis=0)
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3) vertex indices, got shape {faces.shape}")
    if binding.num_texels and binding.face_index.max() >= faces.shape[0]:
        raise ValueError(
            f"the binding refers to face {binding.face_index.max()} but faces has only "
            f"{faces.shape[0]} rows (binding built for another mesh?)")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(
            f"faces index vertices up to {faces.max()} but the mesh has {num_vertices}")
    return faces[binding.face_index].astype(np.int32)


def _texel_corners(vertices: jax.Array, faces, binding: TexelBinding) -> jax.Array:
    """(B, V, 3) per-vertex values -> (B, M, 3 corners, 3) at each texel's triangle."""
    ids = _texel_corner_ids(faces, binding, vertices.shape[1])
    return jnp.take(vertices, ids, axis=1)


def texel_points(vertices: jax.Array, faces, binding: TexelBinding) -> jax.Array:
    """Barycentric surface point of every valid texel: (B, V, 3) -> (B, M, 3)."""
    vertices = jnp.asarray(vertices)
    chex.assert_rank(vertices, 3)
    chex.assert_axis_dimension(vertices, 2, 3)
    corners = _texel_corners(vertices, faces, binding)
    return jnp.einsum("mk,bmkd->bmd", jnp.asarray(binding.bary, vertices.dtype), corners)


def _safe_normalize(v: jax.Array, eps: float = 1e-20) -> jax.Array:
    # rsqrt of a clamped square keeps value and gradient finite at v = 0.
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), eps))


def _perpendicular_reference(up: jax.Array) -> jax.Array:
    """(B, 3) unit vector ⟂ up: the fallback second axis when a normal is parallel to up.

    Chosen once per head (from up, not per texel) so that the fallback does not flicker
    between texels. A continuous fallback is impossible: up × n winds once around ±up, so
    any field that agrees with it outside a small cap must jump somewhere inside it.
    """
    least_aligned = jax.nn.one_hot(jnp.argmin(jnp.abs(up), axis=-1), 3, dtype=up.dtype)
    return _safe_normalize(jnp.cross(up, least_aligned))


def frames_from_normals(texel_normals: jax.Array, up: jax.Array) -> jax.Array:
    """Consecutive local frames (Eq. 1 and after) from per-texel normals.

    texel_normals (B, M, 3) (need not be unit), up (B, 3) -> C (B, M, 3, 3) with columns
    x = n, y = normalize(up × x), z = x × y. Where n ∥ up (|up × n|² < 1e-6) y falls back to
    normalize(r × x) with r ⟂ up fixed per head; values and gradients stay finite.
    """
    chex.assert_rank(texel_normals, 3)
    chex.assert_axis_dimension(texel_normals, 2, 3)
    chex.assert_shape(up, (texel_normals.shape[0], 3))
    up = _safe_normalize(up)
    x = _safe_normalize(texel_normals)
    y_paper = jnp.cross(up[:, None, :], x)
    y_fallback = jnp.cross(_perpendicular_reference(up)[:, None, :], x)
    degenerate = jnp.sum(y_paper * y_paper, axis=-1, keepdims=True) < _DEGENERATE_CROSS_SQ
    # Both branches are polynomials, and the kept one has |·|² ≥ 1e-6, so the normalisation
    # below never divides by ~0 on the branch that receives gradient.
    y = _safe_normalize(jnp.where(degenerate, y_fallback, y_paper))
    z = jnp.cross(x, y)
    return jnp.stack([x, y, z], axis=-1)


def _naive_frames(corners: jax.Array) -> jax.Array:
    """Per-triangle frames (GaussianAvatars style): corners (B, M, 3, 3) -> (B, M, 3, 3).

    x = face normal, y = first edge p1 − p0 orthogonalised against x, z = x × y.
    """
    edge1 = corners[:, :, 1] - corners[:, :, 0]
    edge2 = corners[:, :, 2] - corners[:, :, 0]
    x = _safe_normalize(jnp.cross(edge1, edge2))
    y = _safe_normalize(edge1 - jnp.sum(edge1 * x, axis=-1, keepdims=True) * x)
    z = jnp.cross(x, y)
    return jnp.stack([x, y, z], axis=-1)


def _check_kind(kind: str) -> None:
    if kind not in FRAME_KINDS:
        raise ValueError(f"kind must be one of {FRAME_KINDS}, got {kind!r}")


def _frames(vertices, normals, faces, binding, up, kind, corners=None):
    batch = vertices.shape[0]
    num_texels = binding.num_texels
    if kind == "global":
        return jnp.broadcast_to(jnp.eye(3, dtype=vertices.dtype), (batch, num_texels, 3, 3))
    if kind == "naive":
        if corners is None:
            corners = _texel_corners(vertices, faces, binding)
        return _naive_frames(corners)
    if normals is None:
        from reta3d import flame  # Lazy: binding's host half must not need the FLAME module.
        normals = flame.vertex_normals(vertices, faces)
    normals = jnp.asarray(normals, vertices.dtype)
    chex.assert_equal_shape([normals, vertices])
    corner_normals = _texel_corners(normals, faces, binding)
    texel_normals = jnp.einsum("mk,bmkd->bmd", jnp.asarray(binding.bary, vertices.dtype),
                               corner_normals)
    return frames_from_normals(texel_normals, up)


def local_frames(vertices: jax.Array, faces, binding: TexelBinding, up: jax.Array,
                 kind: str = "consecutive", normals: Optional[jax.Array] = None) -> jax.Array:
    """Local frames at every valid texel: C (B, M, 3, 3), axes as columns (world = C @ local).

    vertices (B, V, 3) float32 posed mesh; faces (F, 3) int; up (B, 3) head up axis;
    kind: "consecutive" (paper), "naive" (per triangle), "global" (identity).
    normals (B, V, 3) optional vertex normals for "consecutive"; computed with
    `reta3d.flame.vertex_normals` when omitted.
    """
    _check_kind(kind)
    vertices = jnp.asarray(vertices)
    chex.assert_rank(vertices, 3)
    chex.assert_axis_dimension(vertices, 2, 3)
    up = jnp.asarray(up, vertices.dtype)
    chex.assert_shape(up, (vertices.shape[0], 3))
    return _frames(vertices, normals, faces, binding, up, kind)


# ----------------------------------------------------------------------------------------
# Quaternions (w, x, y, z), rotation matrices act on column vectors.
# ----------------------------------------------------------------------------------------

def quaternion_to_rotation_matrix(q: jax.Array) -> jax.Array:
    """(..., 4) wxyz (normalised here) -> (..., 3, 3) rotation matrix."""
    w, x, y, z = jnp.moveaxis(_safe_normalize(q), -1, 0)
    return jnp.stack([
        jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def quaternion_multiply(a: jax.Array, b: jax.Array) -> jax.Array:
    """Hamilton product a ⊗ b of (..., 4) wxyz quaternions (rotation b first, then a)."""
    aw, ax, ay, az = jnp.moveaxis(a, -1, 0)
    bw, bx, by, bz = jnp.moveaxis(b, -1, 0)
    return jnp.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


def rotation_matrix_to_quaternion(m: jax.Array) -> jax.Array:
    """(..., 3, 3) rotation matrix -> (..., 4) unit quaternion wxyz.

    Shepperd's method: four candidate quaternions, each divided by one of |w|, |x|, |y|, |z|;
    the one with the largest divisor is picked, so the division is always well conditioned
    (divisor ≥ 1/2). Safe square roots keep gradients finite everywhere.
    """
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_sq = jnp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                         1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)   # 4w², 4x², 4y², 4z²
    positive = four_sq > 1e-12
    two_abs = jnp.where(positive, jnp.sqrt(jnp.where(positive, four_sq, 1.0)), 0.0)
    candidates = jnp.stack([
        jnp.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        jnp.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], -1),
        jnp.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], -1),
        jnp.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], -1),
    ], -2) / (2.0 * jnp.maximum(two_abs, 0.1))[..., None]
    pick = jax.nn.one_hot(jnp.argmax(four_sq, axis=-1), 4, dtype=m.dtype)
    return _safe_normalize(jnp.einsum("...k,...kq->...q", pick, candidates))


def _unit_quaternion(q: jax.Array) -> jax.Array:
    # A raw quaternion of exactly zero has no direction; read it as the identity rather
    # than NaN (the double where keeps its gradient finite).
    sq = jnp.sum(q * q, axis=-1, keepdims=True)
    nonzero = sq > 1e-20
    identity = jnp.array([1.0, 0.0, 0.0, 0.0], q.dtype)
    q = jnp.where(nonzero, q, identity)
    return q * jax.lax.rsqrt(jnp.where(nonzero, sq, 1.0))


# ----------------------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------------------

def decode_texels(features_at_texels: jax.Array, binding: TexelBinding,
                  vertices_world: jax.Array, normals: Optional[jax.Array], up: jax.Array,
                  faces, kind: str = "consecutive",
                  log_gamma_s=math.log(GAMMA_S)) -> Tuple[Gaussians, Dict[str, jax.Array]]:
    """Decode features already gathered at the valid texels (B, M, 14) into Gaussians.

    vertices_world (B, V, 3) posed mesh in EG3D world space; normals (B, V, 3) its vertex
    normals (only read for kind="consecutive"); up (B, 3); faces (F, 3); log_gamma_s ln γs,
    a float or (M,) per texel (scale = exp(raw + ln γs); `HeadBinding` measures it).
    Returns (Gaussians with N = M, aux) where aux holds
      raw            dict of raw channels (see `split_features`)
      surface_points (B, M, 3)    barycentric points p on the posed mesh
      frames         (B, M, 3, 3) local frames C (axes as columns)
      means          (B, M, 3)    μ = p + γp · C @ tanh(o)
    """
    _check_kind(kind)
    raw = split_features(features_at_texels)
    vertices_world = jnp.asarray(vertices_world)
    chex.assert_rank(vertices_world, 3)
    chex.assert_axis_dimension(vertices_world, 2, 3)
    batch, num_texels = features_at_texels.shape[:2]
    if num_texels != binding.num_texels:
        raise ValueError(f"features have {num_texels} texels but the binding has "
                         f"{binding.num_texels}")
    if vertices_world.shape[0] != batch:
        raise ValueError(f"features have batch {batch} but vertices_world has batch "
                         f"{vertices_world.shape[0]}")
    dtype = features_at_texels.dtype
    vertices_world = vertices_world.astype(dtype)
    up = jnp.asarray(up, dtype)
    chex.assert_shape(up, (batch, 3))

    corners = _texel_corners(vertices_world, faces, binding)
    surface_points = jnp.einsum("mk,bmkd->bmd", jnp.asarray(binding.bary, dtype), corners)
    if kind == "consecutive" and normals is None:
        raise ValueError("kind='consecutive' needs the posed mesh's vertex normals")
    frames = _frames(vertices_world, normals, faces, binding, up, kind, corners=corners)

    offsets_world = GAMMA_P * jnp.einsum("bmij,bmj->bmi", frames, jnp.tanh(raw["offset"]))
    means = surface_points + offsets_world
    # World rotation C·R(q) = R(quat(C) ⊗ q): one matrix→quaternion per texel frame.
    quats = quaternion_multiply(rotation_matrix_to_quaternion(frames),
                                _unit_quaternion(raw["quat"]))
    gaussians = Gaussians(
        means=means,
        scales=jnp.exp(raw["scale"] + jnp.asarray(log_gamma_s, dtype)[..., None]),
        quats=quats,
        opacities=jax.nn.sigmoid(raw["opacity"][..., 0]),
        colors=jax.nn.sigmoid(raw["color"]),
    )
    aux = {"raw": raw, "surface_points": surface_points, "frames": frames, "means": means}
    return gaussians, aux


def decode_gaussians(features: jax.Array, binding: TexelBinding, vertices_world: jax.Array,
                     normals: Optional[jax.Array], up: jax.Array, faces,
                     kind: str = "consecutive", log_gamma_s=math.log(GAMMA_S)) -> Gaussians:
    """Decode a UV feature map (B, R, R, 14) into Gaussians (N = M valid texels).

    Channels: offset 3, scale 3, quaternion 4 (wxyz), color 3, opacity 1.
      means     = p + γp · C @ tanh(o)          (B, M, 3)
      quats     = quat(C ⊗ R(q)), unit wxyz      (B, M, 4)
      scales    = exp(s + ln γs)                (B, M, 3)
      opacities = sigmoid(σ)                    (B, M)
      colors    = sigmoid(c)                    (B, M, 3)
    See `decode_texels` for the other arguments and for the raw values.
    """
    features = jnp.asarray(features)
    _check_uv_map(features, binding, "features")
    if features.shape[-1] != NUM_FEATURE_CHANNELS:
        raise ValueError(f"features must have {NUM_FEATURE_CHANNELS} channels (offset 3, scale "
                         f"3, quat 4, color 3, opacity 1), got {features.shape[-1]}")
    gaussians, _ = decode_texels(gather_texels(features, binding), binding, vertices_world,
                                 normals, up, faces, kind, log_gamma_s)
    return gaussians


# ----------------------------------------------------------------------------------------
# The whole head: FLAME → world mesh → frames → face and mouth Gaussians.
# ----------------------------------------------------------------------------------------

# Widths of a missing FLAME parameter's zeros (shape/expression: one zero coefficient, as
# missing trailing coefficients count as zero anyway).
_DEFAULT_PARAM_WIDTH = {"shape": 1, "expression": 1, "global_pose": 3, "neck_pose": 3,
                        "jaw_pose": 3, "eye_pose": 6}


def _flame_inputs(flame_params: Optional[Mapping[str, jax.Array]], batch: int,
                  dtype) -> Dict[str, jax.Array]:
    flame_params = dict(flame_params or {})
    unknown = sorted(set(flame_params) - set(FLAME_PARAM_NAMES))
    if unknown:
        raise ValueError(f"unknown FLAME parameters {unknown}; expected a subset of "
                         f"{FLAME_PARAM_NAMES}")
    inputs = {}
    for name in FLAME_PARAM_NAMES:
        value = flame_params.get(name)
        if value is None:
            value = jnp.zeros((batch, _DEFAULT_PARAM_WIDTH[name]), dtype)
        value = jnp.asarray(value, dtype)
        if value.ndim != 2 or value.shape[0] != batch:
            raise ValueError(f"FLAME parameter {name!r} must be (B={batch}, n), got shape "
                             f"{value.shape}")
        inputs[name] = value
    return inputs


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["vertices_world", "normals", "up"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PosedHead:
    """The posed FLAME mesh in EG3D world space (a pytree).

    vertices_world (B, V, 3) float32, normals (B, V, 3) float32 unit vertex normals,
    up (B, 3) float32 the head's up axis (template up rotated by global and neck pose).
    """

    vertices_world: jax.Array
    normals: jax.Array
    up: jax.Array


def pose_head(model, flame_params: Optional[Mapping[str, jax.Array]], batch: int,
              dtype=jnp.float32) -> PosedHead:
    """FLAME forward → `to_world` → vertex normals and up axis, for `batch` heads.

    flame_params: dict with any of shape, expression, global_pose, neck_pose, jaw_pose,
    eye_pose, each (B, n); missing ones are zeros.
    """
    from reta3d import flame  # Lazy: keeps the host-side binding usable without FLAME.

    params = _flame_inputs(flame_params, batch, dtype)
    vertices_world = jnp.asarray(model.to_world(model.forward(**params)), dtype)
    chex.assert_shape(vertices_world, (batch, None, 3))
    normals = jnp.asarray(flame.vertex_normals(vertices_world, model.faces), dtype)
    up = jnp.asarray(model.up_axis(params["global_pose"], params["neck_pose"]), dtype)
    chex.assert_shape(up, (batch, 3))
    return PosedHead(vertices_world, normals, up)


def _check_head_features(head_binding, face_features, mouth_features):
    for name, feats, binding in (("face_features", face_features, head_binding.face),
                                 ("mouth_features", mouth_features, head_binding.mouth)):
        _check_uv_map(feats, binding, name)
        if feats.shape[-1] != NUM_FEATURE_CHANNELS:
            raise ValueError(f"{name} must have {NUM_FEATURE_CHANNELS} channels, got "
                             f"{feats.shape[-1]}")
    if mouth_features.shape[0] != face_features.shape[0]:
        raise ValueError(f"face_features has batch {face_features.shape[0]} but "
                         f"mouth_features has {mouth_features.shape[0]}")


def decode_head(head_binding: HeadBinding, faces, face_features: jax.Array,
                mouth_features: jax.Array, posed: PosedHead,
                kind: str = "consecutive") -> Tuple[Gaussians, Dict[str, jax.Array]]:
    """Decode face and mouth feature maps on an already posed head (see `head_gaussians`).

    Lets a caller that decodes twice per frame (static maps, then F + ΔF) pose FLAME once.
    """
    _check_kind(kind)
    face_features = jnp.asarray(face_features)
    mouth_features = jnp.asarray(mouth_features)
    _check_head_features(head_binding, face_features, mouth_features)
    if posed.vertices_world.shape[0] != face_features.shape[0]:
        raise ValueError(f"features have batch {face_features.shape[0]} but the posed head "
                         f"has batch {posed.vertices_world.shape[0]}")
    parts = []
    for feats, binding, log_gamma_s in (
            (face_features, head_binding.face, head_binding.face_log_gamma_s),
            (mouth_features, head_binding.mouth, head_binding.mouth_log_gamma_s)):
        parts.append(decode_texels(gather_texels(feats, binding), binding,
                                   posed.vertices_world, posed.normals, posed.up, faces, kind,
                                   log_gamma_s))
    gaussians = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1),
                                       *[g for g, _ in parts])
    aux = {
        "offset_raw": jnp.concatenate([a["raw"]["offset"] for _, a in parts], axis=1),
        "scale_raw": jnp.concatenate([a["raw"]["scale"] for _, a in parts], axis=1),
        "means": gaussians.means,
        "surface_points": jnp.concatenate([a["surface_points"] for _, a in parts], axis=1),
        "vertices_world": posed.vertices_world,
        "up": posed.up,
    }
    return gaussians, aux


def head_gaussians(model, head_binding: HeadBinding, face_features: jax.Array,
                   mouth_features: jax.Array, flame_params: Optional[Mapping[str, jax.Array]],
                   kind: str = "consecutive") -> Tuple[Gaussians, Dict[str, jax.Array]]:
    """Posed FLAME head → Gaussians from the face map and the mouth patch (face first).

    model            a `reta3d.flame.FlameModel`
    head_binding     `HeadBinding.from_model(model, ...)`
    face_features    (B, R, R, 14) float32   (R = head_binding.face.resolution)
    mouth_features   (B, Rm, Rm, 14) float32 (Rm = head_binding.mouth.resolution)
    flame_params     dict with any of shape, expression, global_pose, neck_pose, jaw_pose,
                     eye_pose, each (B, n); missing ones are zeros
    kind             "consecutive" | "naive" | "global"

    Runs FLAME forward → `to_world` → vertex normals → up axis (`pose_head`), then local
    frames and decoding for both maps (`decode_head`). Returns (Gaussians with
    N = head_binding.num_gaussians, aux) where aux holds, over all N Gaussians in order:
      offset_raw (B, N, 3), scale_raw (B, N, 3)   pre-activation values, for regularisers
      means (B, N, 3)            world positions μ
      surface_points (B, N, 3)   barycentric points p on the posed mesh
      vertices_world (B, V, 3)   the posed mesh in EG3D world space
      up (B, 3)                  the head's up axis
    jit-compatible (the bindings are numpy constants closed over); differentiable in the
    features and the FLAME parameters.
    """
    _check_kind(kind)
    face_features = jnp.asarray(face_features)
    mouth_features = jnp.asarray(mouth_features)
    _check_head_features(head_binding, face_features, mouth_features)
    posed = pose_head(model, flame_params, face_features.shape[0], face_features.dtype)
    return decode_head(head_binding, model.faces, face_features, mouth_features, posed, kind)
