"""Training data: the dataset folder format, its TFDS/array_record copy, the grain loader.

See `reta3d.data.folder` for the folder layout, `tfds_builder` for the prepared copy,
`loader` for the input pipeline and `flip` for the mirror augmentation.
"""
from reta3d.data.flip import flip_camera, flip_flame, flip_image, flip_sample
from reta3d.data.folder import (FLAME_KEYS, NUM_EXPRESSION, NUM_SHAPE, DatasetError,
                                FolderSummary, folder_fingerprint, load_image, read_folder,
                                validate_folder, write_folder)
from reta3d.data.loader import Loader, make_loader
from reta3d.data.tfds_builder import load_data_source, make_builder, prepare_dataset

__all__ = [
    "FLAME_KEYS", "NUM_EXPRESSION", "NUM_SHAPE", "DatasetError", "FolderSummary", "Loader",
    "flip_camera", "flip_flame", "flip_image", "flip_sample", "folder_fingerprint",
    "load_data_source", "load_image", "make_builder", "make_loader", "prepare_dataset",
    "read_folder", "validate_folder", "write_folder",
]
