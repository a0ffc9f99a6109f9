"""68-point landmark embeddings on the head model: the template's own, FLAME's from files.

A landmark embedding places each of the 300-W / iBUG 68 facial landmarks on the mesh as a
triangle and barycentric coordinates, so the landmarks follow every blend shape and pose
(FLAME's convention: TF_FLAME / RingNet / DECA `vertices2landmarks`).

68-point semantics (300-W), "image left" = the subject's right = FLAME x < 0 (a frontal
camera sees the subject's left, +x, on the image right):
    0-16   jaw contour, from the image-left end (near the ear) over the chin (8) to the right
    17-21  image-left brow, outer end to inner end; 22-26 image-right brow, inner to outer
    27-30  nose bridge, top to tip
    31-35  lower edge of the nose (nostril base), image left to right, 33 on the midline
    36-41  image-left eye, clockwise in the image from the outer corner: 36 outer corner,
           37-38 upper lid, 39 inner corner, 40-41 lower lid
    42-47  image-right eye from the inner corner: 42 inner, 43-44 upper lid, 45 outer,
           46-47 lower lid
    48-59  outer lip contour: 48 image-left corner, 49-53 upper lip, 54 right corner,
           55-59 lower lip (right to left)
    60-67  inner lip contour: 60 left corner, 61-63 upper lip, 64 right corner, 65-67 lower
`MIRROR_68[i]` is the point that i becomes in a left-right mirrored face.

Jaw contour and head yaw: a 2D detector puts points 0-16 on the face's outline, which
slides over the cheek as the head turns. FLAME's dynamic embedding (RingNet, DECA) keeps one
17-point contour per integer yaw in degrees; `landmarks_3d(..., yaw=...)` uses it (see
`dynamic_row` for the row layout and the sign convention).

Files (never bundled; the user brings them, see `load_embedding`):
- DECA's data/landmark_embedding.npy (github.com/yfeng95/DECA): an np.save'd pickled dict,
  its dynamic tables pickled as torch tensors. It is read without numpy's pickle loading
  and without torch: a restricted unpickler allows numpy's array classes and decodes
  torch's legacy tensor serialisation itself.
- FLAME's flame_static_embedding.pkl (+ flame_dynamic_embedding.npy) from
  flame.is.tue.mpg.de (TF_FLAME / FLAME_PyTorch). Without the dynamic file FLAME has no jaw
  contour: `LandmarkEmbedding.has_contour` is False and points 0-16 come out as NaN.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import struct
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reta3d import errors

NUM_LANDMARKS = 68
NUM_CONTOUR = 17          # points 0-16
NUM_STATIC = 51           # points 17-67: FLAME's static embedding
MAX_DYNAMIC_YAW = 39      # degrees; dynamic rows cover yaw -39..39
NUM_DYNAMIC_ROWS = 2 * MAX_DYNAMIC_YAW + 1

# Left-right mirror partner of each of the 68 points (iBUG layout).
MIRROR_68 = np.array(
    list(range(16, -1, -1))                       # jaw: i <-> 16 - i
    + list(range(26, 16, -1))                     # brows: 17..21 <-> 26..22
    + [27, 28, 29, 30]                            # nose bridge
    + [35, 34, 33, 32, 31]                        # nostril base
    + [45, 44, 43, 42, 47, 46]                    # image-left eye 36..41 -> image-right eye
    + [39, 38, 37, 36, 41, 40]                    # image-right eye 42..47 -> image-left eye
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]   # outer lips 48..59
    + [64, 63, 62, 61, 60, 67, 66, 65],           # inner lips 60..67
    np.int32)

_BARY_TOLERANCE = 1e-3
_EMBEDDING_HINT = ("landmark embeddings are not bundled: use DECA's data/landmark_embedding.npy "
                   "(github.com/yfeng95/DECA, fetched by its fetch_data.sh) or FLAME's "
                   "flame_static_embedding.pkl with flame_dynamic_embedding.npy "
                   "(https://flame.is.tue.mpg.de/, TF_FLAME / FLAME_PyTorch); the embedded "
                   "template head has its own, `template_embedding()`")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["face_index", "barycentric", "dynamic_face_index", "dynamic_barycentric"],
    meta_fields=["source", "has_contour"],
)
@dataclasses.dataclass(frozen=True, eq=False)   # identity hash/eq: it holds arrays
class LandmarkEmbedding:
    """Where the 68 landmarks sit on a head mesh (a pytree: arrays are leaves).

    face_index           (68,)        int32    triangle of each landmark (rows of `faces`)
    barycentric          (68, 3)      float32  weights of the triangle's corners (sum 1, >= 0)
    dynamic_face_index   (79, 17)     int32    yaw-dependent jaw contour (rows: `dynamic_row`),
                                               or None
    dynamic_barycentric  (79, 17, 3)  float32  or None
    source               str          where it came from (file path or "template head")
    has_contour          bool         False when points 0-16 are unknown (FLAME's static
                                      embedding without its dynamic file): placeholders
                                      that `landmarks_3d` returns as NaN
    """

    face_index: np.ndarray
    barycentric: np.ndarray
    dynamic_face_index: Optional[np.ndarray] = None
    dynamic_barycentric: Optional[np.ndarray] = None
    source: str = ""
    has_contour: bool = True

    @property
    def has_dynamic_contour(self) -> bool:
        return self.dynamic_face_index is not None


# ----------------------------------------------------------------------------- evaluation
def dynamic_row(yaw):
    """Row of the dynamic contour table for a head yaw: (...,) radians -> (...,) int32.

    DECA's / RingNet's layout (`FLAME._find_dynamic_lmk_idx_and_bcoords`): the yaw in
    degrees, rounded half to even and clipped to [-39, 39], gives row yaw for yaw >= 0 and
    row 39 - yaw (40..78) for yaw < 0. The yaw is DECA's `rot_mat_to_euler` of the head's
    rotation relative to the camera, atan2(-R[2, 0], sqrt(R[0, 0]^2 + R[1, 0]^2)): the
    rotation about +y (FLAME's up axis), positive when the face turns toward the subject's
    left (+x, the image right), with the camera looking at the face from +z.
    """
    degrees = jnp.clip(jnp.round(jnp.asarray(yaw, jnp.float32) * (180.0 / np.pi)),
                       -MAX_DYNAMIC_YAW, MAX_DYNAMIC_YAW).astype(jnp.int32)
    return jnp.where(degrees >= 0, degrees, MAX_DYNAMIC_YAW - degrees)


def dynamic_rows_blend(yaw):
    """Two neighbouring dynamic-contour rows and a blend weight, for a contour continuous in yaw.

    yaw (...,) radians -> (row0, row1) (...,) int32 and alpha (...,) float32: the rows of
    floor(yaw in degrees) and the next degree (clipped to [-39, 39], rows as `dynamic_row`),
    alpha the fraction of a degree past the first. (1 - alpha) row0 + alpha row1 slides the
    contour with the yaw instead of jumping at half degrees; alpha is differentiable.
    """
    degrees = jnp.clip(jnp.asarray(yaw, jnp.float32) * (180.0 / np.pi), -MAX_DYNAMIC_YAW, MAX_DYNAMIC_YAW)
    low = jnp.clip(jnp.floor(degrees), -MAX_DYNAMIC_YAW, MAX_DYNAMIC_YAW - 1)
    alpha = degrees - low
    to_row = lambda d: jnp.where(d >= 0, d, MAX_DYNAMIC_YAW - d).astype(jnp.int32)   # noqa: E731
    return to_row(low), to_row(low + 1.0), alpha


def landmarks_3d(vertices, faces, embedding: LandmarkEmbedding, yaw=None, interpolate: bool = False) -> jax.Array:
    """The 68 landmarks on posed meshes: (B, V, 3) vertices -> (B, 68, 3) float32.

    vertices (B, V, 3) float32 in any frame (FLAME coordinates, world); faces (F, 3) int32;
    yaw (B,) radians or None: with a dynamic contour in the embedding and a yaw given,
    points 0-16 come from the yaw's row (`dynamic_row`: DECA's convention, the yaw rounded
    to whole degrees) or, with interpolate=True, from the blend of the two rows around it
    (`dynamic_rows_blend`: continuous in the yaw, what a fitter wants); otherwise from the
    static embedding. Points are barycentric interpolations of their triangles' corners
    (linear in the vertices, so exact under blend shapes and skinning of the corners).
    Points 0-16 are NaN when the embedding has no contour (`has_contour` False).
    jit-compatible (the embedding is a pytree); raises ValueError for wrong shapes.
    """
    vertices = jnp.asarray(vertices, jnp.float32)
    faces = jnp.asarray(faces, jnp.int32)
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"landmarks_3d expects vertices (B, V, 3), got shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"landmarks_3d expects faces (F, 3), got shape {faces.shape}")
    corners = vertices[:, faces[jnp.asarray(embedding.face_index)]]               # (B, 68, 3, 3)
    points = jnp.einsum("blkc,lk->blc", corners, jnp.asarray(embedding.barycentric, jnp.float32))
    if yaw is not None and embedding.dynamic_face_index is not None:
        yaw = jnp.asarray(yaw, jnp.float32)
        if yaw.shape != vertices.shape[:1]:
            raise ValueError(f"landmarks_3d expects yaw (B,) = {vertices.shape[:1]}, got shape {yaw.shape}")

        def contour(rows):
            contour_faces = jnp.asarray(embedding.dynamic_face_index)[rows]             # (B, 17)
            contour_bary = jnp.asarray(embedding.dynamic_barycentric, jnp.float32)[rows]  # (B, 17, 3)
            corners = jax.vmap(lambda v, f: v[faces[f]])(vertices, contour_faces)       # (B, 17, 3, 3)
            return jnp.einsum("blkc,blk->blc", corners, contour_bary)

        if interpolate:
            row0, row1, alpha = dynamic_rows_blend(yaw)
            points = points.at[:, :NUM_CONTOUR].set((1.0 - alpha)[:, None, None] * contour(row0)
                                                    + alpha[:, None, None] * contour(row1))
        else:
            points = points.at[:, :NUM_CONTOUR].set(contour(dynamic_row(yaw)))
    elif not embedding.has_contour:
        points = points.at[:, :NUM_CONTOUR].set(jnp.nan)
    return points


# ----------------------------------------------------------------------------- template head
@functools.lru_cache(maxsize=1)
def template_embedding() -> LandmarkEmbedding:
    """The embedded template head's 68-point embedding (static and dynamic contour).

    Built from the template's geometry and constants, deterministically (the head's own
    construction is): 3D anchors in rest pose, each placed on a skin triangle (never the
    eyeballs or the mouth cavity) by an orthographic ray from the front, the way a frontal
    photo sees the face:
      jaw contour   the face's frontal outline, in front of the ears: the outermost skin
                    from the height a quarter of the way from the eyes to the nose tip,
                    down the cheeks to the jaw-skinned chin (the neck below it is left out,
                    so points 4-12 lie on jaw-skinned skin), 17 points equally spaced along
                    it, each 1 mm inside the outline;
      brows         an arch over each eye on the brow ridge (x 15..54 mm from the midline);
      nose          27 between the eyes at the upper-lid height down to the tip (30, the
                    most forward midline point), 31-35 along the nostril base;
      eyes          the edge of the almond-shaped eye opening (`_FISSURE_HALF_WIDTH`,
                    `_FISSURE_HALF_HEIGHT` around EYE_CENTRE_XY), found where the frontal
                    ray stops hitting the eyeball: corners and lids at 1/3, 2/3 of the width;
      outer lips    corners at the slit's ends (about MOUTH_HALF_WIDTH on MOUTH_LINE_Y);
                    upper/lower vermilion borders (the lip bumps' outer edges);
      inner lips    on the upper-lip / lower-lip copies of the mouth line, so a jaw opening
                    separates 61-63 (head) from 65-67 (jaw).
    The dynamic contour (one row per integer yaw, `dynamic_row`) slides each contour point
    inward over the skin to the turned head's outline where the turn hides it (the side
    turning away from the camera), and keeps it where it stays the outermost point.
    """
    return _build_template_embedding()


# Anchor offsets (metres, FLAME axes) relative to the template's constants. Brows: an arch
# over each eye on the brow ridge (the ridge bump is centred 18 mm above the eye centre);
# offsets from EYE_CENTRE_XY, outer end first (point 17/26).
_BROW_DX = (0.022, 0.013, 0.003, -0.007, -0.017)
_BROW_DY = (0.011, 0.018, 0.021, 0.021, 0.017)
_NOSE_TOP_DY = 0.004             # point 27: the upper-lid height, between the eyes
_SUBNASALE_FRACTION = 0.4        # point 33: 40 % of the way from the nose tip to the lip line
_NOSTRIL_X = (0.011, 0.0055)     # points 31/35, 32/34 (|x|); alar base bumps at |x| 13.5 mm
_NOSTRIL_DY = (0.003, 0.001)     # ... their height above point 33
_LIP_X = (0.6, 0.3)              # points 49/53, 50/52 (and 55/59, 56/58): fraction of the
                                 # corner's |x| (50/52 ~ the Cupid's bow peaks)
_INNER_LIP_X = 0.5               # points 61/63, 65/67: fraction of the corner's |x|
_INNER_CORNER_INSET = 0.002      # points 60/64: 2 mm inside the mouth corners
_CONTOUR_INSET = 0.001           # contour points 1 mm inside the frontal outline
_CONTOUR_TOP_FRACTION = 0.25     # contour ends 1/4 of the way from the eyes to the nose tip
_CONTOUR_CENTRE_Y = -0.03        # outline swept around (0, -0.03), the mid-lower face
_EAR_FRONT_Z = -0.028            # the ear's tragus: skin behind is ear / back of the head


def _template_geometry():
    """Rest vertices (V, 3), faces (F, 3), skinning weights (V, 5), construction tags and
    the geometry dict of the template head (float64 numpy)."""
    # The construction's tags say which vertices are skin, eyeballs or mouth cavity and
    # which are the lip copies of the mouth slit: nothing in the FLAME-layout arrays does.
    from reta3d import flame, template_head
    arrays = flame._template_arrays()
    geometry = template_head._build_geometry()
    vertices, faces, _, _, tags = template_head._assemble(geometry)
    if vertices.shape != arrays["v_template"].shape or not np.array_equal(faces, arrays["f"]):
        raise RuntimeError("template head: its construction tags do not match its mesh")
    return arrays["v_template"], faces, arrays["weights"], tags, geometry


def _frontal_hits(vertices, faces, candidates, xy):
    """Orthographic rays along -z at points xy (N, 2): the first candidate triangle hit.

    Returns face ids (N,) (-1 where nothing is hit), barycentric (N, 3) and points (N, 3).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    tri = vertices[faces[candidates]]                                   # (F, 3, 3)
    lo, hi = tri[:, :, :2].min(axis=1), tri[:, :, :2].max(axis=1)
    face_ids = np.full(len(xy), -1, np.int64)
    bary = np.zeros((len(xy), 3))
    for i, p in enumerate(xy):
        near = np.where(np.all((lo <= p + 1e-9) & (hi >= p - 1e-9), axis=1))[0]
        if len(near) == 0:
            continue
        a, b, c = tri[near, 0], tri[near, 1], tri[near, 2]
        e1, e2, d = b[:, :2] - a[:, :2], c[:, :2] - a[:, :2], p - a[:, :2]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        ok = np.abs(det) > 1e-14
        det = np.where(ok, det, 1.0)
        l1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / det
        l2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / det
        l0 = 1.0 - l1 - l2
        inside = ok & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        if not inside.any():
            continue
        z = np.where(inside, l0 * a[:, 2] + l1 * b[:, 2] + l2 * c[:, 2], -np.inf)
        k = int(np.argmax(z))
        face_ids[i] = candidates[near[k]]
        bary[i] = np.clip([l0[k], l1[k], l2[k]], 0.0, 1.0)
        bary[i] /= bary[i].sum()
    points = np.einsum("nkc,nk->nc", vertices[faces[np.maximum(face_ids, 0)]], bary)
    return face_ids, bary, points


def _outline_radius(points_xy, centre, angles, window=np.deg2rad(2.0)):
    """Outermost radius of 2D points around `centre` in each direction (sin a, -cos a)."""
    rel = points_xy - centre
    point_angles = np.arctan2(rel[:, 0], -rel[:, 1])
    radius = np.linalg.norm(rel, axis=-1)
    out = np.empty(len(angles))
    for i, a in enumerate(angles):
        diff = np.abs((point_angles - a + np.pi) % (2.0 * np.pi) - np.pi)
        inside = diff < window
        # Project on the ray direction so that the window's width does not bias the radius.
        out[i] = np.max(np.where(inside, radius * np.cos(diff), 0.0))
    return out


def _contour_region(vertices, faces, weights, skin_vertex):
    """Vertices and faces that may carry the jaw contour: skin in front of the ears, down
    to the jaw-skinned chin (the neck below it, skinned to the neck joint, is left out)."""
    y, z = vertices[:, 1], vertices[:, 2]
    region = skin_vertex & (z > _EAR_FRONT_Z) & ((y > -0.06) | (weights[:, 2] >= 0.5))
    region_faces = np.where(region[faces].all(axis=1))[0]
    region = np.zeros_like(region)
    region[faces[region_faces].reshape(-1)] = True     # only vertices of whole region faces
    return region, region_faces


def _static_contour(vertices, faces, region, region_faces, y_end):
    """17 contour points (face ids, barycentric) on the rest head seen from the front."""
    centre = np.array([0.0, _CONTOUR_CENTRE_Y])
    angles = np.linspace(0.0, np.deg2rad(150.0), 301)
    radius = _outline_radius(vertices[region, :2], centre, angles)
    radius = np.convolve(np.pad(radius, 3, mode="edge"), np.ones(7) / 7.0, mode="valid")
    outline = centre + radius[:, None] * np.stack([np.sin(angles), -np.cos(angles)], -1)
    end = int(np.argmax(outline[:, 1] >= y_end))          # first sample at the top height
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(outline[:end + 1], axis=0), axis=-1))])
    targets = np.linspace(0.0, arc[-1], 9)                # points 8 (chin) .. 16
    half_angles = np.interp(targets, arc, angles[:end + 1])
    half_radius = np.interp(targets, arc, radius[:end + 1]) - _CONTOUR_INSET
    right = centre + half_radius[:, None] * np.stack([np.sin(half_angles), -np.cos(half_angles)], -1)
    xy = np.concatenate([right[::-1] * [-1.0, 1.0], right[1:]])   # points 0..16, x < 0 first
    xy[8, 0] = 0.0
    face_ids, bary, _ = _frontal_hits(vertices, faces, region_faces, xy)
    if np.any(face_ids < 0):
        raise RuntimeError("template head: a jaw contour point missed the face")
    return face_ids, bary


def _dynamic_contour(vertices, faces, region_faces, static_faces, static_bary):
    """(79, 17) faces and barycentrics: per integer yaw (rows as `dynamic_row`), where each
    contour point is seen on the turned head.

    Each point slides on a fixed path over the skin: the frontal rays from its rest position
    toward the outline's centre (0, _CONTOUR_CENTRE_Y), sampled every ~0.3 mm. At yaw a the
    point is the path sample that lies outermost in the turned view, along the path's own
    outward image direction: the static point while nothing of the path sticks out beyond
    it (the side turning toward the camera), the turned head's outline on the side turning
    away. The outermost image position is continuous in the yaw, so the contour slides.
    """
    static_points = np.einsum("nkc,nk->nc", vertices[faces[static_faces]], static_bary)
    centre = np.array([0.0, _CONTOUR_CENTRE_Y])
    fractions = np.linspace(0.0, 0.9, 241)
    dyn_faces = np.zeros((NUM_DYNAMIC_ROWS, NUM_CONTOUR), np.int64)
    dyn_bary = np.zeros((NUM_DYNAMIC_ROWS, NUM_CONTOUR, 3))
    degrees = np.arange(-MAX_DYNAMIC_YAW, MAX_DYNAMIC_YAW + 1)
    rows = np.where(degrees >= 0, degrees, MAX_DYNAMIC_YAW - degrees)
    yaws = np.deg2rad(degrees)
    for k in range(NUM_CONTOUR):
        start = static_points[k, :2]
        xy = start + fractions[:, None] * (centre - start)
        face_ids, bary, points = _frontal_hits(vertices, faces, region_faces, xy)
        face_ids[0], bary[0], points[0] = static_faces[k], static_bary[k], static_points[k]
        valid = face_ids >= 0
        face_ids, bary, points = face_ids[valid], bary[valid], points[valid]
        # Turned image x of each sample (rotation about y; y is unchanged): x cos a + z sin a.
        turned_x = np.cos(yaws)[:, None] * points[None, :, 0] + np.sin(yaws)[:, None] * points[None, :, 2]
        turned = np.stack([turned_x, np.broadcast_to(points[None, :, 1], turned_x.shape)], -1)
        outward = turned[:, 0] - turned[:, -1]
        outward /= np.linalg.norm(outward, axis=-1, keepdims=True)
        best = np.argmax(np.einsum("ysc,yc->ys", turned, outward), axis=1)
        dyn_faces[rows, k], dyn_bary[rows, k] = face_ids[best], bary[best]
    return dyn_faces, dyn_bary


def _slit_point(vertices, faces, chain, skin_faces, x):
    """A point on the mouth slit's lip edge (a chain of vertex ids along increasing x) at
    height of the chain, at the given x: (face id, barycentric) of the lip-side triangle."""
    xs = vertices[chain, 0]
    j = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(chain) - 2))
    s = float(np.clip((x - xs[j]) / (xs[j + 1] - xs[j]), 0.0, 1.0))
    a, b = chain[j], chain[j + 1]
    candidates = [f for f in skin_faces[np.isin(faces[skin_faces], [a, b]).sum(axis=1) == 2]]
    if len(candidates) != 1:
        raise RuntimeError("template head: a mouth-slit edge does not have one lip triangle")
    face = candidates[0]
    bary = np.array([(1.0 - s) * (v == a) + s * (v == b) for v in faces[face]], np.float64)
    return face, bary


def _eye_margin_points(vertices, faces, skin_faces, eye_faces, centre_xy):
    """Points 36-41 of the eye at centre_xy (x < 0) or 42-47 (x > 0): (6,) faces, (6, 3) bary.

    Along rays from the fissure centre through the almond's corners and its lids at 1/3,
    2/3 of the width, the lid margin is the first point whose frontal ray meets the skin
    rather than the eyeball.
    """
    from reta3d import template_head as th
    w, h = th._FISSURE_HALF_WIDTH, th._FISSURE_HALF_HEIGHT
    cx, cy = centre_xy[0], centre_xy[1] + 0.0008        # the fissure mask's own centre offset
    outward = np.sign(cx)                                # +1: x grows away from the nose
    # Image order: outer corner, upper lids toward the nose, inner corner, lower lids back.
    # (dx in units of the half width, positive = away from the nose; lid: +1 upper, -1 lower)
    layout = [(1.0, 0.0), (1.0 / 3.0, 1.0), (-1.0 / 3.0, 1.0), (-1.0, 0.0), (-1.0 / 3.0, -1.0),
              (1.0 / 3.0, -1.0)]
    if outward > 0:   # image-right eye starts at its inner corner: 42 inner, 43-44 upper, ...
        layout = [(-1.0, 0.0), (-1.0 / 3.0, 1.0), (1.0 / 3.0, 1.0), (1.0, 0.0), (1.0 / 3.0, -1.0),
                  (-1.0 / 3.0, -1.0)]
    candidates = np.concatenate([skin_faces, eye_faces])
    eye_set = set(eye_faces.tolist())
    out_faces, out_bary = [], []
    scales = np.arange(0.2, 1.8, 0.005)
    for t, lid in layout:
        direction = np.array([outward * t * w, lid * h * np.sqrt(max(1.0 - t * t, 0.0))])
        if lid == 0.0:
            direction = np.array([outward * t * w, 0.0])
        xy = np.array([cx, cy]) + scales[:, None] * direction
        face_ids, bary, _ = _frontal_hits(vertices, faces, candidates, xy)
        on_skin = np.array([f >= 0 and f not in eye_set for f in face_ids])
        k = int(np.argmax(on_skin))
        if not on_skin[k]:
            raise RuntimeError("template head: no eyelid margin found")
        out_faces.append(face_ids[k])
        out_bary.append(bary[k])
    return np.array(out_faces), np.array(out_bary)


def _build_template_embedding() -> LandmarkEmbedding:
    from reta3d import template_head as th
    vertices, faces, weights, tags, geometry = _template_geometry()
    kind = tags["kind"]
    skin_vertex = kind == 0
    skin_faces = np.where(skin_vertex[faces].all(axis=1))[0]
    eye_faces = np.where(((kind == 2) | (kind == 3))[faces].all(axis=1))[0]
    front_skin = skin_faces[vertices[faces[skin_faces], 2].min(axis=1) > 0.0]
    eye_x, eye_y = th.EYE_CENTRE_XY

    # Nose tip: the most forward skin point on the midline.
    midline = skin_vertex & (np.abs(vertices[:, 0]) < 1e-9)
    tip_y = vertices[midline][np.argmax(vertices[midline, 2]), 1]
    mouth_ids = tags["mouth_row_ids"]
    c0, c1 = geometry["slit"]
    corner_ids = np.array([mouth_ids[c0], mouth_ids[c1]])
    corner_x = float(np.abs(vertices[corner_ids, 0]).mean())
    upper_chain = mouth_ids[c0:c1 + 1]
    lower_chain = np.concatenate([[mouth_ids[c0]], tags["lower_copies"], [mouth_ids[c1]]])
    mouth_line = lambda x: np.interp(x, vertices[upper_chain, 0], vertices[upper_chain, 1])  # noqa: E731

    xy = {}
    for i in range(5):                                                      # brows 17-26
        xy[17 + i] = (-(eye_x + _BROW_DX[i]), eye_y + _BROW_DY[i])
        xy[26 - i] = (eye_x + _BROW_DX[i], eye_y + _BROW_DY[i])
    top_y = eye_y + _NOSE_TOP_DY                                             # nose 27-30
    for i in range(4):
        xy[27 + i] = (0.0, top_y + (tip_y - top_y) * i / 3.0)
    base_y = tip_y + _SUBNASALE_FRACTION * (th.MOUTH_LINE_Y - tip_y)         # nostrils 31-35
    xy[33] = (0.0, base_y)
    for i in range(2):
        xy[31 + i] = (-_NOSTRIL_X[i], base_y + _NOSTRIL_DY[i])
        xy[35 - i] = (_NOSTRIL_X[i], base_y + _NOSTRIL_DY[i])

    # Lips: the vermilion borders of `template_head._lip_height`: bumps centred t above /
    # below the line (t = 1.2 mm + 4.0 / 5.2 mm * taper^0.7, width 0.8 t); the border is
    # taken 0.8 widths beyond the centre, at 1.64 t.
    def border(x, upper):
        taper = np.clip(1.0 - (x / 0.026) ** 2, 0.0, None) ** 0.7
        t = 0.0012 + (0.0040 if upper else 0.0052) * taper
        return mouth_line(x) + (1.64 * t if upper else -1.64 * t)

    outer_x = {49: -_LIP_X[0], 50: -_LIP_X[1], 51: 0.0, 52: _LIP_X[1], 53: _LIP_X[0],
               55: _LIP_X[0], 56: _LIP_X[1], 57: 0.0, 58: -_LIP_X[1], 59: -_LIP_X[0]}
    for i, fraction in outer_x.items():
        x = fraction * corner_x
        xy[i] = (x, border(x, upper=i <= 53))
    for i, k in ((48, 0), (54, 1)):
        xy[i] = tuple(vertices[corner_ids[k], :2])

    face_index = np.zeros(NUM_LANDMARKS, np.int64)
    barycentric = np.zeros((NUM_LANDMARKS, 3))
    ids = sorted(xy)
    hits, bary, _ = _frontal_hits(vertices, faces, front_skin, np.array([xy[i] for i in ids]))
    if np.any(hits < 0):
        raise RuntimeError("template head: a landmark ray missed the face")
    face_index[ids], barycentric[ids] = hits, bary

    for eye_centre, first in (((-eye_x, eye_y), 36), ((eye_x, eye_y), 42)):   # eyes
        f, b = _eye_margin_points(vertices, faces, front_skin, eye_faces, eye_centre)
        face_index[first:first + 6], barycentric[first:first + 6] = f, b

    inner = {60: (upper_chain, -(corner_x - _INNER_CORNER_INSET)),
             61: (upper_chain, -_INNER_LIP_X * corner_x), 62: (upper_chain, 0.0),
             63: (upper_chain, _INNER_LIP_X * corner_x),
             64: (upper_chain, corner_x - _INNER_CORNER_INSET),
             65: (lower_chain, _INNER_LIP_X * corner_x), 66: (lower_chain, 0.0),
             67: (lower_chain, -_INNER_LIP_X * corner_x)}
    for i, (chain, x) in inner.items():
        face_index[i], barycentric[i] = _slit_point(vertices, faces, chain, skin_faces, x)

    region, region_faces = _contour_region(vertices, faces, weights, skin_vertex)
    y_end = eye_y - _CONTOUR_TOP_FRACTION * (eye_y - tip_y)
    contour_faces, contour_bary = _static_contour(vertices, faces, region, region_faces, y_end)
    face_index[:NUM_CONTOUR], barycentric[:NUM_CONTOUR] = contour_faces, contour_bary
    dyn_faces, dyn_bary = _dynamic_contour(vertices, faces, region_faces, contour_faces, contour_bary)
    arrays = [face_index.astype(np.int32), barycentric.astype(np.float32), dyn_faces.astype(np.int32),
              dyn_bary.astype(np.float32)]
    for array in arrays:          # template_embedding() is cached and shared: keep it intact
        array.setflags(write=False)
    return LandmarkEmbedding(*arrays, "template head", True)


# ----------------------------------------------------------------------------- files
def load_embedding(path, model, dynamic_path=None) -> LandmarkEmbedding:
    """A FLAME landmark embedding from the user's file, checked against `model`.

    path: DECA's `landmark_embedding.npy` (keys static_lmk_faces_idx (51,),
      static_lmk_bary_coords (51, 3), dynamic_lmk_faces_idx (79, 17),
      dynamic_lmk_bary_coords (79, 17, 3), full_lmk_faces_idx (1, 68),
      full_lmk_bary_coords (1, 68, 3)), or FLAME's `flame_static_embedding.pkl` (lmk_face_idx
      (51,), lmk_b_coords (51, 3): points 17-67).
    dynamic_path: FLAME's `flame_dynamic_embedding.npy` (lmk_face_idx (79, 17),
      lmk_b_coords (79, 17, 3)), optional and only with FLAME's static file.
    model: the `reta3d.flame.FlameModel` the embedding is for (face indices are checked
      against its triangles).
    DECA's file: points 17-67 come from its static embedding, 0-16 from its full_lmk (the 3D
    jaw contour, used when no yaw is given) and the dynamic table. FLAME's files: 17-67 from
    the static file, 0-16 from the dynamic table's yaw-0 row (without a dynamic file there
    is no contour: `has_contour` False).
    Files are unpickled by a restricted unpickler (numpy arrays, plain containers, torch's
    legacy tensor format decoded without torch); nothing else is ever constructed.
    Raises FileNotFoundError (with where to get the file) and ValueError naming the file for
    a wrong kind of file, missing keys, wrong shapes, face indices outside
    [0, model.num_faces), negative barycentric coordinates or rows not summing to 1 (1e-3).
    """
    path = Path(path)
    _require(path)
    data = _read_pickled_dict(path)
    num_faces = int(model.num_faces)
    if "static_lmk_faces_idx" in data:                                   # DECA
        if dynamic_path is not None:
            raise errors.InputError(f"{path}: DECA's landmark_embedding.npy holds its own dynamic contour; "
                             "dynamic_path is only for FLAME's flame_static_embedding.pkl")
        need = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
                "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")
        _require_keys(data, need, path, "DECA's landmark_embedding.npy")
        static_f = _faces(data["static_lmk_faces_idx"], (NUM_STATIC,), "static_lmk_faces_idx", path, num_faces)
        static_b = _bary(data["static_lmk_bary_coords"], (NUM_STATIC, 3), "static_lmk_bary_coords", path)
        full_f = _faces(data["full_lmk_faces_idx"], (1, NUM_LANDMARKS), "full_lmk_faces_idx", path, num_faces)[0]
        full_b = _bary(data["full_lmk_bary_coords"], (1, NUM_LANDMARKS, 3), "full_lmk_bary_coords", path)[0]
        dyn_f = _faces(data["dynamic_lmk_faces_idx"], (NUM_DYNAMIC_ROWS, NUM_CONTOUR),
                       "dynamic_lmk_faces_idx", path, num_faces)
        dyn_b = _bary(data["dynamic_lmk_bary_coords"], (NUM_DYNAMIC_ROWS, NUM_CONTOUR, 3),
                      "dynamic_lmk_bary_coords", path)
        face_index = np.concatenate([full_f[:NUM_CONTOUR], static_f])
        barycentric = np.concatenate([full_b[:NUM_CONTOUR], static_b])
        return LandmarkEmbedding(face_index.astype(np.int32), barycentric.astype(np.float32),
                                 dyn_f.astype(np.int32), dyn_b.astype(np.float32), str(path), True)
    if "lmk_face_idx" in data or "lmk_b_coords" in data:                 # FLAME
        _require_keys(data, ("lmk_face_idx", "lmk_b_coords"), path, "FLAME's flame_static_embedding.pkl")
        if np.asarray(data["lmk_face_idx"]).ndim == 2:
            raise errors.InputError(f"{path}: this is a dynamic (79 x 17) contour embedding; pass FLAME's "
                             "flame_static_embedding.pkl as path and this file as dynamic_path")
        static_f = _faces(data["lmk_face_idx"], (NUM_STATIC,), "lmk_face_idx", path, num_faces)
        static_b = _bary(data["lmk_b_coords"], (NUM_STATIC, 3), "lmk_b_coords", path)
        dyn_f = dyn_b = None
        source = str(path)
        if dynamic_path is not None:
            dynamic_path = Path(dynamic_path)
            _require(dynamic_path)
            dyn = _read_pickled_dict(dynamic_path)
            _require_keys(dyn, ("lmk_face_idx", "lmk_b_coords"), dynamic_path,
                          "FLAME's flame_dynamic_embedding.npy")
            dyn_f = _faces(dyn["lmk_face_idx"], (NUM_DYNAMIC_ROWS, NUM_CONTOUR), "lmk_face_idx",
                           dynamic_path, num_faces).astype(np.int32)
            dyn_b = _bary(dyn["lmk_b_coords"], (NUM_DYNAMIC_ROWS, NUM_CONTOUR, 3), "lmk_b_coords",
                          dynamic_path).astype(np.float32)
            contour_f, contour_b = dyn_f[0], dyn_b[0]                    # yaw 0
            source = f"{path} + {dynamic_path}"
        else:
            contour_f = np.zeros(NUM_CONTOUR, np.int64)
            contour_b = np.tile(np.array([1.0, 0.0, 0.0]), (NUM_CONTOUR, 1))
        return LandmarkEmbedding(np.concatenate([contour_f, static_f]).astype(np.int32),
                                 np.concatenate([contour_b, static_b]).astype(np.float32),
                                 dyn_f, dyn_b, source, dynamic_path is not None)
    raise errors.InputError(f"{path}: not a landmark embedding: found keys {sorted(data)[:8]}; expected "
                     "DECA's landmark_embedding.npy (static_lmk_faces_idx, ...) or FLAME's "
                     "flame_static_embedding.pkl (lmk_face_idx, lmk_b_coords)")


def _require(path: Path):
    if not path.exists():
        raise errors.MissingInputError(
            f"landmark embedding file not found: {path} ({_EMBEDDING_HINT})")
    if not path.is_file():
        raise errors.MissingInputError(f"landmark embedding path is not a file: {path}")


def _require_keys(data, keys, path, what):
    missing = [key for key in keys if key not in data]
    if missing:
        raise errors.InputError(f"{path}: missing key(s) {missing} ({what} holds {', '.join(keys)})")


def _faces(value, shape, key, path, num_faces) -> np.ndarray:
    array = _to_numpy(value, key, path)
    if array.shape != shape:
        raise errors.InputError(f"{path}: '{key}' must have shape {shape}, got {array.shape}")
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)   # some exports store indices as floats
    if array.dtype.kind not in "iu":
        raise errors.InputError(f"{path}: '{key}' must hold integer face indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_faces):
        raise errors.InputError(f"{path}: '{key}' has face indices in [{array.min()}, {array.max()}] but the "
                         f"head model has {num_faces} faces: the embedding is for another mesh")
    return array


def _bary(value, shape, key, path) -> np.ndarray:
    array = _to_numpy(value, key, path)
    if array.shape != shape:
        raise errors.InputError(f"{path}: '{key}' must have shape {shape}, got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise errors.InputError(f"{path}: '{key}' must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise errors.InputError(f"{path}: '{key}' has non-finite barycentric coordinates")
    if array.min() < -_BARY_TOLERANCE:
        raise errors.InputError(f"{path}: '{key}' has negative barycentric coordinates (min {array.min():.4g})")
    error = np.abs(array.sum(axis=-1) - 1.0).max()
    if error > _BARY_TOLERANCE:
        raise errors.InputError(f"{path}: '{key}' rows must sum to 1 (barycentric coordinates); off by up to {error:.4g}")
    return array


def _to_numpy(value, key, path) -> np.ndarray:
    if isinstance(value, _TorchStorage):
        raise errors.InputError(f"{path}: '{key}' is a bare torch storage, not a tensor")
    try:
        return np.asarray(value)
    except Exception as error:   # a foreign object the unpickler let through as a container
        raise errors.InputError(f"{path}: '{key}' is not an array ({type(error).__name__}: {error})") from None


# --- restricted unpickling --------------------------------------------------------------------
# torch's legacy storage classes (their pickled names) -> numpy dtypes.
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass
class _TorchStorage:
    """A decoded torch storage: its flat numpy data."""
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch.*Storage class named inside a legacy torch file."""
    dtype: type


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied."""
    if not isinstance(storage, _TorchStorage):
        raise pickle.UnpicklingError("torch tensor without a decoded storage")
    data = storage.data
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError("torch tensor with negative size, stride or offset")
    if not size:
        return data[offset].copy()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= data.size:
        raise pickle.UnpicklingError("torch tensor reaches past its storage")
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                           strides=tuple(s * data.itemsize for s in stride))
    return np.array(view)


def _load_legacy_torch_bytes(payload: bytes):
    """torch.storage._load_from_bytes without torch: decode torch's legacy (non-zip) format.

    Layout (torch/serialization.py `_legacy_save`): pickles of the magic number, the protocol
    version and a sys-info dict, then the object's pickle whose storages are persistent ids
    ('storage', StorageClass, key, location, numel, view), then the sorted storage keys,
    then per key an int64 element count and the raw little-endian data.
    """
    buffer = io.BytesIO(bytes(payload))
    for _ in range(3):                                    # magic number, protocol, sys info
        _EmbeddingUnpickler(buffer, encoding="latin1").load()
    storages = {}

    class Loader(_EmbeddingUnpickler):
        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise pickle.UnpicklingError(f"unsupported persistent id in a torch file: {pid!r:.80}")
            key = str(pid[2])
            storages.setdefault(key, _TorchStorage(np.zeros(0, pid[1].dtype)))
            return storages[key]

    obj = Loader(buffer, encoding="latin1").load()
    keys = _EmbeddingUnpickler(buffer, encoding="latin1").load()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise pickle.UnpicklingError(f"torch file stores an unknown storage {key!r:.40}")
        count = struct.unpack("<q", buffer.read(8))[0]
        dtype = storage.data.dtype
        raw = buffer.read(count * dtype.itemsize)
        if count < 0 or len(raw) != count * dtype.itemsize:
            raise pickle.UnpicklingError("torch file ends inside a storage")
        storage.data = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
    return obj


def _torch_class(module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor
    if module == "torch.storage" and name == "_load_from_bytes":
        return _load_legacy_torch_bytes
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
        return _StorageType(_TORCH_STORAGE_DTYPES[name])
    return None


def _flame_unpickler():
    from reta3d.flame import _FlameUnpickler
    return _FlameUnpickler


class _EmbeddingUnpickler(_flame_unpickler()):
    """reta3d.flame's restricted unpickler (numpy, plain containers, chumpy stand-ins) plus
    torch's tensor classes, replaced by the numpy decoders above."""

    def find_class(self, module, name):
        replacement = _torch_class(module, name)
        if replacement is not None:
            return replacement
        return super().find_class(module, name)


def _read_pickled_dict(path: Path) -> dict:
    """The dict inside a pickle (.pkl) or an np.save'd object array (.npy), safely."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as handle:
            if suffix == ".npy":
                data = _read_npy(handle, path)
            elif suffix == ".pkl":
                data = _EmbeddingUnpickler(handle, encoding="latin1").load()
            else:
                raise errors.InputError(f"{path}: unsupported landmark embedding file type '{suffix}' "
                                 "(expected DECA's .npy or FLAME's .pkl)")
    except ValueError:
        raise
    except Exception as error:   # any failure to decode is a corrupt or foreign file
        raise errors.InputError(f"{path}: could not be read as a landmark embedding "
                         f"({type(error).__name__}: {error})") from None
    if isinstance(data, np.ndarray) and data.dtype == object and data.shape == ():
        data = data[()]
    if not isinstance(data, dict):
        raise errors.InputError(f"{path}: a landmark embedding file holds a dict, found {type(data).__name__}")
    return {str(key): value for key, value in data.items()}


def _read_npy(handle, path: Path):
    from numpy.lib import format as npy_format
    try:
        version = npy_format.read_magic(handle)
    except ValueError:
        raise errors.InputError(f"{path}: not a .npy file") from None
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = npy_format.read_array_header_2_0(handle)
    if dtype.hasobject:
        # np.save pickles object arrays after the header; unpickle it ourselves, restricted.
        return _EmbeddingUnpickler(handle, encoding="latin1").load()
    raise errors.InputError(f"{path}: holds a plain {dtype} array of shape {shape}, not a landmark "
                     "embedding dict (np.save of a dict)")
