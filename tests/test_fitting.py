"""Landmark embeddings (reta3d.fitting.embedding) and the landmark fitter (reta3d.fitting.fit).

Known-answer fits: landmarks of the template head under known head poses (relative to the
canonical FFHQ camera), jaw openings, shapes and expressions, projected at 512^2 with
N(0, 1 px) noise, must be fitted back (angles within 2 degrees, jaw within 0.05 rad, the
landmark-observable expression components with correlation >= 0.9).
"""
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d import errors, flame, sequences, template_head
from reta3d.fitting import embedding as emb_mod
from reta3d.fitting import fit as fit_mod
from reta3d.fitting.embedding import MIRROR_68, landmarks_3d, load_embedding, template_embedding
from reta3d.fitting.fit import canonical_label, fit_landmarks, project

SIZE = 512
NUM_CASES = 16

# The 68-point mirror table written out by hand (iBUG 300-W): i <-> MIRROR[i].
MIRROR_PAIRS = ([(i, 16 - i) for i in range(17)]
                + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
                + [(27, 27), (28, 28), (29, 29), (30, 30)]
                + [(31, 35), (32, 34), (33, 33)]
                + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
                + [(48, 54), (49, 53), (50, 52), (51, 51), (55, 59), (56, 58), (57, 57)]
                + [(60, 64), (61, 63), (62, 62), (65, 67), (66, 66)])


@pytest.fixture(scope="module")
def model():
    return flame.load()


@pytest.fixture(scope="module")
def embedding():
    return template_embedding()


def _points(model, embedding, **flame_params):
    vertices = model.forward(**flame_params)
    return np.asarray(landmarks_3d(vertices, model.faces, embedding), np.float64)


# ----------------------------------------------------------------------------- embedding
def test_mirror_table_matches_hand_written():
    table = np.arange(68)
    for a, b in MIRROR_PAIRS:
        table[a], table[b] = b, a
    np.testing.assert_array_equal(MIRROR_68, table)
    np.testing.assert_array_equal(MIRROR_68[MIRROR_68], np.arange(68))


def test_template_embedding_valid(model, embedding):
    assert embedding.face_index.shape == (68,) and embedding.face_index.dtype == np.int32
    assert embedding.barycentric.shape == (68, 3) and embedding.barycentric.dtype == np.float32
    assert embedding.face_index.min() >= 0 and embedding.face_index.max() < model.num_faces
    assert embedding.barycentric.min() >= 0.0 and embedding.barycentric.max() <= 1.0
    np.testing.assert_allclose(embedding.barycentric.sum(axis=1), 1.0, atol=1e-6)
    assert embedding.dynamic_face_index.shape == (79, 17)
    assert embedding.dynamic_barycentric.shape == (79, 17, 3)
    assert embedding.dynamic_face_index.max() < model.num_faces
    np.testing.assert_allclose(embedding.dynamic_barycentric.sum(axis=-1), 1.0, atol=1e-6)
    # Skin only: no landmark triangle belongs to an eyeball (skinned to the eye joints).
    weights = np.asarray(model.weights)
    faces = np.asarray(model.faces)
    for ids in (embedding.face_index, embedding.dynamic_face_index.reshape(-1)):
        assert weights[faces[ids]][..., 3:].sum(axis=-1).max() < 0.5
    # The yaw-0 row of the dynamic contour is the static contour; deterministic build.
    np.testing.assert_array_equal(embedding.dynamic_face_index[0], embedding.face_index[:17])
    again = emb_mod._build_template_embedding()
    np.testing.assert_array_equal(again.face_index, embedding.face_index)
    np.testing.assert_array_equal(again.barycentric, embedding.barycentric)


def test_template_embedding_symmetric_and_ordered(model, embedding):
    p = _points(model, embedding)[0] * 1000.0                      # mm
    mirrored = p[MIRROR_68]
    np.testing.assert_allclose(p[:, 0], -mirrored[:, 0], atol=2.0)
    np.testing.assert_allclose(p[:, 1:], mirrored[:, 1:], atol=2.0)
    pairs = [(a, b) for a, b in MIRROR_PAIRS if a != b]
    for a, b in pairs:                                            # opposite sides
        assert p[a, 0] < -1.0 < 1.0 < p[b, 0] or p[b, 0] < -1.0 < 1.0 < p[a, 0], (a, b)
    assert np.all(p[:17, 0][:8] < 0) and np.all(p[9:17, 0] > 0)   # image left = FLAME x < 0
    assert np.all(np.diff(p[:17, 0]) > 0)                         # jaw 0..16 left to right
    brows, eyes = p[17:27, 1].mean(), p[36:48, 1].mean()
    mouth = p[48:68, 1].mean()
    assert brows > eyes > p[30, 1] > mouth > p[8, 1]
    assert p[27, 1] > p[28, 1] > p[29, 1] > p[30, 1]              # bridge top to tip
    assert p[30, 2] == p[:, 2].max()                              # the tip sticks out most
    assert np.all(np.diff(p[31:36, 0]) > 0) and np.all(np.diff(p[48:55, 0]) > 0)
    assert np.all(np.diff(p[54:60, 0]) < 0)                       # lower lip right to left
    for eye in (p[36:42], p[42:48]):                              # corners widest, lids around
        assert eye[0, 0] < eye[1:3, 0].min() and eye[3, 0] > eye[1:3, 0].max()
        assert eye[1:3, 1].min() > max(eye[0, 1], eye[3, 1]) > eye[4:6, 1].max()
    assert p[51, 1] > p[62, 1] >= p[66, 1] > p[57, 1]              # outer/inner lips
    assert abs(p[39, 0]) < abs(p[36, 0]) and abs(p[42, 0]) < abs(p[45, 0])   # inner corners


def test_jaw_opening_moves_lower_lip_and_chin_only(model, embedding):
    rest = _points(model, embedding)[0]
    opened = _points(model, embedding, jaw_pose=np.array([[0.3, 0.0, 0.0]]))[0]
    delta = (opened - rest) * 1000.0
    for i in (57, 66, 8, 56, 58, 65, 67, 5, 11):
        assert delta[i, 1] < -3.0, (i, delta[i])
    assert opened[62, 1] - opened[66, 1] > 0.005                  # the mouth opens
    for i in (27, 30, 17, 26, 36, 45, 51, 62):
        assert np.abs(delta[i]).max() < 0.05, (i, delta[i])


def test_dynamic_contour_rows_and_continuity(model, embedding):
    np.testing.assert_array_equal(emb_mod.dynamic_row(np.radians([0.0, 1.0, 39.0, 50.0, -1.0, -39.0, -50.0, 0.6])),
                                  [0, 1, 39, 39, 40, 78, 78, 1])
    row0, row1, alpha = emb_mod.dynamic_rows_blend(np.radians([10.25, -0.5, 45.0]))
    np.testing.assert_array_equal(row0, [10, 40, 38])
    np.testing.assert_array_equal(row1, [11, 0, 39])
    np.testing.assert_allclose(alpha, [0.25, 0.5, 1.0], atol=1e-4)
    v = np.asarray(model.v_template)
    faces = np.asarray(model.faces)
    rows = {d: np.einsum("nkc,nk->nc", v[faces[embedding.dynamic_face_index[emb_mod.dynamic_row(np.radians(d))]]],
                         embedding.dynamic_barycentric[emb_mod.dynamic_row(np.radians(d))]) for d in range(-39, 40)}
    for d in range(1, 40):                                        # +yaw mirrors -yaw
        np.testing.assert_allclose(rows[d] * [-1, 1, 1], rows[-d][::-1], atol=2e-3)
    for d in range(-30, 30):                                      # seen from the turned camera,
        a = np.radians(d + 0.5)                                   # neighbouring rows nearly agree
        image = lambda p: np.stack([np.cos(a) * p[:, 0] + np.sin(a) * p[:, 2], p[:, 1]], -1)   # noqa: E731
        assert np.linalg.norm(image(rows[d + 1]) - image(rows[d]), axis=-1).max() < 0.003, d
    # Turning the face toward +x moves the far (x > 0) contour, keeps the near one.
    assert np.abs(rows[25][:5] - rows[0][:5]).max() < 1e-9
    assert np.linalg.norm(rows[25][13:] - rows[0][13:], axis=-1).max() > 0.01


def test_landmarks_3d_jit_batch_and_yaw(model, embedding):
    vertices = model.forward(expression=jnp.zeros((2, 16)))
    yaw = jnp.asarray(np.radians([0.0, 20.0]), jnp.float32)
    eager = landmarks_3d(vertices, model.faces, embedding, yaw=yaw)
    jitted = jax.jit(landmarks_3d, static_argnames=("interpolate",))(vertices, model.faces, embedding, yaw)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-7)
    assert eager.shape == (2, 68, 3) and eager.dtype == jnp.float32
    static = landmarks_3d(vertices, model.faces, embedding)
    np.testing.assert_allclose(np.asarray(eager[0]), np.asarray(static[0]), atol=1e-7)     # yaw 0 row
    np.testing.assert_allclose(np.asarray(eager[1, 17:]), np.asarray(static[1, 17:]), atol=1e-7)
    assert np.abs(np.asarray(eager[1, 12:17] - static[1, 12:17])).max() > 0.005          # far side slid
    blended = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.asarray(np.radians([0.0, 20.5])), interpolate=True)
    lo = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.asarray(np.radians([0.0, 20.0])))
    hi = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.asarray(np.radians([0.0, 21.0])))
    np.testing.assert_allclose(np.asarray(blended[1]), 0.5 * np.asarray(lo[1] + hi[1]), atol=1e-6)
    with pytest.raises(ValueError, match="yaw"):
        landmarks_3d(vertices, model.faces, embedding, yaw=jnp.zeros(3))
    with pytest.raises(ValueError, match="vertices"):
        landmarks_3d(vertices[0], model.faces, embedding)


# ----------------------------------------------------------------------------- embedding files
def _valid_tables(model, rng):
    """Random (valid) DECA tables for a model."""
    def bary(shape):
        b = rng.uniform(0.05, 1.0, shape + (3,))
        return (b / b.sum(-1, keepdims=True)).astype(np.float32)
    return {
        "static_lmk_faces_idx": rng.integers(0, model.num_faces, 51).astype(np.int64),
        "static_lmk_bary_coords": bary((51,)).astype(np.float64),
        "dynamic_lmk_faces_idx": rng.integers(0, model.num_faces, (79, 17)).astype(np.int64),
        "dynamic_lmk_bary_coords": bary((79, 17)),
        "full_lmk_faces_idx": rng.integers(0, model.num_faces, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": bary((1, 68)),
    }


def _save_npy_dict(path, data):
    np.save(path, data, allow_pickle=True)
    return path


def test_load_deca_and_flame_embeddings_round_trip(model, tmp_path):
    rng = np.random.default_rng(3)
    tables = _valid_tables(model, rng)
    deca = load_embedding(_save_npy_dict(tmp_path / "landmark_embedding.npy", tables), model)
    np.testing.assert_array_equal(deca.face_index[17:], tables["static_lmk_faces_idx"])
    np.testing.assert_array_equal(deca.face_index[:17], tables["full_lmk_faces_idx"][0, :17])
    np.testing.assert_allclose(deca.barycentric[17:], tables["static_lmk_bary_coords"], atol=1e-7)
    np.testing.assert_array_equal(deca.dynamic_face_index, tables["dynamic_lmk_faces_idx"])
    np.testing.assert_allclose(deca.dynamic_barycentric, tables["dynamic_lmk_bary_coords"])
    assert deca.has_contour and deca.face_index.dtype == np.int32
    # Usable: 68 finite points on the model.
    points = landmarks_3d(model.forward(), model.faces, deca, yaw=jnp.zeros(1))
    assert np.all(np.isfinite(np.asarray(points)))

    static = {"lmk_face_idx": tables["static_lmk_faces_idx"].astype(np.uint32),
              "lmk_b_coords": tables["static_lmk_bary_coords"]}
    with open(tmp_path / "flame_static_embedding.pkl", "wb") as handle:
        pickle.dump(static, handle, protocol=2)
    dynamic = {"lmk_face_idx": tables["dynamic_lmk_faces_idx"], "lmk_b_coords": tables["dynamic_lmk_bary_coords"]}
    flame_emb = load_embedding(tmp_path / "flame_static_embedding.pkl", model,
                               dynamic_path=_save_npy_dict(tmp_path / "flame_dynamic_embedding.npy", dynamic))
    np.testing.assert_array_equal(flame_emb.face_index[17:], static["lmk_face_idx"])
    np.testing.assert_array_equal(flame_emb.face_index[:17], tables["dynamic_lmk_faces_idx"][0])
    np.testing.assert_array_equal(flame_emb.dynamic_face_index, dynamic["lmk_face_idx"])
    # Without the dynamic file there is no jaw contour: NaN points 0-16.
    no_contour = load_embedding(tmp_path / "flame_static_embedding.pkl", model)
    assert not no_contour.has_contour and no_contour.dynamic_face_index is None
    points = np.asarray(landmarks_3d(model.forward(), model.faces, no_contour))
    assert np.all(np.isnan(points[0, :17])) and np.all(np.isfinite(points[0, 17:]))


def test_load_deca_embedding_with_torch_tensors(model, tmp_path):
    """DECA's real file pickles its dynamic tables as torch tensors: decoded without torch."""
    torch = pytest.importorskip("torch")
    tables = _valid_tables(model, np.random.default_rng(4))
    tables["dynamic_lmk_faces_idx"] = torch.from_numpy(tables["dynamic_lmk_faces_idx"])
    strided = torch.from_numpy(tables["dynamic_lmk_bary_coords"]).permute(2, 1, 0).contiguous().permute(2, 1, 0)
    tables["dynamic_lmk_bary_coords"] = strided                   # a non-contiguous tensor
    path = _save_npy_dict(tmp_path / "landmark_embedding.npy", tables)
    loaded = load_embedding(path, model)
    np.testing.assert_array_equal(loaded.dynamic_face_index, tables["dynamic_lmk_faces_idx"].numpy())
    np.testing.assert_allclose(loaded.dynamic_barycentric, tables["dynamic_lmk_bary_coords"].numpy())


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case, message", [
    ("missing_key", "missing key"),
    ("face_too_large", "face indices"),
    ("face_negative", "face indices"),
    ("bary_sum", "sum to 1"),
    ("bary_negative", "negative"),
    ("wrong_shape", "shape"),
    ("float_faces", "integer face indices"),
    ("plain_array", "not a landmark embedding dict"),
    ("not_dict", "holds a dict"),
    ("foreign_keys", "not a landmark embedding"),
    ("evil", "could not be read"),
    ("suffix", "unsupported"),
    ("dynamic_as_static", "dynamic"),
])
def test_load_embedding_errors_name_the_file(model, tmp_path, case, message):
    rng = np.random.default_rng(5)
    tables = _valid_tables(model, rng)
    path = tmp_path / f"bad_{case}.npy"
    if case == "missing_key":
        del tables["dynamic_lmk_bary_coords"]
    elif case == "face_too_large":
        tables["static_lmk_faces_idx"][3] = model.num_faces
    elif case == "face_negative":
        tables["dynamic_lmk_faces_idx"][1, 2] = -1
    elif case == "bary_sum":
        tables["static_lmk_bary_coords"][0] = [0.5, 0.5, 0.1]
    elif case == "bary_negative":
        tables["full_lmk_bary_coords"][0, 5] = [1.2, -0.2, 0.0]
    elif case == "wrong_shape":
        tables["dynamic_lmk_faces_idx"] = tables["dynamic_lmk_faces_idx"][:40]
    elif case == "float_faces":
        tables["static_lmk_faces_idx"] = tables["static_lmk_faces_idx"] + 0.5
    if case == "plain_array":
        np.save(path, np.zeros((51, 3)))
    elif case == "not_dict":
        np.save(path, np.array([1, 2, 3], dtype=object), allow_pickle=True)
    elif case == "foreign_keys":
        _save_npy_dict(path, {"vertices": np.zeros(3)})
    elif case == "evil":
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps({"lmk_face_idx": _Evil()}))
    elif case == "suffix":
        path = tmp_path / "embedding.txt"
        path.write_text("hello")
    elif case == "dynamic_as_static":
        path = tmp_path / "flame_dynamic_embedding.npy"
        _save_npy_dict(path, {"lmk_face_idx": tables["dynamic_lmk_faces_idx"],
                              "lmk_b_coords": tables["dynamic_lmk_bary_coords"]})
    else:
        _save_npy_dict(path, tables)
    with pytest.raises(errors.InputError, match=message) as error:
        load_embedding(path, model)
    assert str(path) in str(error.value)


def test_load_embedding_missing_file_says_where_to_get_it(model, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_embedding(tmp_path / "landmark_embedding.npy", model)
    assert "yfeng95/DECA" in str(error.value) and "flame.is.tue.mpg.de" in str(error.value)


# ----------------------------------------------------------------------------- projection
def test_project_pixel_convention():
    label = canonical_label()
    # The look-at point (0, 0, 0.2) is on the optical axis: the principal point, size / 2.
    pixels = np.asarray(project(np.array([[[0.0, 0.0, 0.2], [0.1, 0.1, 0.2]]]), label[None], SIZE))
    np.testing.assert_allclose(pixels[0, 0], [SIZE / 2, SIZE / 2], atol=1e-3)
    assert pixels[0, 1, 0] > SIZE / 2 and pixels[0, 1, 1] < SIZE / 2   # +x image right, +y up
    with pytest.raises(ValueError):
        project(np.zeros((1, 4, 3)), label[None, :24], SIZE)


# ----------------------------------------------------------------------------- known answers
def _deca_yaw(rotation):
    return np.arctan2(-rotation[..., 2, 0], np.hypot(rotation[..., 0, 0], rotation[..., 1, 0]))


def _synthesise(model, embedding, ypr, jaw_open, shape, expression, rng, noise=1.0, translation=None,
                neck=None):
    """Landmark pixels (T, 68, 2) and true labels (T, 25) for head poses relative to the
    canonical camera (the head at global pose 0, its motion put into the camera)."""
    num = len(ypr)
    rotation = fit_mod.rotation_from_angles(ypr)
    if translation is None:
        translation = rng.normal(0.0, 0.02, (num, 3))
    centre = np.array([0.0, 0.05, 0.05])
    motion = np.tile(np.eye(4), (num, 1, 1))
    motion[:, :3, :3] = rotation
    motion[:, :3, 3] = centre - rotation @ centre + translation
    label0 = canonical_label().astype(np.float64)
    cam2world = np.linalg.inv(motion) @ label0[:16].reshape(4, 4)
    labels = np.concatenate([cam2world.reshape(num, 16), np.tile(label0[16:], (num, 1))], 1).astype(np.float32)
    jaw = np.zeros((num, 3))
    jaw[:, 0] = jaw_open
    neck = np.zeros((num, 3)) if neck is None else neck
    vertices = model.forward(shape=shape, expression=expression, jaw_pose=jaw, neck_pose=neck)
    head = rotation @ fit_mod._rotation_matrix(neck)
    points = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.asarray(_deca_yaw(head), jnp.float32),
                          interpolate=True)
    pixels = np.asarray(project(model.to_world(points), labels, SIZE), np.float64)
    return pixels + rng.normal(0.0, noise, pixels.shape), labels, pixels


def _observable_expressions(model, embedding):
    """Expression components that move the landmarks and that landmarks can tell apart.

    Moves: mean landmark displacement per unit coefficient > 1 px (frontal, 512^2).
    Distinct: the part of that displacement that the other expression components cannot
    produce (orthogonal to their span) is still > 0.5 px on average. smile / mouth_stretch /
    frown are (nearly) one linear combination on the 68 points (0.04-0.06 px unique), and
    lips_part is upper_lip_raise + lower_lip_depress (0.2 px unique): landmarks cannot split
    them, only their sum (checked separately).
    """
    label = canonical_label()[None].repeat(model.num_expression + 1, 0)
    expression = np.concatenate([np.zeros((1, model.num_expression)), np.eye(model.num_expression)])
    vertices = model.forward(expression=expression)
    points = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.zeros(len(expression)))
    pixels = np.asarray(project(model.to_world(points), label, SIZE), np.float64)
    displacement = (pixels[1:] - pixels[:1]).reshape(model.num_expression, -1)
    moves = np.linalg.norm(displacement.reshape(-1, 68, 2), axis=-1).mean(axis=1)
    unique = np.zeros(model.num_expression)
    for k in range(model.num_expression):
        others = np.delete(displacement, k, axis=0).T
        coef, *_ = np.linalg.lstsq(others, displacement[k], rcond=None)
        unique[k] = np.linalg.norm((displacement[k] - others @ coef).reshape(68, 2), axis=-1).mean()
    return [k for k in range(model.num_expression) if moves[k] > 1.0 and unique[k] > 0.5], displacement


@pytest.fixture(scope="module")
def known_answer(model, embedding):
    rng = np.random.default_rng(2024)
    ypr = np.stack([rng.uniform(-30, 30, NUM_CASES), rng.uniform(-15, 15, NUM_CASES),
                    rng.uniform(-15, 15, NUM_CASES)], -1)
    ypr[:4, 0] = [-30.0, 30.0, -29.0, 28.0]                       # the yaw range's ends
    jaw_open = rng.uniform(0.0, 0.3, NUM_CASES)
    shape = rng.normal(0.0, 0.7, (NUM_CASES, model.num_shape))
    expression = rng.normal(0.0, 0.7, (NUM_CASES, model.num_expression))
    landmarks, labels, clean = _synthesise(model, embedding, ypr, jaw_open, shape, expression, rng)
    # The generator's statistics: 1 px noise, coefficients ~N(0, 0.7^2).
    settings = dict(shared_shape=False, landmark_sigma=1.0 / SIZE, shape_prior=1.0 / 0.49,
                    expression_prior=1.0 / 0.49)
    start = time.perf_counter()
    result = fit_landmarks(model, embedding, landmarks, SIZE, **settings)
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = fit_landmarks(model, embedding, landmarks, SIZE, **settings)
    second = time.perf_counter() - start
    return dict(ypr=ypr, jaw_open=jaw_open, shape=shape, expression=expression, landmarks=landmarks,
                labels=labels, clean=clean, settings=settings, result=result, first=first, second=second)


def test_known_answer_pose_jaw_expression(model, embedding, known_answer):
    result = known_answer["result"]
    angle_error = np.abs(result.yaw_pitch_roll_deg - known_answer["ypr"])
    jaw_error = np.abs(result.jaw_pose[:, 0] - known_answer["jaw_open"])
    observable, displacement = _observable_expressions(model, embedding)
    names = [template_head.EXPRESSION_NAMES[k] for k in observable]
    assert names == ["lip_pucker", "brow_raise", "mouth_sideways"]
    correlation = [np.corrcoef(known_answer["expression"][:, k], result.expression[:, k])[0, 1] for k in observable]
    # What landmarks do see of the whole expression: its displacement of the 68 points.
    seen_true = known_answer["expression"] @ displacement
    seen_fit = result.expression @ displacement
    seen_error = np.linalg.norm((seen_fit - seen_true).reshape(NUM_CASES, 68, 2), axis=-1).mean()
    seen_size = np.linalg.norm(seen_true.reshape(NUM_CASES, 68, 2), axis=-1).mean()
    print(f"\nknown answer ({NUM_CASES} cases): max |angle error| yaw/pitch/roll "
          f"{np.round(angle_error.max(0), 2)} deg, max jaw error {jaw_error.max():.3f} rad, "
          f"correlations {dict(zip(names, np.round(correlation, 3)))}, expression displacement error "
          f"{seen_error:.2f} px of {seen_size:.2f} px, reprojection {result.reprojection_error_px.mean():.2f} px, "
          f"first call {known_answer['first']:.1f} s, then {known_answer['second']:.2f} s")
    assert angle_error.max() < 2.0
    assert jaw_error.max() < 0.05
    assert np.abs(result.jaw_pose[:, 1:]).max() < 0.05
    assert min(correlation) >= 0.9
    assert seen_error < 0.3 * seen_size
    assert np.all(result.reprojection_error_px < 2.0)
    # The returned labels are the true cameras (the head's motion absorbed into them).
    rotation_error = []
    for fitted, true in zip(result.labels, known_answer["labels"]):
        relative = fitted[:16].reshape(4, 4)[:3, :3].T @ true[:16].reshape(4, 4)[:3, :3]
        rotation_error.append(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))
    assert max(rotation_error) < 2.0
    np.testing.assert_allclose(result.labels[:, 16:], known_answer["labels"][:, 16:], atol=1e-6)


def test_fit_result_is_consistent_and_serialisable(model, embedding, known_answer):
    result = known_answer["result"]
    num = NUM_CASES
    assert result.shape.shape == (num, model.num_shape) and result.expression.shape == (num, model.num_expression)
    for key in ("jaw_pose", "neck_pose", "global_pose"):
        assert getattr(result, key).shape == (num, 3)
    assert result.eye_pose.shape == (num, 6) and not result.global_pose.any() and not result.eye_pose.any()
    assert result.labels.shape == (num, 25) and result.labels.dtype == np.float32
    # The head at global pose 0 through the returned cameras gives the fitted landmarks.
    vertices = model.forward(shape=result.shape, expression=result.expression, jaw_pose=result.jaw_pose,
                             neck_pose=result.neck_pose)
    head = fit_mod._rotation_matrix(result.rotation) @ fit_mod._rotation_matrix(result.neck_pose)
    points = landmarks_3d(vertices, model.faces, embedding, yaw=jnp.asarray(_deca_yaw(head), jnp.float32),
                          interpolate=True)
    pixels = np.asarray(project(model.to_world(points), result.labels, SIZE))
    np.testing.assert_allclose(pixels, result.fitted_landmarks, atol=0.05)
    distance = np.linalg.norm(result.fitted_landmarks - known_answer["landmarks"], axis=-1).mean(axis=1)
    np.testing.assert_allclose(result.reprojection_error_px, distance, rtol=1e-4)
    entry = result.to_flame_dict(3)
    assert len(entry["shape"]) == model.num_shape and len(entry["eye_pose"]) == 6
    assert all(isinstance(x, float) for x in entry["jaw_pose"])
    checked = sequences.validate_flame_sequence(result.sequence_arrays(fps=30.0), "fit", model.num_expression,
                                                model.num_shape)
    np.testing.assert_allclose(checked["jaw_pose"], result.jaw_pose)
    arrays = result.flame_arrays()
    assert arrays["shape"].shape == (num, model.num_shape)


def test_confidence_weight_zero_ignores_a_wrong_point(model, embedding, known_answer):
    corrupted = known_answer["landmarks"].copy()
    corrupted[:, 30] += [120.0, -90.0]                            # nose tip far off
    weights = np.ones((NUM_CASES, 68))
    weights[:, 30] = 0.0
    ignored = fit_landmarks(model, embedding, corrupted, SIZE, weights=weights, **known_answer["settings"])
    trusted = fit_landmarks(model, embedding, corrupted, SIZE, **known_answer["settings"])
    clean = known_answer["result"]
    assert np.abs(ignored.yaw_pitch_roll_deg - known_answer["ypr"]).max() < 2.0
    # The ignored point is predicted where it really is, not where the detector put it.
    miss = np.linalg.norm(ignored.fitted_landmarks[:, 30] - known_answer["clean"][:, 30], axis=-1)
    assert miss.max() < 8.0                                       # the detector's was 150 px off
    pulled = np.abs(trusted.yaw_pitch_roll_deg - clean.yaw_pitch_roll_deg).max()
    kept = np.abs(ignored.yaw_pitch_roll_deg - clean.yaw_pitch_roll_deg).max()
    assert kept < 0.5 and pulled > 2.0 * kept
    # Warm start from a previous fit (same compiled program) lands on the same answer.
    again = fit_landmarks(model, embedding, known_answer["landmarks"], SIZE, init=clean, **known_answer["settings"])
    np.testing.assert_allclose(again.yaw_pitch_roll_deg, clean.yaw_pitch_roll_deg, atol=0.2)


def test_temporal_smoothness_reduces_jitter(model, embedding):
    rng = np.random.default_rng(11)
    num = 30                                                      # one second of video
    t = np.arange(num) / num
    ypr = np.stack([20.0 * np.sin(np.pi * t), 8.0 * np.sin(np.pi * t + 0.5), 5.0 * np.cos(np.pi * t)], -1)
    jaw_open = 0.15 + 0.1 * np.sin(np.pi * t)
    expression = np.zeros((num, model.num_expression))
    expression[:, 2] = np.sin(np.pi * t)                          # brow_raise
    expression[:, 15] = 0.8 * np.cos(np.pi * t)                   # mouth_sideways
    shape = np.repeat(rng.normal(0.0, 0.7, (1, model.num_shape)), num, axis=0)
    translation = np.stack([0.01 * np.sin(np.pi * t), np.zeros(num), np.zeros(num)], -1)
    landmarks, _, _ = _synthesise(model, embedding, ypr, jaw_open, shape, expression, rng, noise=2.0,
                                  translation=translation)
    rough = fit_landmarks(model, embedding, landmarks, SIZE, shared_shape=True)
    smooth = fit_landmarks(model, embedding, landmarks, SIZE, shared_shape=True, temporal_weight=1.0)

    def jitter(error):                                            # frame-to-frame error
        return np.sqrt(np.mean(np.diff(error, n=2, axis=0) ** 2))

    angles = {name: jitter(fit.yaw_pitch_roll_deg - ypr) for name, fit in (("rough", rough), ("smooth", smooth))}
    jaw = {name: jitter(fit.jaw_pose[:, 0] - jaw_open) for name, fit in (("rough", rough), ("smooth", smooth))}
    observed = [2, 15]
    expr = {name: jitter(fit.expression[:, observed] - expression[:, observed])
            for name, fit in (("rough", rough), ("smooth", smooth))}
    print(f"\njitter (rms second difference of the error): angles {angles['rough']:.3f} -> {angles['smooth']:.3f} deg, "
          f"jaw {jaw['rough']:.4f} -> {jaw['smooth']:.4f} rad, expression {expr['rough']:.3f} -> {expr['smooth']:.3f}; "
          f"max angle error {np.abs(rough.yaw_pitch_roll_deg - ypr).max():.2f} -> "
          f"{np.abs(smooth.yaw_pitch_roll_deg - ypr).max():.2f} deg")
    assert angles["smooth"] < 0.5 * angles["rough"]
    assert jaw["smooth"] < 0.5 * jaw["rough"]
    assert expr["smooth"] < 0.5 * expr["rough"]
    assert np.abs(smooth.yaw_pitch_roll_deg - ypr).max() < 2.0    # smoother, not biased
    assert smooth.shape.shape == (model.num_shape,)


def test_fit_flame_sized_model_single_photo(model, embedding):
    """A model with FLAME's column counts (300 + 100): only the first 100 / 50 are fitted."""
    rng = np.random.default_rng(7)
    extra_shape = rng.normal(0.0, 1e-4, (model.num_vertices, 3, 300 - model.num_shape)).astype(np.float32)
    extra_expr = rng.normal(0.0, 1e-4, (model.num_vertices, 3, 100 - model.num_expression)).astype(np.float32)
    big = flame.FlameModel(
        v_template=model.v_template, shapedirs=jnp.concatenate([model.shapedirs, extra_shape], -1),
        exprdirs=jnp.concatenate([model.exprdirs, extra_expr], -1), posedirs=model.posedirs,
        J_regressor=model.J_regressor, weights=model.weights, faces=model.faces, name="flame_sized")
    ypr = np.array([[12.0, -6.0, 4.0]])
    expression = np.zeros((1, 100))
    expression[0, 15] = 1.0
    landmarks, _, _ = _synthesise(big, embedding, ypr, np.array([0.2]), np.zeros((1, 300)), expression, rng)
    fit_landmarks(big, embedding, landmarks, SIZE, num_steps=300)  # compile
    start = time.perf_counter()
    result = fit_landmarks(big, embedding, landmarks, SIZE, num_steps=300)
    elapsed = time.perf_counter() - start
    print(f"\none photo, FLAME-sized model (100 shape / 50 expression fitted): {elapsed:.2f} s after compile")
    assert result.shape.shape == (100,) and result.expression.shape == (1, 50)
    assert np.abs(result.yaw_pitch_roll_deg - ypr).max() < 2.0
    assert abs(result.jaw_pose[0, 0] - 0.2) < 0.05
    assert elapsed < 5.0


@pytest.mark.parametrize("change, message", [
    (dict(landmarks=np.zeros((68, 2))), "landmarks must be"),
    (dict(landmarks=np.zeros((2, 51, 2))), "landmarks must be"),
    (dict(nan=True), "non-finite"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=-512), "image_size"),
    (dict(image_size=512.0), "image_size"),
    (dict(weights=np.ones((2, 67))), "weights"),
    (dict(weights=-np.ones((2, 68))), "weights"),
    (dict(weights=np.full((2, 68), np.nan)), "weights"),
    (dict(weights=np.zeros((2, 68))), "non-zero weight"),
    (dict(num_steps=0), "num_steps"),
    (dict(temporal_weight=-1.0), "temporal_weight"),
    (dict(landmark_sigma=0.0), "landmark_sigma"),
    (dict(init={"shape": np.zeros(3)}), "init"),
])
def test_fit_bad_inputs(model, embedding, change, message):
    args = dict(landmarks=np.full((2, 68, 2), 256.0), image_size=SIZE)
    args.update({k: v for k, v in change.items() if k != "nan"})
    if change.get("nan"):
        args["landmarks"] = args["landmarks"].copy()
        args["landmarks"][1, 7, 0] = np.nan
    landmarks, image_size = args.pop("landmarks"), args.pop("image_size")
    with pytest.raises(ValueError, match=message):
        fit_landmarks(model, embedding, landmarks, image_size, **args)
