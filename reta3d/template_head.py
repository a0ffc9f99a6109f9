"""The embedded procedural template head: a stand-in for FLAME with FLAME's data layout.

RETA3D binds Gaussians to the FLAME mesh. FLAME cannot be shipped (licence), so without
the user's FLAME files the project runs on this head, built from code in a fraction of a
second, deterministically (identical arrays on every run; no random numbers, no assets).

Units and axes are FLAME's: metres, y up, the face looking toward +z, the subject's left
at +x; the template has FLAME's rough size and placement (x about +-0.09 with the ears,
y from -0.165 at the neck bottom to +0.11 at the crown, nose tip near z = +0.083), so the
one FLAME -> EG3D-world similarity in `reta3d.flame` fits both heads.

Construction
- Base surface: the zero set of a smooth signed distance function (smooth union of
  ellipsoids for cranium, midface, mandible and chin, and an elliptic neck cylinder cut
  flat at the bottom), sampled by rays from one interior point on a latitude/longitude
  grid: `NUM_RINGS` rings between the crown pole and the neck-bottom pole, `NUM_COLUMNS`
  columns (denser over the face). Rows and columns are spaced by arc length with extra
  density on the face, and one ring passes exactly through the mouth line.
- Features are smooth displacements of that surface (Gaussian-type falloff): nose, brow
  ridge, cheekbones, lips, philtrum, chin groove, ear bumps with a concha bowl, and eye
  sockets whose skin follows a lid surface just in front of the eyeball and dips behind it
  inside an almond-shaped eye opening, so the eyeball shows there.
- Mouth: the mouth-line ring is split between the mouth corners (upper-lip and lower-lip
  copies of the same rest positions), and the slit is closed from the inside by a mouth
  cavity (rings stepping back and shrinking into the head, closed by a throat line), so
  the whole mesh stays closed: every edge is shared by exactly two faces. The neck bottom
  is closed by its pole. Lower-lip copies and the cavity's lower half are skinned to the
  jaw, so a jaw rotation opens the mouth into the cavity.
- Eyes: two separate UV-sphere meshes (radius 12 mm), skinned 100 % to the eye joints.
- Faces are wound counter-clockwise seen from outside (outward normals).

UV layout (v up, as in OBJ files): a cylindrical unwrap of the grid with the seam at the
back of the head: u follows the column index (the face, with its denser columns, takes
the middle ~60 % of u), v follows the ring index from the crown (v = 1) down to the neck
bottom (v = `GRID_UV_BOTTOM`). The mouth slit is opened into a lens in UV and the mouth
cavity is mapped inside the lens, so the lips and the inside of the mouth lie together
in `mouth_rect`. The two eyeballs are small disks (azimuthal unwrap around the gaze axis)
in the bottom-left corner, below the grid. No two UV triangles overlap.

Blend shapes, FLAME-style: `shapedirs` holds `NUM_SHAPE` identity components then
`NUM_EXPRESSION` expression components (names in `SHAPE_NAMES`, `EXPRESSION_NAMES`), one
coefficient ~ one standard deviation (1-13 mm at most; blink = 1 closes the eyes). Each
is a smooth displacement field with compact support (tapered Gaussians). Eyeballs move
rigidly with the skin around them under identity components (so they stay spheres) and
not at all under expressions; the mouth cavity follows the lips of its column. `posedirs`
are small smooth pose correctives (throat bulge when nodding, neck-side bulges when
turning, hollow cheeks and an under-chin bulge when the jaw opens). `J_regressor` rows are
non-negative, sum to 1 and average the vertices around each joint (maximum-entropy
weights solved so that the template's joints sit exactly at the designed rest joints of
`_joint_locations`), so joints follow the shape. Skinning weights are harmonic
interpolations (uniform graph Laplacian) between regions fixed to one joint: cranium and
upper lip to the neck joint, lower lip/chin/jaw to the jaw, the lower neck to the global
joint, eyeballs to their eye joints.

Size: ~7.3k vertices, ~14.6k triangles, 26 identity + 16 expression components.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg

# ----------------------------------------------------------------------------- layout
NUM_COLUMNS = 92          # even, so that the front midline (theta = 0) is a column
NUM_RINGS = 74            # grid rings between the two poles
CAVITY_LEVELS = 5         # cavity rings behind the lips; the last one is the throat line
EYE_RINGS = 9             # latitude rings of an eyeball, between its two poles
EYE_SEGMENTS = 16         # longitude segments of an eyeball
EYE_RADIUS = 0.012
GRID_UV_BOTTOM = 0.1      # the grid fills v in [GRID_UV_BOTTOM, 1]; eyeballs sit below
EYE_UV_CENTRES = ((0.05, 0.05), (0.15, 0.05))   # (u, v) of the left / right eye disks
EYE_UV_RADIUS = 0.045
MOUTH_LENS_HALF_HEIGHT = 0.018   # UV: half-height of the opened lip slit at its middle
MOUTH_LENS_ROWS = 3              # UV: grid rows on each side that make room for the lens

RAY_ORIGIN = np.array([0.0, -0.012, -0.034])   # inside the head; every ray leaves once
MOUTH_LINE_Y = -0.050                          # y of the lip line on the midline
MOUTH_HALF_WIDTH = 0.024                       # x of the mouth corners (approximately)
EYE_CENTRE_XY = (0.032, 0.024)                 # |x|, y of the eyeball centres

JOINT_NAMES = ("global", "neck", "jaw", "eye_left", "eye_right")
KINTREE_PARENTS = (-1, 0, 1, 1, 1)
_ROOT_PARENT = 4294967295   # FLAME stores the root's parent as uint32(-1)

SHAPE_NAMES = (
    "head_width", "head_length", "head_height", "face_length", "jaw_width", "chin_protrusion",
    "chin_height", "nose_size", "nose_projection", "nose_width", "nose_bridge", "brow_ridge",
    "cheekbones", "cheek_fullness", "ear_size", "ear_protrusion", "eye_spacing", "eye_height",
    "eye_depth", "forehead_slope", "neck_thickness", "lip_fullness", "mouth_width",
    "midface_depth", "jaw_angle", "face_asymmetry",
)
EXPRESSION_NAMES = (
    "smile", "lip_pucker", "brow_raise", "brow_furrow", "blink", "eyes_wide", "mouth_stretch",
    "frown", "cheek_puff", "lips_part", "upper_lip_raise", "lower_lip_depress", "nose_wrinkle",
    "jaw_thrust", "squint", "mouth_sideways",
)
NUM_SHAPE = len(SHAPE_NAMES)
NUM_EXPRESSION = len(EXPRESSION_NAMES)


# ----------------------------------------------------------------------------- helpers
def _smoothstep(x, edge0, edge1):
    t = np.clip((np.asarray(x, np.float64) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(p, centre, sigma):
    """exp(-|(p - centre) / sigma|^2 / 2) over the last axis; sigma scalar or per axis.

    Tapered smoothly to exactly 0 between 2.5 and 3.5 sigma, so fields built from it are
    localised: vertices far from a feature do not move at all.
    """
    d = (p - np.asarray(centre, np.float64)) / np.asarray(sigma, np.float64)
    r_sq = np.sum(d * d, axis=-1)
    return np.exp(-0.5 * r_sq) * (1.0 - _smoothstep(np.sqrt(r_sq), 2.5, 3.5))


def _bilateral(p, centre, sigma):
    """A Gaussian mirrored to both sides of the midline (centre given for x >= 0)."""
    q = np.concatenate([np.abs(p[..., :1]), p[..., 1:]], axis=-1)
    return _gauss(q, centre, sigma)


def _smin(a, b, k):
    """Polynomial smooth minimum (blend radius k): a smooth union of two distance fields."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


def _smax(a, b, k):
    return -_smin(-a, -b, k)


def _ellipsoid_sdf(p, centre, radii):
    # Inigo Quilez's bound for an ellipsoid: exact on the surface, good enough nearby.
    radii = np.asarray(radii, np.float64)
    q = (p - np.asarray(centre, np.float64)) / radii
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / radii, axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


# Base-shape primitives (centre, radii) in metres.
_CRANIUM = ((0.0, 0.018, -0.040), (0.077, 0.092, 0.100))
_MIDFACE = ((0.0, -0.028, -0.004), (0.064, 0.066, 0.062))
_MANDIBLE = ((0.0, -0.068, 0.006), (0.052, 0.036, 0.050))
_CHIN = ((0.0, -0.086, 0.032), (0.021, 0.019, 0.020))


def _neck_sdf(p):
    """Elliptic neck cylinder with a flat, slightly rounded bottom; its top hides in the head."""
    radii = np.array([0.052, 0.056])
    q = np.stack([p[..., 0], p[..., 2] + 0.036], axis=-1) / radii
    neck = (np.linalg.norm(q, axis=-1) - 1.0) * radii.min()
    neck = _smax(neck, -0.165 - p[..., 1], 0.006)
    return _smax(neck, p[..., 1] - 0.0, 0.01)


def _jaw_sdf(p):
    return np.minimum(_ellipsoid_sdf(p, *_MANDIBLE), _ellipsoid_sdf(p, *_CHIN))


def _head_sdf(p):
    """Signed distance (approximate, metres) of the base head: negative inside."""
    d = _smin(_ellipsoid_sdf(p, *_CRANIUM), _ellipsoid_sdf(p, *_MIDFACE), 0.03)
    d = _smin(d, _ellipsoid_sdf(p, *_MANDIBLE), 0.02)
    d = _smin(d, _ellipsoid_sdf(p, *_CHIN), 0.012)
    return _smin(d, _neck_sdf(p), 0.03)


def _ray_directions(polar, azimuth):
    """Unit directions: polar from +y, azimuth around y with 0 -> +z, pi/2 -> +x."""
    s = np.sin(polar)
    return np.stack([s * np.sin(azimuth), np.cos(polar), s * np.cos(azimuth)], axis=-1)


def _raycast(directions):
    """First crossing of `_head_sdf` along rays from RAY_ORIGIN: points (..., 3)."""
    steps = np.linspace(0.002, 0.322, 81)
    pts = RAY_ORIGIN + steps[:, None] * directions[..., None, :]
    outside = _head_sdf(pts) > 0
    if not np.all(outside[..., -1]):
        raise RuntimeError("template head: a ray ends inside the head (raise the march range)")
    first = np.argmax(outside, axis=-1)
    lo = steps[np.maximum(first - 1, 0)]
    hi = steps[first]
    for _ in range(32):
        mid = 0.5 * (lo + hi)
        inside = _head_sdf(RAY_ORIGIN + mid[..., None] * directions) <= 0
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return RAY_ORIGIN + (0.5 * (lo + hi))[..., None] * directions


def _vertex_normals(vertices, faces):
    """Area-weighted unit vertex normals (numpy, float64)."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    face_normals = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    return normals / np.maximum(length, 1e-300)


# ----------------------------------------------------------------------------- grid layout
def _column_angles():
    """Azimuths (C,) from -pi (back seam) through 0 (front midline), symmetric."""
    half = NUM_COLUMNS // 2
    theta = np.linspace(0.0, np.pi, 481)
    ring = _raycast(_ray_directions(np.full_like(theta, 1.45), theta))
    ds = np.linalg.norm(np.diff(ring, axis=0), axis=-1)
    mid = 0.5 * (theta[1:] + theta[:-1])
    # Extra columns over the face (more at the eyes), fewer on the back of the head.
    density = 1.0 + 2.6 * np.exp(-0.5 * (mid / 0.62) ** 2) + 0.8 * np.exp(-0.5 * ((mid - 0.42) / 0.12) ** 2)
    cumulative = np.concatenate([[0.0], np.cumsum(ds * density)])
    targets = np.linspace(0.0, cumulative[-1], half + 1)
    right = np.interp(targets, cumulative, theta)   # 0 .. pi, equal shares of the measure
    right[0], right[-1] = 0.0, np.pi
    return np.concatenate([-right[::-1][:-1], right[:-1]])   # -pi .. pi (exclusive)


def _ring_angles():
    """Polar angles (R,) of the rings, and the (0-based) row of the mouth ring.

    Rings are spaced by arc length (averaged over a few meridians) with extra density on
    the face, the eyes and the lips; one ring passes through the lip line at MOUTH_LINE_Y.
    """
    polar = np.linspace(0.0, np.pi, 721)
    ds = 0.0
    for azimuth, weight in ((0.0, 0.5), (np.pi / 2, 0.3), (np.pi, 0.2)):
        meridian = _raycast(_ray_directions(polar, np.full_like(polar, azimuth)))
        if azimuth == 0.0:
            front = meridian
        ds = ds + weight * np.linalg.norm(np.diff(meridian, axis=0), axis=-1)
    # Front-midline height decreases with the polar angle over the face: invert it.
    face = (polar > 0.6) & (polar < 2.3)
    mouth = np.interp(MOUTH_LINE_Y, front[face, 1][::-1], polar[face][::-1])
    eyes = np.interp(EYE_CENTRE_XY[1], front[face, 1][::-1], polar[face][::-1])
    mid = 0.5 * (polar[1:] + polar[:-1])
    density = (1.0 + 1.9 * np.exp(-0.5 * ((mid - 1.70) / 0.45) ** 2)
               + 0.8 * np.exp(-0.5 * ((mid - eyes) / 0.09) ** 2)
               + 0.8 * np.exp(-0.5 * ((mid - mouth) / 0.07) ** 2))
    cumulative = np.concatenate([[0.0], np.cumsum(ds * density)])
    mouth_measure = np.interp(mouth, polar, cumulative)
    intervals = NUM_RINGS + 1
    mouth_ring = int(round(intervals * mouth_measure / cumulative[-1]))
    upper = np.linspace(0.0, mouth_measure, mouth_ring + 1)
    lower = np.linspace(mouth_measure, cumulative[-1], intervals - mouth_ring + 1)
    targets = np.concatenate([upper[1:], lower[1:-1]])
    rings = np.interp(targets, cumulative, polar)
    rings[mouth_ring - 1] = mouth
    return rings, mouth_ring - 1


def _grid_faces(index):
    """Outward-wound triangles of a ring grid; index (R, C) -> vertex ids (wraps in C).

    The diagonal of each quad is mirrored between the two halves of the head so that the
    mesh is exactly left-right symmetric.
    """
    rows, cols = index.shape
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols), indexing="ij")
    jn = (j + 1) % cols
    a, b, c, d = index[i, j], index[i + 1, j], index[i + 1, jn], index[i, jn]
    left = j < cols // 2
    tri1 = np.where(left[..., None], np.stack([a, b, c], -1), np.stack([a, b, d], -1))
    tri2 = np.where(left[..., None], np.stack([a, c, d], -1), np.stack([d, b, c], -1))
    return np.concatenate([tri1.reshape(-1, 3), tri2.reshape(-1, 3)])


# ----------------------------------------------------------------------------- features
def _nose_height(p):
    """Outward height (m) of the nose over the base surface, midline profile x width."""
    x, y = p[..., 0], p[..., 1]
    nasion, tip, base = 0.020, -0.013, -0.029
    t_up = np.clip((nasion - y) / (nasion - tip), 0.0, 1.0)          # nasion -> tip
    t_down = np.clip((tip - y) / (tip - base), 0.0, 1.0)             # tip -> subnasale
    profile = np.where(y > tip, 0.15 + 0.85 * t_up ** 1.4, np.cos(0.5 * np.pi * t_down) ** 1.5)
    profile = profile * _smoothstep(y, base - 0.006, base) * (1.0 - _smoothstep(y, nasion, 0.04))
    profile = profile + 0.15 * np.exp(-0.5 * ((y - nasion) / 0.012) ** 2) * (y > tip)
    width = 0.0075 + 0.006 * np.clip((nasion - y) / (nasion - base), 0.0, 1.0)
    ridge = 0.020 * profile * np.exp(-np.abs(x / width) ** 2.2)
    alae = 0.0075 * _bilateral(p[..., :2], (0.0135, -0.022), (0.0055, 0.0055))
    return ridge + alae


def _ear_height(p):
    """Outward height (m) of the ear bumps: a rim (helix) around a bowl (concha)."""
    y, z = p[..., 1], p[..., 2]
    tilt = np.deg2rad(15.0)
    dy, dz = y + 0.004, z + 0.048
    along = np.cos(tilt) * dy - np.sin(tilt) * dz
    across = np.sin(tilt) * dy + np.cos(tilt) * dz
    r = np.sqrt((along / 0.030) ** 2 + (across / 0.017) ** 2)
    bump = 0.017 * np.exp(-r ** 4) - 0.010 * np.exp(-(r / 0.6) ** 4)
    tragus = 0.004 * np.exp(-0.5 * (((y + 0.006) / 0.004) ** 2 + ((z + 0.028) / 0.004) ** 2))
    side = _smoothstep(np.abs(p[..., 0]), 0.045, 0.062)
    return (bump + tragus) * side


def _lip_height(p, y_rel, front):
    """Outward height (m) of lips, philtrum and chin groove; y_rel = y - mouth line."""
    x = p[..., 0]
    # Vermilion: thick at the midline, tapering to nothing at the mouth corners.
    taper = np.clip(1.0 - (x / 0.026) ** 2, 0.0, None)
    thick_upper = 0.0012 + 0.0040 * taper ** 0.7
    thick_lower = 0.0012 + 0.0052 * taper ** 0.7
    upper = 0.0052 * taper ** 0.45 * np.exp(-0.5 * ((y_rel - thick_upper) / (0.8 * thick_upper)) ** 2)
    lower = 0.0058 * taper ** 0.45 * np.exp(-0.5 * ((y_rel + thick_lower) / (0.8 * thick_lower)) ** 2)
    groove = -0.0012 * np.exp(-0.5 * (y_rel / 0.0015) ** 2) * np.exp(-(x / 0.026) ** 4)
    corners = -0.0015 * _bilateral(np.stack([x, y_rel], -1), (0.027, 0.0), (0.004, 0.004))
    philtrum = -0.0012 * np.exp(-0.5 * (x / 0.0035) ** 2) * _smoothstep(y_rel, 0.009, 0.012) \
        * (1.0 - _smoothstep(y_rel, 0.017, 0.021))
    chin_groove = -0.0022 * np.exp(-0.5 * ((y_rel + 0.018) / 0.004) ** 2) \
        * np.exp(-(x / 0.02) ** 2)
    return (upper + lower + groove + corners + philtrum + chin_groove) * front


def _eye_geometry(base_vertices):
    """Eyeball centres (2, 3): 10.5 mm behind the (socketed) skin in front of them."""
    centres = []
    for sign in (1.0, -1.0):
        x, y = sign * EYE_CENTRE_XY[0], EYE_CENTRE_XY[1]
        d = np.hypot(base_vertices[..., 0] - x, base_vertices[..., 1] - y)
        front = base_vertices[..., 2] > 0
        k = np.argmin(np.where(front, d, np.inf))
        centres.append([x, y, base_vertices.reshape(-1, 3)[k, 2] - 0.0105])
    return np.array(centres)


def _lid_surface_z(dx, dy, centre_z):
    """Lid skin: a paraboloid 2.5 mm in front of the eyeball sphere everywhere."""
    r = EYE_RADIUS + 0.0025
    return centre_z + r - (dx * dx + dy * dy) / (2.0 * r)


_FISSURE_HALF_WIDTH = 0.0145
_FISSURE_HALF_HEIGHT = 0.0050


def _fissure_mask(dx, dy):
    """~1 inside the almond-shaped eye opening, 0 outside (smooth)."""
    shape = (dx / _FISSURE_HALF_WIDTH) ** 2 + ((dy - 0.0008) / _FISSURE_HALF_HEIGHT) ** 2
    return 1.0 - _smoothstep(shape, 0.3, 1.1)


def _eye_region_weight(dx, dy):
    rho = np.sqrt(dx * dx + (dy * 1.15) ** 2)
    return 1.0 - _smoothstep(rho, 0.014, 0.03)


def _apply_eyes(vertices, eye_centres):
    """Sink the skin into eye sockets: lid surface around the eyeball, recess in the opening."""
    out = vertices.copy()
    for centre in eye_centres:
        dx = out[..., 0] - centre[0]
        dy = out[..., 1] - centre[1]
        front = (out[..., 2] > 0.0).astype(np.float64)
        w = _eye_region_weight(dx, dy) * front
        z = (1.0 - w) * out[..., 2] + w * _lid_surface_z(dx, dy, centre[2])
        m = _fissure_mask(dx, dy) * front
        out[..., 2] = (1.0 - m) * z + m * (centre[2] + 0.0015)
    return out


# ----------------------------------------------------------------------------- assembly
class _Mesh:
    """Vertices, faces and UVs appended piece by piece; `add_*` return the new ids."""

    def __init__(self):
        self.vertices, self.faces, self.uvs, self.uv_faces = [], [], [], []
        self.num_vertices = 0
        self.num_uvs = 0

    def add_vertices(self, points):
        points = np.asarray(points, np.float64).reshape(-1, 3)
        start = self.num_vertices
        self.vertices.append(points)
        self.num_vertices += len(points)
        return np.arange(start, self.num_vertices)

    def add_uvs(self, uv):
        uv = np.asarray(uv, np.float64).reshape(-1, 2)
        start = self.num_uvs
        self.uvs.append(uv)
        self.num_uvs += len(uv)
        return np.arange(start, self.num_uvs)

    def add_faces(self, faces, uv_faces):
        self.faces.append(np.asarray(faces, np.int64).reshape(-1, 3))
        self.uv_faces.append(np.asarray(uv_faces, np.int64).reshape(-1, 3))


def _strip(upper, lower, flip=()):
    """Quads between two matching polylines, wound like the grid (upper row above lower).

    Quads listed in `flip` use the other diagonal (where the default one would give a
    triangle with three collinear UV corners).
    """
    a, d = upper[:-1], upper[1:]
    b, c = lower[:-1], lower[1:]
    tri1, tri2 = np.stack([a, b, c], -1), np.stack([a, c, d], -1)
    for q in flip:
        tri1[q], tri2[q] = (a[q], b[q], d[q]), (d[q], b[q], c[q])
    return np.concatenate([tri1, tri2])


def _build_geometry():
    """The head surface on its ring grid (R, C, 3) with features, poles, eyes, mouth slit."""
    columns = _column_angles()
    rings, mouth_row = _ring_angles()
    num_rows, num_cols = len(rings), len(columns)
    polar, azimuth = np.meshgrid(rings, columns, indexing="ij")
    base = _raycast(_ray_directions(polar, azimuth))                       # (R, C, 3)
    top = _raycast(_ray_directions(np.array([0.0]), np.array([0.0])))[0]
    bottom = _raycast(_ray_directions(np.array([np.pi]), np.array([0.0])))[0]

    # Normals of the base surface, from the closed grid mesh.
    grid_index = 1 + np.arange(num_rows * num_cols).reshape(num_rows, num_cols)
    pole_faces = [np.stack([np.zeros(num_cols, np.int64), grid_index[0], np.roll(grid_index[0], -1)], -1),
                  np.stack([grid_index[-1], np.full(num_cols, num_rows * num_cols + 1),
                            np.roll(grid_index[-1], -1)], -1)]
    base_faces = np.concatenate([_grid_faces(grid_index)] + pole_faces)
    base_points = np.concatenate([top[None], base.reshape(-1, 3), bottom[None]])
    normals = _vertex_normals(base_points, base_faces)[1:-1].reshape(num_rows, num_cols, 3)

    # Mouth line per column: the mouth ring's base height (lips are placed relative to it).
    front = _smoothstep(np.cos(azimuth), 0.2, 0.6)
    y_rel = base[..., 1] - base[mouth_row][None, :, 1]
    height = _nose_height(base) * front + _ear_height(base) + _lip_height(base, y_rel, front)
    height += 0.0040 * _bilateral(base, (0.030, 0.042, 0.06), (0.020, 0.0075, 0.03)) * front   # brows
    height += 0.0020 * _gauss(base, (0.0, 0.036, 0.06), (0.010, 0.008, 0.03)) * front           # glabella
    height += 0.0040 * _bilateral(base, (0.050, 0.000, 0.04), (0.015, 0.012, 0.03)) * front     # cheekbones
    height -= 0.0060 * _bilateral(base, (0.032, 0.024, 0.06), (0.016, 0.012, 0.04)) * front     # orbits
    surface = base + normals * height[..., None]
    eye_centres = _eye_geometry(surface)
    surface = _apply_eyes(surface, eye_centres)

    front_right = (columns > 0) & (columns < np.pi / 2)
    corner = int(np.argmin(np.where(front_right, np.abs(surface[mouth_row, :, 0] - MOUTH_HALF_WIDTH),
                                    np.inf)))
    mid = num_cols // 2
    half_slit = corner - mid
    return dict(columns=columns, rings=rings, mouth_row=mouth_row, surface=surface, top=top,
                bottom=bottom, eye_centres=eye_centres, slit=(mid - half_slit, mid + half_slit))


def _eyeball(centre):
    """UV sphere around +z (gaze): front pole, EYE_RINGS x EYE_SEGMENTS, back pole."""
    alpha = np.pi * np.arange(1, EYE_RINGS + 1) / (EYE_RINGS + 1)          # from the front
    beta = 2.0 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    ring_points = np.stack([np.sin(a) * np.cos(b), np.sin(a) * np.sin(b), np.cos(a)], -1)
    points = np.concatenate([[[0.0, 0.0, 1.0]], ring_points.reshape(-1, 3), [[0.0, 0.0, -1.0]]])
    return centre + EYE_RADIUS * points, a, b


def _assemble(geo):
    surface, columns = geo["surface"], geo["columns"]
    num_rows, num_cols = surface.shape[:2]
    mouth_row = geo["mouth_row"]
    c0, c1 = geo["slit"]
    mesh = _Mesh()

    # --- grid vertices: top pole, rings, bottom pole
    top = mesh.add_vertices(geo["top"])[0]
    grid = mesh.add_vertices(surface).reshape(num_rows, num_cols)
    bottom = mesh.add_vertices(geo["bottom"])[0]
    inner = np.arange(c0 + 1, c1)                                  # split columns
    lower_copies = mesh.add_vertices(surface[mouth_row, inner])

    # --- grid UVs (column C duplicates column 0 at u = 1: the seam at the back)
    u = np.arange(num_cols + 1) / num_cols
    dv = (1.0 - GRID_UV_BOTTOM) / (num_rows + 1)
    v = 1.0 - dv * np.arange(1, num_rows + 1)
    uv_u, uv_v = np.meshgrid(u, v)
    u_mid, half_width = u[num_cols // 2], u[c1] - u[num_cols // 2]
    t = (u - u_mid) / half_width
    lens = MOUTH_LENS_HALF_HEIGHT * np.clip(1.0 - t * t, 0.0, None)        # (C+1,)
    rows = np.arange(num_rows)[:, None]
    falloff_up = np.clip(1.0 - (mouth_row - rows) / MOUTH_LENS_ROWS, 0.0, 1.0) * (rows <= mouth_row)
    falloff_down = np.clip(1.0 - (rows - mouth_row) / MOUTH_LENS_ROWS, 0.0, 1.0) * (rows > mouth_row)
    uv_v_shifted = uv_v + lens * falloff_up - lens * falloff_down
    grid_uv = mesh.add_uvs(np.stack([uv_u, uv_v_shifted], -1)).reshape(num_rows, num_cols + 1)
    top_uv = mesh.add_uvs(np.stack([(np.arange(num_cols) + 0.5) / num_cols, np.ones(num_cols)], -1))
    bottom_uv = mesh.add_uvs(np.stack([(np.arange(num_cols) + 0.5) / num_cols,
                                       np.full(num_cols, GRID_UV_BOTTOM)], -1))
    lower_uv = mesh.add_uvs(np.stack([u[inner], v[mouth_row] - lens[inner]], -1))

    # --- grid faces: rows above the slit use the upper copies, rows below the lower ones
    below_index = grid.copy()
    below_index[mouth_row, inner] = lower_copies
    below_uv = grid_uv.copy()
    below_uv[mouth_row, inner] = lower_uv
    upper_rows, upper_uv_rows = grid[:mouth_row + 1], grid_uv[:mouth_row + 1]
    lower_rows = np.concatenate([below_index[mouth_row:mouth_row + 1], grid[mouth_row + 1:]])
    lower_uv_rows = np.concatenate([below_uv[mouth_row:mouth_row + 1], grid_uv[mouth_row + 1:]])
    mesh.add_faces(_grid_faces(upper_rows), _grid_faces_uv(upper_uv_rows))
    mesh.add_faces(_grid_faces(lower_rows), _grid_faces_uv(lower_uv_rows))
    # poles
    j = np.arange(num_cols)
    mesh.add_faces(np.stack([np.full(num_cols, top), grid[0, j], grid[0, (j + 1) % num_cols]], -1),
                   np.stack([top_uv, grid_uv[0, j], grid_uv[0, j + 1]], -1))
    mesh.add_faces(np.stack([grid[-1, j], np.full(num_cols, bottom), grid[-1, (j + 1) % num_cols]], -1),
                   np.stack([grid_uv[-1, j], bottom_uv, grid_uv[-1, j + 1]], -1))

    # --- mouth cavity: rings stepping back from the slit, closed by a throat line
    slit_cols = np.arange(c0, c1 + 1)
    slit_points = surface[mouth_row, slit_cols]                      # corners at both ends
    t_slit = t[slit_cols]
    opening = np.sqrt(np.clip(1.0 - t_slit ** 2, 0.0, None))
    depth = np.array([0.004, 0.012, 0.022, 0.033, 0.044])
    half_height = np.array([0.004, 0.0085, 0.0115, 0.0105, 0.0])
    narrowing = np.array([1.0, 0.97, 0.88, 0.72, 0.5])
    upper_chain = [grid[mouth_row, slit_cols]]
    lower_chain = [np.concatenate([[grid[mouth_row, c0]], lower_copies, [grid[mouth_row, c1]]])]
    upper_uv_chain = [grid_uv[mouth_row, slit_cols]]
    lower_uv_chain = [np.concatenate([[grid_uv[mouth_row, c0]], lower_uv, [grid_uv[mouth_row, c1]]])]
    cavity_upper, cavity_lower, cavity_axis = [], [], []
    shrink_uv = 0.05
    for level in range(CAVITY_LEVELS):
        x = slit_points[:, 0] * narrowing[level]
        z = slit_points[:, 2] - depth[level]
        lift = half_height[level] * opening
        uv_scale = 1.0 - (level + 1) * shrink_uv
        uu = u_mid + (u[slit_cols] - u_mid) * uv_scale
        lens_level = lens[slit_cols] * (1.0 - (level + 1) / CAVITY_LEVELS)
        if level < CAVITY_LEVELS - 1:
            upper_pts = np.stack([x, slit_points[:, 1] + lift, z], -1)
            lower_pts = np.stack([x, slit_points[:, 1] - lift, z], -1)[1:-1]
            up_ids = mesh.add_vertices(upper_pts)
            low_ids = np.concatenate([[up_ids[0]], mesh.add_vertices(lower_pts), [up_ids[-1]]])
            up_uv = mesh.add_uvs(np.stack([uu, v[mouth_row] + lens_level], -1))
            low_uv = np.concatenate([[up_uv[0]], mesh.add_uvs(np.stack([uu, v[mouth_row] - lens_level], -1)[1:-1]),
                                     [up_uv[-1]]])
            cavity_upper.append(up_ids[1:-1])
            cavity_lower.append(low_ids[1:-1])
            cavity_axis.append(up_ids[[0, -1]])
        else:
            up_ids = low_ids = mesh.add_vertices(np.stack([x, slit_points[:, 1], z], -1))
            up_uv = low_uv = mesh.add_uvs(np.stack([uu, np.full_like(uu, v[mouth_row])], -1))
            cavity_axis.append(up_ids)
        upper_chain.append(up_ids)
        lower_chain.append(low_ids)
        upper_uv_chain.append(up_uv)
        lower_uv_chain.append(low_uv)
    for level in range(CAVITY_LEVELS):
        # The upper lip's faces run along the slit with increasing column and the lower
        # lip's the other way; each cavity half runs along its edge the opposite way.
        # In the last strip the throat line and both corners lie on the lens axis in UV.
        first, last = ((0,), (-1,)) if level == CAVITY_LEVELS - 1 else ((), ())
        mesh.add_faces(_strip(upper_chain[level], upper_chain[level + 1], first),
                       _strip(upper_uv_chain[level], upper_uv_chain[level + 1], first))
        mesh.add_faces(_strip(lower_chain[level + 1], lower_chain[level], last),
                       _strip(lower_uv_chain[level + 1], lower_uv_chain[level], last))

    # --- eyeballs
    eye_ids = []
    for centre, uv_centre in zip(geo["eye_centres"], EYE_UV_CENTRES):
        points, alpha, beta = _eyeball(centre)
        ids = mesh.add_vertices(points)
        front_pole, ring_ids, back_pole = ids[0], ids[1:-1].reshape(EYE_RINGS, EYE_SEGMENTS), ids[-1]
        rho = EYE_UV_RADIUS * alpha / np.pi
        ring_uv = mesh.add_uvs(np.stack([uv_centre[0] + rho * np.cos(beta),
                                         uv_centre[1] + rho * np.sin(beta)], -1)).reshape(EYE_RINGS, EYE_SEGMENTS)
        front_uv = mesh.add_uvs(np.array(uv_centre))[0]
        mid_beta = 2.0 * np.pi * (np.arange(EYE_SEGMENTS) + 0.5) / EYE_SEGMENTS
        back_uv = mesh.add_uvs(np.stack([uv_centre[0] + EYE_UV_RADIUS * np.cos(mid_beta),
                                         uv_centre[1] + EYE_UV_RADIUS * np.sin(mid_beta)], -1))
        k = np.arange(EYE_SEGMENTS)
        kn = (k + 1) % EYE_SEGMENTS
        # Rings go from the front pole backwards and beta turns counter-clockwise seen from
        # the front, so (pole, ring k, ring k+1) is counter-clockwise seen from outside.
        mesh.add_faces(np.stack([np.full(EYE_SEGMENTS, front_pole), ring_ids[0, k], ring_ids[0, kn]], -1),
                       np.stack([np.full(EYE_SEGMENTS, front_uv), ring_uv[0, k], ring_uv[0, kn]], -1))
        for r in range(EYE_RINGS - 1):
            a, d = ring_ids[r, k], ring_ids[r, kn]
            b, c = ring_ids[r + 1, k], ring_ids[r + 1, kn]
            ua, ud = ring_uv[r, k], ring_uv[r, kn]
            ub, uc = ring_uv[r + 1, k], ring_uv[r + 1, kn]
            mesh.add_faces(np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]),
                           np.concatenate([np.stack([ua, ub, uc], -1), np.stack([ua, uc, ud], -1)]))
        mesh.add_faces(np.stack([ring_ids[-1, k], np.full(EYE_SEGMENTS, back_pole), ring_ids[-1, kn]], -1),
                       np.stack([ring_uv[-1, k], back_uv, ring_uv[-1, kn]], -1))
        eye_ids.append(ids)

    vertices = np.concatenate(mesh.vertices)
    faces = np.concatenate(mesh.faces)
    uvs = np.concatenate(mesh.uvs)
    uv_faces = np.concatenate(mesh.uv_faces)

    # Per-vertex tags used by the skinning and the blend shapes.
    num = len(vertices)
    kind = np.zeros(num, np.int64)                 # 0 head surface, 1 mouth cavity, 2/3 eyes
    column = np.zeros(num, np.int64)               # grid column (cavity: its slit column)
    side = np.zeros(num)                           # +1 upper-lip side, -1 lower, 0 neither
    column[grid] = np.arange(num_cols)[None, :]
    column[lower_copies] = inner
    side[grid[:mouth_row]] = 1.0
    side[grid[mouth_row + 1:]] = -1.0
    side[grid[mouth_row, inner]] = 1.0
    side[lower_copies] = -1.0
    for level in range(CAVITY_LEVELS):
        for ids, sign in ((upper_chain[level + 1], 1.0), (lower_chain[level + 1], -1.0)):
            kind[ids] = 1
            column[ids] = slit_cols
            side[ids] = sign
    for ids in cavity_axis:
        side[ids] = 0.0
    # Each cavity vertex remembers its depth level and the two lip vertices of its column.
    cavity_ids, cavity_levels, cavity_up, cavity_low = [], [], [], []
    for level in range(1, CAVITY_LEVELS + 1):
        for chain in (upper_chain[level], lower_chain[level]):
            cavity_ids.append(chain)
            cavity_levels.append(np.full(len(chain), level))
            cavity_up.append(upper_chain[0])
            cavity_low.append(lower_chain[0])
    cavity_level = np.zeros(num, np.int64)
    cavity = dict(ids=np.concatenate(cavity_ids), level=np.concatenate(cavity_levels),
                  up=np.concatenate(cavity_up), low=np.concatenate(cavity_low))
    cavity_level[cavity["ids"]] = cavity["level"]
    kind[eye_ids[0]], kind[eye_ids[1]] = 2, 3
    azimuth = columns[column]
    mouth_y = surface[mouth_row, column, 1]
    slit_param = t[column]
    tags = dict(kind=kind, azimuth=azimuth, side=side, mouth_y=mouth_y, slit_param=slit_param,
                eye_centres=geo["eye_centres"], lower_copies=lower_copies,
                upper_copies=grid[mouth_row, inner], mouth_row_ids=grid[mouth_row],
                cavity=cavity, cavity_level=cavity_level)
    return vertices, faces, uvs, uv_faces, tags


def _grid_faces_uv(uv_index):
    """Like `_grid_faces` for UV indices: (R, C+1), no wrap (the seam column is duplicated)."""
    rows, cols1 = uv_index.shape
    cols = cols1 - 1
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols), indexing="ij")
    a, b, c, d = uv_index[i, j], uv_index[i + 1, j], uv_index[i + 1, j + 1], uv_index[i, j + 1]
    left = j < cols // 2
    tri1 = np.where(left[..., None], np.stack([a, b, c], -1), np.stack([a, b, d], -1))
    tri2 = np.where(left[..., None], np.stack([a, c, d], -1), np.stack([d, b, c], -1))
    return np.concatenate([tri1.reshape(-1, 3), tri2.reshape(-1, 3)])


# ----------------------------------------------------------------------------- rigging
def _joint_locations(eye_centres):
    """Designed rest joints (5, 3): global (mid neck), neck (skull base), jaw, eyes."""
    return np.array([[0.0, -0.125, -0.030],
                     [0.0, -0.050, -0.038],
                     [0.0, -0.020, -0.020],
                     eye_centres[0], eye_centres[1]])


def _max_entropy_weights(points, target, sigma):
    """Non-negative weights summing to 1 with sum_i w_i points_i == target.

    Gaussian weights around the target, exponentially tilted (Newton on the convex dual)
    so that their mean is exactly the target; the target must lie inside the convex hull.
    """
    d = points - target
    base = -0.5 * np.sum(d * d, axis=-1) / sigma ** 2
    tilt = np.zeros(3)
    for _ in range(100):
        logits = base + d @ tilt
        w = np.exp(logits - logits.max())
        w /= w.sum()
        mean = w @ d
        if np.abs(mean).max() < 1e-13:
            break
        centred = d - mean
        cov = centred.T @ (w[:, None] * centred)
        tilt -= np.linalg.solve(cov + 1e-15 * np.eye(3), mean)
    else:
        raise RuntimeError("template head: joint regressor did not converge")
    return w


def _joint_regressor(vertices, kind, joints):
    regressor = np.zeros((5, len(vertices)))
    surface = np.where(kind == 0)[0]
    for joint, sigma in ((0, 0.04), (1, 0.04), (2, 0.045)):
        near = surface[np.linalg.norm(vertices[surface] - joints[joint], axis=-1) < 2.5 * sigma]
        regressor[joint, near] = _max_entropy_weights(vertices[near], joints[joint], sigma)
    for joint, eye_kind in ((3, 2), (4, 3)):
        ids = np.where(kind == eye_kind)[0]
        regressor[joint, ids] = _max_entropy_weights(vertices[ids], joints[joint], 1.0)
    return regressor


def _skinning_weights(vertices, normals, faces, tags):
    """Harmonic blend (graph Laplacian) between regions fixed to one joint, (V, 5)."""
    num = len(vertices)
    kind, side, azimuth = tags["kind"], tags["side"], np.abs(tags["azimuth"])
    x, y, z = vertices.T
    weights = np.zeros((num, 5))
    fixed = np.zeros(num, bool)
    for joint, eye_kind in ((3, 2), (4, 3)):
        weights[kind == eye_kind, joint] = 1.0
        fixed |= kind == eye_kind

    skin = kind <= 1
    surface = kind == 0
    mouth_ring = tags["mouth_row_ids"]
    corner = np.abs(tags["azimuth"][mouth_ring][np.argmin(np.abs(np.abs(tags["slit_param"][mouth_ring]) - 1.0))])
    # Jaw boundary: the lip line in front, rising toward the jaw joint in front of the ears.
    boundary = tags["mouth_y"] + (-0.020 - tags["mouth_y"]) * _smoothstep(azimuth, corner, 1.45)
    # Jaw skin lies on the mandible/chin primitives, neck skin on the neck cylinder (with a
    # free band along the crease between them). The upper neck follows the head and blends
    # into the global joint below y = -0.15.
    jaw_distance, neck_distance = _jaw_sdf(vertices), _neck_sdf(vertices)
    on_jaw = jaw_distance < neck_distance - 0.006
    on_neck = neck_distance < jaw_distance - 0.006
    jaw = surface & (y < boundary - 0.007) & (azimuth < 1.45) & on_jaw & (y > -0.105)
    head = surface & (((y > boundary + 0.007) & (azimuth < 1.6)) | ((y > -0.035) & (azimuth >= 1.6))
                      | (on_neck & (jaw_distance > 0.012) & (y < -0.09) & (y > -0.12)))
    root = skin & (y < -0.15)
    inside_slit = np.abs(tags["slit_param"]) < 0.75
    # Lips inside the slit and the first cavity ring are fixed; deeper cavity rings blend.
    lips_and_cavity = np.isin(np.arange(num), np.concatenate([tags["upper_copies"], tags["lower_copies"]])) \
        | (tags["cavity_level"] == 1)
    head |= lips_and_cavity & inside_slit & (side > 0)
    jaw |= lips_and_cavity & inside_slit & (side < 0)
    head &= ~jaw
    for mask, joint in ((root, 0), (head, 1), (jaw, 2)):
        weights[mask] = 0.0
        weights[mask, joint] = 1.0
        fixed |= mask

    # Solve L_ff w_f = -L_fc w_c on the head's graph (uniform Laplacian).
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adjacency = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num, num))
    adjacency = ((adjacency + adjacency.T) > 0).astype(np.float64).tocsr()
    laplacian = sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
    free = np.where(~fixed)[0]
    known = np.where(fixed)[0]
    lff = laplacian[free][:, free].tocsc()
    rhs = -(laplacian[free][:, known] @ weights[known])
    solved = sparse_linalg.splu(lff).solve(rhs)
    weights[free] = np.clip(solved, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _front(azimuth):
    return _smoothstep(np.cos(azimuth), 0.1, 0.5)


def _cavity_follow(field, tags):
    """The mouth cavity moves with the lips of its column (fields are defined on the skin).

    A cavity vertex takes the displacement of the lip on its side, blended with depth toward
    the mean of both lips (the throat line takes the mean), so the cavity neither tears nor
    pokes through the lips. Works for (V, ...) arrays.
    """
    out = field.copy()
    c = tags["cavity"]
    upper, lower = field[c["up"]], field[c["low"]]
    mean = 0.5 * (upper + lower)
    side = tags["side"][c["ids"]].reshape((-1,) + (1,) * (field.ndim - 1))
    own = np.where(side > 0, upper, np.where(side < 0, lower, mean))
    depth = (c["level"] / CAVITY_LEVELS).reshape(side.shape)
    out[c["ids"]] = (1.0 - depth) * own + depth * mean
    return out


def _outward(v):
    """Horizontal outward direction from the head's vertical axis (a smooth 'normal')."""
    d = np.stack([v[:, 0], np.zeros(len(v)), v[:, 2] + 0.035], -1)
    return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-9)


def _eye_follow(displacement, vertices, tags):
    """Eyeballs move rigidly with the skin around them (for identity components)."""
    out = displacement.copy()
    surface = (tags["kind"] == 0) & (vertices[:, 2] > 0)
    for eye_kind, centre in zip((2, 3), tags["eye_centres"]):
        w = np.exp(-0.5 * np.sum(((vertices[:, :2] - centre[:2]) / 0.012) ** 2, axis=-1)) * surface
        out[tags["kind"] == eye_kind] = (w @ displacement) / w.sum()
    return out


def _shape_components(v, n, tags):
    """Identity displacement fields (S, V, 3), one per SHAPE_NAMES entry (~1 std each)."""
    x, y, z = v.T
    front = _front(tags["azimuth"])[:, None]
    out = _outward(v)
    zero = np.zeros_like(x)
    neckness = 1.0 - _smoothstep(y, -0.13, -0.07)
    gonion = _bilateral(v, (0.052, -0.075, -0.010), (0.025, 0.02, 0.035))
    eyes = _bilateral(v, (EYE_CENTRE_XY[0], EYE_CENTRE_XY[1], 0.04), (0.014, 0.012, 0.03))
    ears = _bilateral(v, (0.074, -0.004, -0.048), (0.014, 0.026, 0.018))
    ear_centre = np.stack([np.sign(x) * 0.074, np.full_like(x, -0.004), np.full_like(x, -0.048)], -1)
    mouth = _gauss(np.stack([x, y - tags["mouth_y"]], -1), (0.0, 0.0), (0.022, 0.009))[:, None] * front

    def vec(dx=0.0, dy=0.0, dz=0.0):
        return np.stack([zero + dx, zero + dy, zero + dz], -1)

    fields = {
        "head_width": vec(dx=0.065 * x * (1.0 - 0.6 * neckness)),
        "head_length": vec(dz=0.06 * np.minimum(z + 0.03, 0.0) * _smoothstep(y, -0.07, -0.02)),
        "head_height": vec(dy=0.07 * y * _smoothstep(y, -0.02, 0.03)),
        "face_length": vec(dy=-0.06 * (-0.01 - y) * _smoothstep(-y, 0.01, 0.04) * (1.0 - neckness))
        * front,
        "jaw_width": vec(dx=0.09 * x * gonion),
        "chin_protrusion": vec(dz=0.005 * _gauss(v, (0.0, -0.088, 0.045), (0.018, 0.015, 0.02))),
        "chin_height": vec(dy=-0.004 * _gauss(v, (0.0, -0.09, 0.04), (0.02, 0.015, 0.03))),
        "nose_size": vec(dy=-0.002, dz=0.006) * _gauss(v, (0.0, -0.006, 0.075), (0.011, 0.017, 0.03))[:, None],
        "nose_projection": vec(dz=0.004 * _gauss(v, (0.0, -0.013, 0.09), (0.008, 0.008, 0.02))),
        "nose_width": vec(dx=0.2 * x * _gauss(v, (0.0, -0.02, 0.075), (0.02, 0.012, 0.02))),
        "nose_bridge": vec(dz=0.003 * _gauss(v, (0.0, 0.008, 0.075), (0.007, 0.014, 0.02))),
        "brow_ridge": out * (0.0035 * _bilateral(v, (0.03, 0.044, 0.06), (0.02, 0.008, 0.03)))[:, None]
        * front,
        "cheekbones": out * (0.0035 * _bilateral(v, (0.05, 0.0, 0.04), (0.015, 0.012, 0.03)))[:, None]
        * front,
        "cheek_fullness": out * (0.004 * _bilateral(v, (0.045, -0.045, 0.04), (0.018, 0.018, 0.03)))[:, None]
        * front,
        "ear_size": (v - ear_centre) * (0.25 * ears)[:, None],
        "ear_protrusion": vec(dx=0.005 * np.tanh(x / 0.01) * ears),
        "eye_spacing": vec(dx=0.0025 * np.tanh(x / 0.01) * eyes) * front,
        "eye_height": vec(dy=0.0025 * eyes) * front,
        "eye_depth": vec(dz=-0.0025 * eyes) * front,
        "forehead_slope": vec(dz=0.005 * (y - 0.03) / 0.05 * _gauss(v, (0.0, 0.06, 0.06), (0.05, 0.03, 0.04))) * front,
        "neck_thickness": vec(dx=0.06 * x, dz=0.06 * (z + 0.03)) * (1.0 - _smoothstep(y, -0.11, -0.06))[:, None],
        "lip_fullness": vec(dz=0.002 * np.ones_like(x)) * mouth,
        "mouth_width": vec(dx=0.12 * x) * mouth,
        "midface_depth": vec(dz=-0.004 * _gauss(v, (0.0, -0.01, 0.06), (0.035, 0.025, 0.04))) * front,
        "jaw_angle": vec(dy=-0.003 * gonion),
        "face_asymmetry": vec(dy=0.002 * x / 0.06 * _gauss(v, (0.0, -0.01, 0.06), (0.05, 0.05, 0.05))) * front,
    }
    assert tuple(fields) == SHAPE_NAMES
    return np.stack([_eye_follow(_cavity_follow(fields[name], tags), v, tags) for name in SHAPE_NAMES])


def _blink(v, tags):
    """Upper lids slide down and the skin of the eye openings comes forward over the eyes."""
    out = np.zeros_like(v)
    front = (_front(tags["azimuth"]) * (tags["kind"] == 0))
    for centre in tags["eye_centres"]:
        dx, dy = v[:, 0] - centre[0], v[:, 1] - centre[1]
        region = _eye_region_weight(dx, dy) * _smoothstep(dy, -1.3 * _FISSURE_HALF_HEIGHT,
                                                          -0.7 * _FISSURE_HALF_HEIGHT) * front
        lid_band = _smoothstep(dy, -_FISSURE_HALF_HEIGHT, _FISSURE_HALF_HEIGHT) \
            * (1.0 - _smoothstep(dy, _FISSURE_HALF_HEIGHT + 0.002, _FISSURE_HALF_HEIGHT + 0.012))
        drop = 0.55 * _FISSURE_HALF_HEIGHT * lid_band * (1.0 - _smoothstep(np.abs(dx), 0.6 * _FISSURE_HALF_WIDTH,
                                                                           1.3 * _FISSURE_HALF_WIDTH))
        closed_z = _lid_surface_z(dx, dy - drop, centre[2])
        out[:, 1] += -drop * region
        out[:, 2] += (closed_z - v[:, 2]) * region
    return out


def _expression_components(v, n, tags, jaw_weight):
    """Expression displacement fields (E, V, 3), one per EXPRESSION_NAMES entry."""
    x, y, z = v.T
    front = _front(tags["azimuth"])[:, None]
    skin = (tags["kind"] <= 1)[:, None]
    out = _outward(v)
    zero = np.zeros_like(x)

    def vec(dx=0.0, dy=0.0, dz=0.0):
        return np.stack([zero + dx, zero + dy, zero + dz], -1)

    y_rel = y - tags["mouth_y"]
    mouth_plane = np.stack([x, y_rel], -1)
    corners = _bilateral(mouth_plane, (0.024, 0.0), (0.009, 0.008))
    cheeks = _bilateral(v, (0.040, -0.020, 0.05), (0.015, 0.015, 0.03))
    lips = _gauss(mouth_plane, (0.0, 0.0), (0.022, 0.011))
    # Fields that pull the lips apart only act inside the slit (zero at and beyond the
    # mouth corners), so they are continuous wherever the mesh is connected.
    inside = np.clip(1.0 - tags["slit_param"] ** 2, 0.0, None) ** 2
    upper, lower = (tags["side"] > 0) * inside, (tags["side"] < 0) * inside
    lip_band = np.exp(-0.5 * (y_rel / 0.012) ** 2)
    lid_upper = _bilateral(np.stack([x, y], -1), (EYE_CENTRE_XY[0], EYE_CENTRE_XY[1] + 0.0075), (0.014, 0.004))
    lid_lower = _bilateral(np.stack([x, y], -1), (EYE_CENTRE_XY[0], EYE_CENTRE_XY[1] - 0.0075), (0.013, 0.004))
    fields = {
        "smile": vec(dx=0.0035 * np.tanh(x / 0.01) * corners, dy=0.004 * corners + 0.002 * cheeks,
                     dz=-0.003 * corners) + out * (0.001 * cheeks)[:, None],
        "lip_pucker": vec(dx=-0.25 * x * lips, dz=0.005 * lips),
        "brow_raise": vec(dy=0.005 * _bilateral(v, (0.03, 0.045, 0.06), (0.025, 0.015, 0.03))),
        "brow_furrow": vec(dx=-0.003 * np.tanh(x / 0.005), dy=-0.0025 * np.ones_like(x))
        * _bilateral(v, (0.015, 0.04, 0.06), (0.012, 0.01, 0.03))[:, None],
        "blink": _blink(v, tags),
        "eyes_wide": vec(dy=0.0015 * lid_upper),
        "mouth_stretch": vec(dx=0.005 * np.tanh(x / 0.01) * corners, dz=-0.002 * corners),
        "frown": vec(dy=-0.004 * corners),
        "cheek_puff": out * (0.007 * _bilateral(v, (0.045, -0.04, 0.04), (0.016, 0.016, 0.03)))[:, None],
        "lips_part": vec(dy=0.003 * (upper - lower) * lip_band),
        "upper_lip_raise": vec(dy=0.004 * upper * np.exp(-0.5 * ((y_rel - 0.006) / 0.01) ** 2)),
        "lower_lip_depress": vec(dy=-0.004 * lower * np.exp(-0.5 * ((y_rel + 0.006) / 0.01) ** 2)),
        "nose_wrinkle": vec(dy=0.003, dz=-0.001) * _bilateral(v, (0.012, -0.005, 0.07), (0.007, 0.01, 0.03))[:, None],
        "jaw_thrust": vec(dz=0.004 * jaw_weight),
        "squint": vec(dy=0.0015 * lid_lower),
        "mouth_sideways": vec(dx=0.004 * lips),
    }
    assert tuple(fields) == EXPRESSION_NAMES
    components = []
    for name in EXPRESSION_NAMES:
        field = fields[name] * skin
        if name not in ("jaw_thrust", "lips_part", "upper_lip_raise", "lower_lip_depress", "blink",
                        "cheek_puff"):
            field = field * front
        components.append(_cavity_follow(field, tags))
    return np.stack(components)


def _pose_correctives(v, n, tags):
    """posedirs (V, 3, 36): small bulges driven by (R - I) of the neck and the jaw."""
    x = v[:, 0]
    front = _front(tags["azimuth"])
    skin = (tags["kind"] <= 1).astype(np.float64)
    posedirs = np.zeros(v.shape + (36,))
    # Row-major (R - I)[r, c] of joint k (neck 0, jaw 1, eyes 2, 3) is entry 9 k + 3 r + c.
    nod, turn, jaw_open = 0 * 9 + 3 * 2 + 1, 0 * 9 + 3 * 0 + 2, 1 * 9 + 3 * 2 + 1
    throat = _gauss(v, (0.0, -0.11, 0.02), (0.025, 0.02, 0.02))
    nape = _gauss(v, (0.0, -0.08, -0.08), (0.03, 0.02, 0.02))
    posedirs[:, :, nod] = n * (0.012 * throat - 0.004 * nape)[:, None]
    neck_side = _bilateral(v, (0.045, -0.11, -0.01), (0.015, 0.025, 0.03))
    posedirs[:, :, turn] = n * (-0.008 * np.tanh(x / 0.02) * neck_side)[:, None]
    cheek = _bilateral(v, (0.045, -0.035, 0.04), (0.015, 0.015, 0.03)) * front
    submental = _gauss(v, (0.0, -0.10, 0.02), (0.02, 0.012, 0.025))
    posedirs[:, :, jaw_open] = (_outward(v) * (-0.008 * cheek)[:, None] + n * (0.010 * submental)[:, None])
    return _cavity_follow(posedirs * skin[:, None, None], tags)


def _mouth_rect(vertices, uvs, faces, uv_faces, tags):
    """Square UV rectangle around the lips and the mouth cavity, (u0, v0, u1, v1)."""
    y_rel = vertices[:, 1] - tags["mouth_y"]
    lips = (tags["kind"] == 1) | ((tags["kind"] == 0) & (np.abs(vertices[:, 0]) < 0.03)
                                  & (np.abs(y_rel) < 0.013) & (vertices[:, 2] > 0))
    uv_ids = uv_faces[np.isin(faces, np.where(lips)[0])]
    lo, hi = uvs[uv_ids].min(axis=0), uvs[uv_ids].max(axis=0)
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo).max() + 0.01
    return np.concatenate([centre - half, centre + half])


def build_template_head() -> dict:
    """Build the template head. Returns numpy arrays in FLAME's layout:

    v_template    (V, 3)        float64  rest vertices (metres, FLAME axes)
    shapedirs     (V, 3, S + E) float64  NUM_SHAPE identity then NUM_EXPRESSION expression
    posedirs      (V, 3, 36)    float64  pose correctives (coefficients: R_k - I, k = 1..4)
    J_regressor   (5, V)        float64  rows non-negative, summing to 1
    weights       (V, 5)        float64  skinning weights, rows summing to 1
    kintree_table (2, 5)        int64    parents (root: 4294967295 as in FLAME) / joint ids
    f             (F, 3)        int64    triangles, counter-clockwise seen from outside
    vt            (T, 2)        float64  UV coordinates in [0, 1]^2, v up
    ft            (F, 3)        int64    UV index of each triangle corner
    mouth_rect    (4,)          float64  (u0, v0, u1, v1) of the mouth patch in UV
    num_shape     ()            int64    columns of shapedirs that are identity

    V ~ 7.3k vertices, F ~ 14.6k triangles.
    """
    geo = _build_geometry()
    vertices, faces, uvs, uv_faces, tags = _assemble(geo)
    normals = _vertex_normals(vertices, faces)
    joints = _joint_locations(tags["eye_centres"])
    weights = _skinning_weights(vertices, normals, faces, tags)
    shapes = _shape_components(vertices, normals, tags)
    expressions = _expression_components(vertices, normals, tags, weights[:, 2])
    shapedirs = np.concatenate([shapes, expressions]).transpose(1, 2, 0)
    kintree = np.array([[_ROOT_PARENT if p < 0 else p for p in KINTREE_PARENTS], list(range(5))],
                       np.int64)
    return {
        "v_template": vertices,
        "shapedirs": np.ascontiguousarray(shapedirs),
        "posedirs": _pose_correctives(vertices, normals, tags),
        "J_regressor": _joint_regressor(vertices, tags["kind"], joints),
        "weights": weights,
        "kintree_table": kintree,
        "f": faces,
        "vt": uvs,
        "ft": uv_faces,
        "mouth_rect": _mouth_rect(vertices, uvs, faces, uv_faces, tags),
        "num_shape": np.array(NUM_SHAPE, np.int64),
    }
