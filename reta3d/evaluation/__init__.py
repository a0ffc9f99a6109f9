"""The paper's evaluation (Table 1a/1c): FID, KID, ID, AED, APD, and the networks they need.

Contracts that checks outside the tests call (DESIGN.md, "Real inputs"):
    inception_feature_fn(path) -> fn: uint8 images (N, H, W, 3) -> (N, 2048) float32
        the FID Inception-v3 ("inception-2015-12-05", pool3), loading the user's pytorch-fid /
        torch-fidelity weight file (.pth) or its converted .npz (`reta3d.evaluation.inception`)
    arcface_embedding_fn(path) -> fn: uint8 face crops / images -> (N, 512) float32, L2-normalised
        ArcFace IResNet loading the user's arcface_torch backbone.pth or its converted .npz
        (`reta3d.evaluation.arcface`)
"""
from __future__ import annotations


def inception_feature_fn(path):
    """FID Inception-v3 features; see `reta3d.evaluation.inception.inception_feature_fn`."""
    from reta3d.evaluation import inception
    return inception.inception_feature_fn(path)


def arcface_embedding_fn(path):
    """ArcFace embeddings; see `reta3d.evaluation.arcface.arcface_embedding_fn`."""
    from reta3d.evaluation import arcface
    return arcface.arcface_embedding_fn(path)
