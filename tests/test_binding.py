"""Tests for reta3d.binding: UV texel sampling, local frames, decoding, the whole head."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph

from rasterizer.types import Gaussians
from reta3d import binding as B


# ----------------------------------------------------------------------------------------
# Small meshes built here, independent of reta3d.flame.
# ----------------------------------------------------------------------------------------

def uv_sphere(n_lat, n_lon):
    """Unit sphere, lat-long UV unwrap, pole axis +y.

    3D vertices are unique (one per pole, the seam shared); the UV grid duplicates the
    poles and the seam, so `faces` and `ft` differ. Returns vertices (V, 3) float64,
    faces (F, 3), vt (T, 2), ft (F, 3).
    """
    theta = np.linspace(0.0, np.pi, n_lat + 1)
    phi = np.linspace(0.0, 2 * np.pi, n_lon + 1)
    ring = [(np.sin(t) * np.cos(phi[:-1]), np.full(n_lon, np.cos(t)), np.sin(t) * np.sin(phi[:-1]))
            for t in theta[1:-1]]
    vertices = np.concatenate([[[0.0, 1.0, 0.0]]]
                              + [np.stack(r, -1) for r in ring] + [[[0.0, -1.0, 0.0]]])
    north, south = 0, len(vertices) - 1

    def vid(i, j):  # 3D vertex of grid node (ring i, meridian j)
        if i == 0:
            return north
        if i == n_lat:
            return south
        return 1 + (i - 1) * n_lon + j % n_lon

    def tid(i, j):  # UV vertex of grid node
        return i * (n_lon + 1) + j

    t_grid, p_grid = np.meshgrid(theta, phi, indexing="ij")
    vt = np.stack([p_grid / (2 * np.pi), 1 - t_grid / np.pi], -1).reshape(-1, 2)
    faces, ft = [], []
    for i in range(n_lat):
        for j in range(n_lon):
            quad = [(i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1)]
            tris = [[0, 1, 2], [0, 2, 3]]
            if i == 0:
                tris = [[0, 1, 2]]
            elif i == n_lat - 1:
                tris = [[0, 1, 3]]
            for t in tris:
                faces.append([vid(*quad[k]) for k in t])
                ft.append([tid(*quad[k]) for k in t])
    return vertices, np.array(faces, np.int32), vt, np.array(ft, np.int32)


def vertex_normals_reference(vertices, faces):
    """Area-weighted vertex normals in float64 numpy: (V, 3) -> (V, 3)."""
    vertices = np.asarray(vertices, np.float64)
    p = vertices[faces]
    face_n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def rodrigues(axis_angle):
    """(3,) axis-angle -> (3, 3) rotation matrix, float64."""
    axis_angle = np.asarray(axis_angle, np.float64)
    angle = np.linalg.norm(axis_angle)
    k = axis_angle / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def bumpy_sphere(n_lat=12, n_lon=16, seed=0):
    """A sphere with smooth radial bumps, so normals differ from positions."""
    vertices, faces, vt, ft = uv_sphere(n_lat, n_lon)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(3, 3))
    radius = 1.0 + 0.1 * np.sin(vertices @ direction).sum(-1)
    return vertices * radius[:, None], faces, vt, ft


def plane_mesh(n=4):
    """Planar grid in z = 0 over [-1, 1]², UV = the unit square. Normals are +z."""
    s = np.linspace(0.0, 1.0, n + 1)
    u, v = np.meshgrid(s, s, indexing="xy")
    vt = np.stack([u.ravel(), v.ravel()], -1)
    vertices = np.concatenate([2 * vt - 1, np.zeros((len(vt), 1))], -1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3),
                            np.stack([a, c, d], -1).reshape(-1, 3)]).astype(np.int32)
    return vertices, faces, vt, faces.copy()


def frame_angles(frames_a, frames_b):
    """Rotation angle (radians) between corresponding frames (..., 3, 3)."""
    relative = np.einsum("...ji,...jk->...ik", frames_a, frames_b)
    cos = np.clip((np.trace(relative, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    return np.arccos(cos)


# Jitted entry points: one compilation per test instead of one per eager op.
def jit_frames(faces, binding, kind="consecutive"):
    return jax.jit(lambda v, up, n: B.local_frames(v, faces, binding, up, kind=kind, normals=n))


def jit_decode(binding, faces, kind="consecutive"):
    return jax.jit(lambda f, v, n, up: B.decode_texels(
        B.gather_texels(f, binding), binding, v, n, up, faces, kind=kind))


quat_to_matrix = jax.jit(B.quaternion_to_rotation_matrix)


def quat_to_matrix_np(q):
    """Reference (..., 4) wxyz -> (..., 3, 3) in numpy float64 (normalises q)."""
    q = np.asarray(q, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z], -1),
    ], -2)


def assert_orthonormal_right_handed(frames, atol=1e-5):
    frames = np.asarray(frames, np.float64)
    gram = np.einsum("...ji,...jk->...ik", frames, frames)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=atol)
    np.testing.assert_allclose(np.linalg.det(frames), 1.0, atol=atol)


# ----------------------------------------------------------------------------------------
# Texel sampling.
# ----------------------------------------------------------------------------------------

def test_two_triangle_square_counts_bary_and_invalid_texels():
    vt = np.array([[0.1, 0.2], [0.9, 0.2], [0.9, 0.8], [0.1, 0.8]])
    ft = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    r = 10
    binding = B.build_texel_binding(vt, ft, r)
    # Centres u = (j+.5)/10 inside [0.1, 0.9] -> j = 1..8; v = 1-(i+.5)/10 in [0.2, 0.8]
    # -> i = 2..7. No centre lies on the square's border.
    expected = np.zeros((r, r), bool)
    expected[2:8, 1:9] = True
    np.testing.assert_array_equal(binding.valid, expected)
    assert binding.num_texels == 48
    rows, cols = np.nonzero(expected)  # row-major, like texel_rc
    np.testing.assert_array_equal(binding.texel_rc, np.stack([rows, cols], -1))
    assert binding.texel_rc.dtype == np.int32 and binding.face_index.dtype == np.int32
    assert binding.bary.dtype == np.float32

    u = (cols + 0.5) / r
    v = 1 - (rows + 0.5) / r
    reconstructed = np.einsum("mk,mkd->md", binding.bary, vt[ft[binding.face_index]])
    np.testing.assert_allclose(reconstructed, np.stack([u, v], -1), atol=1e-6)
    np.testing.assert_allclose(binding.texel_uv(), np.stack([u, v], -1), atol=1e-12)
    assert np.all(binding.bary >= 0)
    np.testing.assert_allclose(binding.bary.sum(-1), 1.0, atol=1e-6)
    # Triangle 0 (corners 0, 1, 2) is below the diagonal (0.1,0.2)-(0.9,0.8).
    side = (0.8 * (v - 0.2) - 0.6 * (u - 0.1))
    strict = np.abs(side) > 1e-9
    np.testing.assert_array_equal(binding.face_index[strict], (side[strict] > 0).astype(int))


def test_edge_centres_counted_once_and_single_triangle_leaves_rest_invalid():
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    both = B.build_texel_binding(vt, np.array([[0, 1, 2], [0, 2, 3]]), 4)
    # The diagonal u = v passes exactly through the centres with i + j = 3.
    assert both.valid.all() and both.num_texels == 16
    assert len({tuple(rc) for rc in both.texel_rc}) == 16

    lower = B.build_texel_binding(vt, np.array([[0, 1, 2]]), 4)   # region v <= u
    i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(lower.valid, (1 - (i + 0.5) / 4) <= (j + 0.5) / 4)
    assert lower.num_texels == 10


def test_rect_subgrid_matches_texel_centre_formula():
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ft = np.array([[0, 1, 2], [0, 2, 3]])
    rect = (0.25, 0.5, 0.75, 0.75)
    binding = B.build_texel_binding(vt, ft, 8, rect=rect)
    assert binding.num_texels == 64 and binding.rect == rect
    rows, cols = binding.texel_rc.T
    u = 0.25 + (cols + 0.5) / 8 * 0.5
    v = 0.75 - (rows + 0.5) / 8 * 0.25
    reconstructed = np.einsum("mk,mkd->md", binding.bary, vt[ft[binding.face_index]])
    np.testing.assert_allclose(reconstructed, np.stack([u, v], -1), atol=1e-6)


def test_sphere_binding_reconstructs_uv():
    vertices, faces, vt, ft = uv_sphere(20, 30)
    binding = B.build_texel_binding(vt, ft, 64)
    # The unwrap tiles the unit square except half of each pole-row quad (one triangle per
    # quad there, the other would be degenerate in 3D).
    v = binding.texel_uv()[:, 1]
    rows_v = 1 - (np.arange(64) + 0.5) / 64
    inner_rows = (rows_v > 1 / 20) & (rows_v < 1 - 1 / 20)
    assert binding.valid[inner_rows].all()
    assert binding.num_texels > inner_rows.sum() * 64 and not binding.valid.all()
    assert np.all(np.isin(np.nonzero(~binding.valid)[0], np.nonzero(~inner_rows)[0]))
    del v
    reconstructed = np.einsum("mk,mkd->md", binding.bary, vt[ft[binding.face_index]])
    np.testing.assert_allclose(reconstructed, binding.texel_uv(), atol=1e-6)


def test_binding_bad_input():
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    ft = np.array([[0, 1, 2]])
    with pytest.raises(ValueError, match="vt .*NaN"):
        B.build_texel_binding(np.where(np.eye(3, 2) > 0, np.nan, vt), ft, 4)
    with pytest.raises(ValueError, match="ft indices"):
        B.build_texel_binding(vt, ft + 1, 4)
    with pytest.raises(ValueError, match=r"vt must be \(T, 2\)"):
        B.build_texel_binding(vt[:, :1], ft, 4)
    with pytest.raises(ValueError, match="resolution"):
        B.build_texel_binding(vt, ft, 0)
    with pytest.raises(ValueError, match="rect"):
        B.build_texel_binding(vt, ft, 4, rect=(0.5, 0.0, 0.2, 1.0))


def test_gather_scatter_round_trip():
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    binding = B.build_texel_binding(vt, np.array([[0, 1, 2]]), 6)
    uv_map = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 5))
    values = B.gather_texels(uv_map, binding)
    assert values.shape == (2, binding.num_texels, 5)
    back = B.scatter_texels(values, binding)
    np.testing.assert_array_equal(back, np.where(binding.valid[None, :, :, None], uv_map, 0))
    np.testing.assert_array_equal(B.gather_texels(back, binding), values)
    with pytest.raises(ValueError, match="resolution 5x5 .* 6x6"):
        B.gather_texels(uv_map[:, :5, :5], binding)
    with pytest.raises(ValueError, match="texels"):
        B.scatter_texels(values[:, 1:], binding)


# ----------------------------------------------------------------------------------------
# Frames.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", B.FRAME_KINDS)
def test_frames_orthonormal_right_handed(kind):
    vertices, faces, vt, ft = bumpy_sphere()
    binding = B.build_texel_binding(vt, ft, 32)
    normals = vertex_normals_reference(vertices, faces)
    up = np.array([[0.1, 1.0, 0.2], [1.0, 0.3, -0.5]], np.float32)
    verts = jnp.asarray(np.stack([vertices, vertices[:, [2, 0, 1]]]), jnp.float32)
    norms = jnp.asarray(np.stack([normals, normals[:, [2, 0, 1]]]), jnp.float32)
    frames = jit_frames(faces, binding, kind)(verts, up, norms)
    assert frames.shape == (2, binding.num_texels, 3, 3)
    assert_orthonormal_right_handed(frames)
    if kind == "consecutive":
        # First axis is the normalised barycentric blend of the vertex normals (Eq. 1).
        blend = np.einsum("mk,bmkd->bmd", binding.bary,
                          np.asarray(norms)[:, faces[binding.face_index]])
        blend /= np.linalg.norm(blend, axis=-1, keepdims=True)
        np.testing.assert_allclose(frames[..., 0], blend, atol=1e-5)
        # y = normalize(up × x) ⟂ up.
        unit_up = up / np.linalg.norm(up, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.einsum("bmd,bd->bm", frames[..., 1], unit_up), 0,
                                   atol=1e-5)
    if kind == "global":
        np.testing.assert_array_equal(frames, np.broadcast_to(np.eye(3), frames.shape))


def test_naive_frames_follow_first_edge():
    vertices, faces, vt, ft = bumpy_sphere()
    binding = B.build_texel_binding(vt, ft, 16)
    frames = np.asarray(jit_frames(faces, binding, "naive")(
        jnp.asarray(vertices[None], jnp.float32), jnp.array([[0.0, 1.0, 0.0]]), None))
    p = vertices[faces[binding.face_index]]
    normal = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    edge = p[:, 1] - p[:, 0]
    np.testing.assert_allclose(frames[0, :, :, 0], normal / np.linalg.norm(normal, axis=-1,
                                                                           keepdims=True),
                               atol=1e-5)
    np.testing.assert_allclose(frames[0, :, :, 1], edge / np.linalg.norm(edge, axis=-1,
                                                                         keepdims=True),
                               atol=1e-5)  # on a triangle the edge is already ⟂ its normal


def test_consecutive_frames_safe_when_normal_parallel_to_up():
    vertices, faces, vt, ft = plane_mesh(3)
    binding = B.build_texel_binding(vt, ft, 8)
    verts = jnp.asarray(vertices[None], jnp.float32)
    normals = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), verts.shape)
    weights = jax.random.normal(jax.random.PRNGKey(1), (1, binding.num_texels, 3, 3))
    frames_fn = jit_frames(faces, binding)

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1, 2))
    def grad_fn(n, u, v):
        return jnp.sum(weights * B.local_frames(v, faces, binding, u, normals=n))

    for up in (jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.0, 0.0, -2.0]]),
               jnp.array([[1e-5, 0.0, 1.0]])):
        frames = frames_fn(verts, up, normals)
        assert np.all(np.isfinite(frames))
        assert_orthonormal_right_handed(frames)
        np.testing.assert_allclose(frames[..., 0], np.broadcast_to([0, 0, 1.0],
                                                                   frames[..., 0].shape),
                                   atol=1e-6)
        grads = grad_fn(normals, up, verts)
        for g in grads:
            assert np.all(np.isfinite(g))
        assert np.abs(grads[0]).max() > 0


def _chart_neighbour_pairs(binding, ft):
    """Index pairs (a, b) of 4-neighbouring valid texels in the same UV chart."""
    num_faces = ft.shape[0]
    # Faces sharing a UV edge are in the same chart.
    edges = {}
    rows, cols = [], []
    for f in range(num_faces):
        for k in range(3):
            key = tuple(sorted((int(ft[f, k]), int(ft[f, (k + 1) % 3]))))
            if key in edges:
                rows.append(f)
                cols.append(edges[key])
            else:
                edges[key] = f
    graph = scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, cols)),
                                    shape=(num_faces, num_faces))
    _, chart = scipy.sparse.csgraph.connected_components(graph, directed=False)
    r = binding.resolution
    texel_of = -np.ones((r, r), np.int64)
    texel_of[binding.texel_rc[:, 0], binding.texel_rc[:, 1]] = np.arange(binding.num_texels)
    pairs = []
    for a_slice, b_slice in (((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
                             ((slice(0, -1), slice(None)), (slice(1, None), slice(None)))):
        a, b = texel_of[a_slice].ravel(), texel_of[b_slice].ravel()
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        same = chart[binding.face_index[a]] == chart[binding.face_index[b]]
        pairs.append(np.stack([a[same], b[same]], -1))
    return np.concatenate(pairs)


def _continuity_angles(vertices, faces, ft, binding, up, normals=None):
    """Angles (degrees) between 4-neighbouring texels' frames, per kind, and a mask of the
    pairs on smooth surface away from the consecutive frame's singularity: both normals
    more than 15° from ±up, and the two normals within 10° of each other (folds such as the
    lips' edge turn the normal itself by up to 180° between neighbouring texels, for any
    kind of frame)."""
    pairs = _chart_neighbour_pairs(binding, ft)
    out = {}
    for kind in ("consecutive", "naive"):
        frames = np.asarray(jit_frames(faces, binding, kind)(vertices, up, normals))[0]
        out[kind] = np.degrees(frame_angles(frames[pairs[:, 0]], frames[pairs[:, 1]]))
        if kind == "consecutive":
            normal = frames[:, :, 0]
            unit_up = np.asarray(up[0]) / np.linalg.norm(up[0])
            cos_up = np.abs(normal @ unit_up)
    cos_pair = np.sum(normal[pairs[:, 0]] * normal[pairs[:, 1]], axis=-1)
    smooth = (np.all(cos_up[pairs] < math.cos(math.radians(15.0)), axis=-1)
              & (cos_pair > math.cos(math.radians(10.0))))
    return out, smooth


def _assert_consecutive_smoother(angles, smooth, label):
    consecutive, naive = angles["consecutive"], angles["naive"]
    stats = {
        "consecutive max": consecutive[smooth].max(), "naive max": naive[smooth].max(),
        "consecutive p99": np.percentile(consecutive[smooth], 99),
        "naive p99": np.percentile(naive[smooth], 99),
        "all pairs: consecutive max": consecutive.max(), "all pairs: naive max": naive.max(),
    }
    print(f"{label}: neighbour frame angles (deg) over {smooth.sum()} of {smooth.size} "
          f"pairs on smooth surface away from ±up: "
          + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))
    assert smooth.mean() > 0.7
    assert stats["naive max"] > 3 * stats["consecutive max"]
    assert stats["naive p99"] > 3 * stats["consecutive p99"]


def test_consecutive_frames_continuous_on_sphere_naive_not():
    vertices, faces, vt, ft = bumpy_sphere(16, 24)
    binding = B.build_texel_binding(vt, ft, 48)
    normals = vertex_normals_reference(vertices, faces)[None]
    angles, away = _continuity_angles(
        jnp.asarray(vertices[None], jnp.float32), faces, ft, binding,
        jnp.array([[0.0, 1.0, 0.0]]), jnp.asarray(normals, jnp.float32))
    _assert_consecutive_smoother(angles, away, "bumpy sphere")
    assert angles["consecutive"][away].max() < 15.0


@pytest.mark.parametrize("kind", ["consecutive", "naive"])
def test_frames_rotate_with_the_head(kind):
    vertices, faces, vt, ft = bumpy_sphere()
    binding = B.build_texel_binding(vt, ft, 24)
    rotation = rodrigues([0.3, -0.5, 0.2])
    up = np.array([0.05, 1.0, 0.1])
    frames_fn = jit_frames(faces, binding, kind)
    rest = frames_fn(jnp.asarray(vertices[None], jnp.float32),
                     jnp.asarray(up[None], jnp.float32),
                     jnp.asarray(vertex_normals_reference(vertices, faces)[None], jnp.float32))
    turned_vertices = vertices @ rotation.T
    turned = frames_fn(jnp.asarray(turned_vertices[None], jnp.float32),
                       jnp.asarray((rotation @ up)[None], jnp.float32),
                       jnp.asarray(vertex_normals_reference(turned_vertices, faces)[None],
                                   jnp.float32))
    np.testing.assert_allclose(turned, np.einsum("ij,bmjk->bmik", rotation, rest), atol=2e-5)


# ----------------------------------------------------------------------------------------
# Quaternions and decoding.
# ----------------------------------------------------------------------------------------

def test_rotation_matrix_to_quaternion_round_trip_and_gradients():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(64, 4))
    q[:4] = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # incl. 180° turns
    q[4] = [1e-4, 1, 1, 0]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    m = quat_to_matrix(jnp.asarray(q, jnp.float32))
    # Independent reference: rodrigues from the quaternion's axis-angle.
    for k in (5, 6, 7):
        angle = 2 * np.arccos(np.clip(q[k, 0], -1, 1))
        axis = q[k, 1:] / np.linalg.norm(q[k, 1:])
        np.testing.assert_allclose(m[k], rodrigues(axis * angle), atol=1e-5)
    back = np.asarray(jax.jit(B.rotation_matrix_to_quaternion)(m))
    sign = np.sign(np.sum(back * q, -1, keepdims=True))
    np.testing.assert_allclose(back * sign, q, atol=1e-5)
    grad = jax.jit(jax.grad(lambda mm: jnp.sum(B.rotation_matrix_to_quaternion(mm) ** 3)))(m)
    assert np.all(np.isfinite(grad))
    # Composition matches matrix products.
    a, b = jnp.asarray(q[10:20], jnp.float32), jnp.asarray(q[20:30], jnp.float32)
    np.testing.assert_allclose(quat_to_matrix(jax.jit(B.quaternion_multiply)(a, b)),
                               quat_to_matrix(a) @ quat_to_matrix(b), atol=1e-5)


def _plane_setup(resolution=6):
    vertices, faces, vt, ft = plane_mesh(3)
    binding = B.build_texel_binding(vt, ft, resolution)
    verts = jnp.asarray(vertices[None], jnp.float32)
    normals = jnp.asarray(np.broadcast_to(np.float32([0, 0, 1]), verts.shape))
    up = jnp.asarray(np.float32([[0, 1, 0]]))
    return verts, normals, up, faces, binding


def test_decode_hand_checked_values():
    verts, normals, up, faces, binding = _plane_setup()
    r, m = binding.resolution, binding.num_texels
    features = np.zeros((1, r, r, 14), np.float32)
    features[..., 6] = 1.0   # identity quaternion
    decode = jit_decode(binding, faces)
    gaussians, _ = jax.device_get(decode(features, verts, normals, up))
    assert isinstance(gaussians, Gaussians) and gaussians.num_gaussians == m
    np.testing.assert_allclose(gaussians.scales, B.GAMMA_S, rtol=1e-6)
    np.testing.assert_allclose(gaussians.opacities, 0.5)
    np.testing.assert_allclose(gaussians.colors, 0.5)
    assert gaussians.opacities.shape == (1, m) and gaussians.colors.shape == (1, m, 3)
    # Zero offsets: exactly on the surface, i.e. the barycentric point, i.e. z = 0.
    p = np.einsum("mk,mkd->md", binding.bary, np.asarray(verts[0])[faces[binding.face_index]])
    np.testing.assert_allclose(gaussians.means[0], p, atol=1e-6)
    np.testing.assert_array_equal(gaussians.means[0, :, 2], 0.0)
    np.testing.assert_allclose(gaussians.means[0, :, :2],
                               2 * binding.texel_uv() - 1, atol=1e-6)
    # Plane normal +z, up +y: x = +z, y = up × x = +x, z = x × y = +y.
    expected_frame = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    rot = quat_to_matrix_np(gaussians.quats)
    np.testing.assert_allclose(rot, np.broadcast_to(expected_frame, rot.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(gaussians.quats, axis=-1), 1.0, atol=1e-6)
    # Global frames and identity quaternion: identity rotation.
    decode_global = jit_decode(binding, faces, "global")
    glob, _ = jax.device_get(decode_global(features, verts, normals, up))
    np.testing.assert_allclose(np.abs(glob.quats), np.broadcast_to([1, 0, 0, 0], (1, m, 4)),
                               atol=1e-6)
    # Offset o with tanh(o) = (0.4, -0.8, 0.2): μ = p + 0.25·(0.4·x − 0.8·y + 0.2·z).
    o = np.arctanh([0.4, -0.8, 0.2])
    moved_features = features.copy()
    moved_features[..., 0:3] = o
    moved, _ = jax.device_get(decode(moved_features, verts, normals, up))
    np.testing.assert_allclose(moved.means[0] - p, np.broadcast_to(
        0.25 * expected_frame @ [0.4, -0.8, 0.2], p.shape), atol=1e-6)
    # A zero raw quaternion reads as the identity instead of NaN.
    zero_q, _ = jax.device_get(decode_global(np.zeros_like(features), verts, normals, up))
    np.testing.assert_allclose(np.abs(zero_q.quats), np.abs(glob.quats), atol=1e-6)


def test_decode_rotation_is_frame_times_feature_rotation():
    vertices, faces, vt, ft = bumpy_sphere()
    binding = B.build_texel_binding(vt, ft, 16)
    verts = jnp.asarray(vertices[None], jnp.float32)
    normals = jnp.asarray(vertex_normals_reference(vertices, faces)[None], jnp.float32)
    up = jnp.array([[0.0, 1.0, 0.0]])
    features = jax.random.normal(jax.random.PRNGKey(4), (1, 16, 16, 14))
    texel_features = np.asarray(features).reshape(-1, 14)[binding.flat_index][None]
    for kind in B.FRAME_KINDS:
        decode = jit_decode(binding, faces, kind)
        gaussians, aux = jax.device_get(decode(features, verts, normals, up))
        frames = aux["frames"]
        np.testing.assert_allclose(aux["raw"]["quat"], texel_features[..., 6:10])
        np.testing.assert_allclose(quat_to_matrix_np(gaussians.quats),
                                   frames @ quat_to_matrix_np(texel_features[..., 6:10]),
                                   atol=2e-5)
        expected_means = aux["surface_points"] + 0.25 * np.einsum(
            "bmij,bmj->bmi", frames, np.tanh(texel_features[..., 0:3]))
        np.testing.assert_allclose(gaussians.means, expected_means, atol=1e-6)
        if kind == "consecutive":
            # With an identity feature rotation, the world rotation's first column is the
            # (blended) normal.
            ident = np.array(features)
            ident[..., 6:10] = [1.0, 0, 0, 0]
            gaussians, _ = jax.device_get(decode(ident, verts, normals, up))
            blend = np.einsum("mk,bmkd->bmd", binding.bary,
                              np.asarray(normals)[:, faces[binding.face_index]])
            blend /= np.linalg.norm(blend, axis=-1, keepdims=True)
            np.testing.assert_allclose(quat_to_matrix_np(gaussians.quats)[..., 0], blend,
                                       atol=1e-5)


def test_decode_gradients_match_float64_finite_differences():
    vertices, faces, vt, ft = bumpy_sphere()
    binding = B.build_texel_binding(vt, ft, 16)
    rng = np.random.default_rng(5)
    normals = vertex_normals_reference(vertices, faces)[None]
    features = 0.3 * rng.normal(size=(1, 16, 16, 14))
    weights = rng.normal(size=(binding.num_texels, 14))
    inputs = (features, vertices[None], normals, np.array([[0.0, 1.0, 0.1]]))
    directions = [rng.normal(size=np.shape(x)) for x in inputs]

    def loss(feats, v, n, u):
        g = B.decode_gaussians(feats, binding, v, n, u, faces)
        flat = jnp.concatenate([g.means, g.scales, g.quats, g.colors,
                                g.opacities[..., None]], -1)[0]
        return jnp.sum(weights * flat)

    with jax.enable_x64(True):
        inputs = [jnp.asarray(x, jnp.float64) for x in inputs]
        loss_fn = jax.jit(loss)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*inputs)
        assert grads[0].dtype == jnp.float64
        for g in grads:
            assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
        # Every channel of every valid texel receives gradient; invalid texels none.
        per_texel = np.abs(np.asarray(grads[0][0])).reshape(-1, 14)
        assert np.all(per_texel[binding.flat_index] > 0)
        assert np.all(per_texel[~binding.valid.ravel()] == 0)
        # Central differences along a random direction, for each input separately.
        eps = 1e-6
        for k, direction in enumerate(directions):
            plus = [x + eps * direction if i == k else x for i, x in enumerate(inputs)]
            minus = [x - eps * direction if i == k else x for i, x in enumerate(inputs)]
            fd = (float(loss_fn(*plus)) - float(loss_fn(*minus))) / (2 * eps)
            np.testing.assert_allclose(float(np.sum(np.asarray(grads[k]) * direction)), fd,
                                       rtol=1e-5, atol=1e-8)


def test_decode_bad_input():
    verts, normals, up, faces, binding = _plane_setup()
    r = binding.resolution
    good = jnp.zeros((1, r, r, 14))
    with pytest.raises(ValueError, match="14 channels"):
        B.decode_gaussians(good[..., :13], binding, verts, normals, up, faces)
    with pytest.raises(ValueError, match=f"resolution 4x4 .* {r}x{r}"):
        B.decode_gaussians(good[:, :4, :4], binding, verts, normals, up, faces)
    with pytest.raises(ValueError, match=r"\(B, R, R, C\)"):
        B.decode_gaussians(good[0], binding, verts, normals, up, faces)
    with pytest.raises(ValueError, match="kind"):
        B.decode_gaussians(good, binding, verts, normals, up, faces, kind="tangent")
    with pytest.raises(ValueError, match="batch"):
        B.decode_gaussians(jnp.zeros((2, r, r, 14)), binding, verts, normals, up, faces)
    with pytest.raises(ValueError, match="faces has only"):
        B.decode_gaussians(good, binding, verts, normals, up, faces[:3])
    with pytest.raises(ValueError, match="normals"):
        B.decode_gaussians(good, binding, verts, None, up, faces)
    with pytest.raises(ValueError, match=r"\(B, M, 14\)"):
        B.split_features(jnp.zeros((1, 5, 12)))


def test_split_features_layout():
    feats = jnp.arange(14.0)[None, None]
    raw = B.split_features(feats)
    assert [k for k, _ in B.FEATURE_LAYOUT] == list(raw)
    np.testing.assert_array_equal(raw["offset"][0, 0], [0, 1, 2])
    np.testing.assert_array_equal(raw["scale"][0, 0], [3, 4, 5])
    np.testing.assert_array_equal(raw["quat"][0, 0], [6, 7, 8, 9])
    np.testing.assert_array_equal(raw["color"][0, 0], [10, 11, 12])
    np.testing.assert_array_equal(raw["opacity"][0, 0], [13])
    assert B.GAMMA_P == 0.25 and B.GAMMA_S == pytest.approx(math.exp(-5.5))


def test_face_and_mouth_bindings_cached_per_uv_layout_and_resolution():
    import types
    _, _, vt, ft = uv_sphere(8, 12)
    model = types.SimpleNamespace(vt=vt, ft=ft, mouth_rect=(0.25, 0.25, 0.75, 0.5))
    first = B.face_binding(model, 32)
    assert B.face_binding(model, 32) is first
    assert B.face_binding(model, 16) is not first and B.face_binding(model, 16).resolution == 16
    # Same layout in a different object shares the cache; a changed layout does not.
    twin = types.SimpleNamespace(vt=vt.copy(), ft=ft.copy(), mouth_rect=model.mouth_rect)
    assert B.face_binding(twin, 32) is first
    moved = types.SimpleNamespace(vt=vt * 0.5, ft=ft, mouth_rect=model.mouth_rect)
    assert B.face_binding(moved, 32).num_texels < first.num_texels
    mouth = B.mouth_binding(model, 8)
    assert mouth.rect == model.mouth_rect and mouth.resolution == 8
    uv = mouth.texel_uv()
    assert np.all((uv >= [0.25, 0.25]) & (uv <= [0.75, 0.5]))
    head = B.HeadBinding.from_model(model, 32, 8, log_gamma_s=-5.5)  # no mesh: γs given
    assert head.face is first and head.mouth is mouth
    assert head.face_log_gamma_s == head.mouth_log_gamma_s == -5.5
    assert head.num_gaussians == first.num_texels + mouth.num_texels


# ----------------------------------------------------------------------------------------
# The template head (reta3d.flame).
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template():
    from reta3d import flame
    return flame.load()


def test_template_bindings_at_paper_sizes(template):
    head = B.HeadBinding.from_model(template)          # face 256², mouth 64² over mouth_rect
    print(f"template Gaussians: face {head.num_face}, mouth {head.num_mouth}, "
          f"total {head.num_gaussians} (paper: ~68k)")
    assert head.face.resolution == 256 and head.mouth.resolution == 64
    assert head.mouth.rect == tuple(template.mouth_rect)
    assert 40_000 < head.num_face < 256 ** 2 and 0 < head.num_mouth <= 64 ** 2
    vt, ft = np.asarray(template.vt), np.asarray(template.ft)
    for binding in (head.face, head.mouth):
        reconstructed = np.einsum("mk,mkd->md", binding.bary, vt[ft[binding.face_index]])
        np.testing.assert_allclose(reconstructed, binding.texel_uv(), atol=1e-5)
    assert B.HeadBinding.from_model(template).face is head.face     # cached


def test_template_consecutive_frames_continuous_naive_not(template):
    from reta3d import flame
    binding = B.face_binding(template, 96)
    vertices = template.to_world(template.v_template[None])
    normals = flame.vertex_normals(vertices, template.faces)
    angles, away = _continuity_angles(vertices, np.asarray(template.faces),
                                      np.asarray(template.ft), binding,
                                      jnp.array([[0.0, 1.0, 0.0]]), normals)
    _assert_consecutive_smoother(angles, away, "template head")


def test_template_head_gaussians_pose_surface_and_gradients(template):
    head = B.HeadBinding.from_model(template, 32, 8)
    m = head.num_gaussians
    rng = np.random.default_rng(8)
    face = np.zeros((2, 32, 32, 14), np.float32)
    mouth = np.zeros((2, 8, 8, 14), np.float32)
    face[..., 6] = mouth[..., 6] = 1.0                    # identity rotation, zero offsets
    face[..., 10:] = rng.normal(size=(2, 32, 32, 4))      # colour, opacity: any
    turn = np.array([0.2, -0.6, 0.1], np.float32)
    # Row 1 is row 0 with the whole head turned by `turn` (global pose only).
    params = {
        "shape": np.tile(rng.normal(size=(1, 4)).astype(np.float32), (2, 1)),
        "expression": np.tile(rng.normal(size=(1, 3)).astype(np.float32), (2, 1)),
        "global_pose": np.stack([np.zeros(3, np.float32), turn]),
        "neck_pose": np.tile(np.float32([[0.05, 0.1, 0.0]]), (2, 1)),
        "jaw_pose": np.tile(np.float32([[0.15, 0.0, 0.0]]), (2, 1)),
    }
    weights = rng.normal(size=(2, m, 14)).astype(np.float32)

    @jax.jit
    def run(face, mouth, params):
        def loss(face, mouth, params):
            g, aux = B.head_gaussians(template, head, face, mouth, params)
            flat = jnp.concatenate([g.means, g.scales, g.quats, g.colors,
                                    g.opacities[..., None]], -1)
            return jnp.sum(weights * flat), (g, aux)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(face, mouth, params)

    (_, (gaussians, aux)), grads = jax.device_get(run(face, mouth, params))
    assert gaussians.means.shape == (2, m, 3) and gaussians.opacities.shape == (2, m)
    assert aux["offset_raw"].shape == aux["scale_raw"].shape == (2, m, 3)

    # Zero offsets: every Gaussian exactly on the posed surface (its barycentric point).
    np.testing.assert_array_equal(gaussians.means, aux["surface_points"])
    faces = np.asarray(template.faces)
    expected = np.concatenate([
        np.einsum("mk,bmkd->bmd", b.bary, aux["vertices_world"][:, faces[b.face_index]])
        for b in (head.face, head.mouth)], axis=1)
    np.testing.assert_allclose(gaussians.means, expected, atol=1e-6)

    # Turning the head turns every consecutive frame (= the Gaussians' rotation here, as
    # the feature rotation is the identity) by the same rotation.
    rotation = rodrigues(turn)
    frames = quat_to_matrix_np(gaussians.quats)
    # float32 FLAME skinning: errors ~1e-5, amplified by 1/sin(angle to up) in y = up × n.
    turned = np.einsum("ij,mjk->mik", rotation, frames[0])
    np.testing.assert_allclose(frames[1], turned, atol=1e-3)
    assert np.median(np.abs(frames[1] - turned)) < 1e-5
    np.testing.assert_allclose(aux["up"][1], rotation @ aux["up"][0], atol=1e-5)

    # Gradients reach the features and every FLAME parameter that moves the surface.
    for name, g in [("face", grads[0]), ("mouth", grads[1])] + sorted(grads[2].items()):
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name


def test_head_gaussians_bad_input(template):
    head = B.HeadBinding.from_model(template, 16, 8)
    face = jnp.zeros((1, 16, 16, 14))
    mouth = jnp.zeros((1, 8, 8, 14))
    with pytest.raises(ValueError, match="mouth_features has resolution 16x16 .* 8x8"):
        B.head_gaussians(template, head, face, jnp.zeros((1, 16, 16, 14)), {})
    with pytest.raises(ValueError, match="face_features must have 14 channels"):
        B.head_gaussians(template, head, face[..., :12], mouth, {})
    with pytest.raises(ValueError, match="unknown FLAME parameters .*jaw"):
        B.head_gaussians(template, head, face, mouth, {"jaw": jnp.zeros((1, 3))})
    with pytest.raises(ValueError, match="'expression' must be"):
        B.head_gaussians(template, head, face, mouth, {"expression": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="batch"):
        B.head_gaussians(template, head, face, jnp.zeros((2, 8, 8, 14)), {})
    with pytest.raises(ValueError, match="kind"):
        B.head_gaussians(template, head, face, mouth, {}, kind="tbn")


@pytest.mark.parametrize("script, flag", [("benchmark_head.py", "--batch_sizes"),
                                          ("render_head.py", "--image_size")])
def test_experiment_scripts_show_help(script, flag):
    import pathlib
    import subprocess
    import sys
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, f"experiments/{script}", "--help"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    # absl's --help prints the usage and exits with status 1 by design.
    assert result.returncode in (0, 1), result.stderr
    assert flag in result.stdout and "--kind" in result.stdout


def test_texel_spacing_of_a_flat_square_by_hand():
    """A unit square in UV mapped onto a flat square of side 0.3 (world = 2·p): adjacent
    texel centres of an R×R grid are 2·0.3/R apart, so ln γs = ln(0.6/R) at every R."""
    import types
    v = np.array([[0, 0, 0], [0.3, 0, 0], [0.3, 0.3, 0], [0, 0.3, 0]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    vt = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    model = types.SimpleNamespace(v_template=v, faces=faces, vt=vt, ft=faces, world_scale=2.0,
                                  mouth_rect=(0.0, 0.0, 0.5, 0.5), to_world=lambda p: 2.0 * p)
    for r in (8, 16, 32):
        assert B.texel_spacing(model, B.face_binding(model, r)) == pytest.approx(0.6 / r, rel=1e-5)
    head = B.HeadBinding.from_model(model, 16, 8)
    assert head.face_log_gamma_s == pytest.approx(math.log(0.6 / 16), abs=1e-5)
    # The mouth patch covers half the side with 8 texels: spacing 0.3 / 8.
    assert head.mouth_log_gamma_s == pytest.approx(math.log(0.3 / 8), abs=1e-5)
    np.testing.assert_allclose(head.log_gamma_s[:head.num_face], math.log(0.6 / 16), atol=1e-5)
    np.testing.assert_allclose(head.log_gamma_s[head.num_face:], math.log(0.3 / 8), atol=1e-5)


def test_gamma_s_follows_the_uv_resolution_on_the_template():
    """γs halves when the UV resolution doubles, and the template at the paper's 256² keeps
    the paper's e^-5.5 (within 0.05 in ln)."""
    from reta3d import flame
    model = flame.load()
    logs = {r: B.HeadBinding.from_model(model, r, 32).face_log_gamma_s for r in (64, 128, 256)}
    assert logs[256] == pytest.approx(-5.5, abs=0.05)
    assert logs[128] - logs[256] == pytest.approx(math.log(2), abs=0.05)
    assert logs[64] - logs[128] == pytest.approx(math.log(2), abs=0.05)
    # And the decoding uses it: raw scale 0 decodes to exactly γs.
    hb = B.HeadBinding.from_model(model, 64, 32)
    face = jnp.zeros((1, 64, 64, 14)).at[..., 6].set(1.0)
    mouth = jnp.zeros((1, 32, 32, 14)).at[..., 6].set(1.0)
    gaussians, _ = B.head_gaussians(model, hb, face, mouth, None)
    np.testing.assert_allclose(np.log(np.asarray(gaussians.scales[0])),
                               np.broadcast_to(hb.log_gamma_s[:, None], (hb.num_gaussians, 3)),
                               atol=1e-5)
