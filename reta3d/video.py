"""Video and image-layout helpers of the sampling and animation scripts.

`write_video` (.mp4 through ffmpeg/libx264, .gif through ffmpeg's palette filters: exactly one
video frame per input frame, identical frames included), `read_video`, `timing_path` (where an
animation's timing JSON goes), and the tiling of several identities / views into one picture
(`side_by_side`, `image_grid`).
"""
from __future__ import annotations

import contextlib
import os
import pathlib

import chex
import numpy as np

from reta3d import atomic_files, errors
from reta3d.sequences import DEFAULT_FPS

VIDEO_SUFFIXES = (".mp4", ".gif")


def side_by_side(frames: np.ndarray) -> np.ndarray:
    """(T, S, H, W, 3) → (T, H, S·W, 3): identities left to right."""
    chex.assert_rank(frames, 5)
    t, s, h, w, c = frames.shape
    return frames.transpose(0, 2, 1, 3, 4).reshape(t, h, s * w, c)


def image_grid(images: np.ndarray) -> np.ndarray:
    """(rows, cols, H, W, 3) → (rows·H, cols·W, 3)."""
    chex.assert_rank(images, 5)
    r, c, h, w, ch = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


@contextlib.contextmanager
def _ffmpeg_subprocess():
    """Around every imageio / imageio-ffmpeg call that starts ffmpeg: have it started by a plain
    fork+exec. imageio-ffmpeg passes `preexec_fn=os.setpgrp` (to keep a Ctrl-C from reaching
    ffmpeg), and with a preexec_fn CPython runs the at-fork hooks and Python code in the forked
    child of this multithreaded JAX process, which JAX rightly warns may deadlock.
    `IMAGEIO_FFMPEG_NO_PREVENT_SIGINT=1`, imageio-ffmpeg's own switch, drops the preexec_fn (a
    Ctrl-C then stops ffmpeg along with the script; outputs are written atomically). Set for
    the process, because a reader starts ffmpeg lazily, on its first frame; a value the user
    set is kept."""
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    yield


def check_output_suffix(path, what: str = "video output") -> pathlib.Path:
    """`path` as a Path; raises `errors.InputError` (naming `what`, e.g. a flag) unless it ends in
    one of VIDEO_SUFFIXES. Scripts call it before any work, `write_video` again at the end."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise errors.InputError(f"{what} must end in {' or '.join(VIDEO_SUFFIXES)}, got {path}")
    return path


def write_video(path, frames: np.ndarray, fps: float = DEFAULT_FPS) -> pathlib.Path:
    """frames (T, H, W, 3) uint8 → `path` (.mp4: H.264 yuv420p, odd sizes padded by one edge
    pixel; .gif: ffmpeg palettegen/paletteuse, one palette for the clip). ffmpeg writes every
    frame, so the file has exactly T frames even when consecutive frames are identical (Pillow's
    GIF writer would merge those). Written atomically: an interrupted write leaves the previous
    file, if any, whole."""
    import imageio_ffmpeg
    path = check_output_suffix(path)
    suffix = path.suffix.lower()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"write_video expects (T>=1, H, W, 3) uint8 frames, got "
                         f"{frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        kwargs = dict(codec="libx264", pix_fmt_out="yuv420p", quality=8, macro_block_size=2,
                      output_params=["-movflags", "+faststart"])
    else:
        kwargs = dict(codec="gif", pix_fmt_out="pal8", quality=None, macro_block_size=1,
                      output_params=["-vf", "split[a][b];[a]palettegen=stats_mode=full[p];"
                                            "[b][p]paletteuse=dither=sierra2_4a", "-loop", "0"])
    height, width = frames.shape[1:3]

    def write(tmp):
        with _ffmpeg_subprocess():
            writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=float(fps),
                                                 ffmpeg_log_level="error", **kwargs)
            try:
                writer.send(None)
                for frame in frames:
                    writer.send(np.ascontiguousarray(frame))
            finally:
                writer.close()   # waits for ffmpeg, or stops it after an error
    return atomic_files.write_via(path, write)


def read_video(path) -> np.ndarray:
    """All frames of a .mp4 / .gif as (T, H, W, 3) uint8."""
    import imageio.v2 as imageio
    path = pathlib.Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"video not found: {path}")
    if path.suffix.lower() == ".gif":
        frames = imageio.mimread(path, memtest=False)
        return np.stack([np.asarray(f)[..., :3] for f in frames])
    with _ffmpeg_subprocess():
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            return np.stack([np.asarray(f) for f in reader])
        finally:
            reader.close()


def timing_path(video_path) -> pathlib.Path:
    """Where the per-frame timing JSON of a video goes: NAME.mp4 → NAME_timing.json, NAME.gif
    → NAME_gif_timing.json (a GIF and an MP4 of one name keep their own)."""
    video_path = pathlib.Path(video_path)
    tag = "" if video_path.suffix.lower() == ".mp4" else "_" + video_path.suffix.lower()[1:]
    return video_path.with_name(video_path.stem + tag + "_timing.json")

