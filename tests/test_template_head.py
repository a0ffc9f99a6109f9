"""reta3d.template_head: the procedural FLAME stand-in (topology, UVs, rig, blend shapes)."""
import numpy as np
import pytest
from scipy import sparse
from scipy.sparse import csgraph

from reta3d import flame, template_head


@pytest.fixture(scope="module")
def head():
    return template_head.build_template_head()


@pytest.fixture(scope="module")
def model():
    return flame.load()


def components(faces, num_vertices):
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = sparse.coo_matrix((np.ones(len(edges)), tuple(edges.T)), shape=(num_vertices, num_vertices))
    return csgraph.connected_components(graph, directed=False)[1]


def signed_volume(vertices, faces):
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    return np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0


def first_hit(vertices, faces, origin, direction):
    """Möller-Trumbore against every triangle: (face index, distance) of the nearest hit."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    e1, e2 = b - a, c - a
    p = np.cross(direction, e2)
    det = np.einsum("ij,ij->i", e1, p)
    ok = np.abs(det) > 1e-15
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin - a
    u = np.einsum("ij,ij->i", s, p) * inv
    q = np.cross(s, e1)
    v = (q @ direction) * inv
    t = np.einsum("ij,ij->i", e2, q) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    t = np.where(hit, t, np.inf)
    k = int(np.argmin(t))
    return k, t[k]


def lip_pairs(vertices):
    """Pairs of distinct vertices with the same rest position: the split lip line."""
    _, inverse, counts = np.unique(vertices, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    return [np.where(inverse == k)[0] for k in np.where(counts == 2)[0]]


def test_build_is_deterministic_in_flame_layout(head):
    again = template_head.build_template_head()
    assert set(head) == set(again) == {"v_template", "shapedirs", "posedirs", "J_regressor", "weights",
                                       "kintree_table", "f", "vt", "ft", "mouth_rect", "num_shape"}
    for key in head:
        assert head[key].dtype == again[key].dtype
        np.testing.assert_array_equal(head[key], again[key], err_msg=key)
    num_vertices, num_faces = len(head["v_template"]), len(head["f"])
    assert 3000 <= num_vertices <= 8000
    assert head["shapedirs"].shape[:2] == (num_vertices, 3)
    assert head["posedirs"].shape == (num_vertices, 3, 36)
    assert head["J_regressor"].shape == (5, num_vertices) and head["weights"].shape == (num_vertices, 5)
    assert head["ft"].shape == (num_faces, 3) and head["f"].dtype.kind == "i"
    np.testing.assert_array_equal(head["kintree_table"], [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    assert int(head["num_shape"]) >= 20 and head["shapedirs"].shape[2] - int(head["num_shape"]) >= 10


def test_size_and_placement_match_flame(head):
    v = head["v_template"]
    assert np.abs(v[:, 0]).max() < 0.095
    assert 0.09 < v[:, 1].max() < 0.13 and -0.18 < v[:, 1].min() < -0.14
    nose = v[np.argmax(v[:, 2])]
    assert abs(nose[0]) < 1e-6 and -0.03 < nose[1] < 0.0 and 0.06 < nose[2] < 0.1
    ears = v[np.abs(v[:, 0]) > 0.08]                      # only the ears stick out that far
    assert len(ears) > 10 and np.all(ears[:, 2] < 0.0) and np.all(np.abs(ears[:, 1]) < 0.04)


def test_mesh_is_closed_with_outward_winding(head):
    v, f = head["v_template"], head["f"]
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    _, undirected_counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert np.all(undirected_counts == 2)                # closed: no boundary, no fins
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    assert np.all(directed_counts == 1)                  # neighbours wound consistently
    areas = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    assert areas.min() > 1e-10
    labels = components(f, len(v))
    assert labels.max() == 2                             # head + two eyeballs
    for label in range(3):
        faces = f[labels[f[:, 0]] == label]
        assert signed_volume(v, faces) > 0               # counter-clockwise seen from outside
    eye_volume = 4 / 3 * np.pi * template_head.EYE_RADIUS ** 3
    volumes = sorted(signed_volume(v, f[labels[f[:, 0]] == k]) for k in range(3))
    np.testing.assert_allclose(volumes[:2], eye_volume, rtol=0.1)


def test_uv_layout_is_valid_and_face_centred(head):
    vt, ft, v, f = head["vt"], head["ft"], head["v_template"], head["f"]
    assert vt.min() >= 0.0 and vt.max() <= 1.0
    uv = vt[ft]
    area = 0.5 * ((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                  - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1]))
    assert area.min() > 0.0                              # no flipped or degenerate UV triangle
    # No overlaps: sample a fine grid and count the triangles strictly covering each sample.
    resolution = 1024
    coverage = np.zeros((resolution, resolution), np.int32)
    corners = uv * resolution
    for a, b, c in corners:
        x0, y0 = np.floor(np.minimum(np.minimum(a, b), c)).astype(int)
        x1, y1 = np.ceil(np.maximum(np.maximum(a, b), c)).astype(int)
        xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        den = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
        w1 = ((xs - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (ys - a[1])) / den
        w2 = ((b[0] - a[0]) * (ys - a[1]) - (xs - a[0]) * (b[1] - a[1])) / den
        inside = (w1 > 1e-9) & (w2 > 1e-9) & (1 - w1 - w2 > 1e-9)
        coverage[ys[inside].astype(int), xs[inside].astype(int)] += 1
    assert coverage.max() == 1
    # The front of the face takes most of the middle of the map; eyeballs sit in a corner.
    labels = components(f, len(v))
    head_label = np.bincount(labels).argmax()
    centres = v[f].mean(axis=1)
    face = (centres[:, 2] > 0.03) & (np.abs(centres[:, 1] + 0.025) < 0.075) & (labels[f[:, 0]] == head_label)
    face_uv = uv[face].reshape(-1, 2)
    assert np.all((face_uv > 0.15) & (face_uv < 0.85))
    assert area[face].sum() > 0.2
    nose = np.argmax(v[:, 2])
    np.testing.assert_allclose(vt[ft[f == nose]].mean(axis=0), [0.5, 0.55], atol=0.08)
    eye_uv = uv[labels[f[:, 0]] != head_label].reshape(-1, 2)
    assert np.all(eye_uv < [0.25, 0.1])


def test_mouth_rect_covers_the_lips(head):
    u0, v0, u1, v1 = head["mouth_rect"]
    assert 0.0 <= u0 < u1 <= 1.0 and 0.0 <= v0 < v1 <= 1.0
    np.testing.assert_allclose(u1 - u0, v1 - v0)         # square: the 64x64 patch is not stretched
    assert u1 - u0 < 0.35
    pairs = np.concatenate(lip_pairs(head["v_template"]))
    assert len(pairs) >= 20
    lip_uv = head["vt"][head["ft"][np.isin(head["f"], pairs)]]
    assert np.all((lip_uv >= [u0, v0]) & (lip_uv <= [u1, v1]))


def test_rig_weights_and_joint_regressor(head):
    weights, regressor, v, f = head["weights"], head["J_regressor"], head["v_template"], head["f"]
    assert weights.min() >= 0 and np.allclose(weights.sum(axis=1), 1.0)
    assert regressor.min() >= 0 and np.allclose(regressor.sum(axis=1), 1.0)
    labels = components(f, len(v))
    joints = regressor @ v
    for joint in (3, 4):
        eyeball = labels == labels[np.argmax(weights[:, joint])]
        assert eyeball.sum() < 500
        np.testing.assert_array_equal(weights[eyeball, joint], 1.0)      # eyeballs follow their joint only
        np.testing.assert_array_equal(regressor[joint, ~eyeball], 0.0)
        np.testing.assert_allclose(joints[joint], v[eyeball].mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(v[eyeball] - joints[joint], axis=1),
                                   template_head.EYE_RADIUS, atol=1e-9)
    assert joints[3, 0] > 0.02 and joints[4, 0] < -0.02                  # left eye at +x
    lo, hi = v.min(axis=0), v.max(axis=0)
    assert np.all((joints > lo) & (joints < hi))
    assert joints[0, 1] < joints[1, 1] < joints[2, 1] < joints[3, 1]      # root, neck, jaw, eyes
    # Joints follow the shape (the regressor averages nearby vertices).
    spacing = template_head.SHAPE_NAMES.index("eye_spacing")
    moved = regressor @ (v + 3.0 * head["shapedirs"][..., spacing])
    assert moved[3, 0] - joints[3, 0] > 0.004 and moved[4, 0] - joints[4, 0] < -0.004
    # Smooth skinning: no hard seams between joints (the largest step, 0.56, is across the
    # crease under the chin where the grid is sparse).
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    assert np.abs(weights[edges[:, 0]] - weights[edges[:, 1]]).max() < 0.6


def test_blend_shapes_are_smooth_localised_and_independent(head):
    shapedirs, f = head["shapedirs"], head["f"]
    assert len(template_head.SHAPE_NAMES) == int(head["num_shape"]) >= 20
    assert len(template_head.EXPRESSION_NAMES) == shapedirs.shape[2] - int(head["num_shape"]) >= 10
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    names = template_head.SHAPE_NAMES + template_head.EXPRESSION_NAMES
    localised = 0
    for k, name in enumerate(names):
        field = shapedirs[..., k]
        size = np.linalg.norm(field, axis=1)
        assert 0.0008 < size.max() < 0.02, name
        jump = np.linalg.norm(field[edges[:, 0]] - field[edges[:, 1]], axis=1).max()
        # Blinking flattens the recessed eye openings: their walls move by design.
        assert name == "blink" or jump < 0.6 * size.max(), name
        localised += np.mean(size == 0.0) > 0.5
    assert localised >= 25                                # compact support, not global noise
    flat = shapedirs.reshape(-1, shapedirs.shape[2])
    assert np.linalg.matrix_rank(flat, tol=1e-6) == shapedirs.shape[2]


def test_blend_shapes_keep_eyeballs_rigid(head):
    v, f, shapedirs = head["v_template"], head["f"], head["shapedirs"]
    labels = components(f, len(v))
    posed = v + shapedirs @ np.random.default_rng(0).normal(size=shapedirs.shape[2]) * 2.0
    for label in range(3):
        ids = np.where(labels == label)[0]
        if len(ids) < 500:
            offsets = posed[ids] - v[ids]
            np.testing.assert_allclose(offsets, offsets[:1].repeat(len(ids), 0), atol=1e-12)


def test_pose_correctives_are_small_nonzero_and_off_the_eyes(head):
    posedirs, weights = head["posedirs"], head["weights"]
    neck, jaw, eyes = posedirs[..., 0:9], posedirs[..., 9:18], posedirs[..., 18:36]
    assert np.abs(neck).max() > 1e-3 and np.abs(jaw).max() > 1e-3
    assert np.abs(posedirs).max() < 0.02
    np.testing.assert_array_equal(eyes, 0.0)
    np.testing.assert_array_equal(posedirs[(weights[:, 3] + weights[:, 4]) > 0], 0.0)


def test_blink_closes_the_eyelids_over_the_eyes(head, model):
    blink = np.zeros((1, model.num_expression), np.float32)
    blink[0, template_head.EXPRESSION_NAMES.index("blink")] = 1.0
    rest = np.asarray(model.forward()[0], np.float64)
    closed = np.asarray(model.forward(expression=blink)[0], np.float64)
    f, weights = head["f"], head["weights"]
    for joint in (3, 4):
        centre = (head["J_regressor"] @ head["v_template"])[joint]
        eyeball = weights[:, joint] == 1.0
        eyeball_faces = np.all(eyeball[f], axis=1)
        origin = centre + [0.0, 0.0, 0.2]
        k_open, _ = first_hit(rest, f, origin, np.array([0.0, 0.0, -1.0]))
        k_closed, _ = first_hit(closed, f, origin, np.array([0.0, 0.0, -1.0]))
        assert eyeball_faces[k_open] and not eyeball_faces[k_closed]    # the lid now covers the eye
        dx, dy = rest[:, 0] - centre[0], rest[:, 1] - centre[1]
        upper_lid = ~eyeball & (np.abs(dx) < 0.008) & (dy > 0.004) & (dy < 0.009) & (rest[:, 2] > centre[2])
        assert upper_lid.sum() >= 3
        assert np.all(closed[upper_lid, 1] - rest[upper_lid, 1] < -0.0005)   # lids move down
        np.testing.assert_array_equal(closed[eyeball], rest[eyeball])


def test_eye_rotation_moves_only_the_eyeballs(head, model):
    pose = np.array([[0.0, 0.3, 0.0, 0.2, 0.0, 0.0]], np.float32)      # left eye yaw, right pitch
    rest = np.asarray(model.forward()[0], np.float64)
    turned = np.asarray(model.forward(eye_pose=pose)[0], np.float64)
    weights = head["weights"]
    eyes = (weights[:, 3] + weights[:, 4]) > 0
    np.testing.assert_array_equal(turned[~eyes], rest[~eyes])
    assert np.mean(np.linalg.norm(turned[eyes] - rest[eyes], axis=1) > 1e-4) > 0.9
    joints = head["J_regressor"] @ head["v_template"]
    for joint, expected in ((3, [np.sin(0.3), 0.0, np.cos(0.3)]), (4, [0.0, -np.sin(0.2), np.cos(0.2)])):
        ids = weights[:, joint] == 1.0
        np.testing.assert_allclose(np.linalg.norm(turned[ids] - joints[joint], axis=1),
                                   template_head.EYE_RADIUS, atol=1e-6)
        pupil = np.where(ids)[0][np.argmax(rest[ids, 2])]                  # front pole = gaze
        gaze = (turned[pupil] - joints[joint]) / template_head.EYE_RADIUS
        np.testing.assert_allclose(gaze, expected, atol=1e-5)


def test_open_jaw_shows_the_mouth_cavity_inside_the_mouth_patch(head, model):
    opened = np.asarray(model.forward(jaw_pose=np.array([[0.3, 0.0, 0.0]], np.float32))[0], np.float64)
    pairs = lip_pairs(head["v_template"])
    lips = head["v_template"][np.concatenate(pairs)]
    centre = lips.mean(axis=0)
    k, distance = first_hit(opened, head["f"], centre + [0.0, -0.004, 0.2], np.array([0.0, 0.0, -1.0]))
    hit_z = centre[2] + 0.2 - distance
    assert hit_z < lips[:, 2].max() - 0.01                 # seen through the open lips, deep inside
    u0, v0, u1, v1 = head["mouth_rect"]
    hit_uv = head["vt"][head["ft"][k]]
    assert np.all((hit_uv >= [u0, v0]) & (hit_uv <= [u1, v1]))
