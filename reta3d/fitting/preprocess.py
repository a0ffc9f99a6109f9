"""Portrait photos → a training dataset folder (`reta3d.data.folder` layout), resumably.

For every photo (`media.list_images`, sorted): detect the faces (dlib, `landmarks.detect_faces`;
with several, the largest is taken and that is noted), crop it the way EG3D's FFHQ
preprocessing frames faces (`crop`: scale + translation from five landmarks, no rotation),
with the head model's own landmarks under the canonical FFHQ camera as the reference, so a
neutral frontal head seen by `look_at_eg3d_label(0, 0)` lands on the face), map the detected
landmarks into the crop, and fit FLAME and the EG3D camera to them (`fit.fit_landmarks`, one
shape per photo, in batches of `batch_size` photos per compiled call). Horizontal mirroring
stays the loader's job.

Output (OUT):
    images/00000.png …       the crops, resolution² RGB; RGBA for a photo with a matte in its
                             alpha (its straight colour and alpha cropped alike, `matted_crop`),
                             which a discriminator that sees alpha trains on
    dataset.json, flame.json the camera labels and FLAME fits (`reta3d.data.folder` layout)
    preprocess_report.json   one entry per input file: written (with its crop name, fit error
                             in pixels and as a fraction of the inter-ocular distance, the
                             head's yaw/pitch/roll, the share of the crop that lay outside the
                             photo, notes), or skipped with the reason (unreadable, no face,
                             face too small)
    overlays/…jpg            (optional) detected vs fitted landmarks and the fitted mesh
    .preprocess/             the resume state: one JSON line per finished input
Every file is written atomically (temporary name, then rename); the state line of an input
is appended only after its crop is on disk, so an interrupted run resumes where it stopped
and never loses what it had written. The JSON files are rewritten at the end of every run
from the state, and the folder is checked with `reta3d.data.folder.validate_folder`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from reta3d import atomic_files, errors
from reta3d.fitting import crop as crop_lib
from reta3d.fitting import fit as fit_lib

STATE_DIR = ".preprocess"
STATE_FILE = "state.jsonl"
SETTINGS_FILE = "settings.json"
REPORT_FILE = "preprocess_report.json"
OVERLAY_DIR = "overlays"
DEFAULT_RESOLUTION = 512
# A face whose crop would magnify the photo more than this is too small to train on: the
# crop would be an upsampled blur (FFHQ's faces are >= 1024² before their 512² resize).
DEFAULT_MAX_UPSCALE = 4.0
# dlib's HOG scores: the real face of scikit-image's astronaut scores 1.2, a round mission
# patch next to it 0.12; below 0.5 a detection is more often not a face.
DEFAULT_MIN_SCORE = 0.5
# dlib's HOG detector misses faces under ~80 px; large photos are searched downscaled to this
# longest side (then the landmarks are predicted at full resolution).
DETECTION_MAX_SIDE = 1024
# Photos with a shorter side below this get a hint when no face is found (the HOG detector,
# upsampled once, finds faces from about 40 px wide).
SMALL_PHOTO = 160


# ------------------------------------------------------------------------------ the reference
def reference_points(model, embedding) -> np.ndarray:
    """(68, 2) float64: the head model's rest-pose landmarks seen by the canonical FFHQ camera
    (`fit.canonical_label`), in normalised crop coordinates [0, 1] (x right, y down). A crop
    that puts a photo's five points here frames the face as EG3D's FFHQ crops do."""
    from reta3d.fitting.embedding import landmarks_3d
    vertices = model.forward()
    points = model.to_world(landmarks_3d(vertices, model.faces, embedding))
    pixels = fit_lib.project(points, fit_lib.canonical_label()[None], 1)
    return np.asarray(pixels[0], np.float64)


# ------------------------------------------------------------------------------ small helpers
def interocular_distance(landmarks68) -> np.ndarray:
    """(..., 68, 2) → (...,) distance between the two eye centres (means of 36-41, 42-47)."""
    lm = np.asarray(landmarks68, np.float64)
    return np.linalg.norm(lm[..., 36:42, :].mean(-2) - lm[..., 42:48, :].mean(-2), axis=-1)


class Progress:
    """A one-line progress bar with rate and ETA on stderr (a line per update when stderr is
    not a terminal, at most every `every_s` seconds).

    The first unit of work usually includes compiling it (seconds to minutes on a CPU), which
    says nothing about the rest: a line at the start says so, and the rate and ETA count from
    the end of the first update on (until then the ETA shows "?"), as the training loop's do.
    `first_note`: said in that line (None for a stage that compiles nothing); `initial`: units
    finished by an earlier run (a resumed job); `clock` (seconds) is for tests."""

    def __init__(self, total: int, what: str, every_s: float = 5.0, stream=None,
                 clock=time.perf_counter,
                 first_note: Optional[str] = "the first step includes compilation",
                 initial: int = 0):
        self.total, self.what, self.every_s = int(total), what, every_s
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.first = None       # (time, done) at the first update: where the rate counts from
        self.last = -1e9
        self.done = int(initial)    # units finished before this run (a resumed job)
        if self.total > 0:
            print(f"{what}: {self.done}/{self.total}, starting"
                  + (f" ({first_note})" if first_note else ""),
                  file=self.stream, flush=True)

    def rate(self, done: int, now: float) -> float:
        """Units per second since the first update (0 before the second one)."""
        if self.first is None or now <= self.first[0] or done <= self.first[1]:
            return 0.0
        return (done - self.first[1]) / (now - self.first[0])

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        now = self.clock()
        first_update = self.first is None
        if first_update:
            self.first = (now, done)
        elif now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = self.rate(done, now)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        width = 30
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        if done >= self.total:
            eta_text = f"done in {now - self.start:.0f}s"
        else:
            eta_text = f"ETA {eta:5.0f}s" if np.isfinite(eta) else "ETA    ?s"
        if rate > 0:
            rate_text = f"{rate:5.2f}/s"
        elif first_update:
            rate_text = f"first {now - self.start:.0f}s"
        else:
            rate_text = "    ?/s"
        line = (f"{self.what} [{bar}] {done}/{self.total} {rate_text} {eta_text}"
                + (f"  {note}" if note else ""))
        end = "\r" if self.stream.isatty() and done < self.total else "\n"
        print(line, end=end, file=self.stream, flush=True)


# ------------------------------------------------------------------------------ the state
@dataclasses.dataclass
class _Pending:
    source: str
    crop: np.ndarray          # (R, R, 3) uint8 (over white for a matted photo)
    landmarks: np.ndarray     # (68, 2) in the crop
    entry: Dict[str, Any]
    matted: Optional[np.ndarray] = None   # (R, R, 4) uint8: what is written, if the photo had alpha


def _read_state(path: pathlib.Path) -> Dict[str, Dict[str, Any]]:
    """{source: entry} from the state file; a torn last line (a crash mid-write) is dropped."""
    entries: Dict[str, Dict[str, Any]] = {}
    if not path.exists():
        return entries
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                logging.warning("%s: dropping a torn last line (an interrupted write)", path)
                continue
            raise errors.InputError(
                f"{path}: line {number + 1} is not JSON; delete the folder "
                f"{path.parent} to start the preprocessing over") from None
        entries[entry["source"]] = entry
    return entries


def _append_state(path: pathlib.Path, entries: Sequence[Dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_settings(out: pathlib.Path, settings: Dict[str, Any]) -> None:
    path = out / STATE_DIR / SETTINGS_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise errors.InputError(
                f"{out} was started with other settings {changed} (was, now); "
                "use a new --out folder or the same settings to resume")
    else:
        atomic_files.write_text(path, json.dumps(settings, indent=2))


# ------------------------------------------------------------------------------ overlays
def draw_overlay(image: np.ndarray, detected=None, fitted=None, mesh_points=None,
                 mesh_edges=None, min_size: int = 256) -> np.ndarray:
    """A picture of a fit: the image, the fitted mesh's edges (thin grey), the detected
    landmarks (green) and the fitted ones (red), each line from detected to fitted.

    image (H, W, 3) uint8; detected / fitted (68, 2) pixels; mesh_points (V, 2) pixels with
    mesh_edges (K, 2) int vertex pairs. Returns (k·H, k·W, 3) uint8: an image whose shorter
    side is below `min_size` is drawn enlarged k = ⌈min_size / min(H, W)⌉ times (bicubic),
    so that the marks do not cover a small crop's face; k = 1 otherwise.
    """
    image = np.asarray(image, np.uint8)
    k = max(1, -(-int(min_size) // min(image.shape[:2])))
    canvas = Image.fromarray(image).convert("RGB")
    if k > 1:
        canvas = canvas.resize((k * image.shape[1], k * image.shape[0]), Image.BICUBIC)
        scaled = lambda points: None if points is None else np.asarray(points, np.float64) * k
        detected, fitted, mesh_points = scaled(detected), scaled(fitted), scaled(mesh_points)
    draw = ImageDraw.Draw(canvas, "RGBA")
    if mesh_points is not None and mesh_edges is not None:
        for a, b in np.asarray(mesh_edges):
            draw.line([tuple(mesh_points[a]), tuple(mesh_points[b])], fill=(255, 255, 255, 45))
    r = max(1.5, canvas.size[1] / 256)
    if detected is not None and fitted is not None:
        for p, q in zip(detected, fitted):
            draw.line([tuple(p), tuple(q)], fill=(255, 255, 0, 255))
    for points, colour in ((detected, (0, 255, 0, 255)), (fitted, (255, 40, 40, 255))):
        if points is None:
            continue
        for x, y in np.asarray(points):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(canvas)


def _front_edges(model, fit: "fit_lib.FitResult", i: int, image_size: int):
    """Projected vertices (V, 2) of frame i's fitted mesh and the edges of its front-facing
    triangles."""
    import jax.numpy as jnp
    flame = {"shape": fit.frame_shape(i)[None], "expression": fit.expression[i:i + 1],
             "jaw_pose": fit.jaw_pose[i:i + 1], "neck_pose": fit.neck_pose[i:i + 1]}
    vertices = model.to_world(model.forward(**{k: jnp.asarray(v) for k, v in flame.items()}))
    label = jnp.asarray(fit.labels[i:i + 1])
    pixels = np.asarray(fit_lib.project(vertices, label, image_size)[0])
    cam2world = np.asarray(fit.labels[i, :16], np.float64).reshape(4, 4)
    eye = cam2world[:3, 3]
    faces = np.asarray(model.faces)
    v = np.asarray(vertices[0], np.float64)
    normal = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    front = np.einsum("fk,fk->f", normal, eye - v[faces[:, 0]]) > 0
    tri = faces[front]
    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    return pixels, edges


# ------------------------------------------------------------------------------ one photo
class PhotoSkipped(errors.InputError):
    """A photo the preprocessing cannot use: `reason` is "no face" or "face too small",
    `detail` says more. An InputError: a script given one photo reports it in one line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _no_face(image: np.ndarray, name: Optional[str] = None) -> PhotoSkipped:
    """PhotoSkipped("no face"), its detail naming the photo (`name`) and a small photo's size."""
    height, width = image.shape[:2]
    details = [] if name is None else [
        f"{name}: dlib's face detector found no face in it (it finds faces seen roughly from "
        "the front, at least about 40 px wide)"]
    if min(height, width) < SMALL_PHOTO:
        details.append(f"the photo is {width}x{height} px; dlib's face detector misses faces "
                       "narrower than about 40 px")
    return PhotoSkipped("no face", "; ".join(details))


def require_face(image: np.ndarray, name: str, *,
                 min_score: float = DEFAULT_MIN_SCORE) -> None:
    """Raises `PhotoSkipped` naming `name` (the photo's path) when `prepare_photo` would find
    no face in `image` ((H, W, 3) uint8): the check a script runs before it loads a model
    (one detection, about a second; up to five on a photo without a face)."""
    from reta3d.fitting import landmarks as landmarks_lib
    face, _ = landmarks_lib.find_face(image, min_score=min_score, max_side=DETECTION_MAX_SIDE)
    if face is None:
        raise _no_face(np.asarray(image), name)


@dataclasses.dataclass
class PreparedPhoto:
    """A photo's face, cropped: crop (R, R, 3) uint8, landmarks (68, 2) in the crop's pixels,
    affine (2, 3) photo → crop pixels, the detection score, notes, the crop's magnification
    and the share of it that lay outside the photo."""

    crop: np.ndarray
    landmarks: np.ndarray
    affine: np.ndarray
    score: float
    notes: List[str]
    magnification: float
    outside_fraction: float


def prepare_photo(image: np.ndarray, reference: np.ndarray, resolution: int, *,
                  min_score: float = DEFAULT_MIN_SCORE,
                  max_upscale: float = DEFAULT_MAX_UPSCALE) -> PreparedPhoto:
    """Finds the largest face of `image` ((H, W, 3) uint8) and crops it as the dataset
    preprocessing does (module docstring); `reference` from `reference_points`. Raises
    PhotoSkipped("no face" | "face too small")."""
    from reta3d.fitting import landmarks as landmarks_lib
    face, num_faces = landmarks_lib.find_face(image, min_score=min_score,
                                              max_side=DETECTION_MAX_SIDE)
    if face is None:
        raise _no_face(image)
    notes = []
    if num_faces > 1:
        notes.append(f"{num_faces} faces found; the largest was taken")
    affine = crop_lib.crop_transform(face.landmarks, reference, resolution)
    magnification = float(abs(affine[0, 0]))
    if magnification > max_upscale:
        raise PhotoSkipped("face too small", (
            f"the crop would magnify the photo {magnification:.1f}x (> {max_upscale:g}x); "
            f"inter-ocular distance {float(interocular_distance(face.landmarks)):.0f} px"))
    picture, outside = crop_lib.crop_image(image, affine, resolution)
    if outside > 0:
        notes.append(f"{100 * outside:.1f}% of the crop lay outside the photo (reflected)")
    return PreparedPhoto(crop=picture, landmarks=crop_lib.transform_points(face.landmarks, affine),
                         affine=affine, score=float(face.score), notes=notes,
                         magnification=magnification, outside_fraction=float(outside))


def matted_crop(rgba: np.ndarray, affine: np.ndarray, resolution: int) -> np.ndarray:
    """A matted photo's crop: rgba (H, W, 4) uint8 with straight colour (as PNG stores it) →
    (R, R, 4) uint8, colour and alpha each resampled as `crop.crop_image` resamples the photo
    (same affine, Lanczos, reflected outside). Composited over white it matches the crop of
    the photo composited over white, except within the filter's reach of the matte's edges."""
    colour, _ = crop_lib.crop_image(np.ascontiguousarray(rgba[..., :3]), affine, resolution)
    alpha, _ = crop_lib.crop_image(np.ascontiguousarray(rgba[..., 3]), affine, resolution)
    return np.dstack([colour, alpha])


@dataclasses.dataclass
class PhotoFit:
    """`fit_photo`'s result: the prepared crop, its EG3D label (25,) float32, its FLAME
    parameters (a flame.json entry: lists), the fit's mean landmark error in pixels and as a
    fraction of the inter-ocular distance, the head's yaw/pitch/roll (degrees), and the
    FitResult itself."""

    prepared: PreparedPhoto
    label: np.ndarray
    flame: Dict[str, List[float]]
    error_px: float
    error_iod: float
    yaw_pitch_roll_deg: np.ndarray
    fit: "fit_lib.FitResult"


def fit_photo(image: np.ndarray, model=None, embedding=None,
              resolution: int = DEFAULT_RESOLUTION, *, num_steps: int = 300,
              min_score: float = DEFAULT_MIN_SCORE,
              max_upscale: float = DEFAULT_MAX_UPSCALE) -> PhotoFit:
    """One photo, exactly as `preprocess_folder` treats each of its photos: crop, camera
    label, FLAME parameters. image (H, W, 3) uint8; model / embedding default to the
    template head and its embedding. Raises PhotoSkipped like `prepare_photo`."""
    from reta3d import flame as flame_lib
    from reta3d.fitting import embedding as embedding_lib
    model = flame_lib.load() if model is None else model
    embedding = embedding_lib.template_embedding() if embedding is None else embedding
    prepared = prepare_photo(image, reference_points(model, embedding), resolution,
                             min_score=min_score, max_upscale=max_upscale)
    fit = fit_lib.fit_landmarks(model, embedding, prepared.landmarks[None].astype(np.float32),
                                resolution, shared_shape=False, num_steps=num_steps)
    error = float(fit.reprojection_error_px[0])
    return PhotoFit(prepared=prepared, label=np.asarray(fit.labels[0], np.float32),
                    flame=fit.to_flame_dict(0), error_px=error,
                    error_iod=error / max(float(interocular_distance(prepared.landmarks)), 1e-6),
                    yaw_pitch_roll_deg=np.asarray(fit.yaw_pitch_roll_deg[0]), fit=fit)


# ------------------------------------------------------------------------------ the job
def preprocess_folder(images_dir, out_dir, resolution: int = DEFAULT_RESOLUTION, *,
                      model=None, embedding=None, batch_size: int = 8,
                      max_upscale: float = DEFAULT_MAX_UPSCALE,
                      min_score: float = DEFAULT_MIN_SCORE, overlays: bool = False,
                      overlay_background: str = "photo",
                      num_steps: int = 300, limit: Optional[int] = None,
                      progress: bool = True,
                      stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Runs the preprocessing job (module docstring) and returns the report's summary
    {"inputs", "written", "skipped", "by_reason", "mean_error_iod", "out"}.

    images_dir: a folder of photos (searched recursively). out_dir: the dataset folder (created;
    an existing one is resumed when its settings match). resolution: crop size (pixels).
    model / embedding: the head model and its landmark embedding (default: the embedded
    template head and `template_embedding()`). batch_size: photos fitted per compiled call.
    max_upscale: skip faces whose crop magnifies the photo more than this. min_score: dlib
    detections scoring lower are ignored. overlays: also write OUT/overlays/NAME.jpg, drawn on
    the crop (overlay_background="photo") or on plain grey ("grey": the points and the mesh
    alone, e.g. for figures that must not reproduce the photo).
    limit: only the first N photos. stop_after: stop after this many newly finished inputs
    (tests use it to interrupt a run). Raises ValueError for an empty or missing folder, a
    resolution < 16, and a resume with other settings; ImportError without the face extras.
    """
    from reta3d import flame as flame_lib
    from reta3d.data import folder as folder_lib
    from reta3d.fitting import embedding as embedding_lib
    from reta3d.fitting import landmarks as landmarks_lib
    from reta3d.fitting import media

    resolution = int(resolution)
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16 pixels, got {resolution}")
    if overlay_background not in ("photo", "grey"):
        raise ValueError(f"overlay_background must be 'photo' or 'grey', got {overlay_background!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images_dir, out = pathlib.Path(images_dir), pathlib.Path(out_dir)
    sources = media.list_images(images_dir)
    if limit is not None:
        sources = sources[:int(limit)]
    model = flame_lib.load() if model is None else model
    embedding = embedding_lib.template_embedding() if embedding is None else embedding
    landmarks_lib.model_files()   # fail early, before any output, without the face extras

    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (out / folder_lib.IMAGES_DIR).mkdir(exist_ok=True)
    if overlays:
        (out / OVERLAY_DIR).mkdir(exist_ok=True)
    _check_settings(out, {"resolution": resolution, "model": model.name,
                          "embedding": embedding.source, "max_upscale": float(max_upscale),
                          "min_score": float(min_score), "num_steps": int(num_steps)})
    state_path = out / STATE_DIR / STATE_FILE
    state = _read_state(state_path)
    # Crops on disk that no state line owns were written by a run that stopped before it
    # could record them; their names are handed out again below.
    owned = {e["name"] for e in state.values() if e["status"] == "written"}
    for orphan in (out / folder_lib.IMAGES_DIR).glob("*.png"):
        if f"{folder_lib.IMAGES_DIR}/{orphan.name}" not in owned:
            orphan.unlink()
    reference = reference_points(model, embedding)
    keys = {str(s.relative_to(images_dir)): s for s in sources}
    todo = [k for k in keys if k not in state or (
        state[k]["status"] == "written" and not (out / state[k]["name"]).exists())]
    next_index = 1 + max([int(pathlib.Path(e["name"]).stem) for e in state.values()
                          if e["status"] == "written"], default=-1)
    done = len(keys) - len(todo)
    if progress and done and not todo:
        print(f"preprocess: all {done} photos were finished by an earlier run in {out}; "
              "writing the outputs", file=sys.stderr, flush=True)
    # The bar counts finished photos (cropped, fitted and written, or skipped).
    bar = Progress(len(keys), "preprocess", initial=done) if progress and todo else None
    finished_now = 0
    pending: List[_Pending] = []
    fits = 0

    def flush():
        nonlocal pending, finished_now, done, fits
        if not pending:
            return
        real = len(pending)
        if bar and fits == 0:
            print(f"preprocess: fitting FLAME and cameras to {real} photo(s) "
                  f"(batches of {batch_size}; the first fit compiles)", file=sys.stderr,
                  flush=True)
        fits += 1
        marks = np.stack([p.landmarks for p in pending])
        # A fixed batch shape: one compiled fit for the whole job.
        marks = np.concatenate([marks, np.repeat(marks[-1:], batch_size - real, 0)])
        fit = fit_lib.fit_landmarks(model, embedding, marks.astype(np.float32), resolution,
                                    shared_shape=False, num_steps=num_steps)
        entries = []
        for i, item in enumerate(pending):
            name = item.entry["name"]
            atomic_files.save_png(out / name, item.crop if item.matted is None else item.matted)
            iod = float(interocular_distance(item.landmarks))
            error = float(fit.reprojection_error_px[i])
            entry = dict(item.entry, label=[float(v) for v in fit.labels[i]],
                         flame=fit.to_flame_dict(i), error_px=error,
                         error_iod=error / max(iod, 1e-6),
                         yaw_pitch_roll_deg=[float(v) for v in fit.yaw_pitch_roll_deg[i]])
            if overlays:
                mesh, edges = _front_edges(model, fit, i, resolution)
                backdrop = item.crop if overlay_background == "photo" else np.full_like(item.crop, 96)
                picture = draw_overlay(backdrop, item.landmarks, fit.fitted_landmarks[i],
                                       mesh, edges)
                overlay_path = out / OVERLAY_DIR / (pathlib.Path(name).stem + ".jpg")
                tmp = overlay_path.with_name(f".{overlay_path.name}.tmp")
                Image.fromarray(picture).save(tmp, format="JPEG", quality=92)
                os.replace(tmp, overlay_path)
            entries.append(entry)
        _append_state(state_path, entries)
        for entry in entries:
            state[entry["source"]] = entry
        finished_now += real
        done += real
        pending = []
        if bar:
            bar.update(done)

    skipped_now = []

    def skip(key, reason, **extra):
        nonlocal finished_now, done
        entry = {"source": key, "status": "skipped", "reason": reason, **extra}
        _append_state(state_path, [entry])
        state[key] = entry
        skipped_now.append(entry)
        finished_now += 1
        done += 1
        if bar:
            bar.update(done)

    for key in todo:
        if stop_after is not None and finished_now + len(pending) >= stop_after:
            break
        path = keys[key]
        try:
            image, rgba = media.load_image_and_matte(path)
        except (ValueError, OSError) as e:
            skip(key, "unreadable", detail=str(e))
            continue
        try:
            prepared = prepare_photo(image, reference, resolution, min_score=min_score,
                                     max_upscale=max_upscale)
        except PhotoSkipped as e:
            skip(key, e.reason, **({"detail": e.detail} if e.detail else {}))
            continue
        name = f"{folder_lib.IMAGES_DIR}/{next_index:05d}.png"
        next_index += 1
        entry = {"source": key, "status": "written", "name": name, "score": prepared.score,
                 "outside_fraction": prepared.outside_fraction,
                 "magnification": prepared.magnification, "notes": prepared.notes}
        matted = None if rgba is None else matted_crop(rgba, prepared.affine, resolution)
        pending.append(_Pending(key, prepared.crop, prepared.landmarks, entry, matted))
        if len(pending) == batch_size:
            flush()
    flush()
    if progress:
        _print_skipped(skipped_now, images_dir, out)
    return write_outputs(out, [state[k] for k in keys if k in state], len(keys))


def _print_skipped(entries, images_dir, out, most: int = 10) -> None:
    """The photos this run skipped, one line each (the first `most`), on stderr."""
    for entry in entries[:most]:
        detail = entry.get("detail")
        print(f"skipped {pathlib.Path(images_dir) / entry['source']}: {entry['reason']}"
              + (f" ({detail})" if detail else ""), file=sys.stderr, flush=True)
    if len(entries) > most:
        print(f"... and {len(entries) - most} more skipped; {out / REPORT_FILE} lists them all",
              file=sys.stderr, flush=True)


def require_a_dataset(summary: Dict[str, Any], images_dir) -> None:
    """Raises `errors.InputError` when `preprocess_folder` (its `summary`) wrote no photo: the
    output folder is then no dataset, and the report says why each photo was skipped."""
    if not summary["written"]:
        out = pathlib.Path(summary["out"])
        raise errors.InputError(
            f"no photo of {images_dir} could be used, so {out} is not a dataset; "
            f"{out / REPORT_FILE} gives each photo's reason")


def write_outputs(out: pathlib.Path, entries: Sequence[Dict[str, Any]], num_inputs: int
                  ) -> Dict[str, Any]:
    """dataset.json, flame.json and preprocess_report.json from the finished entries (written
    atomically), then `validate_folder`. Returns the report's summary."""
    from reta3d.data import folder as folder_lib
    written = sorted((e for e in entries if e["status"] == "written"), key=lambda e: e["name"])
    skipped = [e for e in entries if e["status"] == "skipped"]
    by_reason: Dict[str, int] = {}
    for e in skipped:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    fit_errors = [e["error_iod"] for e in written]
    summary = {"inputs": num_inputs, "finished": len(entries), "written": len(written),
               "skipped": len(skipped), "by_reason": by_reason,
               "mean_error_iod": float(np.mean(fit_errors)) if fit_errors else None,
               "mean_error_px": float(np.mean([e["error_px"] for e in written])) if written else None,
               "out": str(out)}
    report = {"summary": summary, "files": [
        {k: v for k, v in e.items() if k not in ("label", "flame")} for e in entries]}
    atomic_files.write_text(out / REPORT_FILE, json.dumps(report, indent=1, allow_nan=False))
    if not written:
        return summary
    atomic_files.write_text(out / folder_lib.LABELS_FILE, folder_lib._json_lines(
        "labels", [[e["name"], e["label"]] for e in written]))
    atomic_files.write_text(out / folder_lib.FLAME_FILE, folder_lib._json_lines(
        "flame", [[e["name"], e["flame"]] for e in written]))
    folder_lib.validate_folder(out)
    return summary
