"""An identity distance whose weights ship on the package index: dlib's ResNet face descriptor.

This is a substitute for the ArcFace ID metric (`reta3d.evaluation.arcface`) when the user has
no arcface_torch weights, and it must be reported under its own name, `METRIC_NAME`
("dlib ResNet face descriptor distance"), never as ArcFace: it is a different network (Davis
King's 29-layer ResNet, 128-d descriptors, trained with a metric loss on ~3M faces; 99.38% on
LFW according to dlib), a different alignment (dlib's own 150 x 150 face chips) and a different
score (Euclidean distance, lower = more alike; dlib's same-person threshold is 0.6,
`SAME_PERSON_THRESHOLD`), so its numbers are not comparable with published ID scores.

Pipeline per photo: the largest face (`reta3d.fitting.landmarks.find_face`: dlib's HOG detector
+ the 68-point shape predictor) → its 68 points as a dlib `full_object_detection` →
`face_recognition_model_v1.compute_face_descriptor(image, shape, num_jitters, padding)`, which
cuts dlib's aligned chip (`get_face_chip`, similarity transform from the 68 points) and runs the
network. Weights: `dlib_face_recognition_resnet_model_v1.dat` from the `face-recognition-models`
package (requirements-faces.txt; Davis King, CC0 / public domain per that package).
"""
from __future__ import annotations

import functools
import pathlib
from typing import Callable

import numpy as np

from reta3d.fitting import landmarks as _landmarks

METRIC_NAME = "dlib ResNet face descriptor distance"
SAME_PERSON_THRESHOLD = 0.6
DESCRIPTOR_DIM = 128
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


def model_file() -> pathlib.Path:
    """Path of dlib_face_recognition_resnet_model_v1.dat inside the installed
    face_recognition_models package (found without importing it, as landmarks.model_files).
    Raises FileNotFoundError with the install hint when missing."""
    return _landmarks.packaged_model_file(RECOGNITION_MODEL)


@functools.lru_cache(maxsize=1)
def _model():
    dlib = _landmarks._import_dlib()
    return dlib.face_recognition_model_v1(str(model_file()))


def dlib_shape(face: _landmarks.Face):
    """A `Face` (68 points, pixel centres at +0.5) → dlib.full_object_detection (integer pixel
    indices, as dlib's shape predictor reports them: x - 0.5 rounded)."""
    dlib = _landmarks._import_dlib()
    x0, y0, x1, y1 = (int(v) for v in np.round(np.asarray(face.box, np.float64)))
    rect = dlib.rectangle(x0, y0, max(x0, x1 - 1), max(y0, y1 - 1))
    points = np.rint(np.asarray(face.landmarks, np.float64) - 0.5).astype(int)
    return dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in points])


def dlib_descriptor_fn(num_jitters: int = 0, padding: float = 0.25, min_score: float = 0.5
                       ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """fn(images uint8 (N, H, W, 3), or a sequence of (H, W, 3) of any sizes) →
    (descriptors (N, 128) float32, NaN rows where no face was found; found (N,) bool).

    num_jitters, padding: as dlib's compute_face_descriptor (0 = no jitter averaging; chip
    padding 0.25 is dlib's default). min_score: HOG detector threshold (as `find_face`).
    Compare descriptors with `descriptor_distance` (Euclidean; < 0.6 = same person for dlib).
    """
    model = _model()

    def descriptor_fn(images, landmarks68=None):
        """landmarks68: optional (N, 68, 2) known landmarks (e.g. a generated head's own,
        projected from its head model); then nothing is detected."""
        found = np.zeros(len(images), bool)
        out = np.full((len(images), DESCRIPTOR_DIM), np.nan, np.float32)
        for k, image in enumerate(images):
            image = _landmarks.as_rgb_uint8(image)
            if landmarks68 is not None:
                marks = np.asarray(landmarks68[k], np.float32)
                box = np.concatenate([marks.min(0), marks.max(0)]).astype(np.float32)
                face = _landmarks.Face(landmarks=marks, box=box, score=float("nan"))
            else:
                face, _ = _landmarks.find_face(image, min_score=min_score)
            if face is None:
                continue
            out[k] = np.asarray(model.compute_face_descriptor(
                image, dlib_shape(face), int(num_jitters), float(padding)), np.float32)
            found[k] = True
        return out, found

    return descriptor_fn


def descriptor_distance(desc_a, desc_b) -> np.ndarray:
    """Euclidean distance of corresponding rows, (N, 128) and (N, 128) → (N,) float32 (the
    "dlib ResNet face descriptor distance": lower = more alike, < 0.6 same person by dlib's
    threshold); NaN rows give NaN."""
    a = np.asarray(desc_a, np.float64)
    b = np.asarray(desc_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N, D) descriptor arrays of one shape, got {a.shape}, "
                         f"{b.shape}")
    return np.linalg.norm(a - b, axis=1).astype(np.float32)
