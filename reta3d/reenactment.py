"""Video-driven reenactment (the paper's Fig. 3 setting): a real clip drives generated heads.

`reenact_video`: track the clip with the generator's own head model
(`reta3d.fitting.tracking`: expression, jaw, neck and head rotation per frame), then drive
S identities with it along the paper's inference split (Sec. 2.3): the static generator
(mapping → G → G_m → blending) once per identity, then one jitted per-frame function (FLAME,
G_d, binding, rasterizer) per frame, in a fixed frontal camera (the head turns by the clip's
global_pose). The identities keep their own shape (shape 0: the tracked person's shape is
not transferred, only the motion). Output: the driving face (the clip's EG3D-style crop of
each frame) and the heads side by side, exactly one output frame per input frame, at the
clip's frame rate; the tracked sequence (.npz, animate.py's layout) and a timing JSON beside it.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from reta3d import atomic_files, errors, inference, sequences, video
from reta3d.cameras import camera_path, conditioning_labels


def driving_sequence(tracking, model) -> Dict[str, np.ndarray]:
    """The tracked motion as per-frame arrays (T, k) float32 for `model`, shape zeroed (each
    generated identity keeps its own)."""
    arrays = {k: v for k, v in tracking.sequence.items() if k != "shape"}
    return sequences.validate_flame_sequence(arrays, "tracked sequence", model.num_expression,
                                             model.num_shape)


def driving_crops(frames, tracking, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8: each frame's EG3D-style crop (the tracking's affines, made for
    `tracking.resolution`, rescaled to `size`)."""
    from reta3d.fitting import crop as crop_lib
    scale = size / tracking.resolution
    out = []
    for frame, affine in zip(frames, tracking.affines):
        picture, _ = crop_lib.crop_image(np.asarray(frame), affine * scale, size)
        out.append(picture)
    return np.stack(out)


def reenact_video(config, generator, g_vars, video_path, seeds: Sequence[int], out, *,
                  embedding=None, tracking=None, truncation_psi: float = 1.0,
                  resolution: Optional[int] = None, backend: Optional[str] = None,
                  capacity: Optional[int] = None, temporal_weight: float = 1.0,
                  num_steps: int = 400, min_score: float = 0.5) -> Dict[str, Any]:
    """Writes the reenactment video `out` (.mp4 / .gif), `OUT_sequence.npz` (the tracking) and
    `OUT_timing.json`; returns the timing/summary dict.

    generator, g_vars: a loaded generator (`inference.load_generator`). seeds: the identities.
    embedding: the landmark embedding of generator.flame_model (default: the template head's;
    a real FLAME needs the user's, `reta3d.fitting.embedding.load_embedding`). tracking: an
    existing `Tracking` of this clip (skips tracking). resolution/backend/capacity: rendering,
    as animate.py. Raises ValueError for a bad output suffix, FileNotFoundError / ValueError
    naming the video when it is missing, unreadable or has no face.
    """
    from reta3d.fitting import embedding as embedding_lib
    from reta3d.fitting import media, tracking as tracking_lib
    out = video.check_output_suffix(out, "the reenactment output")
    model = generator.flame_model
    if embedding is None:
        if model.name != "template_head":
            raise errors.InputError(
                f"the generator's head model '{model.name}' needs its landmark "
                "embedding (reta3d.fitting.embedding.load_embedding)")
        embedding = embedding_lib.template_embedding()
    start = time.perf_counter()
    if tracking is None:
        tracking = tracking_lib.track_video(video_path, model, embedding,
                                            temporal_weight=temporal_weight,
                                            num_steps=num_steps, min_score=min_score)
    tracking_s = time.perf_counter() - start
    sequence_path = tracking.save(out.with_name(out.stem + "_sequence.npz"))

    sequence = driving_sequence(tracking, model)
    num = tracking.num_frames
    z = inference.latents_for_seeds(seeds, config.model.z_dim)
    start = time.perf_counter()
    static = jax.block_until_ready(inference.generate_static_maps(
        generator, g_vars, z, conditioning_labels(config, len(seeds)), truncation_psi))
    static_s = time.perf_counter() - start
    frame_fn = inference.make_frame_fn(config, generator, resolution, backend, capacity=capacity)
    heads, timing = inference.run_animation(frame_fn, g_vars, static, sequence,
                                            camera_path("fixed", num))
    size = int(heads.shape[2])
    frames, _, _ = media.read_video(video_path)
    driving = driving_crops(frames, tracking, size)
    if driving.shape[0] != num:
        raise ValueError(f"{video_path}: read {driving.shape[0]} frames the second time, "
                         f"{num} the first")
    panels = np.concatenate([driving[:, None], heads], axis=1)
    video.write_video(out, video.side_by_side(panels), tracking.fps)
    summary = dict(timing, video=str(out), driving_video=str(video_path),
                   sequence=str(sequence_path), seeds=[int(s) for s in seeds],
                   tracking=tracking_lib.summary(tracking), tracking_s=tracking_s,
                   static_s_all_identities_incl_compile=static_s, resolution=size,
                   num_gaussians=generator.num_gaussians, **inference.device_description())
    summary.pop("frame_ms", None)
    atomic_files.write_text(video.timing_path(out), json.dumps(summary, indent=2))
    return summary
