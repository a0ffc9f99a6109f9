"""Reading photos and videos for fitting, with errors that name the offending file
(`reta3d.errors.InputError`, a ValueError; MissingInputError, also a FileNotFoundError, for a
path that does not exist).

`load_image` (PIL, EXIF orientation applied, any mode to RGB uint8), `list_images` (a folder's
photos in a deterministic order) and `read_video` (frames streamed through imageio's ffmpeg
plugin, with fps and frame count). Writing videos is reta3d/video.py's `write_video`.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import warnings
from typing import Iterator, Optional

import numpy as np

from reta3d.errors import InputError, MissingInputError
from reta3d.video import _ffmpeg_subprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# imageio's ffmpeg plugin refuses files by suffix (.gif, .m4v, .3gp, ... are not on its list);
# claiming .mp4 lets ffmpeg itself probe the content, which decides what is readable.
_FFMPEG_EXTENSION = ".mp4"


def _require_file(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    return path


def _to_rgb(image) -> np.ndarray:
    """A loaded PIL image of any mode → (H, W, 3) uint8."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit greyscale (PNG/TIFF): Pillow's convert("RGB") would clip to 0..255 instead of
        # rescaling. "I" is how older Pillow opens 16-bit PNGs; its range is taken as 16-bit.
        values = np.asarray(image, np.float64)
        if image.mode == "F":
            grey = np.clip(values, 0, 255)
        else:
            grey = np.clip(values, 0, 65535) / 257.0
        grey = np.round(grey).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    # RGBA / LA / PA (or a transparency key): composited over white, the background the
    # generator renders on, so a matted photo keeps its matte; P, L, 1, CMYK, YCbCr: converted
    # by Pillow.
    from reta3d.data.folder import flatten_alpha
    return np.asarray(flatten_alpha(image))


def load_image(path) -> np.ndarray:
    """The photo at `path` as (H, W, 3) uint8 RGB, upright.

    EXIF orientation is applied (ImageOps.exif_transpose), as phone cameras store pixels
    unrotated and the orientation in a tag; a malformed EXIF block only warns. Greyscale,
    palette, CMYK and 16-bit images are converted (16-bit: value / 257); an image with alpha
    (e.g. a matted photo) is composited over white (its matte: `load_image_and_matte`).
    Multi-frame files (GIF, animated WebP) give their first frame.
    Raises FileNotFoundError for a missing path, ValueError naming the file for a directory, an
    empty, truncated, corrupt or non-image file, or one over Pillow's decompression-bomb limit.
    """
    return load_image_and_matte(path)[0]


def load_image_and_matte(path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The photo at `path` → (rgb (H, W, 3) uint8 as `load_image` gives it, rgba (H, W, 4) uint8
    or None): for a photo with transparency (a matte from rembg or MODNet in its alpha), its
    straight colour and alpha, upright as `rgb`; None for any other photo. Errors as
    `load_image`."""
    from PIL import Image, ImageOps

    from reta3d.data.folder import has_alpha
    path = _require_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception as err:  # a broken EXIF block must not lose a readable photo
                warnings.warn(f"{path}: EXIF orientation ignored ({err})")
                upright = image
            rgb = _to_rgb(upright)
            rgba = np.asarray(upright.convert("RGBA")) if has_alpha(upright) else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    if min(rgb.shape[:2]) < 1:
        raise InputError(f"{path}: image has no pixels ({rgb.shape})")
    return np.ascontiguousarray(rgb), None if rgba is None else np.ascontiguousarray(rgba)


def list_images(folder) -> list[pathlib.Path]:
    """Image files under `folder` (recursive), suffix in `IMAGE_SUFFIXES` in any case.

    Order is deterministic: by path relative to `folder`, compared part by part. Hidden files
    and folders (name starting with ".", e.g. macOS "._x.jpg" resource forks) are skipped.
    Raises FileNotFoundError for a missing folder, ValueError (naming it) for a path that is not
    a folder or a folder without images.
    """
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise MissingInputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append((relative.parts, path))
    if not found:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return [path for _, path in sorted(found)]


def _count_frames(path: pathlib.Path) -> Optional[int]:
    """Frames of the first video stream, counted by ffmpeg remuxing to nothing (`-c copy`: no
    decoding, so fast), or None when ffmpeg gives no count."""
    import imageio_ffmpeg
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:v:0",
           "-c", "copy", "-f", "null", "-"]
    try:
        with _ffmpeg_subprocess():
            out = subprocess.run(cmd, capture_output=True, timeout=120, check=True).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(out.decode(errors="ignore").replace("\r", "\n").splitlines()):
        if "frame=" in line:
            try:
                return int(line.split("frame=", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def _reason(err: BaseException) -> str:
    """ffmpeg's first error line (usually the cause; later ones are consequences, the last often
    a generic "Conversion failed!"), without its banner or "[codec @ 0x...]" prefixes."""
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip()) for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    causes = [line for line in lines
              if re.search(r"error|invalid|not found|partial file", line, re.I)]
    return f"{type(err).__name__}: {(causes or lines or [''])[0 if causes else -1]}"


def read_video(path) -> tuple[Iterator[np.ndarray], float, Optional[int]]:
    """Open a video (anything ffmpeg reads: .mp4, .mov, .webm, .avi, .mkv, .gif, ...; a still
    image reads as a one-frame video).

    Returns (frames, fps, num_frames):
      frames: an iterator of (H, W, 3) uint8 RGB frames, decoded one at a time as it is consumed
        (a long video is never held in memory); rotation metadata (phone videos) is applied by
        ffmpeg, so frames are upright. Closing the iterator early stops ffmpeg.
      fps: frames per second from the stream header (float).
      num_frames: frames in the stream from a demux-only ffmpeg pass (no decoding), or None when
        unknown; a damaged file can decode to fewer.
    Raises FileNotFoundError for a missing path and ValueError naming the file when ffmpeg
    cannot open it as a video (corrupt, empty, not a video).
    """
    import imageio.v3 as iio

    path = _require_file(path)
    try:
        with _ffmpeg_subprocess():
            meta = iio.immeta(path, plugin="FFMPEG", extension=_FFMPEG_EXTENSION)
    except Exception as err:  # imageio raises OSError, RuntimeError, IndexError, ... by case
        raise InputError(f"{path}: not a readable video ({_reason(err)})") from err
    fps = float(meta.get("fps") or 0.0)
    if not np.isfinite(fps) or fps <= 0:
        raise InputError(f"{path}: no frame rate in the video stream (metadata {meta})")
    return _frames(path), fps, _count_frames(path)


def _frames(path: pathlib.Path) -> Iterator[np.ndarray]:
    import imageio.v3 as iio
    # Opened lazily (on the first frame), so an iterator never consumed holds no ffmpeg process.
    with _ffmpeg_subprocess():
        reader = iio.imopen(path, "r", plugin="FFMPEG", extension=_FFMPEG_EXTENSION)
    try:
        for frame in reader.iter():
            yield np.ascontiguousarray(np.asarray(frame)[..., :3])
    except (OSError, RuntimeError) as err:
        raise InputError(f"{path}: decoding failed ({_reason(err)})") from err
    finally:
        reader.close()
