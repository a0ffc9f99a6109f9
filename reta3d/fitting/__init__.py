"""Fitting the generator to photos and videos of real faces.

Modules (imported on first use, so that `import reta3d.fitting` stays light):
- `embedding`: 68-point landmark embeddings on the head mesh (`template_embedding`,
  `load_embedding` for FLAME's / DECA's files, `landmarks_3d`).
- `fit`: FLAME + EG3D-camera fitting to 2D landmarks (`fit_landmarks`, `project`).
- `landmarks`, `crop`: face detection / 68 landmarks in photos, EG3D-style crops.

The names below are re-exported lazily from `embedding` and `fit`.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "LandmarkEmbedding": "embedding", "template_embedding": "embedding", "load_embedding": "embedding",
    "landmarks_3d": "embedding", "MIRROR_68": "embedding",
    "FitResult": "fit", "fit_landmarks": "fit", "project": "fit", "canonical_label": "fit",
    "head_rotation_angles": "fit",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reta3d.fitting' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"reta3d.fitting.{module}"), name)
    globals()[name] = value
    return value
