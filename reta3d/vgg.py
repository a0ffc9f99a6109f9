"""VGG16 feature extractor (torchvision layout) for the identity-consistency loss L_ID.

RETA3D (Sec. 2.4) uses L_ID = ||VGG(I_d) - VGG(I_s)||_1 without naming the layers; we use
the four activations that LPIPS and most perceptual losses use: relu1_2, relu2_2, relu3_3
and relu4_3 (torchvision `features` indices 3, 8, 15 and 22).

Weights: the user brings torchvision's ImageNet VGG16 weights file `vgg16-397923af.pth`
(https://download.pytorch.org/models/vgg16-397923af.pth, torchvision's
`VGG16_Weights.IMAGENET1K_V1`) and converts it once with
`python experiments/convert_vgg16.py --input=vgg16-397923af.pth --output=vgg16.npz`.
The `.npz` holds the 26 tensors `features.{0,2,5,...,28}.{weight,bias}` verbatim (torch
layout: weights [out, in, 3, 3] float32); `load_vgg16_params` transposes them to Flax's
HWIO. Without a file, `random_vgg16_params(seed)` gives a fixed random network (an
explicit choice the caller makes; random VGG features still form a usable, if weaker,
perceptual distance).

Input convention: `make_vgg16_features_fn` takes images in [-1, 1], maps them to [0, 1]
and normalises with ImageNet's per-channel mean/std, exactly as torchvision's VGG expects.
No resize to 224 is done: the convolutional features work at any size >= 8 px (relu4_3
sits after three 2x2 poolings).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import errors

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# (flax name, in channels, out channels, index in torchvision's `vgg16().features`).
VGG16_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 3, 64, 0),
    ("conv1_2", 64, 64, 2),
    ("conv2_1", 64, 128, 5),
    ("conv2_2", 128, 128, 7),
    ("conv3_1", 128, 256, 10),
    ("conv3_2", 256, 256, 12),
    ("conv3_3", 256, 256, 14),
    ("conv4_1", 256, 512, 17),
    ("conv4_2", 512, 512, 19),
    ("conv4_3", 512, 512, 21),
    ("conv5_1", 512, 512, 24),
    ("conv5_2", 512, 512, 26),
    ("conv5_3", 512, 512, 28),
)
# torchvision puts a 2x2/2 max-pool after the last conv of each block (features 4, 9, 16, 23, 30).
_POOL_AFTER = frozenset({"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"})
RELU_LAYERS: tuple[str, ...] = tuple("relu" + name[4:] for name, *_ in VGG16_CONVS)
DEFAULT_FEATURE_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: jax.Array) -> jax.Array:
    """Maps images (..., H, W, 3) float in [-1, 1] to torchvision's VGG input.

    x01 = (x + 1) / 2, then (x01 - mean) / std per RGB channel (ImageNet statistics).
    """
    chex.assert_axis_dimension(images, -1, 3)
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return ((images + 1.0) * 0.5 - mean) / std


def _check_layer_names(layers: Sequence[str]) -> None:
    if len(layers) == 0:
        raise ValueError("VGG16: at least one output layer is needed")
    unknown = [name for name in layers if name not in RELU_LAYERS]
    if unknown:
        raise ValueError(f"VGG16: unknown layer(s) {unknown}; choose from {RELU_LAYERS}")


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features` (13 3x3 convs + ReLU, 2x2 max-pools), no classifier.

    Call on ImageNet-normalised images (B, H, W, 3) float32 (see `imagenet_normalize`);
    returns {layer name: (B, h, w, C) float32} for each name in `output_layers` (names
    relu{block}_{conv}, e.g. relu3_3). Layers deeper than the deepest requested one are not
    computed, so the parameters of those convs may be present or absent.
    Parameters: {"conv1_1": {"kernel": (3, 3, 3, 64) HWIO, "bias": (64,)}, ...}.
    """

    output_layers: Sequence[str] = DEFAULT_FEATURE_LAYERS

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        _check_layer_names(self.output_layers)
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        deepest = max(RELU_LAYERS.index(name) for name in self.output_layers)
        features = {}
        x = images
        for index, (name, _, out_channels, _) in enumerate(VGG16_CONVS[: deepest + 1]):
            # torchvision pads 1 pixel on each side (padding=1), not XLA's "SAME" rule.
            x = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), name=name)(x)
            x = nn.relu(x)
            relu_name = RELU_LAYERS[index]
            if relu_name in self.output_layers:
                features[relu_name] = x
            if name in _POOL_AFTER and index < deepest:
                # torch's MaxPool2d(2, 2) floors odd sizes, as VALID padding does.
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return {name: features[name] for name in self.output_layers}


def make_vgg16_features_fn(
    params: Mapping, layers: Sequence[str] = DEFAULT_FEATURE_LAYERS
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """Returns fn(images (B, H, W, 3) float in [-1, 1]) -> {layer: (B, h, w, C) float32}.

    `params` is the tree from `load_vgg16_params` or `random_vgg16_params`. The function
    applies `imagenet_normalize` first; it is pure and jit-able, and gradients flow to the
    images (the VGG parameters are constants of the closure, never trained).
    """
    _check_layer_names(layers)
    module = VGG16Features(output_layers=tuple(layers))
    variables = {"params": params["params"] if "params" in params else params}

    def features_fn(images: jax.Array) -> dict[str, jax.Array]:
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        return module.apply(variables, imagenet_normalize(images.astype(jnp.float32)))

    return features_fn


def random_vgg16_params(seed: int = 0) -> dict:
    """A fixed random VGG16 (all 13 convs): {"params": {conv name: {kernel HWIO, bias}}}.

    Initialised as torchvision does (kaiming normal, fan_out, ReLU gain: std =
    sqrt(2 / (9 * out)); zero biases), float32. Drawn with numpy's PCG64 generator from
    `seed`: 14.7M normals take ~0.1 s that way, against seconds with jax.random on CPU.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, c_in, c_out, _ in VGG16_CONVS:
        std = np.float32(np.sqrt(2.0 / (9 * c_out)))
        params[name] = {
            "kernel": jnp.asarray(std * rng.standard_normal((3, 3, c_in, c_out), np.float32)),
            "bias": jnp.zeros((c_out,), jnp.float32),
        }
    return {"params": params}


def torch_key_names() -> list[str]:
    """The 26 torchvision state-dict names VGG16's features use, in network order."""
    names = []
    for _, _, _, index in VGG16_CONVS:
        names += [f"features.{index}.weight", f"features.{index}.bias"]
    return names


def vgg16_params_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """Converts torchvision VGG16 tensors (as numpy) to this module's parameter tree.

    state_dict: at least `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`;
    weights [out, in, 3, 3], biases [out]; other keys (the classifier) are ignored.
    Returns {"params": {...}} with kernels (3, 3, in, out) float32. Raises ValueError
    naming `source` for missing keys, wrong shapes or non-finite values.
    """
    missing = [name for name in torch_key_names() if name not in state_dict]
    if missing:
        raise ValueError(
            f"{source}: not a torchvision VGG16 state dict, missing {len(missing)} key(s): "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    params = {}
    for name, c_in, c_out, index in VGG16_CONVS:
        weight = np.asarray(state_dict[f"features.{index}.weight"])
        bias = np.asarray(state_dict[f"features.{index}.bias"])
        if weight.shape != (c_out, c_in, 3, 3):
            raise ValueError(
                f"{source}: features.{index}.weight has shape {weight.shape}, "
                f"expected {(c_out, c_in, 3, 3)} (VGG16 {name})"
            )
        if bias.shape != (c_out,):
            raise ValueError(
                f"{source}: features.{index}.bias has shape {bias.shape}, expected {(c_out,)}"
            )
        if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
            raise errors.InputError(f"{source}: features.{index} holds NaN or infinite values")
        params[name] = {
            # torch OIHW -> flax HWIO; conv2d in both is cross-correlation, so no flip.
            "kernel": jnp.asarray(np.transpose(weight, (2, 3, 1, 0)).astype(np.float32)),
            "bias": jnp.asarray(bias.astype(np.float32)),
        }
    return {"params": params}


def load_vgg16_params(path: str | os.PathLike) -> dict:
    """Loads VGG16 parameters from an `.npz` written by experiments/convert_vgg16.py.

    Returns {"params": {conv name: {"kernel": (3, 3, in, out), "bias": (out,)}}} float32.
    Raises FileNotFoundError (with how to obtain the file) when `path` does not exist and
    ValueError naming the file when it is unreadable or is not a VGG16 features dump.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingInputError(
            f"VGG16 weights not found: {path!r}. Download torchvision's {VGG16_WEIGHTS_FILE} "
            f"yourself ({VGG16_WEIGHTS_URL}) and convert it with "
            f"`python experiments/convert_vgg16.py --input={VGG16_WEIGHTS_FILE} --output={path}`."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # zipfile/pickle/format errors all mean "corrupt file".
        raise errors.InputError(f"{path}: cannot read as a VGG16 .npz ({type(error).__name__}: {error})") from error
    return vgg16_params_from_state_dict(arrays, source=path)
