"""reta3d.flame: LBS against an independent float64 numpy FLAME, loaders, bad input."""
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse
from scipy.spatial.transform import Rotation

from reta3d import errors, flame

PARENTS = (-1, 0, 1, 1, 1)


# ----------------------------------------------------------------------------- reference
def reference_flame(arrays, num_shape, shape, expression, pose):
    """FLAME written out from its definition in float64 numpy (one head).

    arrays: FLAME-layout dict (dense J_regressor); shape/expression: 1-D coefficients
    (zero-padded); pose (5, 3) axis-angle per joint. Returns vertices (V, 3), joints (5, 3).
    """
    v_template = np.asarray(arrays["v_template"], np.float64)
    shapedirs = np.asarray(arrays["shapedirs"], np.float64)
    num_vertices = len(v_template)
    coefficients = np.zeros(shapedirs.shape[-1])
    coefficients[:len(shape)] = shape
    coefficients[num_shape:num_shape + len(expression)] = expression
    v_shaped = v_template + shapedirs @ coefficients
    regressor = arrays["J_regressor"]
    regressor = regressor.toarray() if sparse.issparse(regressor) else np.asarray(regressor, np.float64)
    joints = regressor @ v_shaped
    rotations = Rotation.from_rotvec(np.asarray(pose, np.float64)).as_matrix()
    features = (rotations[1:] - np.eye(3)).reshape(-1)
    posedirs = np.asarray(arrays["posedirs"], np.float64).reshape(num_vertices, 3, 36)
    v_posed = v_shaped + posedirs @ features
    world = []
    for k in range(5):
        local = np.eye(4)
        local[:3, :3] = rotations[k]
        local[:3, 3] = joints[k] - (joints[PARENTS[k]] if k else 0.0)
        world.append(local if k == 0 else world[PARENTS[k]] @ local)
    posed_joints = np.array([g[:3, 3] for g in world])
    skinning = []
    for k in range(5):
        g = world[k].copy()
        g[:3, 3] -= g[:3, :3] @ joints[k]
        skinning.append(g)
    per_vertex = np.einsum("vk,kij->vij", np.asarray(arrays["weights"], np.float64), np.stack(skinning))
    vertices = np.einsum("vij,vj->vi", per_vertex[:, :3, :3], v_posed) + per_vertex[:, :3, 3]
    return vertices, posed_joints


def full_pose(global_pose, neck_pose, jaw_pose, eye_pose):
    return np.concatenate([global_pose, neck_pose, jaw_pose, eye_pose]).reshape(5, 3)


@pytest.fixture(scope="module")
def template():
    return flame.load()


@pytest.fixture(scope="module")
def template_arrays():
    return flame._template_arrays()


def random_inputs(rng, batch, num_shape, num_expression, scale=0.2):
    return dict(shape=rng.normal(size=(batch, num_shape)).astype(np.float32),
                expression=rng.normal(size=(batch, num_expression)).astype(np.float32),
                global_pose=(scale * rng.normal(size=(batch, 3))).astype(np.float32),
                neck_pose=(scale * rng.normal(size=(batch, 3))).astype(np.float32),
                jaw_pose=(np.abs(scale * rng.normal(size=(batch, 3))) * [1, 0.2, 0.2]).astype(np.float32),
                eye_pose=(scale * rng.normal(size=(batch, 6))).astype(np.float32))


# ----------------------------------------------------------------------------- rotations
def test_rodrigues_matches_scipy_including_tiny_angles():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(size=(20, 3)) * 1.5, rng.normal(size=(5, 3)) * 1e-6,
                              np.zeros((1, 3)), [[np.pi, 0, 0]]])
    got = np.asarray(flame.rodrigues(jnp.asarray(vectors, jnp.float32)))
    np.testing.assert_allclose(got, Rotation.from_rotvec(vectors).as_matrix(), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(flame.rodrigues(jnp.zeros(3))), np.eye(3))


def test_rodrigues_gradient_at_zero_is_the_cross_product_matrix():
    jacobian = np.asarray(jax.jacfwd(flame.rodrigues)(jnp.zeros(3)))            # (3, 3, 3)
    generators = np.zeros((3, 3, 3))
    generators[2, 1, 0], generators[1, 2, 0] = 1, -1       # d R / d x
    generators[0, 2, 1], generators[2, 0, 1] = 1, -1       # d R / d y
    generators[1, 0, 2], generators[0, 1, 2] = 1, -1       # d R / d z
    np.testing.assert_allclose(jacobian, generators, atol=1e-7)
    gradient = jax.grad(lambda a: jnp.sum(flame.rodrigues(a) ** 3))(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(gradient)))


# ----------------------------------------------------------------------------- LBS
def test_zero_parameters_give_the_template(template, template_arrays):
    vertices, joints = template.forward(return_joints=True)
    assert vertices.shape == (1, template.num_vertices, 3) and vertices.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(vertices[0]), template_arrays["v_template"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(joints[0]),
                               template_arrays["J_regressor"] @ template_arrays["v_template"], atol=1e-6)


def test_forward_matches_numpy_reference_on_the_template(template, template_arrays):
    rng = np.random.default_rng(1)
    inputs = random_inputs(rng, 2, template.num_shape, template.num_expression, scale=0.3)
    vertices, joints = template.forward(**inputs, return_joints=True)
    for b in range(2):
        pose = full_pose(inputs["global_pose"][b], inputs["neck_pose"][b], inputs["jaw_pose"][b],
                         inputs["eye_pose"][b])
        expected, expected_joints = reference_flame(template_arrays, template.num_shape,
                                                    inputs["shape"][b], inputs["expression"][b], pose)
        np.testing.assert_allclose(np.asarray(vertices[b]), expected, atol=2e-6)
        np.testing.assert_allclose(np.asarray(joints[b]), expected_joints, atol=2e-6)


def test_global_rotation_is_rigid_about_the_root_joint(template):
    axis_angle = np.array([[0.3, -0.5, 0.2]], np.float32)
    rest, joints = template.forward(return_joints=True)
    posed = template.forward(global_pose=axis_angle)
    rotation = Rotation.from_rotvec(axis_angle[0]).as_matrix()
    root = np.asarray(joints[0, 0])
    expected = (np.asarray(rest[0]) - root) @ rotation.T + root
    np.testing.assert_allclose(np.asarray(posed[0]), expected, atol=2e-6)


def test_jaw_rotation_moves_only_jaw_vertices_and_opens_the_mouth(template):
    rest = np.asarray(template.forward()[0])
    opened = np.asarray(template.forward(jaw_pose=np.array([[0.25, 0.0, 0.0]], np.float32))[0])
    weights, posedirs = np.asarray(template.weights), np.asarray(template.posedirs)
    static = (weights[:, 2] == 0) & np.all(posedirs[:, :, 9:18] == 0, axis=(1, 2))
    assert 0.3 * len(rest) < static.sum() < len(rest)
    np.testing.assert_array_equal(opened[static], rest[static])
    assert np.abs(opened[~static] - rest[~static]).max() > 0.01
    # The lip slit: pairs of distinct vertices sharing a rest position (upper/lower lip).
    _, inverse, counts = np.unique(rest, axis=0, return_inverse=True, return_counts=True)
    pairs = [np.where(inverse.ravel() == k)[0] for k in np.where(counts == 2)[0]]
    assert len(pairs) >= 5
    gaps = []
    for pair in pairs:
        lower, upper = pair[np.argsort(-weights[pair, 2])]
        gaps.append(opened[upper, 1] - opened[lower, 1])
    assert np.median(gaps) > 0.005 and min(gaps) > 0.0


def test_shape_and_expression_are_linear(template):
    rng = np.random.default_rng(2)
    a = dict(shape=rng.normal(size=(2, template.num_shape)), expression=rng.normal(size=(2, template.num_expression)))
    b = dict(shape=rng.normal(size=(2, template.num_shape)), expression=rng.normal(size=(2, template.num_expression)))
    f = lambda p: np.asarray(template.forward(**{k: np.asarray(v, np.float32) for k, v in p.items()}))  # noqa: E731
    zero = f(dict(shape=np.zeros((2, 1))))
    both = f({k: a[k] + b[k] for k in a})
    np.testing.assert_allclose(both - zero, (f(a) - zero) + (f(b) - zero), atol=2e-6)


def test_fewer_coefficients_are_zero_padded_and_batch_comes_from_any_input(template):
    coefficients = np.array([[0.5, -1.0, 2.0]], np.float32)
    padded = np.zeros((1, template.num_shape), np.float32)
    padded[:, :3] = coefficients
    np.testing.assert_array_equal(np.asarray(template.forward(shape=coefficients)),
                                  np.asarray(template.forward(shape=padded)))
    assert template.forward(eye_pose=np.zeros((3, 6), np.float32)).shape == (3, template.num_vertices, 3)


def test_gradients_are_finite_and_match_finite_differences(template, template_arrays):
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.normal(size=(1, template.num_vertices, 3)), jnp.float32)
    names = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")

    def loss(params):
        return jnp.sum(template.forward(**params) * weights)

    zero = random_inputs(rng, 1, template.num_shape, template.num_expression, scale=0.0)
    posed = random_inputs(rng, 1, template.num_shape, template.num_expression, scale=0.3)
    for point in (zero, posed):
        gradient = jax.grad(loss)({k: jnp.asarray(v) for k, v in point.items()})
        for name in names:
            assert np.all(np.isfinite(np.asarray(gradient[name]))), name
    # Directional derivative at the posed point against float64 central differences of the
    # independent reference.
    direction = random_inputs(rng, 1, template.num_shape, template.num_expression, scale=1.0)
    analytic = sum(float(jnp.sum(gradient[k] * direction[k])) for k in names)

    def reference_loss(step):
        p = {k: posed[k][0].astype(np.float64) + step * direction[k][0] for k in names}
        vertices, _ = reference_flame(template_arrays, template.num_shape, p["shape"], p["expression"],
                                      full_pose(p["global_pose"], p["neck_pose"], p["jaw_pose"], p["eye_pose"]))
        return float(np.sum(vertices * np.asarray(weights[0], np.float64)))

    numeric = (reference_loss(1e-5) - reference_loss(-1e-5)) / 2e-5
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_jit_eager_and_vmap_agree(template):
    rng = np.random.default_rng(4)
    inputs = random_inputs(rng, 2, 5, 4)
    eager = template.forward(**inputs)
    jitted = jax.jit(lambda model, p: model.forward(**p))(template, inputs)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    stacked = {k: np.stack([v, v[::-1]]) for k, v in inputs.items()}                 # (2, 2, k)
    mapped = jax.vmap(lambda p: template.forward(**p))(stacked)
    np.testing.assert_allclose(np.asarray(mapped[0]), np.asarray(eager), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mapped[1]), np.asarray(eager)[::-1], atol=1e-6)
    # Op-by-op (no XLA fusion at all) on the rotation, including its small-angle branch.
    vectors = jnp.asarray(np.concatenate([rng.normal(size=(4, 3)), np.zeros((1, 3))]), jnp.float32)
    with jax.disable_jit():
        unfused = flame.rodrigues(vectors)
    np.testing.assert_allclose(np.asarray(unfused), np.asarray(flame.rodrigues(vectors)), atol=1e-6)


def test_bad_parameters_raise_clear_errors(template):
    with pytest.raises(ValueError, match=r"shape has 27 coefficients but the model 'template_head' holds 26"):
        template.forward(shape=np.zeros((1, template.num_shape + 1), np.float32))
    with pytest.raises(ValueError, match=r"expression must be batched \(B, k\)"):
        template.forward(expression=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"jaw_pose must be \(B, 3\)"):
        template.forward(jaw_pose=np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"eye_pose must be \(B, 6\)"):
        template.forward(eye_pose=np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        template.forward(shape=np.zeros((2, 3), np.float32), jaw_pose=np.zeros((3, 3), np.float32))


# ----------------------------------------------------------------------------- geometry
def test_vertex_normals_outward_on_an_icosahedron_and_match_a_naive_loop():
    t = (1.0 + 5 ** 0.5) / 2
    points = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                       [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], np.float64)
    faces = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                      [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                      [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    normals = np.asarray(flame.vertex_normals(jnp.asarray(points, jnp.float32), faces))
    np.testing.assert_allclose(normals, points / np.linalg.norm(points, axis=1, keepdims=True), atol=1e-6)

    rng = np.random.default_rng(5)
    vertices = rng.normal(size=(2, 30, 3))
    faces = np.array([rng.choice(30, 3, replace=False) for _ in range(50)])
    expected = np.zeros_like(vertices)
    for b in range(2):
        for a, c, d in faces:
            n = np.cross(vertices[b, c] - vertices[b, a], vertices[b, d] - vertices[b, a])
            for k in (a, c, d):
                expected[b, k] += n
    lengths = np.linalg.norm(expected, axis=-1, keepdims=True)
    expected = np.where(lengths > 0, expected / np.where(lengths > 0, lengths, 1), 0)
    got = np.asarray(flame.vertex_normals(jnp.asarray(vertices, jnp.float32), faces))
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_vertex_normals_safe_for_zero_area_faces():
    vertices = jnp.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0]])
    faces = np.array([[0, 1, 2]])                 # collinear: zero area; vertex 3 unused
    normals = flame.vertex_normals(vertices, faces)
    np.testing.assert_array_equal(np.asarray(normals), 0.0)
    gradient = jax.grad(lambda v: jnp.sum(flame.vertex_normals(v, faces)))(vertices)
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_template_normals_point_out_of_the_head(template):
    normals = np.asarray(flame.vertex_normals(template.v_template, template.faces))
    vertices = np.asarray(template.v_template)
    nose_tip = np.argmax(vertices[:, 2])
    crown = np.argmax(vertices[:, 1])
    assert normals[nose_tip, 2] > 0.9 and normals[crown, 1] > 0.9
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)


def test_up_axis_is_the_posed_y_axis(template):
    rng = np.random.default_rng(6)
    global_pose, neck_pose = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    expected = (Rotation.from_rotvec(global_pose).as_matrix() @ Rotation.from_rotvec(neck_pose).as_matrix())[..., 1]
    got = template.up_axis(global_pose.astype(np.float32), neck_pose.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(template.up_axis()), [[0.0, 1.0, 0.0]])


def test_world_transform_frames_the_head_like_eg3d(template):
    from rasterizer.types import look_at_eg3d_label
    world = np.asarray(template.to_world(template.v_template))
    np.testing.assert_allclose(world, flame.WORLD_SCALE * np.asarray(template.v_template)
                               + np.asarray(flame.WORLD_TRANSLATION), atol=1e-6)
    label = look_at_eg3d_label(0.0, 0.0)
    cam2world, intrinsics = label[:16].reshape(4, 4).astype(np.float64), label[16:].reshape(3, 3)
    camera = (world - cam2world[:3, 3]) @ cam2world[:3, :3]               # OpenCV camera axes
    image = camera[:, :2] / camera[:, 2:] * intrinsics[0, 0] + 0.5         # normalised image coords
    head = np.asarray(template.v_template)[:, 1] > -0.09                  # above the chin
    # EG3D's frontal camera (2.7 from the world origin, 2.5 from the look-at point) frames
    # the head as FFHQ's crops do: sides and chin in view, the crown cut by a few percent.
    assert image[head, 0].min() > 0.0 and image[head, 0].max() < 1.0
    assert image[head, 1].max() < 1.0 and image[head, 1].min() > -0.05
    nose = np.argmax(np.asarray(template.v_template)[:, 2])
    assert abs(image[nose, 0] - 0.5) < 0.02 and abs(image[nose, 1] - 0.5) < 0.1
    height = image[head, 1].max() - image[head, 1].min()
    assert 0.6 < height < 0.95                                            # fills the crop


def test_model_is_a_pytree_and_the_template_is_built_once(template):
    assert flame.load() is template
    leaves, treedef = jax.tree_util.tree_flatten(template)
    assert len(leaves) == 9
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.mouth_rect == template.mouth_rect and rebuilt.parents == PARENTS


# ----------------------------------------------------------------------------- loading
def synthetic_flame(rng, num_vertices=40, num_faces=60, num_columns=400):
    """A small random model in FLAME's layout (J_regressor scipy.sparse, as in FLAME)."""
    regressor = rng.random((5, num_vertices)) * (rng.random((5, num_vertices)) < 0.3)
    regressor[:, 0] += 1e-3
    regressor /= regressor.sum(axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(5) * 0.5, size=num_vertices)
    return {
        "v_template": rng.normal(size=(num_vertices, 3)) * 0.1,
        "shapedirs": rng.normal(size=(num_vertices, 3, num_columns)) * 1e-3,
        "posedirs": rng.normal(size=(num_vertices, 3, 36)) * 1e-2,
        "J_regressor": sparse.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "f": np.array([rng.choice(num_vertices, 3, replace=False) for _ in range(num_faces)], np.uint32),
        "J": rng.normal(size=(5, 3)),
        "bs_style": "lbs",
    }


def write_obj(path, vertices, faces, vt, ft, rotate_first_face=False, reverse_face_order=False):
    lines = [f"v {x} {y} {z}" for x, y, z in vertices] + [f"vt {u} {v}" for u, v in vt]
    order_of_faces = range(len(faces))[::-1] if reverse_face_order else range(len(faces))
    for k in order_of_faces:
        face, uv_face = faces[k], ft[k]
        order = [1, 2, 0] if (rotate_first_face and k == 0) else [0, 1, 2]
        lines.append("f " + " ".join(f"{face[i] + 1}/{uv_face[i] + 1}" for i in order))
    path.write_text("\n".join(lines) + "\n")


def write_chumpy_pickle(path, arrays):
    """Pickle like FLAME's files: chumpy.ch.Ch objects (a fake chumpy, removed afterwards)."""
    chumpy, chumpy_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
            self._cache = {"r": None}

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set(), "_itr": None}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    chumpy_ch.Ch, chumpy.ch = Ch, chumpy_ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
    try:
        payload = {k: (Ch(v) if k in ("v_template", "shapedirs", "posedirs", "J") else v)
                   for k, v in arrays.items()}
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    rng = np.random.default_rng(7)
    directory = tmp_path_factory.mktemp("flame")
    arrays = synthetic_flame(rng)
    vt = rng.random((70, 2))
    ft = rng.integers(0, 70, size=(len(arrays["f"]), 3))
    write_chumpy_pickle(directory / "generic_model.pkl", arrays)
    np.savez(directory / "flame.npz", **{k: (v.toarray() if sparse.issparse(v) else v)
                                         for k, v in arrays.items() if k != "bs_style"})
    write_obj(directory / "head_template.obj", arrays["v_template"], arrays["f"], vt, ft, rotate_first_face=True,
              reverse_face_order=True)
    np.savez(directory / "uv.npz", vt=vt, ft=ft)
    return dict(dir=directory, arrays=arrays, vt=vt, ft=ft, rect=(0.2, 0.1, 0.6, 0.5))


def test_load_pickle_npz_and_obj_match_the_reference(synthetic):
    assert "chumpy" not in sys.modules
    d, arrays = synthetic["dir"], synthetic["arrays"]
    rng = np.random.default_rng(8)
    shape, expression = rng.normal(size=(1, 10)), rng.normal(size=(1, 7))
    pose = rng.normal(size=(5, 3)) * 0.4
    expected, _ = reference_flame(arrays, 300, shape[0], expression[0], pose)
    for model_file, uv_file in (("generic_model.pkl", "head_template.obj"), ("flame.npz", "uv.npz")):
        model = flame.load(d / model_file, uv_path=d / uv_file, mouth_rect=synthetic["rect"])
        assert "chumpy" not in sys.modules
        assert (model.num_shape, model.num_expression, model.num_vertices) == (300, 100, 40)
        assert model.name == model_file.split(".")[0] and model.mouth_rect == synthetic["rect"]
        np.testing.assert_array_equal(np.asarray(model.ft), synthetic["ft"])
        np.testing.assert_allclose(np.asarray(model.vt), synthetic["vt"], atol=1e-7)
        vertices = model.forward(shape=shape.astype(np.float32), expression=expression.astype(np.float32),
                                 global_pose=pose[None, 0].astype(np.float32),
                                 neck_pose=pose[None, 1].astype(np.float32),
                                 jaw_pose=pose[None, 2].astype(np.float32),
                                 eye_pose=pose[None, 3:].reshape(1, 6).astype(np.float32))
        np.testing.assert_allclose(np.asarray(vertices[0]), expected, atol=2e-6)


def test_load_without_uv_layout_gives_lbs_and_a_clear_error_when_binding(synthetic):
    """LBS needs no UV layout: load(path) alone works; binding texels names the file and uv_path."""
    from reta3d import binding
    d, arrays = synthetic["dir"], synthetic["arrays"]
    rng = np.random.default_rng(10)
    shape, expression = rng.normal(size=(1, 12)), rng.normal(size=(1, 9))
    pose = rng.normal(size=(5, 3)) * 0.4
    expected, expected_joints = reference_flame(arrays, 300, shape[0], expression[0], pose)
    inputs = dict(shape=shape.astype(np.float32), expression=expression.astype(np.float32),
                  global_pose=pose[None, 0].astype(np.float32), neck_pose=pose[None, 1].astype(np.float32),
                  jaw_pose=pose[None, 2].astype(np.float32),
                  eye_pose=pose[None, 3:].reshape(1, 6).astype(np.float32))
    for model_file in ("generic_model.pkl", "flame.npz"):
        model = flame.load(d / model_file)
        assert not model.has_uv_layout and model.num_vertices == 40
        vertices, joints = model.forward(**inputs, return_joints=True)
        np.testing.assert_allclose(np.asarray(vertices[0]), expected, atol=2e-6)
        np.testing.assert_allclose(np.asarray(joints[0]), expected_joints, atol=2e-6)
        # Still a pytree that jit accepts (the absent UV arrays are empty subtrees).
        jitted = jax.jit(lambda m, p: m.forward(**p))(model, inputs)
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(vertices), atol=1e-6)
        assert len(jax.tree_util.tree_leaves(model)) == 7
        message = rf"{model_file}: loaded without a UV layout.*uv_path=head_template\.obj"
        for bind in (lambda: binding.face_binding(model, 8), lambda: binding.mouth_binding(model, 4),
                     lambda: binding.HeadBinding.from_model(model, 8, 4), lambda: model.vt,
                     lambda: model.ft, lambda: model.mouth_rect):
            with pytest.raises(ValueError, match=message):
                bind()
    # A mouth_rect given without a UV layout is kept (and checked), the faces still cannot bind.
    model = flame.load(d / "flame.npz", mouth_rect=synthetic["rect"])
    assert model.mouth_rect == synthetic["rect"]
    with pytest.raises(ValueError, match=r"flame.npz: loaded without a UV layout"):
        binding.HeadBinding.from_model(model, 8, 4)
    with pytest.raises(ValueError, match="mouth_rect must be"):
        flame.load(d / "flame.npz", mouth_rect=(0.5, 0.5, 0.4, 0.9))
    # With the UV layout the same file binds.
    bound = binding.face_binding(flame.load(d / "flame.npz", uv_path=d / "uv.npz",
                                            mouth_rect=synthetic["rect"]), 8)
    assert bound.num_texels > 0


def test_unlocatable_mouth_is_an_error_only_when_the_mouth_is_bound(tmp_path):
    """A closed mesh has no mouth opening: the model loads and the face binds; the mouth
    patch raises, naming the file and mouth_rect, until a mouth_rect is given."""
    from reta3d import binding
    # An octahedron: closed (every edge has two faces), so there is no boundary loop at all.
    vertices = 0.1 * np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    faces = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    arrays = synthetic_flame(np.random.default_rng(11), num_vertices=6, num_faces=1, num_columns=8)
    uv = np.array([[0.5, 0.5], [0.0, 0.5], [1.0, 0.5], [0.5, 1.0], [0.5, 0.0]])
    uv_faces = np.array([[0, 1, 3], [0, 3, 2], [0, 2, 4], [0, 4, 1]] * 2)
    arrays.update(v_template=vertices, f=faces, J_regressor=arrays["J_regressor"].toarray(), vt=uv,
                  ft=uv_faces)
    arrays.pop("bs_style")
    np.savez(tmp_path / "closed.npz", **arrays)
    model = flame.load(tmp_path / "closed.npz", num_shape=4)
    assert model.has_uv_layout and binding.face_binding(model, 8).num_texels > 0
    message = r"closed.npz: cannot locate the mouth \(the mesh has no open boundary\).*mouth_rect="
    for bind in (lambda: model.mouth_rect, lambda: binding.mouth_binding(model, 4),
                 lambda: binding.HeadBinding.from_model(model, 8, 4)):
        with pytest.raises(ValueError, match=message):
            bind()
    given = flame.load(tmp_path / "closed.npz", num_shape=4, mouth_rect=(0.25, 0.25, 0.75, 0.75))
    assert binding.mouth_binding(given, 4).num_texels == 16


def test_num_shape_split_and_flat_posedirs(synthetic, tmp_path):
    arrays = dict(synthetic["arrays"])
    arrays["posedirs"] = arrays["posedirs"].reshape(-1, 36)
    arrays["J_regressor"] = arrays["J_regressor"].toarray()
    arrays.pop("bs_style")
    np.savez(tmp_path / "flat.npz", **arrays)
    model = flame.load(tmp_path / "flat.npz", uv_path=synthetic["dir"] / "uv.npz", num_shape=250,
                       mouth_rect=synthetic["rect"])
    assert (model.num_shape, model.num_expression) == (250, 150)
    np.testing.assert_allclose(np.asarray(model.posedirs), synthetic["arrays"]["posedirs"], atol=1e-7)


def test_mouth_rect_is_found_from_the_mouth_opening(tmp_path):
    """A lat-long sphere with a neck opening, a mouth hole in front and two eye holes."""
    rings, segments = 20, 48
    polar = np.pi * np.arange(1, rings + 1) / (rings + 1)
    azimuth = 2 * np.pi * np.arange(segments) / segments - np.pi
    p, a = np.meshgrid(polar, azimuth, indexing="ij")
    vertices = 0.1 * np.stack([np.sin(p) * np.sin(a), np.cos(p), np.sin(p) * np.cos(a)], -1).reshape(-1, 3)
    vt = np.stack([(a + np.pi) / (2 * np.pi), 1 - p / np.pi], -1).reshape(-1, 2)
    ids = np.arange(rings * segments).reshape(rings, segments)
    # Holes: the mouth straddles x = 0 below the equator; the eyes do not straddle it. The
    # open top, bottom and back seam make the largest loop (like FLAME's neck opening).
    faces, holes = [], {(13, 23), (13, 24), (8, 17), (8, 30)}
    for i in range(rings - 1):
        for j in range(segments - 1):
            if (i, j) not in holes:
                faces += [[ids[i, j], ids[i + 1, j], ids[i + 1, j + 1]], [ids[i, j], ids[i + 1, j + 1], ids[i, j + 1]]]
    faces = np.array(faces)
    arrays = synthetic_flame(np.random.default_rng(9), num_vertices=len(vertices), num_faces=1, num_columns=8)
    arrays.update(v_template=vertices, f=faces, J_regressor=arrays["J_regressor"].toarray(), vt=vt, ft=faces)
    arrays.pop("bs_style")
    np.savez(tmp_path / "holes.npz", **arrays)
    model = flame.load(tmp_path / "holes.npz", num_shape=4)
    u0, v0, u1, v1 = model.mouth_rect
    mouth_uv = vt[ids[13:15, 23:26].ravel()]
    eye_uv = vt[ids[8:10, [17, 18, 30, 31]].ravel()]
    assert np.all((mouth_uv >= [u0, v0]) & (mouth_uv <= [u1, v1]))
    assert not np.any(np.all((eye_uv >= [u0, v0]) & (eye_uv <= [u1, v1]), axis=1))
    assert u1 - u0 < 0.3


def test_missing_files_raise_file_not_found(tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="nowhere.pkl.*flame.is.tue.mpg.de"):
        flame.load(tmp_path / "nowhere.pkl", uv_path=synthetic["dir"] / "uv.npz")
    with pytest.raises(FileNotFoundError, match="missing_uv.obj"):
        flame.load(synthetic["dir"] / "flame.npz", uv_path=tmp_path / "missing_uv.obj")


def test_bad_files_raise_clear_errors(tmp_path, synthetic):
    d, arrays = synthetic["dir"], synthetic["arrays"]
    dense = {k: (v.toarray() if sparse.issparse(v) else v) for k, v in arrays.items() if k != "bs_style"}
    without = {k: v for k, v in dense.items() if k != "weights"}
    np.savez(tmp_path / "no_weights.npz", **without)
    with pytest.raises(ValueError, match=r"no_weights.npz: missing key 'weights'"):
        flame.load(tmp_path / "no_weights.npz", uv_path=d / "uv.npz")
    (tmp_path / "corrupt.pkl").write_bytes((d / "generic_model.pkl").read_bytes()[:500])
    with pytest.raises(errors.InputError, match="corrupt.pkl: could not be read as a FLAME pickle"):
        flame.load(tmp_path / "corrupt.pkl", uv_path=d / "uv.npz")
    np.savez(tmp_path / "few_faces_uv.npz", vt=synthetic["vt"], ft=synthetic["ft"][:-1])
    with pytest.raises(errors.InputError, match=r"few_faces_uv.npz: the UV layout has 59 faces but the model .* has 60"):
        flame.load(d / "flame.npz", uv_path=tmp_path / "few_faces_uv.npz")
    other = arrays["f"].copy()
    other[3] = other[3][::-1]
    write_obj(tmp_path / "other.obj", arrays["v_template"], other, synthetic["vt"], synthetic["ft"])
    with pytest.raises(ValueError, match="other.obj: face 3 uses vertices .* does not match the model"):
        flame.load(d / "flame.npz", uv_path=tmp_path / "other.obj")
    other[3] = [0, 1, 2] if set(other[3]) != {0, 1, 2} else [0, 1, 3]
    write_obj(tmp_path / "foreign.obj", arrays["v_template"], other, synthetic["vt"], synthetic["ft"])
    with pytest.raises(ValueError, match=r"foreign.obj: face 3 of the model .* is not in the UV file"):
        flame.load(d / "flame.npz", uv_path=tmp_path / "foreign.obj")
    nan = dict(dense, v_template=np.where(np.arange(40)[:, None] == 5, np.nan, dense["v_template"]))
    np.savez(tmp_path / "nan.npz", **nan)
    with pytest.raises(ValueError, match="nan.npz: 'v_template' contains non-finite values"):
        flame.load(tmp_path / "nan.npz", uv_path=d / "uv.npz")
    np.savez(tmp_path / "posedirs.npz", **dict(dense, posedirs=dense["posedirs"][:, :, :30]))
    with pytest.raises(ValueError, match=r"posedirs.npz: posedirs must be \(40, 3, 36\)"):
        flame.load(tmp_path / "posedirs.npz", uv_path=d / "uv.npz")
    with pytest.raises(ValueError, match="mouth_rect"):
        flame.load(d / "flame.npz", uv_path=d / "uv.npz", mouth_rect=(0.5, 0.5, 0.4, 0.9))
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(errors.InputError, match="unsupported FLAME model file type"):
        flame.load(tmp_path / "model.txt", uv_path=d / "uv.npz")


def test_pickle_loader_refuses_foreign_classes(tmp_path, synthetic):
    class Exploit:
        def __reduce__(self):
            import os
            return (os.getcwd, ())

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"v_template": Exploit()}, handle, protocol=2)
    with pytest.raises(ValueError, match="evil.pkl: could not be read.*refusing to load"):
        flame.load(tmp_path / "evil.pkl", uv_path=synthetic["dir"] / "uv.npz")
