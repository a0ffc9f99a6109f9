"""A video of a face → a FLAME sequence (expression, jaw, neck and head pose per frame).

Per frame: the largest face (`landmarks.find_face`), its 68 landmarks, and the EG3D-style crop
transform that frames it as the canonical FFHQ camera expects (`preprocess.reference_points`,
`crop.crop_transform`: scale + translation, no rotation, so the head's roll stays in the
image). The landmarks of all frames with a face, mapped into their crops, are fitted together
(`fit.fit_landmarks`: one shape for the clip, a second-difference smoothness term over
consecutive tracked frames). Frames without a face are filled by interpolation between their
tracked neighbours (held constant before the first and after the last), flagged in
`face_found` and in the log, never silently.

The sequence drives a generated head in a fixed camera, so the head's rotation relative to
the camera goes into `global_pose` (FLAME's root rotation; world and FLAME axes coincide), and
the same pose as EG3D cameras with the rotation absorbed (global_pose 0, what a dataset's
dataset.json holds) goes into `camera_labels`. Use one or the other, not both.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from reta3d import errors
from reta3d.fitting import crop as crop_lib
from reta3d.fitting import fit as fit_lib

DEFAULT_RESOLUTION = 512          # the crops the cameras are for (EG3D's FFHQ size)
DEFAULT_TEMPORAL_WEIGHT = 1.0


@dataclasses.dataclass
class Tracking:
    """A tracked clip of T frames (numpy arrays).

    sequence       FLAME sequence arrays (`reta3d.sequences` layout): expression (T, E),
                   jaw_pose, neck_pose, global_pose (T, 3) (the head's rotation relative to
                   the camera), eye_pose (T, 6) zeros, shape (S,)
    camera_labels  (T, 25) EG3D labels of each frame's crop, head rotation absorbed
    face_found     (T,) bool; False: the frame's values are interpolated
    landmarks      (T, 68, 2) detected landmarks in frame pixels (NaN where none)
    fitted         (T, 68, 2) fitted landmarks in frame pixels
    affines        (T, 2, 3) frame → crop pixel maps (interpolated where no face)
    yaw_pitch_roll_deg (T, 3) the head's orientation relative to the camera
    error_iod      (T,) mean landmark error / inter-ocular distance (NaN where no face)
    fps            float, frame_size (H, W), resolution (crop size of the fit)
    """

    sequence: Dict[str, np.ndarray]
    camera_labels: np.ndarray
    face_found: np.ndarray
    landmarks: np.ndarray
    fitted: np.ndarray
    affines: np.ndarray
    yaw_pitch_roll_deg: np.ndarray
    error_iod: np.ndarray
    fps: float
    frame_size: tuple
    resolution: int

    @property
    def num_frames(self) -> int:
        return int(self.face_found.shape[0])

    def save(self, path) -> pathlib.Path:
        """Writes the sequence .npz (animate.py reads it; `sequences.load_tracking` reads the
        extras) atomically. Returns the path."""
        path = pathlib.Path(path)
        if path.suffix.lower() != ".npz":
            raise errors.InputError(f"{path}: the sequence file must end in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **self.sequence, fps=np.float32(self.fps),
                 camera_labels=self.camera_labels.astype(np.float32),
                 face_found=self.face_found.astype(np.uint8),
                 yaw_pitch_roll_deg=self.yaw_pitch_roll_deg.astype(np.float32))
        os.replace(tmp, path)
        return path


def _interpolate(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(T, ...) values known at `known` frames → every frame, linearly (held at the ends)."""
    frames = np.arange(values.shape[0])
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    out = np.stack([np.interp(frames, frames[known], flat[known, j])
                    for j in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


def _interpolate_rotations(rotvecs: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(T, 3) axis-angle known at `known` frames → every frame by slerp (held at the ends)."""
    frames = np.arange(rotvecs.shape[0])
    known_frames = frames[known]
    if len(known_frames) == 1:
        return np.repeat(rotvecs[known], rotvecs.shape[0], axis=0)
    slerp = Slerp(known_frames, Rotation.from_rotvec(rotvecs[known]))
    return slerp(np.clip(frames, known_frames[0], known_frames[-1])).as_rotvec()


def _labels_from_pose(rotvecs, translations, centre) -> np.ndarray:
    """EG3D labels (T, 25) from the head's rigid motion (fit.py's convention: w = R(x - c) + c + t
    relative to the canonical camera, absorbed into the camera as cam2world = M⁻¹ cam2world0)."""
    label0 = fit_lib.canonical_label().astype(np.float64)
    cam2world0 = label0[:16].reshape(4, 4)
    out = []
    for rotvec, t in zip(rotvecs, translations):
        r = Rotation.from_rotvec(rotvec).as_matrix()
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = r, centre + t - r @ centre
        out.append(np.concatenate([(np.linalg.inv(m) @ cam2world0).reshape(-1), label0[16:]]))
    return np.asarray(out, np.float32)


def track_frames(frames, model, embedding, *, fps: float = 30.0,
                 resolution: int = DEFAULT_RESOLUTION,
                 temporal_weight: float = DEFAULT_TEMPORAL_WEIGHT, num_steps: int = 400,
                 min_score: float = 0.5, num_frames: Optional[int] = None,
                 progress: bool = True, source: str = "video") -> Tracking:
    """Tracks a face through `frames` (an iterable of (H, W, 3) uint8, e.g. `media.read_video`'s
    iterator) → Tracking (class docstring).

    model / embedding: the head model to fit and its landmark embedding (for reenactment, the
    generator's own head model). resolution: crop size the cameras are for. temporal_weight:
    smoothness across frames (fit.fit_landmarks). num_frames: the expected count, for the
    progress bar only. Raises ValueError naming `source` when it has no frames or no frame
    with a face, or frames of different sizes.
    """
    from reta3d.fitting import landmarks as landmarks_lib
    from reta3d.fitting.preprocess import Progress, interocular_distance, reference_points

    reference = reference_points(model, embedding)
    detected, affines, size = [], [], None
    bar = (Progress(num_frames, "track: landmarks", first_note=None)
           if progress and num_frames else None)
    for index, frame in enumerate(frames):
        frame = np.asarray(frame)
        if size is None:
            size = frame.shape[:2]
        elif frame.shape[:2] != size:
            raise errors.InputError(f"{source}: frame {index} is {frame.shape[:2]}, frame 0 {size}")
        face, _ = landmarks_lib.find_face(frame, min_score=min_score)
        if face is None:
            detected.append(np.full((68, 2), np.nan, np.float32))
            affines.append(np.full((2, 3), np.nan))
        else:
            detected.append(face.landmarks)
            affines.append(crop_lib.crop_transform(face.landmarks, reference, resolution))
        if bar:
            bar.update(index + 1)
    if not detected:
        raise errors.InputError(f"{source}: no frames")
    detected, affines = np.stack(detected), np.stack(affines)
    found = np.isfinite(detected).all(axis=(1, 2))
    total = len(found)
    if not found.any():
        raise errors.InputError(f"{source}: no face found in any of its {total} frames")
    missing = np.flatnonzero(~found)
    if len(missing):
        logging.warning("%s: no face in %d of %d frames (%s); their parameters are interpolated "
                        "from the neighbouring frames and flagged in face_found",
                        source, len(missing), total, _ranges(missing))

    in_crop = np.stack([crop_lib.transform_points(m, a)
                        for m, a in zip(detected[found], affines[found])])
    if progress:
        print(f"track: fitting FLAME and the head pose to {int(found.sum())} frames at once "
              f"({num_steps} L-BFGS steps; it compiles first) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    fit = fit_lib.fit_landmarks(model, embedding, in_crop.astype(np.float32), resolution,
                                shared_shape=True, temporal_weight=temporal_weight,
                                num_steps=num_steps)
    if progress:
        print(f"track: fitted in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    def fill(values):
        full = np.zeros((total,) + values.shape[1:], np.float64)
        full[found] = values
        return _interpolate(full, found)

    rotation = np.zeros((total, 3))
    rotation[found] = fit.rotation
    rotation = _interpolate_rotations(rotation, found)
    translation = fill(fit.translation)
    sequence = {"expression": fill(fit.expression), "jaw_pose": fill(fit.jaw_pose),
                "neck_pose": fill(fit.neck_pose), "global_pose": rotation,
                "eye_pose": np.zeros((total, 6)), "shape": np.asarray(fit.shape, np.float64)}
    sequence = {k: v.astype(np.float32) for k, v in sequence.items()}
    labels = _labels_from_pose(rotation, translation, np.asarray(fit.centre, np.float64))
    affines = _interpolate(np.where(np.isfinite(affines), affines, 0.0), found)
    fitted = np.stack([crop_lib.transform_points(p, crop_lib.invert_affine(a))
                       for p, a in zip(fill(fit.fitted_landmarks), affines)])
    error = np.full(total, np.nan)
    error[found] = fit.reprojection_error_px / np.maximum(interocular_distance(in_crop), 1e-6)
    angles = fill(fit.yaw_pitch_roll_deg)
    return Tracking(sequence=sequence, camera_labels=labels, face_found=found,
                    landmarks=detected, fitted=fitted.astype(np.float32),
                    affines=affines, yaw_pitch_roll_deg=angles.astype(np.float32),
                    error_iod=error, fps=float(fps), frame_size=tuple(size),
                    resolution=int(resolution))


def _ranges(indices: Sequence[int]) -> str:
    """[3, 4, 5, 9] → '3-5, 9' (frame numbers for the log)."""
    parts, start, prev = [], None, None
    for i in list(indices) + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    return ", ".join(parts[:10]) + (" …" if len(parts) > 10 else "")


def track_video(path, model, embedding, **kwargs) -> Tracking:
    """`track_frames` on a video file (`media.read_video`: clear errors for a missing or
    unreadable file); the clip's frame rate becomes the sequence's fps."""
    from reta3d.fitting import media
    frames, fps, count = media.read_video(path)
    return track_frames(frames, model, embedding, fps=fps, num_frames=count,
                        source=str(path), **kwargs)


def overlay_frames(frames, tracking: Tracking):
    """Yields each frame with its detected (green) and fitted (red) landmarks drawn, and a red
    border on frames whose values were interpolated (no face found)."""
    from reta3d.fitting.preprocess import draw_overlay
    for index, frame in enumerate(frames):
        found = bool(tracking.face_found[index])
        picture = draw_overlay(np.asarray(frame), tracking.landmarks[index] if found else None,
                               tracking.fitted[index])
        if not found:
            picture = picture.copy()
            border = max(2, picture.shape[0] // 100)
            picture[:border], picture[-border:] = (255, 0, 0), (255, 0, 0)
            picture[:, :border], picture[:, -border:] = (255, 0, 0), (255, 0, 0)
        yield picture


def summary(tracking: Tracking) -> Dict[str, Any]:
    """Numbers for the log and the JSON printout of track_video.py."""
    found = tracking.face_found
    return {"frames": tracking.num_frames, "frames_with_face": int(found.sum()),
            "frames_interpolated": int((~found).sum()), "fps": tracking.fps,
            "mean_error_iod": float(np.nanmean(tracking.error_iod)),
            "max_error_iod": float(np.nanmax(tracking.error_iod)),
            "yaw_range_deg": [float(tracking.yaw_pitch_roll_deg[:, 0].min()),
                              float(tracking.yaw_pitch_roll_deg[:, 0].max())]}
