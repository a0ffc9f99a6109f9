"""Face detection and 68-point landmarks in photos, from packages on the index (no download).

dlib's HOG + linear SVM frontal face detector (`dlib.get_frontal_face_detector`, no model file)
finds face boxes; dlib's ensemble-of-regression-trees shape predictor (Kazemi & Sullivan 2014,
"One Millisecond Face Alignment with an Ensemble of Regression Trees") with Davis King's
`shape_predictor_68_face_landmarks.dat` places the 68 iBUG 300-W points in each box.
The model file comes from the `face-recognition-models` package. Both are optional extras:
`pip install -r requirements-faces.txt`. See `LICENCES`: the 68-point model is for
research / non-commercial use only.

Coordinates: image coordinates (x right, y down) in pixels, with pixel (row i, col j) covering
[j, j+1) x [i, i+1) and its centre at (j + 0.5, i + 0.5), as in rasterizer/types.py.
dlib reports integer pixel indices (the pixel whose centre is the point), so a dlib point
(px, py) becomes (px + 0.5, py + 0.5); a dlib rectangle of inclusive pixel indices
left..right, top..bottom becomes the box [left, right + 1] x [top, bottom + 1].

68-point index layout (iBUG 300-W, 0-based; "left"/"right" are as seen in the image, so the
subject's right eye is at image left): 0-16 jaw (image left to right), 17-21 and 22-26 brows,
27-30 nose bridge (30 = tip), 31-35 nostrils, 36-41 image-left eye (36 outer corner,
39 inner), 42-47 image-right eye (42 inner, 45 outer), 48-59 outer lip (48 and 54 corners),
60-67 inner lip.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib

import numpy as np

from reta3d import errors

INSTALL_HINT = "pip install -r requirements-faces.txt"
SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"

LICENCES = """\
Face detection and landmarks (optional extras, requirements-faces.txt):
- dlib (PyPI: dlib-bin, prebuilt wheels of dlib): Boost Software License 1.0. The HOG face
  detector is built into dlib (no separate model file).
- face-recognition-models (Adam Geitgey): package metadata says MIT; the LICENSE file it ships
  is CC0 1.0 Universal, and its README says the models were created by Davis King and are in the
  public domain / CC0.
- shape_predictor_68_face_landmarks.dat (Davis King, from github.com/davisking/dlib-models):
  trained on the iBUG 300-W data set, whose licence excludes commercial use; at the request of
  one of its creators the dlib-models README states that the trained model can therefore not be
  used in a commercial product. Research / non-commercial use only.
"""

# Index i of a mirrored face is index MIRROR_68[i] of the original (an involution): the iBUG
# 68-point layout is left/right symmetric, points on the midline map to themselves.
MIRROR_68 = np.array(
    list(range(16, -1, -1))                       # jaw 0..16 reversed
    + list(range(26, 21, -1)) + list(range(21, 16, -1))   # brows 17-21 <-> 26-22
    + [27, 28, 29, 30]                            # nose bridge
    + [35, 34, 33, 32, 31]                        # nostrils
    + [45, 44, 43, 42, 47, 46]                    # eye 36-41 <-> 45,44,43,42,47,46
    + [39, 38, 37, 36, 41, 40]                    # eye 42-47 <-> 39,38,37,36,41,40
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]    # outer lip
    + [64, 63, 62, 61, 60, 67, 66, 65],           # inner lip
    dtype=np.int32)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: identity, not elementwise ==
class Face:
    """One detected face.

    landmarks: (68, 2) float32, (x, y) image pixels, pixel centres at (j + 0.5, i + 0.5);
      iBUG 300-W order (module docstring).
    box: (4,) float32, x0, y0, x1, y1 in the same pixel coordinates (edges, not centres); may
      reach outside the image.
    score: dlib HOG detector confidence (SVM margin; > 0 passes dlib's default threshold).
    """
    landmarks: np.ndarray
    box: np.ndarray
    score: float

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def _import_dlib():
    try:
        import dlib
    except ImportError as err:
        raise errors.MissingDependencyError(f"face detection needs dlib: {INSTALL_HINT} (installs dlib-bin)") from err
    return dlib


def model_files() -> dict[str, pathlib.Path]:
    """The model files used: {"shape_predictor_68": path to shape_predictor_68_face_landmarks.dat}.

    The file is found inside the installed `face_recognition_models` package without importing
    it (its __init__ imports pkg_resources, which recent setuptools no longer ships).
    Raises FileNotFoundError (with the install hint) when the package or the file is missing.
    """
    return {"shape_predictor_68": packaged_model_file(SHAPE_PREDICTOR_68)}


def packaged_model_file(name: str) -> pathlib.Path:
    """Path of the dlib model file `name` inside the installed face_recognition_models package,
    found without importing it. Raises FileNotFoundError with the install hint."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise errors.MissingInputError(
            f"face landmark model package face_recognition_models is not "
            f"installed: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = pathlib.Path(root) / "models" / name
        if path.is_file():
            return path
    raise errors.MissingInputError(
        f"{name} not found in face_recognition_models at "
        f"{list(spec.submodule_search_locations)}: {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _models():
    """(detector, predictor), loaded once per process (loading the predictor takes ~1 s)."""
    dlib = _import_dlib()
    predictor = dlib.shape_predictor(str(model_files()["shape_predictor_68"]))
    return dlib.get_frontal_face_detector(), predictor


def as_rgb_uint8(image) -> np.ndarray:
    """(H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA uint8 → C-contiguous (H, W, 3) uint8.

    Alpha is dropped (not composited). Raises ValueError for another dtype or shape.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
                         f"got {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def detect_faces(image, upsample: int = 1, min_score: float = 0.0) -> list[Face]:
    """Faces in `image`, largest box first (ties: higher score first).

    image: (H, W, 3) uint8 RGB; (H, W) grey and (H, W, 4) RGBA are accepted (alpha dropped).
    upsample: times dlib doubles the image before detecting; the HOG detector's smallest face is
      about 80 x 80 px, so upsample=1 finds faces down to ~40 px, at ~4x the time of 0. Time
      grows with the pixel count (~0.3 s for 512 x 512 at upsample=1 on one CPU core), so
      downscale large photos first and scale the landmarks back.
    min_score: detections with a lower HOG score are dropped (0.0 = dlib's default threshold).
      On the packaged test photos real faces score 1.2-1.3 and the one false positive (a round
      mission patch on the astronaut's suit) 0.12.
    Returns a list of `Face` (possibly empty).
    Raises ValueError for a non-uint8 or wrongly shaped image or a negative `upsample`;
    ImportError / FileNotFoundError when dlib or the model files are not installed.
    """
    image = as_rgb_uint8(image)
    if int(upsample) != upsample or upsample < 0:
        raise ValueError(f"upsample must be a non-negative integer, got {upsample!r}")
    detector, predictor = _models()
    rects, scores, _ = detector.run(image, int(upsample), 0.0)
    faces = []
    for rect, score in zip(rects, scores):
        if score < min_score:
            continue
        box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], np.float32)
        faces.append(Face(landmarks=_predict(predictor, image, rect), box=box, score=float(score)))
    faces.sort(key=lambda f: (-f.area, -f.score))
    return faces


def _predict(predictor, image: np.ndarray, rect) -> np.ndarray:
    shape = predictor(image, rect)
    return np.array([(p.x, p.y) for p in shape.parts()], np.float32) + 0.5


def predict_landmarks(image, box) -> np.ndarray:
    """The 68 landmarks of the face in `box`, without running the detector (e.g. a box carried
    over from the previous video frame, or one from another detector).

    image: as in `detect_faces`. box: (4,) x0, y0, x1, y1 pixel edges (as `Face.box`), rounded
      to whole pixels because dlib's rectangles are integer; it should frame the face the way
      dlib's HOG detector does (roughly brows to chin, ear to ear less the ears), since the
      shape predictor starts from a mean shape placed in the box.
    Returns (68, 2) float32 pixels (pixel-centre convention, module docstring).
    Raises ValueError for a bad image or an empty / non-finite box.
    """
    image = as_rgb_uint8(image)
    box = np.asarray(box, np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"box must be 4 finite numbers x0, y0, x1, y1, got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in np.round(box))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box.tolist()}")
    dlib = _import_dlib()
    _, predictor = _models()
    return _predict(predictor, image, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))


def largest_face(image, upsample: int = 1, min_score: float = 0.0) -> Face:
    """The largest face of `detect_faces` (same arguments); raises ValueError when none is found."""
    faces = detect_faces(image, upsample=upsample, min_score=min_score)
    if not faces:
        raise ValueError(f"no face found (dlib HOG detector, upsample={upsample}, "
                         f"min_score={min_score}); small faces may need upsample=2, and the "
                         f"detector only finds roughly frontal faces")
    return faces[0]


def mirror_landmarks(landmarks, width: float) -> np.ndarray:
    """Landmarks of the left-right mirrored image (`image[:, ::-1]`): x → width - x, and the
    indices permuted by `MIRROR_68` so each index keeps its anatomical meaning.

    landmarks: (..., 68, 2) pixels; width: image width in pixels. Returns (..., 68, 2) float32.
    """
    landmarks = np.asarray(landmarks, np.float32)
    if landmarks.shape[-2:] != (68, 2):
        raise ValueError(f"expected (..., 68, 2) landmarks, got {landmarks.shape}")
    mirrored = landmarks[..., MIRROR_68, :].copy()
    mirrored[..., 0] = width - mirrored[..., 0]
    return mirrored


def _turn(image: np.ndarray, angle: float, centre) -> np.ndarray:
    """The image turned counter-clockwise on screen by `angle` degrees about `centre` (x, y)."""
    from PIL import Image
    return np.asarray(Image.fromarray(image).rotate(
        angle, resample=Image.BILINEAR, center=(float(centre[0]), float(centre[1]))))


def _turn_back(points: np.ndarray, angle: float, centre) -> np.ndarray:
    """Points of an image turned by `_turn(image, angle, centre)` → the original image's."""
    # PIL's counter-clockwise turn moves a point q (y down) to centre + [[c, s], [−s, c]]·(q −
    # centre); the transpose undoes it.
    theta = np.deg2rad(angle)
    c, s = np.cos(theta), np.sin(theta)
    d = np.asarray(points, np.float64) - centre
    return (np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], -1)
            + centre).astype(np.float32)


def eye_line_angle(landmarks) -> float:
    """The in-plane angle (degrees) of the line from the image-left eye centre (36-41) to the
    image-right one (42-47): 0 level, positive when the right end is lower (y down)."""
    lm = np.asarray(landmarks, np.float64)
    v = lm[42:48].mean(0) - lm[36:42].mean(0)
    return float(np.degrees(np.arctan2(v[1], v[0])))


def find_face(image, min_score: float = 0.5, max_side: int = 1024, upsample: int = 1,
              rotations=(0.0, 20.0, -20.0, 40.0, -40.0), level_above: float = 5.0):
    """The largest face of a photo or video frame of any size → (Face in the image's own
    pixels, number of faces found), or (None, 0).

    - The HOG detector's time grows with the pixel count and it needs no more than ~1 Mpx, so
      an image whose longest side exceeds `max_side` is searched downscaled (bilinear) and the
      68 landmarks are predicted again at full resolution in the scaled-up box.
    - The detector only finds faces within about ±15° of upright: when none is found the image
      is searched again turned by each angle of `rotations` (degrees, counter-clockwise).
    - dlib's shape predictor is most accurate on upright faces: when the eye line of the
      landmarks found is tilted by more than `level_above` degrees, the image is turned about
      the face to level it, the face is found and its landmarks predicted again there.
    Landmarks found in a turned image are turned back; the box is then the axis-aligned box of
    the landmarks. min_score / upsample as in `detect_faces` (0.5 drops the weak false
    positives seen on the packaged test photos).
    """
    image = as_rgb_uint8(image)
    centre = np.array([image.shape[1] / 2, image.shape[0] / 2])
    face = None
    for angle in rotations:
        turned = image if angle == 0 else _turn(image, angle, centre)
        face, count = _find_upright(turned, min_score, max_side, upsample)
        if face is not None:
            if angle != 0:
                face = _from_turned(face, angle, centre)
            break
    if face is None:
        return None, 0
    tilt = eye_line_angle(face.landmarks)
    if abs(tilt) > level_above:
        middle = face.landmarks.mean(0)
        level, _ = _find_upright(_turn(image, tilt, middle), min_score, max_side, upsample)
        if level is not None:
            level = _from_turned(level, tilt, middle)
            box = level.box
            if box[0] <= middle[0] <= box[2] and box[1] <= middle[1] <= box[3]:
                face = level
    return face, count


def _from_turned(face: Face, angle: float, centre) -> Face:
    back = _turn_back(face.landmarks, angle, centre)
    box = np.concatenate([back.min(0), back.max(0)]).astype(np.float32)
    return Face(landmarks=back, box=box, score=face.score)


def _find_upright(image, min_score, max_side, upsample):
    from PIL import Image
    scale = min(1.0, max_side / max(image.shape[:2]))
    small = image if scale == 1.0 else np.asarray(Image.fromarray(image).resize(
        (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
        Image.BILINEAR))
    faces = detect_faces(small, upsample=upsample, min_score=min_score)
    if not faces:
        return None, 0
    face = faces[0]
    if scale != 1.0:
        box = (face.box / scale).astype(np.float32)
        face = Face(landmarks=predict_landmarks(image, box), box=box, score=face.score)
    return face, len(faces)
