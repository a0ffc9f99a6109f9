"""Files written atomically: to a temporary name beside the target, then renamed over it, so an
interrupted job leaves the old file or the new one, never a truncated one (the contract of every
long job here: nothing already written is lost)."""
from __future__ import annotations

import os
import pathlib
from typing import Callable, Mapping

import numpy as np


def write_via(path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Calls `write(tmp)` for a hidden temporary file beside `path` (same folder, same suffix,
    so writers that pick a format from the suffix, such as ffmpeg, still do), then renames it
    over `path`. If `write` raises (or the process is interrupted), `path` keeps its old content
    and the temporary is removed. A missing parent folder is created. Returns `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path, data: bytes) -> pathlib.Path:
    """Writes `data` to `path` atomically; returns the path."""
    return write_via(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> pathlib.Path:
    """Writes `text` (UTF-8) to `path` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def save_npz(path, arrays: Mapping[str, np.ndarray]) -> pathlib.Path:
    """np.savez of `arrays` to `path` (the name kept as given) atomically; returns the path."""
    def write(tmp):
        with open(tmp, "wb") as handle:   # a file object keeps np.savez from appending ".npz"
            np.savez(handle, **arrays)
    return write_via(path, write)


def save_png(path, image: np.ndarray) -> pathlib.Path:
    """An (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) uint8 image as PNG at `path`, atomically;
    returns the path."""
    from PIL import Image
    return write_via(path, lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG"))
