"""The training input pipeline (grain): shuffle, flip, shard per host, batch per device, prefetch.

Pipeline over any random-access source (the TFDS array_record source of
`tfds_builder.load_data_source`, or a plain sequence of dicts with the same keys):

  record ids ─ shuffle (seeded, a new order every epoch) ─ the first ⌊N / G⌋·G of each
  epoch ─ repeat(num_epochs) ─ flip decision (seeded per position) ─ global batches of G ─
  this host's slice of each (host k of S: positions k·G/S … (k+1)·G/S − 1) ─ read, decode,
  resize, flip, image to float32 [-1, 1] ─ reshape per device ─ prefetch (threads; worker
  processes if worker_count > 0)

The global stream (which records, in which order, which are flipped) is a function of the
seed only, never of the number of hosts: host k reads only its slice of every global batch,
so S hosts with D devices each see, device by device, exactly the batch one host with S·D
devices sees (and `train.make_steps` then computes the same step). Every random choice is a
function of (seed, position in the global stream), so the same arguments give the same
batches, and `get_state()`/`set_state()` (a small dict, safe to store in a checkpoint) resume
a run exactly where it stopped.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Optional, Sequence

import chex
from absl import flags as absl_flags
import grain
import numpy as np
from PIL import Image

from reta3d.data import flip as flip_lib
from reta3d.data import folder as folder_format

FLAME_FIELDS = folder_format.FLAME_KEYS
BATCH_KEYS = ("image", "alpha", "camera") + FLAME_FIELDS + ("index", "flipped")


# Part of the loader's settings: a checkpointed stream from another layout cannot resume.
_STREAM_LAYOUT = "global-batch-slices-v2"


def _seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the shuffle and the flips (the same on every host)."""
    shuffle_seed, flip_seed = np.random.SeedSequence([seed]).generate_state(2)
    return int(shuffle_seed), int(flip_seed)


def _decode(element: tuple[int, Mapping[str, Any]], resolution: Optional[int],
            alpha: bool = True) -> dict:
    """A source record -> image (R, R, 3) uint8, alpha (R, R, 1) uint8 (the record's mask;
    255 everywhere for a source without masks; not read, and absent, when alpha=False),
    camera (25,) and FLAME fields float32."""
    index, record = element
    missing = [key for key in ("image", "camera") + FLAME_FIELDS if key not in record]
    name = record.get("filename", f"record {index}")
    name = name.decode() if isinstance(name, bytes) else str(name)
    if missing:
        raise ValueError(f"data source element {index} ({name}) lacks {missing}")
    image = np.asarray(record["image"])
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"data source element {index} ({name}): image must be (H, W, 3) "
                         f"uint8, got {image.shape} {image.dtype}")
    mask = None
    if alpha:
        mask = np.asarray(record["mask"]) if "mask" in record else np.full(
            image.shape[:2] + (1,), 255, np.uint8)
        if mask.shape != image.shape[:2] + (1,) or mask.dtype != np.uint8:
            raise ValueError(f"data source element {index} ({name}): mask must be (H, W, 1) "
                             f"uint8 as its image, got {mask.shape} {mask.dtype}")
    if resolution is not None and image.shape[:2] != (resolution, resolution):
        size = (resolution, resolution)
        image = np.asarray(Image.fromarray(image, "RGB").resize(size, Image.Resampling.LANCZOS))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask[..., 0], "L").resize(
                size, Image.Resampling.LANCZOS))[..., None]
    out = {"image": image, "camera": np.asarray(record["camera"], np.float32)}
    if mask is not None:
        out["alpha"] = mask
    chex.assert_shape(out["camera"], (folder_format.LABEL_SIZE,))
    out.update({key: np.asarray(record[key], np.float32) for key in FLAME_FIELDS})
    out["index"] = np.int32(index)
    return out


def _not_flipped(record_id) -> tuple:
    return int(record_id), False


def _draw_flip(record_id, rng: np.random.Generator) -> tuple:
    # Drawn on the global stream, before the host split: a function of the position only.
    return int(record_id), bool(rng.random() < 0.5)


def _apply_flip(element: dict, flipped: bool) -> dict:
    if flipped:
        flame = {key: element[key] for key in FLAME_FIELDS}
        image, camera, flame = flip_lib.flip_sample(element["image"], element["camera"], flame)
        element = {**element, "image": image, "camera": camera, **flame}
        if "alpha" in element:
            element["alpha"] = flip_lib.flip_image(element["alpha"])
    return {**element, "flipped": np.bool_(flipped)}


def _normalise(element: dict) -> dict:
    # uint8 0..255 -> [-1, 1] (StyleGAN/EG3D convention); alpha -> [0, 1].
    out = {**element,
           "image": element["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
    if "alpha" in element:
        out["alpha"] = element["alpha"].astype(np.float32) / np.float32(255.0)
    return out


def _split_devices(batch: dict, num_devices: int) -> dict:
    return {key: value.reshape((num_devices, -1) + value.shape[1:])
            for key, value in batch.items()}


def _read_host_batch(ids_and_flips, data_source, resolution: Optional[int], num_devices: int,
                     alpha: bool = True) -> dict:
    """(record ids (H,), flips (H,)) -> this host's batch, split over its devices."""
    ids, flips = (np.asarray(a).reshape(-1) for a in ids_and_flips)
    elements = [_normalise(_apply_flip(_decode((int(i), data_source[int(i)]), resolution, alpha),
                                       bool(f)))
                for i, f in zip(ids, flips)]
    batch = {key: np.stack([element[key] for element in elements]) for key in elements[0]}
    return _split_devices(batch, num_devices)


class Loader:
    """Iterator of batches {key: (num_devices, per_device_batch, ...)} with resumable state.

    image (D, B, H, W, 3) float32 in [-1, 1]; alpha (D, B, H, W, 1) float32 in [0, 1] (the
    images' mattes; 1 for images without one; absent from a loader made with alpha=False);
    camera (D, B, 25) float32; shape (D, B, S), expression (D, B, E), global_pose/neck_pose/jaw_pose (D, B, 3), eye_pose (D, B, 6)
    float32; index (D, B) int32 (the record's index in the source); flipped (D, B) bool.
    """

    def __init__(self, dataset: grain.IterDataset, settings: dict, batches_per_epoch: int):
        self._dataset = dataset
        self._settings = settings
        self._iterator = iter(dataset)
        self.batches_per_epoch = batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (store it in the checkpoint)."""
        return {"settings": json.dumps(self._settings, sort_keys=True),
                "grain": json.dumps(self._iterator.get_state(), sort_keys=True)}

    def set_state(self, state: Mapping[str, str]) -> None:
        """Continues from a `get_state()` of a loader made with the same arguments."""
        if set(state) != {"settings", "grain"}:
            raise ValueError(f"not a loader state (keys {sorted(state)})")
        saved = json.loads(state["settings"])
        if saved != json.loads(json.dumps(self._settings)):
            changed = sorted(k for k in set(saved) | set(self._settings)
                             if saved.get(k) != self._settings.get(k))
            raise ValueError(f"loader state was saved with different settings {changed}: "
                             f"saved {saved}, now {self._settings}")
        self._iterator.set_state(json.loads(state["grain"]))

    def close(self) -> None:
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            closer()


def make_loader(data_source: Sequence[Mapping[str, Any]], global_batch_size: int,
                num_devices: int, seed: int, shuffle: bool = True, flip: bool = True,
                resolution: Optional[int] = None, shard_index: int = 0, shard_count: int = 1,
                num_epochs: Optional[int] = None, worker_count: int = 0,
                read_threads: int = 4, prefetch_batches: int = 4, alpha: bool = True) -> Loader:
    """The training loader over `data_source` (see the module docstring).

    global_batch_size: examples per step over all hosts; each host (shard_index of
    shard_count, e.g. jax.process_index()/jax.process_count()) yields its slice of every
    global batch, global_batch_size / shard_count examples split over its `num_devices`
    local devices, so global_batch_size must be divisible by shard_count * num_devices.
    Host k's slice is examples k·H … (k+1)·H − 1 of the global batch (H = the host batch):
    the hosts read disjoint records, and the global batch does not depend on shard_count.
    An epoch is ⌊len / global_batch_size⌋ global batches of a fresh permutation (the
    remainder, a different random set each epoch, is left out). num_epochs=None repeats
    forever. resolution: resize images whose size differs (None: keep).
    worker_count > 0 decodes in that many processes (grain mp_prefetch); read_threads and
    prefetch_batches control the in-process thread prefetch. alpha=False leaves the records'
    masks unread and the batches without "alpha" (for a discriminator that sees RGB only; with
    `tfds_builder.load_data_source(masks=False)` they are not even decoded); the stream is the
    same either way, so it is not part of the resumable state's settings.
    """
    if num_devices <= 0 or shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need num_devices > 0 and 0 <= shard_index < shard_count, got "
                         f"{num_devices}, {shard_index}, {shard_count}")
    if global_batch_size <= 0 or global_batch_size % (shard_count * num_devices):
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                         f"of shard_count * num_devices = {shard_count * num_devices}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    host_batch = global_batch_size // shard_count
    batches_per_epoch = len(data_source) // global_batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"the source holds {len(data_source)} records, fewer than one global "
                         f"batch of {global_batch_size} ({shard_count} host batch(es) of "
                         f"{host_batch})")

    shuffle_seed, flip_seed = _seeds(seed)
    # Only record ids travel through the shuffle, the flip draw and the host split, so a
    # host reads (and decodes) nothing but its own slice. Module-level functions (not
    # lambdas) so worker processes can unpickle the pipeline.
    dataset = grain.MapDataset.range(len(data_source))
    if shuffle:
        dataset = dataset.shuffle(seed=shuffle_seed)   # position e·N + i: epoch e's order
    dataset = dataset[:batches_per_epoch * global_batch_size].repeat(num_epochs)
    if flip:
        dataset = dataset.random_map(_draw_flip, seed=flip_seed)
    else:
        dataset = dataset.map(_not_flipped)
    # Global batch j is host batches j·S … j·S + S − 1; host k keeps the k-th of each.
    dataset = dataset.batch(host_batch, drop_remainder=True)[shard_index::shard_count]
    dataset = dataset.map(functools.partial(_read_host_batch, data_source=data_source,
                                            resolution=resolution, num_devices=num_devices,
                                            alpha=alpha))
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=min(read_threads, prefetch_batches), prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        if not absl_flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
            # nothing parsed them, so take their defaults.
            absl_flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count))
    settings = {"global_batch_size": global_batch_size, "num_devices": num_devices,
                "seed": seed, "shuffle": shuffle, "flip": flip, "resolution": resolution,
                "shard_index": shard_index, "shard_count": shard_count,
                "num_epochs": num_epochs, "worker_count": worker_count,
                "num_records": len(data_source), "layout": _STREAM_LAYOUT}
    return Loader(iter_dataset, settings, batches_per_epoch)
