"""Face detection and 68-point landmarks (reta3d/fitting/landmarks.py) on real photos shipped
inside scikit-image and matplotlib (nothing is downloaded). The expected positions below were
read off overlays of the photos."""
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-faces.txt")
skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")

from reta3d.fitting import landmarks  # noqa: E402
from reta3d.fitting.crop import five_points  # noqa: E402


def _grace_hopper() -> np.ndarray:
    from PIL import Image
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return np.asarray(image.convert("RGB"))


# photo → (face region x0, y0, x1, y1; image-left eye, image-right eye, nose tip, mouth centre),
# pixels, from looking at the photos with the landmarks drawn on them.
PHOTOS = {
    "astronaut": (skimage_data.astronaut, (172, 74, 268, 170),
                  [(204, 102), (247, 105), (226, 128), (224, 141)]),
    "grace_hopper": (_grace_hopper, (178, 137, 368, 328),
                     [(224, 193), (306, 190), (268, 238), (267, 280)]),
}


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def photo(request):
    load, region, points = PHOTOS[request.param]
    image = load()
    return request.param, image, np.array(region, np.float32), np.array(points, np.float32)


def test_finds_the_face_where_it_is(photo):
    name, image, region, expected = photo
    faces = landmarks.detect_faces(image)
    assert faces, name
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    assert face.box.shape == (4,) and face.box.dtype == np.float32
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert _iou(face.box, region) > 0.8, (name, face.box)
    assert face.score > 0.5
    # Only one real face; the astronaut's round mission patch is a weak false positive (0.12).
    assert len(landmarks.detect_faces(image, min_score=0.5)) == 1
    # 68 points inside the box grown by 15% (dlib's box stops above the chin and inside the ears).
    grow = 0.15 * (face.box[2] - face.box[0])
    lm = face.landmarks
    assert np.all(lm[:, 0] > face.box[0] - grow) and np.all(lm[:, 0] < face.box[2] + grow)
    assert np.all(lm[:, 1] > face.box[1] - grow) and np.all(lm[:, 1] < face.box[3] + grow)
    five = five_points(lm)
    mouth = (five[3] + five[4]) / 2
    interocular = np.linalg.norm(five[1] - five[0])
    found = np.stack([five[0], five[1], five[2], mouth])
    np.testing.assert_allclose(found, expected, atol=0.15 * interocular)
    # Anatomy: interocular distance a plausible share of the face box width (~0.45 for dlib's
    # box), eyes above nose above mouth, 36 left of 45, nose tip between the eyes.
    assert 0.3 < interocular / (face.box[2] - face.box[0]) < 0.6
    assert max(five[0, 1], five[1, 1]) < five[2, 1] < min(five[3, 1], five[4, 1])
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]
    assert five[0, 0] < lm[30, 0] < five[1, 0]
    assert lm[48, 0] < lm[54, 0] and lm[8, 1] > lm[57, 1]   # chin below the lower lip
    assert lm[0, 0] < lm[16, 0]


def test_mirrored_photo_gives_mirrored_landmarks(photo):
    name, image, _, _ = photo
    width = image.shape[1]
    face = landmarks.largest_face(image)
    mirrored = landmarks.largest_face(np.ascontiguousarray(image[:, ::-1]))
    back = landmarks.mirror_landmarks(mirrored.landmarks, width)
    error = np.linalg.norm(back - face.landmarks, axis=-1)
    interocular = np.linalg.norm(five_points(face.landmarks)[1] - five_points(face.landmarks)[0])
    # The regression trees are not exactly mirror-symmetric and the HOG box shifts a few px.
    assert np.median(error) < 0.05 * interocular, (name, error)
    assert error.max() < 0.12 * interocular, (name, error)
    # Without the permutation the points would be far off (the eyes swap sides).
    swapped = mirrored.landmarks.copy()
    swapped[:, 0] = width - swapped[:, 0]
    assert np.median(np.linalg.norm(swapped - face.landmarks, axis=-1)) > 0.3 * interocular


def test_mirror_permutation_is_an_involution_keeping_the_midline():
    perm = landmarks.MIRROR_68
    assert sorted(perm.tolist()) == list(range(68))
    np.testing.assert_array_equal(perm[perm], np.arange(68))
    assert {i for i in range(68) if perm[i] == i} == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    assert perm[36] == 45 and perm[39] == 42 and perm[48] == 54 and perm[0] == 16


def test_predict_landmarks_in_a_given_box_matches_the_detector(photo):
    _, image, _, _ = photo
    face = landmarks.largest_face(image)
    np.testing.assert_array_equal(landmarks.predict_landmarks(image, face.box), face.landmarks)


def test_grey_and_rgba_inputs_are_accepted():
    image = skimage_data.astronaut()
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(landmarks.largest_face(rgba).landmarks,
                                  landmarks.largest_face(image).landmarks)
    grey = np.round(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    face = landmarks.largest_face(grey)
    assert _iou(face.box, PHOTOS["astronaut"][1]) > 0.7


@pytest.mark.parametrize("load", [skimage_data.coffee, skimage_data.rocket])
def test_no_face_in_a_face_free_photo(load):
    image = load()
    assert landmarks.detect_faces(image) == []
    with pytest.raises(ValueError, match="no face found"):
        landmarks.largest_face(image)


def test_bad_inputs_raise():
    image = skimage_data.astronaut()
    with pytest.raises(ValueError, match="uint8"):
        landmarks.detect_faces(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W"):
        landmarks.detect_faces(image[..., :2])
    with pytest.raises(ValueError, match=r"\(H, W"):
        landmarks.detect_faces(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="upsample"):
        landmarks.detect_faces(image, upsample=-1)
    with pytest.raises(ValueError, match="box"):
        landmarks.predict_landmarks(image, [10, 10, 5, 20])
    with pytest.raises(ValueError, match="box"):
        landmarks.predict_landmarks(image, [np.nan, 10, 50, 60])
    with pytest.raises(ValueError, match="68, 2"):
        landmarks.mirror_landmarks(np.zeros((5, 2)), 10)


def test_model_files_and_licences_are_reported():
    files = landmarks.model_files()
    assert files["shape_predictor_68"].is_file()
    assert files["shape_predictor_68"].name == "shape_predictor_68_face_landmarks.dat"
    assert "Boost Software License" in landmarks.LICENCES
    assert "commercial" in landmarks.LICENCES


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="requirements-faces.txt"):
        landmarks.model_files()


def test_missing_dlib_names_the_install_command(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "dlib", None)   # makes `import dlib` raise ImportError
    with pytest.raises(ImportError, match="requirements-faces.txt"):
        landmarks._import_dlib()
