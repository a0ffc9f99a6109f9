"""ArcFace face embeddings for the ID metric: 5-point alignment to 112 x 112 and IResNet in Flax.

The network is insightface's arcface_torch IResNet (github.com/deepinsight/insightface,
recognition/arcface_torch/backbones/iresnet.py), in inference mode (BatchNorm running
statistics, dropout off), float32 throughout (the `fp16` flag of arcface_torch, an autocast of
the convolutional trunk, is ignored):

    input (N, 112, 112, 3) RGB uint8 → (x / 255 - 0.5) / 0.5
    conv3x3(3→64) - BN - PReLU
    layer1..4: IBasicBlock x layers[i], widths 64, 128, 256, 512, the first block of each
        stage strided 2 (112 → 56 → 28 → 14 → 7) with a conv1x1(stride 2) - BN shortcut;
        IBasicBlock = BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut
    BN2d - flatten (torch's C, H, W order) - dropout (off) - Linear(512·7·7 → 512) - BatchNorm1d
    (its weight is fixed at 1.0 in arcface_torch but is read from the file all the same)
Depths: r18 [2, 2, 2, 2], r34 [3, 4, 6, 3], r50 [3, 4, 14, 3], r100 [3, 13, 30, 3],
r200 [6, 26, 60, 6]; the depth is read from the state dict's keys. Embeddings are
L2-normalised (the ID metric is the cosine similarity of two embeddings).

Weights (never downloaded; the user brings them): an arcface_torch `backbone.pth` state dict
from the model zoo at github.com/deepinsight/insightface/tree/master/recognition/arcface_torch
(e.g. `ms1mv3_arcface_r50_fp16/backbone.pth`, which Deep3DFaceRecon_pytorch uses, or
`ms1mv3_arcface_r100_fp16/backbone.pth`; the zoo links to OneDrive / Baidu). Either load it
directly (needs torch) or convert it once to `.npz`:

    python experiments/convert_arcface.py --input=backbone.pth --output=arcface.npz

The `.npz` holds the state dict's float tensors verbatim (torch names and layouts, float32).

Alignment (insightface `utils/face_align.py` `norm_crop`, as Deep3DFaceRecon / 3DFaceShop use
it): the similarity transform (rotation, uniform scale, translation; Umeyama 1991, what
skimage's `SimilarityTransform.estimate` computes) taking the face's 5 points (eye centres, nose
tip, mouth corners; `reta3d.fitting.crop.five_points`) to `ARCFACE_TEMPLATE_112`, then a
bilinear warp to 112 x 112 with black outside the photo (cv2.warpAffine, BORDER_CONSTANT 0).
Pixel centres: our landmarks put pixel (row i, col j)'s centre at (j + 0.5, i + 0.5);
insightface's template and cv2.warpAffine use pixel indices (centre at (j, i)). The points are
therefore shifted by -0.5 before the fit, and the warp samples the photo at index coordinates
exactly as cv2 does (cv2 quantises the bilinear weights to 1/32; we do not). `alignment_matrices`
returns the transform in our convention (crop = A[:, :2] @ photo + A[:, 2], both with centres
at +0.5), which is the index-convention transform conjugated by the half-pixel shift.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import errors

ARCFACE_SIZE = 112
# insightface `utils/face_align.py` arcface_dst: image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner, in 112 x 112 pixel-index coordinates.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)

ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
EMBEDDING_DIM = 512
BN_EPS = 1e-5

MODEL_ZOO_URL = "https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch"
WEIGHTS_HINT = (
    f"Download an arcface_torch backbone.pth yourself from the insightface model zoo "
    f"({MODEL_ZOO_URL}, e.g. ms1mv3_arcface_r50_fp16/backbone.pth or "
    f"ms1mv3_arcface_r100_fp16/backbone.pth) and pass it directly (needs torch) or convert it "
    f"once with `python experiments/convert_arcface.py --input=backbone.pth --output=arcface.npz`.")


# ----------------------------------------------------------------------------- alignment

def umeyama_similarity(source, target) -> np.ndarray:
    """Least squares similarity (rotation, uniform scale, translation; no reflection) with
    target ≈ s R source + t (Umeyama 1991), as skimage's SimilarityTransform.estimate.

    source, target: (K >= 2, 2) corresponding points. Returns the (3, 3) float64 homogeneous
    matrix [[sR, t], [0, 0, 1]]. Raises ValueError for bad shapes, non-finite values or
    degenerate (coincident) source points.
    """
    src = np.asarray(source, np.float64)
    dst = np.asarray(target, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2 or src.shape != dst.shape:
        raise ValueError(f"expected two (K>=2, 2) point sets, got {src.shape} and {dst.shape}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("points must be finite")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("degenerate source points (all coincide)")
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    if np.linalg.matrix_rank(cov) == 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        rotation = u @ vt
    else:
        rotation = u @ np.diag(d) @ vt
    scale = (sing @ d) / src_var
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrices(five_points) -> np.ndarray:
    """(..., 5, 2) points (our convention, pixel centres at +0.5) → (..., 2, 3) float64 affines
    A with crop = A[:, :2] @ photo + A[:, 2] in the same convention, mapping the points onto
    `ARCFACE_TEMPLATE_112` (+0.5) in the least squares sense (module docstring)."""
    points = np.asarray(five_points, np.float64)
    if points.shape[-2:] != (5, 2):
        raise ValueError(f"expected (..., 5, 2) five points, got {points.shape}")
    flat = points.reshape(-1, 5, 2)
    out = np.empty((len(flat), 2, 3))
    for k, p in enumerate(flat):
        # Fit in pixel-index coordinates (insightface / cv2), then conjugate by the +0.5 shift:
        # crop_ours = M (photo_ours - 0.5) + 0.5.
        m = umeyama_similarity(p - 0.5, ARCFACE_TEMPLATE_112)[:2]
        out[k, :, :2] = m[:, :2]
        out[k, :, 2] = m[:, 2] - 0.5 * m[:, :2].sum(1) + 0.5
    return out.reshape(points.shape[:-2] + (2, 3))


def warp_affine(image, matrix, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Bilinear warp of one (H, W, C) image by the affine `matrix` (2, 3) (photo → output, our
    pixel-centre convention) to (size, size, C), black outside the photo, as cv2.warpAffine with
    INTER_LINEAR and BORDER_CONSTANT 0. uint8 in → uint8 out (rounded); float in → float32 out."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got {image.shape}")
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"expected a finite (2, 3) affine, got {matrix!r}")
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    centres = np.arange(size, dtype=np.float64) + 0.5
    gx, gy = np.meshgrid(centres, centres)
    # Photo position of each output pixel centre, then in pixel-index coordinates (-0.5).
    sx = inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2] - 0.5
    sy = inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2] - 0.5
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    height, width = image.shape[:2]
    source = image.astype(np.float64)

    def tap(yy, xx):
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        values = source[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
        return np.where(inside[..., None], values, 0.0)

    out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
           + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def align_faces(images, five_points) -> np.ndarray:
    """ArcFace crops: images uint8 (N, H, W, 3) (or a sequence of (H, W, 3) of any sizes) and
    their 5 points (N, 5, 2) (our convention; `reta3d.fitting.crop.five_points`) →
    (N, 112, 112, 3) uint8, each face warped onto insightface's arcface template."""
    matrices = alignment_matrices(five_points)
    if matrices.ndim != 3 or len(matrices) != len(images):
        raise ValueError(f"expected (N, 5, 2) points for {len(images)} images, got "
                         f"{np.shape(five_points)}")
    crops = []
    for image, matrix in zip(images, matrices):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) images, got {image.dtype} {image.shape}")
        crops.append(warp_affine(image, matrix, ARCFACE_SIZE))
    return np.stack(crops) if crops else np.zeros((0, ARCFACE_SIZE, ARCFACE_SIZE, 3), np.uint8)


# ----------------------------------------------------------------------------- network

class PReLU(nn.Module):
    """torch.nn.PReLU(C): max(0, x) + alpha · min(0, x), one alpha per channel."""

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, alpha * x)


def _bn(name):
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, name=name)


def _conv(features, kernel, stride, name):
    pad = kernel // 2  # torch's explicit padding, not XLA's "SAME" rule (which differs for stride 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, name=name)


class IBasicBlock(nn.Module):
    """arcface_torch IBasicBlock: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, + shortcut
    (conv1x1(stride) - BN when `downsample`)."""
    planes: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        out = _bn("bn1")(x)
        out = _conv(self.planes, 3, 1, "conv1")(out)
        out = _bn("bn2")(out)
        out = PReLU(name="prelu")(out)
        out = _conv(self.planes, 3, self.stride, "conv2")(out)
        out = _bn("bn3")(out)
        if self.downsample:
            x = _bn("downsample_bn")(_conv(self.planes, 1, self.stride, "downsample_conv")(x))
        return out + x


class IResNet(nn.Module):
    """arcface_torch IResNet (inference). Call on (N, 112, 112, 3) float32 already normalised
    to [-1, 1] ((x / 255 - 0.5) / 0.5); returns the (N, num_features) unnormalised features.

    Variables: {"params": ..., "batch_stats": ...}; the fc kernel is (7·7·512, num_features) with
    its input rows in this module's (H, W, C) flattening order (`params_from_state_dict`
    permutes torch's (C, H, W) order)."""
    layers: Sequence[int] = ARCHITECTURES["r50"]
    num_features: int = EMBEDDING_DIM

    @nn.compact
    def __call__(self, x):
        x = _conv(64, 3, 1, "conv1")(x)
        x = _bn("bn1")(x)
        x = PReLU(name="prelu")(x)
        # Every stage starts strided (stride 2), so its first block always has a shortcut conv.
        for stage, (blocks, planes) in enumerate(zip(self.layers, STAGE_WIDTHS), start=1):
            for index in range(blocks):
                x = IBasicBlock(planes, stride=2 if index == 0 else 1, downsample=index == 0,
                                name=f"layer{stage}_{index}")(x)
        x = _bn("bn2")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.num_features, name="fc")(x)
        return _bn("features")(x)


def preprocess(images) -> jax.Array:
    """uint8 (or float 0..255) RGB (N, H, W, 3) → float32 (x / 255 - 0.5) / 0.5."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5


# ----------------------------------------------------------------------------- weights

def detect_architecture(state_dict: Mapping) -> tuple[str, tuple[int, int, int, int]]:
    """(name, layers) of the IResNet whose torch state-dict keys these are (name "r50", "r100",
    ... or "custom" for another block count). Raises ValueError when the keys do not look like
    an arcface_torch IResNet."""
    layers = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.conv1\.weight$")
        indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
        if not indices or indices != set(range(len(indices))):
            raise ValueError(f"not an arcface_torch IResNet state dict: blocks of layer{stage} are "
                             f"{sorted(indices)} (keys like 'layer{stage}.0.conv1.weight' expected)")
        layers.append(len(indices))
    layers = tuple(layers)
    name = next((n for n, l in ARCHITECTURES.items() if l == layers), "custom")
    return name, layers


def torch_key_shapes(layers: Sequence[int], num_features: int = EMBEDDING_DIM) -> dict[str, tuple]:
    """Every float tensor an arcface_torch IResNet state dict holds (BatchNorm's integer
    num_batches_tracked excluded), name → shape, in network order."""
    shapes = {}

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(layers, STAGE_WIDTHS), start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            c_in = inplanes if index == 0 else planes
            bn(f"{p}.bn1", c_in)
            shapes[f"{p}.conv1.weight"] = (planes, c_in, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if index == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, c_in, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", 512)
    shapes["fc.weight"] = (num_features, 512 * 7 * 7)
    shapes["fc.bias"] = (num_features,)
    bn("features", num_features)
    return shapes


def clean_state_dict(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Drops a DataParallel / DDP "module." prefix and BatchNorm's num_batches_tracked; values
    as float32 numpy (torch tensors are converted)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().float().numpy()
        out[key] = np.asarray(value, np.float32)
    return out


def params_from_state_dict(state_dict: Mapping, source: str = "state dict") -> dict:
    """arcface_torch IResNet tensors (numpy or torch, torch names and layouts) → the Flax
    variables {"params", "batch_stats"} of `IResNet(layers)`; the depth comes from the keys.

    Raises ValueError naming `source` for keys that are missing or unexpected, wrong shapes
    or non-finite values."""
    state = clean_state_dict(state_dict)
    _, layers = detect_architecture(state)
    num_features = state["fc.weight"].shape[0] if "fc.weight" in state else EMBEDDING_DIM
    expected = torch_key_shapes(layers, num_features)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise errors.InputError(f"{source}: not an arcface_torch IResNet{layers} state dict: missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise errors.InputError(f"{source}: {key} has shape {state[key].shape}, expected {shape} "
                             f"(arcface_torch IResNet for 112 x 112 crops)")
        if not np.all(np.isfinite(state[key])):
            raise errors.InputError(f"{source}: {key} holds NaN or infinite values")

    params, stats = {}, {}

    def conv(prefix):  # torch OIHW → flax HWIO (both cross-correlate: no flip)
        return {"kernel": jnp.asarray(np.transpose(state[f"{prefix}.weight"], (2, 3, 1, 0)))}

    def bn(prefix):
        return ({"scale": jnp.asarray(state[f"{prefix}.weight"]),
                 "bias": jnp.asarray(state[f"{prefix}.bias"])},
                {"mean": jnp.asarray(state[f"{prefix}.running_mean"]),
                 "var": jnp.asarray(state[f"{prefix}.running_var"])})

    def put(p_tree, s_tree, name, prefix):
        p_tree[name], s_tree[name] = bn(prefix)

    params["conv1"] = conv("conv1")
    put(params, stats, "bn1", "bn1")
    params["prelu"] = {"alpha": jnp.asarray(state["prelu.weight"])}
    for stage, blocks in enumerate(layers, start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            bp, bs = {}, {}
            put(bp, bs, "bn1", f"{p}.bn1")
            bp["conv1"] = conv(f"{p}.conv1")
            put(bp, bs, "bn2", f"{p}.bn2")
            bp["prelu"] = {"alpha": jnp.asarray(state[f"{p}.prelu.weight"])}
            bp["conv2"] = conv(f"{p}.conv2")
            put(bp, bs, "bn3", f"{p}.bn3")
            if index == 0:
                bp["downsample_conv"] = conv(f"{p}.downsample.0")
                put(bp, bs, "downsample_bn", f"{p}.downsample.1")
            params[f"layer{stage}_{index}"], stats[f"layer{stage}_{index}"] = bp, bs
    put(params, stats, "bn2", "bn2")
    # torch flattens (C=512, H=7, W=7); this module flattens (H, W, C): permute the fc inputs.
    fc = state["fc.weight"].reshape(num_features, 512, 7, 7).transpose(2, 3, 1, 0)
    params["fc"] = {"kernel": jnp.asarray(fc.reshape(7 * 7 * 512, num_features)),
                    "bias": jnp.asarray(state["fc.bias"])}
    put(params, stats, "features", "features")
    return {"params": params, "batch_stats": stats}


def layers_of(variables: Mapping) -> tuple[int, ...]:
    """The per-stage block counts of a parameter tree from `params_from_state_dict`."""
    names = variables["params"].keys()
    return tuple(sum(1 for n in names if n.startswith(f"layer{s}_")) for s in range(1, 5))


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An arcface_torch backbone.pth (a state dict, possibly with a "module." prefix or nested
    under "state_dict"; needs torch) or its .npz conversion → {name: float32 numpy}."""
    from reta3d.networks.convert import load_state_dict_file
    path = os.fspath(path)
    try:
        state, _ = load_state_dict_file(path)
    except ImportError as error:
        raise errors.MissingDependencyError(f"reading {path} needs torch (the CPU build is enough); or convert it "
                          f"where torch is installed with experiments/convert_arcface.py and "
                          f"load the .npz") from error
    return clean_state_dict(state)


def load_arcface_params(path: str | os.PathLike) -> dict:
    """Flax variables of the ArcFace IResNet in `path`: the user's arcface_torch backbone.pth
    (read with torch) or the .npz written by experiments/convert_arcface.py (no torch needed).
    The depth (r50, r100, ...) is read from the keys (`layers_of` recovers it).

    Raises FileNotFoundError (saying where to get the weights and how to convert them) when
    `path` does not exist; ValueError naming the file when it is unreadable or not an IResNet.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingInputError(f"ArcFace weights not found: {path!r}. {WEIGHTS_HINT}")
    state = read_torch_state_dict(path)
    return params_from_state_dict(state, source=path)


# ----------------------------------------------------------------------------- embeddings

def _chunk_size(n: int, batch_size: int) -> int:
    size = 1
    while size < min(n, batch_size):
        size *= 2
    return min(size, batch_size)


def make_embedding_fn(variables: Mapping, batch_size: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """fn(aligned uint8 (N, 112, 112, 3) RGB) → (N, 512) float32 L2-normalised numpy, for the
    variables of `load_arcface_params`. Runs jit-compiled in chunks of at most `batch_size`,
    padded to a power of two (so few shapes are compiled)."""
    module = IResNet(layers=layers_of(variables),
                     num_features=variables["params"]["fc"]["bias"].shape[0])
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    @jax.jit
    def forward(images):
        features = module.apply(variables, preprocess(images))
        norm = jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True))
        return features / jnp.maximum(norm, 1e-12)   # torch.nn.functional.normalize

    def embedding_fn(aligned) -> np.ndarray:
        aligned = np.asarray(aligned)
        if aligned.ndim != 4 or aligned.shape[1:] != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
            raise ValueError(f"expected aligned (N, 112, 112, 3) crops (see align_faces), got "
                             f"{aligned.shape}")
        out = []
        for start in range(0, len(aligned), batch_size):
            chunk = aligned[start:start + batch_size]
            size = _chunk_size(len(chunk), batch_size)
            padded = np.zeros((size,) + chunk.shape[1:], chunk.dtype)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(forward(padded))[:len(chunk)])
        dim = module.num_features
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    return embedding_fn


def arcface_embedding_fn(path: str | os.PathLike, batch_size: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """fn(aligned uint8 (N, 112, 112, 3) RGB crops from `align_faces`) → (N, 512) float32
    L2-normalised ArcFace embeddings, with the weights in `path` (see `load_arcface_params`).
    For whole photos use `embed_images(fn, images)`."""
    return make_embedding_fn(load_arcface_params(path), batch_size=batch_size)


def embed_images(embedding_fn, images, min_score: float = 0.5,
                 landmarks68=None) -> tuple[np.ndarray, np.ndarray]:
    """Detects the largest face of each photo (`reta3d.fitting.landmarks.find_face`, dlib), takes
    its 5 points (`reta3d.fitting.crop.five_points`), aligns it (`align_faces`) and embeds it.

    images: uint8 (N, H, W, 3) or a sequence of (H, W, 3) uint8 of any sizes.
    landmarks68: optional (N, 68, 2) known landmarks (pixel centres at +0.5), e.g. a generated
    head's own, projected from its head model: then nothing is detected.
    Returns (embeddings (N, D) float32, NaN rows where no face was found; found (N,) bool).
    Needs the optional dlib extras (requirements-faces.txt)."""
    from reta3d.fitting import crop, landmarks
    found = np.zeros(len(images), bool)
    crops, points = [], []
    for k, image in enumerate(images):
        image = landmarks.as_rgb_uint8(image)
        if landmarks68 is not None:
            marks = np.asarray(landmarks68[k], np.float64)
        else:
            face, _ = landmarks.find_face(image, min_score=min_score)
            if face is None:
                continue
            marks = face.landmarks
        found[k] = True
        crops.append(image)
        points.append(crop.five_points(marks))
    if crops:
        embedded = np.asarray(embedding_fn(align_faces(crops, np.stack(points))), np.float32)
        dim = embedded.shape[1]
    else:
        embedded, dim = None, EMBEDDING_DIM
    out = np.full((len(images), dim), np.nan, np.float32)
    if embedded is not None:
        out[found] = embedded
    return out, found


def identity_similarity(emb_a, emb_b) -> np.ndarray:
    """Cosine similarity of corresponding rows, (N, D) and (N, D) → (N,) float32 (the ID metric:
    higher = same identity); NaN rows (no face found) give NaN."""
    a = np.asarray(emb_a, np.float64)
    b = np.asarray(emb_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of one shape, got {a.shape}, {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((a * b).sum(1) / norms).astype(np.float32)
