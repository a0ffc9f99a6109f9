"""The FID Inception-v3 ("inception-2015-12-05", pool3 features) in Flax, for FID and KID.

Every FID implementation uses the same network: the TensorFlow graph `inception-2015-12-05`
(TTUR's fid.py, bioinf-jku/TTUR), not torchvision's ImageNet Inception-v3. Its PyTorch ports
are pytorch-fid's `fid_inception_v3()` (`pytorch_fid/inception.py`: torchvision's Inception3
with the `FIDInceptionA/C/E_1/E_2` blocks) and torch-fidelity's `FeatureExtractorInceptionV3`
(`torch_fidelity/feature_extractor_inceptionv3.py`). This module is that network, NHWC, in
inference mode (BatchNorm running statistics, eps 1e-3), float32:

    Conv2d_1a_3x3 (3→32, s2) - Conv2d_2a_3x3 (32→32) - Conv2d_2b_3x3 (32→64, pad 1) - maxpool 3/2
    Conv2d_3b_1x1 (64→80) - Conv2d_4a_3x3 (80→192) - maxpool 3/2
    Mixed_5b/5c/5d (InceptionA) - Mixed_6a (InceptionB) - Mixed_6b..6e (InceptionC)
    Mixed_7a (InceptionD) - Mixed_7b (InceptionE, avg pool) - Mixed_7c (InceptionE, max pool)
    global average pool → (N, 2048)

each conv being BasicConv2d = Conv2d (no bias) - BatchNorm2d(eps=0.001) - ReLU. The FID
variants differ from torchvision in two ways, both reproduced here: the 3x3 average pool of the
A, C and first E blocks does not count the zero padding (TF's `avg_pool`,
`count_include_pad=False`), and the last E block (Mixed_7c) pools with a 3x3 max instead of an
average (a quirk of the TF graph).

Input handling follows the TF graph and torch-fidelity, not pytorch-fid's default path:
uint8 images of any size → float32 0..255 → TF1 `resize_bilinear` to 299 x 299
(align_corners=False, *no* half-pixel centres: source coordinate = out_index · in / out, as
torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` reproduces bit-exactly on CPU) →
(x - 128) / 128 (the graph's `Sub 128, Mul 0.0078125`; torch-fidelity's forward). This is what
the original TF code and torch-fidelity feed the network, so the features give the standard
FID / KID numbers. pytorch-fid's `InceptionV3` instead scales [0, 1] floats with
`F.interpolate(bilinear, align_corners=False)` (half-pixel centres) and then 2x - 1, i.e.
x / 127.5 - 1 on the 0..255 scale: both the sampling grid and the scale differ slightly, and its
FIDs differ from the TF numbers in the second decimal (pytorch-fid's README says as much). An
image already 299 x 299 is not resampled (TF1's resize is the identity there, exactly).

Weights (never downloaded; the user brings them), either of:
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (`FID_WEIGHTS_URL`);
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (`TORCH_FIDELITY_WEIGHTS_URL`).
Both are the TF weights in torchvision's Inception3 parameter names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight` (1008, 2048)), so one reader handles
both; a state dict of pytorch-fid's `InceptionV3` wrapper module (`blocks.0.0.conv.weight`, ...)
is recognised too. Pass the `.pth` directly (needs torch) or convert it once:

    python experiments/convert_inception.py --input=pt_inception-2015-12-05-6726825d.pth \\
        --output=inception.npz

The `.npz` holds the tensors verbatim in torchvision's names and layouts (float32), without
`num_batches_tracked`; the 1008-way `fc` is kept when present (not used for pool3 features).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import errors

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # BasicConv2d's BatchNorm2d(eps=0.001) in both PyTorch ports (TF's default).
DEFAULT_BATCH_SIZE = 64

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                              "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_HINT = (
    f"Download the FID Inception weights yourself: pytorch-fid's {FID_WEIGHTS_FILE} "
    f"({FID_WEIGHTS_URL}) or torch-fidelity's {TORCH_FIDELITY_WEIGHTS_FILE} "
    f"({TORCH_FIDELITY_WEIGHTS_URL}); pass the .pth directly (needs torch) or convert it once "
    f"with `python experiments/convert_inception.py --input={FID_WEIGHTS_FILE} "
    f"--output=inception.npz`.")

LAYOUT_TORCHVISION = "torchvision Inception3 names (pytorch-fid / torch-fidelity weight file)"
LAYOUT_PYTORCH_FID_MODULE = "pytorch-fid InceptionV3 module (blocks.*)"

# pytorch-fid's `InceptionV3` wrapper stores the trunk as nn.Sequential blocks; these are the
# parameterised entries of each block, in order (the max-pools hold no tensors).
_PYTORCH_FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


# ----------------------------------------------------------------------------- network

class BasicConv2d(nn.Module):
    """Conv (no bias) - BatchNorm (running statistics, eps 1e-3) - ReLU, torch's padding.

    (N, H, W, C) float32 → (N, H', W', features) float32. Submodule names `conv` / `bn` match
    the torch state dict (`<block>.conv.weight`, `<block>.bn.running_var`, ...).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        # HIGHEST: on GPUs XLA would otherwise run f32 convs in TF32, and the metric is defined
        # by the float32 TF graph.
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's avg_pool with SAME padding divides by the number of real pixels; pytorch-fid's
    # `F.avg_pool2d(..., count_include_pad=False)` "patch".
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    # torch MaxPool2d(3, stride=2) without padding floors odd sizes, as VALID does.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """pytorch-fid `FIDInceptionA` (Mixed_5b/5c/5d): 1x1 | 5x5 | double 3x3 | avg pool - 1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # torch.cat order, channels last


class InceptionB(nn.Module):
    """torchvision `InceptionB` (Mixed_6a, grid reduction 35 → 17)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid `FIDInceptionC` (Mixed_6b..6e): factorised 7x7 branches, avg pool - 1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision `InceptionD` (Mixed_7a, grid reduction 17 → 8)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid `FIDInceptionE_1` (pool="avg", Mixed_7b) / `FIDInceptionE_2` (pool="max",
    Mixed_7c): 1x1 | split 3x3 | double split 3x3 | pool - 1x1."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            # The TF graph's Mixed_7c max-pools here (pytorch-fid `FIDInceptionE_2`); flax pads
            # max pooling with -inf, as torch's F.max_pool2d(padding=1) does.
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {self.pool!r}")
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 trunk up to pool3.

    Call on (N, 299, 299, 3) float32 already resized and scaled to [-1, 1] (`preprocess`);
    returns the pool3 features (N, 2048) float32 (torch-fidelity's "2048" output, pytorch-fid's
    block 3). Other sizes run too (the trunk is convolutional) but are not the FID protocol.
    Variables: {"params": {name: {"conv": {"kernel" HWIO}, "bn": {"scale", "bias"}}},
    "batch_stats": {name: {"bn": {"mean", "var"}}}}, names nested as in torch
    (`Mixed_6b/branch7x7_2/...`).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- input handling

def _tf1_grid(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Static (numpy) so the exact float32 arithmetic of torch-fidelity's `resample_manually` is
    # reproduced bit for bit: float32 arange times the float32-rounded scale in / out.
    scale = np.float32(in_size / out_size)
    coords = np.arange(out_size, dtype=np.float32) * scale
    lo = coords.astype(np.int64)  # truncation == floor for these non-negative coordinates
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (coords - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)
                        ) -> jax.Array:
    """TF 1.x `tf.image.resize_bilinear(align_corners=False)` (no half-pixel centres).

    images: (N, H, W, C), any real dtype (cast to float32); returns (N, size[0], size[1], C)
    float32 in the input's units. Output pixel i samples source coordinate i · H / size[0]
    (top-left aligned), lerping between floor and min(floor + 1, H - 1): first along x, then y,
    in the order of torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method="slow",
    `torch_fidelity/interpolate_compat_tensorflow.py`), which follows TF's
    `resize_bilinear_op.cc`. Downscaling does not low-pass filter (TF1 does not either).
    Raises ValueError for a non-4D input or an empty size.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_bilinear_tf1: expected (N, H, W, C), got shape {images.shape}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_bilinear_tf1: bad output size {size}")
    x = jnp.asarray(images).astype(jnp.float32)
    y_lo, y_hi, dy = _tf1_grid(x.shape[1], out_h)
    x_lo, x_hi, dx = _tf1_grid(x.shape[2], out_w)
    top, bottom = x[:, y_lo], x[:, y_hi]
    dx = jnp.asarray(dx)[None, None, :, None]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
    return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 images (N, H, W, 3), any H, W → network input (N, 299, 299, 3) float32 in [-1, 1).

    TF1 bilinear resize to 299² (`resize_bilinear_tf1`; skipped when already 299², where it is
    the identity), then (x - 128) / 128 as torch-fidelity's `FeatureExtractorInceptionV3.forward`
    (the TF graph's Sub 128 / Mul 1/128, exact in float32).
    """
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- weights

def _torch_names(variables: Mapping) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{torch state-dict name: (flax collection, path)} for every variable of the network."""
    names = {}
    suffix = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
              ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
              ("bn", "var"): "bn.running_var"}
    for collection, tree in variables.items():
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(p.key for p in path)
            names[".".join(keys[:-2]) + "." + suffix[keys[-2:]]] = (collection, keys)
    return names


@functools.lru_cache(maxsize=1)
def _expected() -> tuple[dict, dict]:
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    shapes = dict(shapes)  # leaves stay ShapeDtypeStructs (a tuple would be a pytree node)
    return shapes, _torch_names(shapes)


def torch_key_names() -> list[str]:
    """The 470 state-dict names (torchvision Inception3 layout) the pool3 features use:
    `<layer>.conv.weight` and `<layer>.bn.{weight,bias,running_mean,running_var}` for the 94
    BasicConv2d layers (grouped by Flax collection, then sorted)."""
    return list(_expected()[1])


def torch_shape(name: str) -> tuple[int, ...]:
    """The torch shape of `name` (conv weights OIHW, BatchNorm vectors (C,))."""
    shapes, names = _expected()
    collection, keys = names[name]
    shape = functools.reduce(lambda tree, key: tree[key], keys, shapes[collection]).shape
    return (shape[3], shape[2], shape[0], shape[1]) if keys[-1] == "kernel" else tuple(shape)


def detect_layout(names) -> str:
    """Which key layout a state dict uses: `LAYOUT_TORCHVISION` (pytorch-fid's and
    torch-fidelity's weight files) or `LAYOUT_PYTORCH_FID_MODULE` (a saved pytorch-fid
    `InceptionV3`). Raises ValueError for anything else."""
    names = set(names)
    if "Conv2d_1a_3x3.conv.weight" in names:
        return LAYOUT_TORCHVISION
    if "blocks.0.0.conv.weight" in names:
        return LAYOUT_PYTORCH_FID_MODULE
    sample = sorted(names)[:6]
    raise ValueError(f"not an Inception-v3 state dict (no 'Conv2d_1a_3x3.conv.weight' nor "
                     f"'blocks.0.0.conv.weight'; first keys: {sample})")


def canonical_state_dict(state_dict: Mapping[str, Any], source: str = "state dict"
                         ) -> dict[str, np.ndarray]:
    """Renames a state dict to torchvision's Inception3 names and keeps the FID tensors.

    Accepts either layout of `detect_layout` (a leading `module.` from DataParallel is
    dropped); values are numpy-convertible arrays. Returns {name: float32 array} with the 470
    `torch_key_names()` plus `fc.weight` / `fc.bias` when present; `num_batches_tracked` and
    anything else is dropped. Raises ValueError naming `source` for an unknown layout, for
    torchvision's ImageNet Inception-v3 (AuxLogits or a 1000-way fc: other weights, not the
    FID network), for missing tensors, wrong shapes, or NaN / infinite values.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    try:
        layout = detect_layout(state_dict.keys())
    except ValueError as error:
        raise errors.InputError(f"{source}: {error}") from None
    if layout == LAYOUT_PYTORCH_FID_MODULE:
        renamed = {}
        for key, value in state_dict.items():
            parts = key.split(".")
            if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
                block, index = int(parts[1]), int(parts[2])
                if block < len(_PYTORCH_FID_BLOCKS) and index < len(_PYTORCH_FID_BLOCKS[block]):
                    renamed[".".join([_PYTORCH_FID_BLOCKS[block][index]] + parts[3:])] = value
        state_dict = renamed
    if any(k.startswith("AuxLogits.") for k in state_dict) or (
            "fc.weight" in state_dict and tuple(np.shape(state_dict["fc.weight"])) == (1000, 2048)):
        raise ValueError(
            f"{source}: this is torchvision's ImageNet Inception-v3 (inception_v3_google), not the "
            f"FID network 'inception-2015-12-05' (1008 classes); its features give other FIDs. "
            + WEIGHTS_HINT)
    missing = [name for name in torch_key_names() if name not in state_dict]
    if missing:
        raise errors.InputError(f"{source}: not the FID Inception-v3, missing {len(missing)} tensor(s): "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
    out = {}
    for name in torch_key_names() + [n for n in ("fc.weight", "fc.bias") if n in state_dict]:
        value = np.asarray(state_dict[name], dtype=np.float32)
        expected = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}.get(name) or torch_shape(name)
        if value.shape != expected:
            raise errors.InputError(f"{source}: {name} has shape {value.shape}, expected {expected}")
        if not np.all(np.isfinite(value)):
            raise errors.InputError(f"{source}: {name} holds NaN or infinite values")
        out[name] = value
    return out


def inception_variables_from_state_dict(state_dict: Mapping[str, Any],
                                        source: str = "state dict") -> dict:
    """torch tensors (as numpy) → Flax variables of `FIDInceptionV3`.

    state_dict: either layout of `canonical_state_dict` (validated there, same errors).
    Returns {"params": ..., "batch_stats": ...} of jax float32 arrays; conv weights go from
    torch OIHW to Flax HWIO (both cross-correlate, so no flip).
    """
    tensors = canonical_state_dict(state_dict, source)
    variables: dict = {"params": {}, "batch_stats": {}}
    for name, (collection, keys) in _expected()[1].items():
        value = tensors[name]
        if keys[-1] == "kernel":
            value = np.transpose(value, (2, 3, 1, 0))
        node = variables[collection]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jnp.asarray(value)
    return variables


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the tensors of an Inception `.pth` (torch.load, weights_only=True) or `.npz`.

    Returns {name: numpy array}, floating ones as float32 (no renaming or checks). Raises FileNotFoundError
    with `WEIGHTS_HINT` for a missing file, ImportError for a .pth without torch installed
    (saying to convert it elsewhere), ValueError naming the file when it cannot be read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingInputError(f"FID Inception weights not found: {path!r}. {WEIGHTS_HINT}")
    from reta3d.networks.convert import load_state_dict_file
    try:
        state_dict, _ = load_state_dict_file(path)
    except ImportError as error:
        raise errors.MissingDependencyError(
            f"{path}: reading a .pth needs torch (pip install torch; the CPU build is enough). "
            f"Or convert it once, where torch is installed, with `python "
            f"experiments/convert_inception.py --input={path} --output=inception.npz` and pass "
            f"the .npz.") from error
    return {name: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
            for name, value in state_dict.items()}


def load_inception_params(path: str | os.PathLike) -> dict:
    """Loads the FID Inception-v3 from a pytorch-fid / torch-fidelity `.pth` or a converted `.npz`.

    The layout is detected from the key names (`detect_layout`). Returns the Flax variables
    {"params": ..., "batch_stats": ...} (float32) of `FIDInceptionV3`. Raises FileNotFoundError
    (saying where to get the file and how to convert it), ImportError (.pth without torch) or
    ValueError naming the file (unreadable, or not the FID Inception-v3).
    """
    return inception_variables_from_state_dict(read_state_dict(path), source=os.fspath(path))


def random_inception_variables(seed: int = 0) -> dict:
    """A fixed random FID Inception-v3 (same shapes as the real one), for tests and timing.

    Conv weights N(0, 2 / fan_in) (He), BatchNorm scale U(0.8, 1.2), bias N(0, 0.1²), running
    mean N(0, 0.1²), running var U(0.5, 1.5); numpy PCG64 from `seed`. Returns the variables in
    torch layout as {torch name: float32 array} — feed it to `inception_variables_from_state_dict`
    (or save it as a .pth). Random features are not FID features.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in torch_key_names():
        shape = torch_shape(name)
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("bn.running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bn.bias, bn.running_mean
            value = 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- features

def _chunks(count: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, padded size): full chunks of batch_size; a smaller set is padded to the
    next power of two only, so small calls do not pay for a full batch and at most
    log2(batch_size) + 1 shapes are ever compiled."""
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        padded = batch_size if count > batch_size else min(batch_size, 1 << (stop - start - 1).bit_length())
        yield start, stop, padded


def make_feature_fn(variables: Mapping, batch_size: int = DEFAULT_BATCH_SIZE
                    ) -> Callable[[Any], np.ndarray]:
    """Returns fn(images uint8 (N, H, W, 3)) -> pool3 features (N, 2048) float32 numpy.

    `variables`: from `load_inception_params` / `inception_variables_from_state_dict`. Images
    (numpy or jax, any H, W >= 1) go through `preprocess` and the network in chunks of
    `batch_size` (the last one zero-padded; padding rows are dropped), so memory stays bounded
    for any N. The network is jitted once per padded chunk shape; the resize once per input
    size. The fn raises TypeError for a non-uint8 input (floats in [0, 1] or [-1, 1] would
    silently give wrong features) and ValueError for a shape other than (N, H, W, 3).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = FIDInceptionV3()
    variables = jax.device_put({"params": variables["params"], "batch_stats": variables["batch_stats"]})
    # Variables are an argument, not closure constants: 24M constants would be folded into
    # every compiled program and slow compilation down.
    network = jax.jit(lambda v, x: module.apply(v, x))
    prepare = jax.jit(preprocess)

    def feature_fn(images) -> np.ndarray:
        if images.dtype != np.uint8:
            raise TypeError(f"inception features: expected uint8 images (0..255), got {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"inception features: expected (N, H, W, 3), got shape {images.shape}")
        count = images.shape[0]
        out = np.empty((count, FEATURE_DIM), np.float32)
        for start, stop, padded in _chunks(count, batch_size):
            chunk = np.asarray(images[start:stop])
            if padded > stop - start:
                chunk = np.concatenate([chunk, np.zeros((padded - (stop - start),) + chunk.shape[1:],
                                                        np.uint8)])
            features = network(variables, prepare(jnp.asarray(chunk)))
            out[start:stop] = np.asarray(features)[: stop - start]
        return out

    return feature_fn


def inception_feature_fn(path: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE
                         ) -> Callable[[Any], np.ndarray]:
    """fn(images uint8 (N, H, W, 3)) -> (N, 2048) float32: the FID pool3 features.

    Loads the weights at `path` (`load_inception_params`: pytorch-fid's / torch-fidelity's
    .pth, or the .npz of experiments/convert_inception.py) and returns `make_feature_fn`.
    Raises FileNotFoundError (with where to get the weights), ImportError or ValueError as
    `load_inception_params`.
    """
    return make_feature_fn(load_inception_params(path), batch_size=batch_size)
