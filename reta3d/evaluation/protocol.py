"""The paper's evaluation protocol (Sec. 3.1, Table 1a): what is generated, and how each metric
is computed from it.

- FID / KID (EG3D's fid50k_full): real statistics from the whole dataset (its images resized to
  the render resolution), N generated images from random latents, each with the camera and FLAME
  parameters of a random dataset record (drawn with replacement; the mapping is conditioned on
  the same camera, as EG3D's metrics do). Features: the FID Inception-v3.
- ID: `num_identities` identities × 2 random parameter sets (camera and FLAME from two dataset
  records); the mean cosine similarity of the two ArcFace embeddings per identity. Without the
  ArcFace weights, dlib's ResNet face descriptor (its own name and scale: a Euclidean distance,
  lower is better, 0.6 is dlib's same-person threshold).
- AED / APD (Next3D, 3DFaceShop, OTAvatar): `num_identities` identities × `sets_per_identity`
  random FLAME sets (expression, jaw and neck from dataset records, a random dataset camera);
  the parameters are re-estimated from the generated images by the landmark fitter
  (`reta3d.fitting`) and compared with the driving ones, under both conventions in use:
  RMSE over coefficients (Next3D) and mean L1 (3DFaceShop / OTAvatar). Pose is the 6-vector
  (head rotation relative to the camera as axis-angle, jaw axis-angle), in radians.
  The estimator's own error on images with known parameters (the synthetic dataset's renders
  with the embedded template head) is reported beside the metric as its floor.

Generated images for the face metrics are rendered at `face_resolution` (default 256): the
landmark detector needs faces of ~80 px and more, and the Gaussians render at any size.
Features and estimates are cached in chunks under the workdir, so an interrupted evaluation
resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Any, Callable, Dict, Optional

import numpy as np
from scipy.spatial.transform import Rotation

from reta3d import atomic_files, errors

FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")


# ------------------------------------------------------------------------------ caching
class ChunkCache:
    """Arrays computed in chunks and kept on disk (`folder/chunk_00000.npz`, written
    atomically), so that a long computation resumes after an interruption. `key` names what is
    cached; a folder made for another key is an error rather than silently reused."""

    def __init__(self, folder, key: Dict[str, Any]):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        text = json.dumps(key, sort_keys=True)
        if key_file.exists() and key_file.read_text() != text:
            raise errors.InputError(f"{self.folder} caches something else ({key_file.read_text()}); "
                             "delete it or use another workdir")
        atomic_files.write_text(key_file, text)

    def path(self, index: int) -> pathlib.Path:
        return self.folder / f"chunk_{index:05d}.npz"

    def get(self, index: int) -> Optional[Dict[str, np.ndarray]]:
        path = self.path(index)
        if not path.exists():
            return None
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def put(self, index: int, arrays: Dict[str, np.ndarray]) -> None:
        atomic_files.save_npz(self.path(index), arrays)


def key_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunked(num_items: int, chunk: int, cache: ChunkCache,
            compute: Callable[[int, int], Dict[str, np.ndarray]], what: Optional[str] = None,
            stream=None) -> Dict[str, np.ndarray]:
    """Runs compute(start, stop) for each chunk not in `cache` and concatenates all chunks.
    what: the progress bar's label (None: no bar). Chunks found in the cache are counted as
    done from the start, so the rate and ETA are those of the computed ones; when every chunk
    is cached one line says so."""
    bounds = [(start, min(start + chunk, num_items)) for start in range(0, num_items, chunk)]
    cached = [cache.path(i).exists() for i in range(len(bounds))]
    bar = None
    if what is not None:
        from reta3d.fitting.preprocess import Progress
        if all(cached):
            print(f"{what}: all {num_items} from the cache ({cache.folder})",
                  file=stream or sys.stderr, flush=True)
        else:
            bar = Progress(num_items, what, stream=stream,
                           initial=sum(e - s for (s, e), c in zip(bounds, cached) if c))
    parts, done = [], bar.done if bar else 0
    for index, (start, stop) in enumerate(bounds):
        arrays = cache.get(index)
        if arrays is None:
            arrays = compute(start, stop)
            cache.put(index, arrays)
            done += stop - start
            if bar is not None:
                bar.update(done)
        parts.append(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------ conditions
def draw_conditions(source, count: int, seed: int) -> Dict[str, np.ndarray]:
    """`count` (camera (25,), FLAME) conditions from random dataset records (with
    replacement): {"camera": (count, 25), FLAME key: (count, k)} float32."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(source), size=count)
    records = [source[int(i)] for i in index]
    out = {"camera": np.stack([np.asarray(r["camera"], np.float32) for r in records])}
    for key in FLAME_KEYS:
        out[key] = np.stack([np.asarray(r[key], np.float32) for r in records])
    return out


def identity_conditions(source, num_identities: int, sets_per_identity: int, seed: int
                        ) -> Dict[str, np.ndarray]:
    """Conditions for animating identities, as the paper's ID and AED/APD protocols do ("500
    identities, animate each with 20 random FLAME expression/pose parameter sets", Sec. 3).

    Rows are identity-major: identity i's sets are rows i·S … i·S + S − 1 (S =
    sets_per_identity). Each row takes the camera, expression and poses (global, neck, jaw,
    eye) of a random dataset record; the FLAME shape and the mapping's conditioning camera
    ("mapping_camera") are the identity's own, those of its first row, for every set: both
    belong to the identity, which is generated once and then animated. Returns {"camera",
    "mapping_camera": (N, 25), FLAME key: (N, k)} float32, N = num_identities · S.
    Raises ValueError for a non-positive count.
    """
    if num_identities < 1 or sets_per_identity < 1:
        raise ValueError(f"identity_conditions: need positive counts, got {num_identities} "
                         f"identities x {sets_per_identity} sets")
    out = draw_conditions(source, num_identities * sets_per_identity, seed)
    first = np.arange(num_identities) * sets_per_identity
    out["shape"] = np.repeat(out["shape"][first], sets_per_identity, axis=0)
    out["mapping_camera"] = np.repeat(out["camera"][first], sets_per_identity, axis=0)
    return out


def latents(count: int, z_dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, z_dim)).astype(np.float32)


def to_uint8(images) -> np.ndarray:
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, size, size, 3) uint8 (PIL bicubic; the identity when equal)."""
    from PIL import Image
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in images])


# ------------------------------------------------------------------------------ poses
def head_rotation_in_camera(labels: np.ndarray, global_pose: np.ndarray,
                            neck_pose: np.ndarray) -> np.ndarray:
    """The head's rotation relative to the camera as axis-angle (N, 3) float64, measured from
    the frontal pose: R = R0ᵀ · R_world→camera · R_global · R_neck, with R0 the canonical
    frontal camera's world→camera rotation (so a frontal, unposed head is the identity, far
    from the ±π wrap of axis-angle; world and FLAME axes coincide)."""
    from rasterizer.types import look_at_eg3d_label
    cam2world = np.asarray(labels, np.float64)[:, :16].reshape(-1, 4, 4)
    world_to_camera = np.transpose(cam2world[:, :3, :3], (0, 2, 1))
    frontal = look_at_eg3d_label(0.0, 0.0).astype(np.float64)[:16].reshape(4, 4)[:3, :3]
    head = (Rotation.from_rotvec(np.asarray(global_pose, np.float64))
            * Rotation.from_rotvec(np.asarray(neck_pose, np.float64))).as_matrix()
    return Rotation.from_matrix(frontal @ world_to_camera @ head).as_rotvec()


def pose_vector(labels, global_pose, neck_pose, jaw_pose) -> np.ndarray:
    """(N, 6): head rotation in the camera (axis-angle) and jaw axis-angle, radians."""
    return np.concatenate([head_rotation_in_camera(labels, global_pose, neck_pose),
                           np.asarray(jaw_pose, np.float64)], axis=1)


def distances(driving: np.ndarray, estimated: np.ndarray, valid: np.ndarray) -> Dict[str, float]:
    """Both conventions over the valid rows: RMSE over all coefficients (Next3D) and mean
    absolute difference (3DFaceShop / OTAvatar)."""
    d = (np.asarray(estimated, np.float64) - np.asarray(driving, np.float64))[valid]
    if d.size == 0:
        return {"rmse": float("nan"), "l1": float("nan")}
    return {"rmse": float(np.sqrt(np.mean(d ** 2))), "l1": float(np.mean(np.abs(d)))}


def model_landmarks(model, embedding, conditions: Dict[str, np.ndarray], resolution: int
                    ) -> np.ndarray:
    """(N, 68, 2) pixels: where the head model's 68 landmarks fall in images rendered at
    `resolution` under conditions' cameras and FLAME parameters (a generated head is bound to
    its FLAME mesh, so this is where its face is, whether or not a detector finds it)."""
    import jax.numpy as jnp

    from reta3d.fitting import fit as fit_lib
    from reta3d.fitting.embedding import landmarks_3d
    kwargs = {}
    for key, width in (("shape", model.num_shape), ("expression", model.num_expression)):
        kwargs[key] = jnp.asarray(conditions[key][:, :width])
    for key in ("global_pose", "neck_pose", "jaw_pose", "eye_pose"):
        kwargs[key] = jnp.asarray(conditions[key])
    vertices = model.forward(**kwargs)
    points = model.to_world(landmarks_3d(vertices, model.faces, embedding))
    return np.asarray(fit_lib.project(points, jnp.asarray(conditions["camera"]), resolution))


# ------------------------------------------------------------------------------ estimator
@dataclasses.dataclass
class Estimates:
    """Re-estimated parameters of N images: expression (N, E), pose (N, 6) (`pose_vector`),
    found (N,) bool (a face was found and fitted)."""

    expression: np.ndarray
    pose: np.ndarray
    found: np.ndarray


def estimate_parameters(images: np.ndarray, model, embedding, num_expression: int,
                        resolution: int = 512, num_steps: int = 300) -> Estimates:
    """The default AED/APD estimator: every image (N, H, W, 3) uint8 through the dataset
    preprocessing (`reta3d.fitting.preprocess.prepare_photo`: face, landmarks, crop) and one
    batched landmark fit (`fit_landmarks`, a shape per image). Images without a face get
    found=False and NaN rows."""
    from reta3d.fitting import fit as fit_lib
    from reta3d.fitting import preprocess
    reference = preprocess.reference_points(model, embedding)
    marks, found = [], []
    for image in images:
        try:
            prepared = preprocess.prepare_photo(image, reference, resolution, min_score=0.0,
                                                max_upscale=1e9)
            marks.append(prepared.landmarks)
            found.append(True)
        except preprocess.PhotoSkipped:
            marks.append(None)
            found.append(False)
    found = np.asarray(found)
    n = len(images)
    expression = np.full((n, num_expression), np.nan)
    pose = np.full((n, 6), np.nan)
    if found.any():
        stack = np.stack([m for m in marks if m is not None]).astype(np.float32)
        fit = fit_lib.fit_landmarks(model, embedding, stack, resolution, shared_shape=False,
                                    num_steps=num_steps, num_expression=num_expression)
        e = fit.expression.shape[1]
        expression[found, :e] = fit.expression
        expression[found, e:] = 0.0
        pose[found] = pose_vector(fit.labels, fit.global_pose, fit.neck_pose, fit.jaw_pose)
    return Estimates(expression=expression, pose=pose, found=found)


def driving_parameters(conditions: Dict[str, np.ndarray], num_expression: int):
    """(expression (N, E), pose (N, 6)) of the driving conditions."""
    expression = np.zeros((len(conditions["camera"]), num_expression))
    e = min(num_expression, conditions["expression"].shape[1])
    expression[:, :e] = conditions["expression"][:, :e]
    pose = pose_vector(conditions["camera"], conditions["global_pose"], conditions["neck_pose"],
                       conditions["jaw_pose"])
    return expression, pose


def summarize_animation_accuracy(driving_expression, driving_pose, estimates: Estimates
                                 ) -> Dict[str, Any]:
    """AED and APD in both conventions, and how many images the estimator could read."""
    valid = estimates.found
    aed = distances(driving_expression, estimates.expression, valid)
    apd = distances(driving_pose, estimates.pose, valid)
    # What an estimator that always answers "neutral" would score: the scale AED is read on.
    zero = distances(driving_expression, np.zeros_like(driving_expression), valid)
    return {"aed_rmse": aed["rmse"], "aed_l1": aed["l1"], "apd_rmse": apd["rmse"],
            "apd_l1": apd["l1"], "aed_rmse_zero_guess": zero["rmse"],
            "aed_l1_zero_guess": zero["l1"], "estimated": int(valid.sum()),
            "images": int(valid.size)}
