"""The dataset folder format: reading, writing and validation.

Layout (every filename is relative to DATASET, with forward slashes)::

    DATASET/
      images/…/*.png (or .jpg/.jpeg)  square RGB images, any resolution; they are resized
                                      to the config's resolution when the TFDS copy is built
                                      (and again by the loader if asked for another size).
                                      RGBA (a matte in the alpha channel, as rembg or MODNet
                                      write) is composited over white, the background the
                                      generator renders on (`flatten_alpha`); the matte is
                                      kept beside it for a discriminator that sees alpha
                                      (`config.disc.alpha_channel`, `load_image_and_alpha`).
      dataset.json                    EG3D's camera labels:
          {"labels": [["images/00000.png", [25 floats]], …]}
          25 = the 4x4 cam2world matrix (row-major, OpenCV axes) then the 3x3 intrinsics
          normalised by the image size (FFHQ: fx = fy = 4.2647, cx = cy = 0.5).
      flame.json                      per-image FLAME parameters (axis-angle poses):
          {"flame": [["images/00000.png", {"shape": [≤300], "expression": [≤100],
                      "global_pose": [3], "neck_pose": [3], "jaw_pose": [3],
                      "eye_pose": [6]}], …]}

Both JSON files list exactly the images present under ``images/`` (no more, no less, no
duplicates). A key missing from a FLAME entry means zeros. ``global_pose`` is usually zero
because EG3D's camera already absorbs the head rotation. ``eye_pose`` is the left eye's
axis-angle then the right eye's.

Stored sizes: a FLAME fit may carry up to 300 shape and 100 expression coefficients, but the
training data keeps the first ``NUM_SHAPE = 100`` shape and ``NUM_EXPRESSION = 50``
expression coefficients (what DECA/EMOCA fits provide, and what FLAME-conditioned 3D GANs
such as Next3D condition on); shorter vectors are zero-padded, longer ones truncated. Both
sizes can be changed per TFDS build (``num_shape``, ``num_expression``).

Real FFHQ is brought by the user, never downloaded: crop the photos and estimate the
cameras with EG3D's FFHQ preprocessing (github.com/NVlabs/eg3d, ``dataset_preprocessing/
ffhq``), which writes ``dataset.json``; fit FLAME to every crop with DECA or EMOCA and write
``flame.json`` in the layout above (see the README, "Datasets"). Without FFHQ,
``experiments/make_synthetic_dataset.py`` renders a synthetic folder with ``write_folder``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Mapping, NamedTuple, Optional, Sequence

import chex
import numpy as np
from PIL import Image

from reta3d import errors

NUM_SHAPE = 100
NUM_EXPRESSION = 50
MAX_SHAPE = 300
MAX_EXPRESSION = 100
LABEL_SIZE = 25
FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")
POSE_SIZES = {"global_pose": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
MAX_SIZES = {"shape": MAX_SHAPE, "expression": MAX_EXPRESSION}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_FILE = "dataset.json"
FLAME_FILE = "flame.json"
IMAGES_DIR = "images"
# How many problems a DatasetError spells out; the rest are counted.
MAX_LISTED_PROBLEMS = 10

HOW_TO_GET = (
    "Expected layout: DATASET/images/**/*.png (square RGB), DATASET/dataset.json "
    '({"labels": [["images/00000.png", [25 floats]], ...]}, EG3D camera labels) and '
    'DATASET/flame.json ({"flame": [["images/00000.png", {"shape": [...], "expression": '
    '[...], "global_pose": [3], "neck_pose": [3], "jaw_pose": [3], "eye_pose": [6]}], ...]}). '
    "For real FFHQ: crop and estimate cameras with EG3D's FFHQ preprocessing "
    "(github.com/NVlabs/eg3d, dataset_preprocessing/ffhq), fit FLAME with DECA or EMOCA; "
    "see README 'Datasets'. For a folder of your own photos run experiments/preprocess.py; "
    "for a synthetic dataset run experiments/make_synthetic_dataset.py."
)


class DatasetError(errors.InputError):
    """A dataset folder that cannot be used. `problems` lists (file, message) pairs."""

    def __init__(self, folder, problems: Sequence[tuple[str, str]], hint: str = ""):
        self.folder = str(folder)
        self.problems = list(problems)
        shown = [f"  {file}: {message}" for file, message in self.problems[:MAX_LISTED_PROBLEMS]]
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            shown.append(f"  ... and {hidden} more problem(s)")
        text = (f"{len(self.problems)} problem(s) in dataset folder {self.folder}:\n"
                + "\n".join(shown))
        if hint:
            text += "\n" + hint
        super().__init__(text)


@dataclasses.dataclass(frozen=True)
class FolderSummary:
    """What `validate_folder` found in a valid folder.

    filenames: sorted relative image names; image_sizes: {side length: image count};
    max_shape / max_expression: the longest shape / expression vector in flame.json;
    num_smaller_than_resolution: images that will be upsampled to reach `resolution`.
    """

    folder: str
    num_images: int
    filenames: tuple[str, ...]
    image_sizes: dict
    max_shape: int
    max_expression: int
    resolution: Optional[int]
    num_smaller_than_resolution: int


class FolderContents(NamedTuple):
    """Labels read from the JSON files, sorted by filename.

    filenames: list of N relative names; cameras: (N, 25) float32;
    flame: {"shape": (N, num_shape), "expression": (N, num_expression), "global_pose",
    "neck_pose", "jaw_pose": (N, 3), "eye_pose": (N, 6)} float32.
    """

    filenames: list
    cameras: np.ndarray
    flame: dict


def _hint(folder: pathlib.Path, problems) -> str:
    """What to do about a folder missing the dataset's files (once, after the list): the
    layout and where datasets come from; for a folder experiments/preprocess.py wrote nothing
    into, where it says why."""
    if not any(message.startswith("missing") for _, message in problems):
        return ""
    report = folder / "preprocess_report.json"
    if report.is_file():
        return (f"{report} is here: experiments/preprocess.py ran on this folder but wrote no "
                "photo; its 'skipped' entries give each photo's reason.")
    return HOW_TO_GET


def _missing_folder_error(folder: pathlib.Path) -> DatasetError:
    return DatasetError(folder, [(str(folder), "dataset folder does not exist")], HOW_TO_GET)


def list_images(folder) -> list[str]:
    """Relative names (posix, sorted) of the image files under `folder`/images."""
    folder = pathlib.Path(folder)
    root = folder / IMAGES_DIR
    if not root.is_dir():
        return []
    names = []
    for dirpath, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith(IMAGE_SUFFIXES) and not file.startswith("."):
                names.append((pathlib.Path(dirpath) / file).relative_to(folder).as_posix())
    return sorted(names)


def _check_name(name, json_file: str, index: int, problems: list) -> bool:
    if not isinstance(name, str) or not name:
        problems.append((json_file, f"entry {index}: the filename must be a non-empty string, "
                                    f"got {name!r}"))
        return False
    parts = pathlib.PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "\\" in name:
        problems.append((json_file, f"entry {index}: filename {name!r} must be a relative "
                                    "posix path inside the dataset folder"))
        return False
    return True


def _as_finite_vector(values, file: str, what: str, problems: list) -> Optional[np.ndarray]:
    """A flat list of finite numbers as float64, or None (with a problem recorded)."""
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        problems.append((file, f"{what} must be a flat list of numbers"))
        return None
    vector = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(vector)):
        problems.append((file, f"{what} has non-finite values (NaN or inf)"))
        return None
    return vector


def _load_json(folder: pathlib.Path, file: str, key: str, problems: list):
    """The list under `key` in folder/file, or None with a problem recorded."""
    path = folder / file
    if not path.is_file():
        problems.append((str(path), f"missing ({file} is required)"))
        return None
    try:
        with open(path, "rb") as handle:
            # NaN/Infinity tokens parse to floats here and are reported as non-finite later.
            content = json.loads(handle.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append((str(path), f"is not valid JSON ({error})"))
        return None
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        problems.append((str(path), f'must be an object with a list under "{key}"'))
        return None
    return content[key]


def _parse_labels(folder: pathlib.Path, problems: list) -> Optional[dict]:
    """{filename: (25,) float64} from dataset.json, or None if the file is unusable."""
    entries = _load_json(folder, LABELS_FILE, "labels", problems)
    if entries is None:
        return None
    path = str(folder / LABELS_FILE)
    labels = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2:
            problems.append((path, f"entry {index} must be [filename, [25 numbers]]"))
            continue
        name, values = entry
        if not _check_name(name, path, index, problems):
            continue
        if name in labels:
            problems.append((path, f"{name} is labelled more than once"))
            continue
        vector = _as_finite_vector(values, path, f"label of {name}", problems)
        if vector is None:
            labels[name] = None
            continue
        if vector.size != LABEL_SIZE:
            problems.append((path, f"label of {name} has {vector.size} numbers, expected "
                                   f"{LABEL_SIZE} (16 cam2world + 9 normalised intrinsics)"))
            labels[name] = None
            continue
        cam2world = vector[:16].reshape(4, 4)
        rotation = cam2world[:3, :3]
        if (not np.allclose(cam2world[3], [0, 0, 0, 1], atol=1e-4)
                or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3)
                or np.linalg.det(rotation) <= 0):
            problems.append((path, f"label of {name}: the first 16 numbers are not a rigid "
                                   "cam2world matrix (rotation + translation, last row 0 0 0 1)"))
        labels[name] = vector
    return labels


def _parse_flame(folder: pathlib.Path, problems: list) -> Optional[dict]:
    """{filename: {key: float64 vector}} from flame.json, or None if the file is unusable."""
    entries = _load_json(folder, FLAME_FILE, "flame", problems)
    if entries is None:
        return None
    path = str(folder / FLAME_FILE)
    flame = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], dict):
            problems.append((path, f"entry {index} must be [filename, {{FLAME parameters}}]"))
            continue
        name, params = entry
        if not _check_name(name, path, index, problems):
            continue
        if name in flame:
            problems.append((path, f"{name} has more than one FLAME entry"))
            continue
        parsed = {}
        for key, values in params.items():
            if key not in FLAME_KEYS:
                problems.append((path, f"FLAME entry of {name}: unknown key {key!r} "
                                       f"(expected some of {', '.join(FLAME_KEYS)})"))
                continue
            vector = _as_finite_vector(values, path, f"FLAME {key} of {name}", problems)
            if vector is None:
                continue
            if key in POSE_SIZES and vector.size != POSE_SIZES[key]:
                problems.append((path, f"FLAME {key} of {name} has {vector.size} numbers, "
                                       f"expected {POSE_SIZES[key]}"))
                continue
            if key in MAX_SIZES and vector.size > MAX_SIZES[key]:
                problems.append((path, f"FLAME {key} of {name} has {vector.size} numbers, "
                                       f"FLAME has at most {MAX_SIZES[key]}"))
                continue
            parsed[key] = vector
        flame[name] = parsed
    return flame


def _parse_json_files(folder: pathlib.Path, problems: list):
    """Labels and FLAME entries, with every name check against the images present."""
    labels = _parse_labels(folder, problems)
    flame = _parse_flame(folder, problems)
    images_dir = folder / IMAGES_DIR
    present = list_images(folder)
    if not images_dir.is_dir():
        problems.append((str(images_dir), "missing image directory"))
    elif not present:
        problems.append((str(images_dir), f"holds no image ({', '.join(IMAGE_SUFFIXES)})"))
    present_set = set(present)
    if labels is not None:
        for name in sorted(set(labels) - present_set):
            problems.append((str(folder / name), f"is labelled in {LABELS_FILE} but the image "
                                                 "file does not exist"))
        for name in sorted(present_set - set(labels)):
            problems.append((str(folder / name), f"has no label in {LABELS_FILE}"))
        if len(labels) != len(present) and present:
            problems.append((str(folder / LABELS_FILE), f"has {len(labels)} labels but "
                                                        f"{IMAGES_DIR}/ holds {len(present)} "
                                                        "images"))
    if flame is not None:
        for name in sorted(set(flame) - present_set):
            problems.append((str(folder / name), f"has a FLAME entry in {FLAME_FILE} but the "
                                                 "image file does not exist"))
        for name in sorted(present_set - set(flame)):
            problems.append((str(folder / name), f"has no FLAME entry in {FLAME_FILE}"))
    return labels, flame, present


def _check_image(path: pathlib.Path) -> tuple[Optional[int], Optional[str]]:
    """(side length, None) for a good image, (None, problem) otherwise."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, (width, height) = image.mode, image.size
    except Exception as error:  # PIL raises many types for corrupt files.
        return None, f"cannot be decoded as an image ({type(error).__name__}: {error})"
    if mode not in ("RGB", "RGBA"):
        return None, (f"has mode {mode}, expected RGB (8-bit, 3 channels) or RGBA (8-bit, "
                      "alpha = foreground matte)")
    if width != height:
        return None, f"is not square ({width}x{height})"
    return width, None


def _check_images(folder: pathlib.Path, names: Sequence[str], problems: list) -> dict:
    """Decodes every image (threads: PIL releases the GIL while decoding); {name: side}."""
    sides = {}
    workers = min(16, (os.cpu_count() or 1) + 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda name: _check_image(folder / name), names)
        for name, (side, problem) in zip(names, results):
            if problem is not None:
                problems.append((str(folder / name), problem))
            else:
                sides[name] = side
    return sides


def validate_folder(path, resolution: Optional[int] = None,
                    check_images: bool = True) -> FolderSummary:
    """Checks a dataset folder before training; raises one DatasetError listing all problems.

    Checks: the folder, images/, dataset.json and flame.json exist; the JSON parses and has
    the documented structure; both files list exactly the images present (no missing image,
    no image without a label or FLAME entry, no duplicates); labels have 25 finite numbers
    forming a rigid cam2world matrix; FLAME entries have known keys, finite values and the
    right lengths; every image decodes (unless check_images=False), is RGB and square.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise _missing_folder_error(folder)
    if resolution is not None and (not isinstance(resolution, (int, np.integer))
                                   or resolution <= 0):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    problems: list[tuple[str, str]] = []
    labels, flame, present = _parse_json_files(folder, problems)
    sides = _check_images(folder, present, problems) if check_images else {}
    if problems:
        raise DatasetError(folder, problems, _hint(folder, problems))
    image_sizes: dict = {}
    for side in sides.values():
        image_sizes[side] = image_sizes.get(side, 0) + 1
    return FolderSummary(
        folder=str(folder),
        num_images=len(present),
        filenames=tuple(present),
        image_sizes=dict(sorted(image_sizes.items())),
        max_shape=max([len(p.get("shape", ())) for p in flame.values()], default=0),
        max_expression=max([len(p.get("expression", ())) for p in flame.values()], default=0),
        resolution=None if resolution is None else int(resolution),
        num_smaller_than_resolution=0 if resolution is None else sum(
            count for side, count in image_sizes.items() if side < resolution),
    )


def _fit(vector: Optional[np.ndarray], size: int) -> np.ndarray:
    """Zero-pads or truncates to `size` (missing = zeros)."""
    out = np.zeros(size, np.float32)
    if vector is not None:
        count = min(size, vector.size)
        out[:count] = vector[:count]
    return out


def read_folder(path, num_shape: int = NUM_SHAPE,
                num_expression: int = NUM_EXPRESSION) -> FolderContents:
    """Cameras and FLAME parameters of every image, sorted by filename.

    Checks the JSON files against the images present (not the pixels: see validate_folder)
    and raises DatasetError on any problem. Returns FolderContents: filenames (N,), cameras
    (N, 25) float32, flame {shape (N, num_shape), expression (N, num_expression),
    global_pose/neck_pose/jaw_pose (N, 3), eye_pose (N, 6)} float32.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise _missing_folder_error(folder)
    problems: list[tuple[str, str]] = []
    labels, flame, present = _parse_json_files(folder, problems)
    if problems:
        raise DatasetError(folder, problems)
    sizes = {"shape": num_shape, "expression": num_expression, **POSE_SIZES}
    cameras = np.stack([labels[name].astype(np.float32) for name in present])
    params = {key: np.stack([_fit(flame[name].get(key), size) for name in present])
              for key, size in sizes.items()}
    return FolderContents(list(present), cameras, params)


def flatten_alpha(image: "Image.Image", background: int = 255) -> "Image.Image":
    """A PIL image with transparency (RGBA, LA, PA, or P/L/RGB with a transparency key) →
    RGB composited over a solid grey level (255: white, the configs' render background);
    any other image → RGB as Pillow converts it. A matte in the alpha channel thus becomes
    the white background of FFHQ-style training images (GGHead's `apply_masks`)."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background,) * 3 + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def has_alpha(image: "Image.Image") -> bool:
    """Whether a PIL image carries transparency (what `flatten_alpha` composites)."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def load_image(path, resolution: Optional[int] = None) -> np.ndarray:
    """One image file as (H, W, 3) uint8, resized to (resolution, resolution) if given.

    An image with an alpha channel is composited over white first (`flatten_alpha`).
    Resizing uses Lanczos filtering (antialiased when downsampling).
    """
    return load_image_and_alpha(path, resolution)[0]


def load_image_and_alpha(path, resolution: Optional[int] = None
                         ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One image file → (rgb (H, W, 3) uint8 composited over white as `load_image` does,
    alpha (H, W) uint8 or None for an image without transparency), both resized with the same
    Lanczos filter when `resolution` is given. The composite is linear in (premultiplied
    colour, alpha), so resizing the two apart keeps them consistent."""
    path = pathlib.Path(path)
    try:
        with Image.open(path) as image:
            alpha = image.convert("RGBA").getchannel("A") if has_alpha(image) else None
            image = flatten_alpha(image)
            if resolution is not None and image.size != (resolution, resolution):
                size = (resolution, resolution)
                image = image.resize(size, Image.Resampling.LANCZOS)
                alpha = None if alpha is None else alpha.resize(size, Image.Resampling.LANCZOS)
            return (np.asarray(image, np.uint8).copy(),
                    None if alpha is None else np.asarray(alpha, np.uint8).copy())
    except (OSError, ValueError) as error:
        raise DatasetError(path.parent, [(str(path), f"cannot be read as an image ({error})")])


def images_without_alpha(path) -> list[str]:
    """The images of dataset folder `path` (relative names) that carry no alpha channel: what
    a discriminator that sees alpha cannot train on. Reads only the file headers."""
    folder = pathlib.Path(path)
    missing = []
    for name in list_images(folder):
        with Image.open(folder / name) as image:
            if not has_alpha(image):
                missing.append(name)
    return missing


def folder_fingerprint(path) -> str:
    """sha256 hex of the folder's content, cheap enough to compute at every start.

    Covers the bytes of dataset.json and flame.json, and each image's name, size and
    modification time (hashing every pixel of FFHQ at every start would take minutes;
    rewriting an image changes its mtime).
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise _missing_folder_error(folder)
    digest = hashlib.sha256()
    for file in (LABELS_FILE, FLAME_FILE):
        digest.update(file.encode())
        target = folder / file
        digest.update(target.read_bytes() if target.is_file() else b"<missing>")
    for name in list_images(folder):
        stat = (folder / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _json_lines(key: str, entries: Sequence) -> str:
    # One entry per line: diffable and readable for 70k images, unlike one giant line.
    body = ",\n".join("  " + json.dumps(entry, allow_nan=False) for entry in entries)
    return f'{{"{key}": [\n{body}\n]}}\n'


def write_folder(path, images, labels, flame: Mapping[str, np.ndarray],
                 names: Optional[Sequence[str]] = None, overwrite: bool = False,
                 extra_files: Optional[Mapping[str, str]] = None) -> pathlib.Path:
    """Writes a dataset folder in the documented layout, atomically.

    images: (N, H, W, 3) uint8 RGB or (N, H, W, 4) RGBA with straight (not premultiplied)
    alpha, the PNG convention (H == W); labels: (N, 25) EG3D camera labels; flame: dict of
    (N, k) arrays with keys among FLAME_KEYS (absent keys mean zeros; shape k ≤ 300,
    expression k ≤ 100, poses 3, eye_pose 6); names: N relative names "images/….png"
    (default "images/00000.png", …). Everything is written to a temporary sibling folder and
    renamed into place, so `path` never holds half a dataset. An existing `path` is an error
    unless overwrite=True. extra_files: {name: text} written beside dataset.json, in the same
    rename (e.g. the synthetic dataset's recipe). Returns the folder path.
    """
    folder = pathlib.Path(path)
    images = np.asarray(images)
    labels = np.asarray(labels, np.float64)
    chex.assert_rank(images, 4)
    count = images.shape[0]
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.shape[3] not in (3, 4) or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, H, H, 3) square RGB or (N, H, H, 4) RGBA, got "
                         f"{images.shape}")
    chex.assert_shape(labels, (count, LABEL_SIZE))
    if not np.all(np.isfinite(labels)):
        raise ValueError("labels contain non-finite values")
    flame_arrays = {}
    for key, values in flame.items():
        if key not in FLAME_KEYS:
            raise ValueError(f"unknown FLAME key {key!r}; expected some of {FLAME_KEYS}")
        values = np.asarray(values, np.float64)
        chex.assert_rank(values, 2)
        if values.shape[0] != count:
            raise ValueError(f"flame[{key!r}] has {values.shape[0]} rows, expected {count}")
        if key in POSE_SIZES and values.shape[1] != POSE_SIZES[key]:
            raise ValueError(f"flame[{key!r}] must be (N, {POSE_SIZES[key]}), got {values.shape}")
        if key in MAX_SIZES and values.shape[1] > MAX_SIZES[key]:
            raise ValueError(f"flame[{key!r}] has {values.shape[1]} columns, at most "
                             f"{MAX_SIZES[key]}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"flame[{key!r}] contains non-finite values")
        flame_arrays[key] = values
    if names is None:
        names = [f"{IMAGES_DIR}/{index:05d}.png" for index in range(count)]
    names = list(names)
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"names must be {count} distinct filenames, got {len(names)} "
                         f"({len(set(names))} distinct)")
    for name in names:
        problems: list = []
        if (not _check_name(name, "names", 0, problems) or not name.startswith(IMAGES_DIR + "/")
                or not name.endswith(".png")):
            raise ValueError(f"name {name!r} must be a relative path 'images/….png'")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for name, image in zip(names, images):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, "RGBA" if image.shape[-1] == 4 else "RGB").save(
                target, format="PNG")
        (staging / LABELS_FILE).write_text(_json_lines(
            "labels", [[name, [float(v) for v in label]] for name, label in zip(names, labels)]))
        (staging / FLAME_FILE).write_text(_json_lines("flame", [
            [name, {key: [float(v) for v in values[index]]
                    for key, values in flame_arrays.items()}]
            for index, name in enumerate(names)]))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if folder.exists():
            retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, retired)
            os.rename(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
