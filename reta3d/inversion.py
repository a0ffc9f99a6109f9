"""One-shot reconstruction (GAN inversion): a portrait photo in, an animatable 3D Gaussian head out.

Pipeline (`invert_photo`, the job of experiments/invert.py):

1. Preprocess (`photo_target`): the photo goes through exactly what the dataset preprocessor
   does per photo (`reta3d.fitting.preprocess.fit_photo`): dlib face + 68 landmarks, an
   EG3D/FFHQ-style crop at `fit_resolution` (512 by default, FFHQ's size and the
   preprocessor's default, so the landmark fit has full detail), and a FLAME + EG3D-camera fit
   with the GENERATOR'S OWN head model and landmark embedding. The crop is then resized
   (Lanczos) to the generator's render resolution, as the training loader resizes dataset
   crops; the camera label is resolution-free (normalised intrinsics), so it holds at any size.
   The fitted FLAME (shape, expression, jaw, neck) and camera stay FIXED during the inversion.
2. Latent optimisation (`project`): start at w_avg, optimise either one w broadcast to all
   layers ("w") or one w per layer ("w+") with Adam so that the render under the fitted camera
   and FLAME (the full generator: G, G_m, blending, FLAME, G_d, binding, rasterizer) matches
   the crop. "w+" runs in two phases: the first `w_plus_tied` (half) of the steps optimise one
   shared w (the layers' gradients averaged), the rest every layer's w at `w_plus_lr_scale`
   (0.3) × the learning rate; each phase has StyleGAN2's projector schedule (learning-rate
   ramp-up, cosine ramp-down). Measured on the demo model, this finds a 3D-consistent head
   where free W+ from the start overfits the one view (README, "One-shot reconstruction").
   Latent noise (StyleGAN2's projector: 0.05) is available but off by default: it lowered
   every measured reconstruction. The latent is parameterised in units of the W distribution,
   u = (w − w_avg) / w_std (per-dimension std of the mapped W of `num_w_samples` random z), so
   the regulariser is simply mean(u²) (distance to w_avg in W standard deviations).
   Loss = perceptual (VGG16, below) + L2 (+ L1) on pixels + w_reg·mean(u²), all restricted to
   the head mask (below). One jitted step per iteration with a progress bar (ETA) and one
   JSON line per step in the loss log.
3. Pivotal tuning (PTI, Roich et al. 2022; optional, `pivotal_tuning`): the static generator's
   weights (G, G_m, blending ConvNet; the mapping and the dynamic module G_d stay as trained so
   that the animation behaves as the trained model's) are fine-tuned around the pivot w for
   `pti_steps` Adam steps (lr 3e-4, PTI's) on L2 + perceptual, plus PTI's locality
   regulariser: renders of `pti_locality_batch` random latents per step (w_r = w_p + t·(w_z −
   w_p), t = `pti_locality_t`; 1 = the random latents themselves), frontal camera, neutral
   FLAME, must stay close (L2 + perceptual) to the ORIGINAL generator's renders of the same
   latents, weight `pti_locality_weight` (PTI's 0.1).
4. The identity (`write_identity` / `read_identity` / `load_identity`): DIR/identity.npz holds
   the latent (w or w+ and the broadcast ws), the static maps (face, mouth) the animation
   needs, the fitted FLAME (shape used for every later render) and camera, a fingerprint of
   the generator it belongs to, and with PTI the name of DIR/tuned_params.msgpack (the tuned
   G, G_m and blending weights, flax msgpack).

Choices the issue left open:
- Landmark term: none. The camera and FLAME are fitted to the landmarks and held fixed, so
  the model's landmarks (which live on the FLAME mesh) already coincide with the photo's; a
  landmark loss would have no gradient toward the latent. What the latent can still get wrong
  is coverage, so instead the losses are restricted to a head MASK: the fitted FLAME mesh's
  silhouette under the fitted camera, dilated by `mask_dilate` and feathered. Outside it (the
  photo's background, shoulders) both images are replaced by the render background, so the
  generator is never asked to paint the background. `mask="none"` uses every pixel.
- Perceptual loss: LPIPS's form without learned weights (unit-normalised VGG16 features per
  layer, squared difference summed over channels, averaged over pixels, summed over layers) on
  `config.loss.vgg_layers`, with the user's converted VGG16 (config.loss.vgg16 or --vgg16), or
  a fixed random VGG16 when that is "random" (the demo config; reported in metrics.json).
  Images larger than 256² are area-downsampled to 256² first (as StyleGAN2/EG3D's projectors
  do). The learned LPIPS (`lpips` package) is only used as an optional METRIC when installed
  with its weights; it is never a dependency.
- Synthesis noise: the constant noise buffers, as all inference here (not optimised).

Outputs of `invert_photo` (all staged in OUT/.partial-PID and moved into OUT only when every
file exists, metrics.json last; on any failure the staging folder is removed and OUT holds no
new result file): identity.npz [+ tuned_params.msgpack], input_crop.png, reconstruction.png,
comparison.png (input | reconstruction [| before PTI]), novel_views.png (yaw −30°, 0, +30°;
pitch −15°, +15°), animation.mp4 (+ animation_timing.json), head.ply, loss_log.jsonl,
metrics.json (PSNR, SSIM, masked PSNR, LPIPS when available, before and after PTI; timing;
settings; device).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from reta3d import atomic_files, errors

IDENTITY_FORMAT = "reta3d-identity"
IDENTITY_VERSION = 1
IDENTITY_FILE = "identity.npz"
TUNED_PARAMS_FILE = "tuned_params.msgpack"
METRICS_FILE = "metrics.json"
LOSS_LOG_FILE = "loss_log.jsonl"
# What PTI tunes: the static generator. The mapping and G_d stay as trained.
TUNED_SUBTREES = ("synthesis", "mouth_synthesis", "blend")
SPACES = ("w", "w+")
MASKS = ("head", "none")
NOVEL_VIEWS_DEG = ((-30.0, 0.0), (0.0, 0.0), (30.0, 0.0), (0.0, -15.0), (0.0, 15.0))
FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")
PERCEPTUAL_MAX_SIZE = 256


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InversionSettings:
    """Hyper-parameters of the latent optimisation and of PTI (defaults in the module doc)."""

    space: str = "w+"
    num_steps: int = 300
    learning_rate: float = 0.3        # Adam, in W-std units per step (u-space)
    lr_rampup: float = 0.05           # fraction of the steps (StyleGAN2 projector)
    lr_rampdown: float = 0.25
    w_plus_tied: float = 0.5          # "w+": the first such fraction of the steps optimise one w
    w_plus_lr_scale: float = 0.3      # "w+": learning rate of the per-layer phase (× learning_rate)
    initial_noise: float = 0.0        # latent noise, × sqrt(w_dim) W-stds, decaying to 0 ...
    noise_ramp: float = 0.75          # ... over this fraction of the steps
    perceptual_weight: float = 1.0
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    w_reg_weight: float = 1e-3
    mask: str = "head"
    mask_dilate: float = 0.04         # head mask dilation, fraction of the image size
    num_w_samples: int = 10000        # random z mapped for w_avg / w_std
    pti_steps: int = 0
    pti_learning_rate: float = 3e-4
    pti_l2_weight: float = 1.0
    pti_perceptual_weight: float = 1.0
    pti_locality_weight: float = 0.1
    pti_locality_batch: int = 1
    pti_locality_t: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.pti_steps < 0:
            raise ValueError(f"pti_steps must be >= 0, got {self.pti_steps}")
        if self.pti_locality_batch < 1:
            raise ValueError(f"pti_locality_batch must be >= 1, got {self.pti_locality_batch}")
        if self.num_w_samples < 2:
            raise ValueError(f"num_w_samples must be >= 2, got {self.num_w_samples}")
        for name in ("learning_rate", "pti_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.w_plus_tied <= 1.0:
            raise ValueError(f"w_plus_tied must be in [0, 1], got {self.w_plus_tied}")
        for name in ("w_plus_lr_scale", "perceptual_weight", "l2_weight", "l1_weight",
                     "w_reg_weight", "initial_noise", "pti_l2_weight", "pti_perceptual_weight",
                     "pti_locality_weight", "mask_dilate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def replace(self, **changes) -> "InversionSettings":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class _RenderKey:
    """The render settings a compiled function depends on (hashable)."""
    resolution: int
    backend: str
    background: float
    capacity: int


def render_key(config, generator) -> _RenderKey:
    """The training render settings of `config` (resolution, backend, background, capacity
    as `train.render_capacity`): inversion renders exactly as the generator was trained."""
    from reta3d import train
    return _RenderKey(int(config.render.resolution), str(config.render.backend),
                      float(config.render.background),
                      int(train.render_capacity(config, generator.num_gaussians)))


# ------------------------------------------------------------------------------------------
# The target: a crop, its camera and FLAME, a mask
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """What the inversion matches: image (R, R, 3) uint8 at the render resolution, camera (25,)
    EG3D label, flame: dict of (1, k) float32 at the head model's widths, mask (R, R) float32 in
    [0, 1], info: preprocessing details for metrics.json."""

    image: np.ndarray
    camera: np.ndarray
    flame: Dict[str, np.ndarray]
    mask: np.ndarray
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)


def flame_for_model(flame: Mapping[str, Any], model) -> Dict[str, np.ndarray]:
    """FLAME parameters (lists or arrays, one frame, any widths; missing keys = zeros) → dict
    of (1, k) float32 at `model`'s widths (shape / expression truncated or zero-padded)."""
    from reta3d.sequences import POSE_WIDTHS
    widths = dict(POSE_WIDTHS, shape=model.num_shape, expression=model.num_expression)
    out = {}
    for key in FLAME_KEYS:
        value = np.asarray(flame.get(key, np.zeros(0)), np.float32).reshape(-1)
        width = widths[key]
        value = value[:width]
        out[key] = np.pad(value, (0, width - value.shape[0]))[None].astype(np.float32)
        if not np.all(np.isfinite(out[key])):
            raise ValueError(f"FLAME '{key}' holds non-finite values")
    return out


def head_mask(model, flame: Mapping[str, np.ndarray], camera: np.ndarray, resolution: int,
              dilate: float = 0.04, supersample: int = 4) -> np.ndarray:
    """The head's silhouette (R, R) float32 in [0, 1]: every triangle of the posed mesh
    (`flame`, (1, k) arrays) projected through `camera` (25,), filled (PIL, `supersample`×),
    dilated by `dilate`·R pixels and feathered by a Gaussian of σ = dilate·R / 2."""
    from PIL import Image, ImageDraw
    from scipy import ndimage
    from reta3d.fitting import fit as fit_lib
    params = {k: jnp.asarray(v) for k, v in flame.items()}
    vertices = model.to_world(model.forward(**params))
    pixels = np.asarray(fit_lib.project(vertices, jnp.asarray(camera, jnp.float32)[None],
                                        resolution)[0], np.float64) * supersample
    size = resolution * supersample
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for tri in np.asarray(model.faces):
        draw.polygon([tuple(p) for p in pixels[tri]], fill=255)
    mask = np.asarray(canvas, np.float32).reshape(resolution, supersample, resolution,
                                                  supersample).mean((1, 3)) / 255.0
    radius = dilate * resolution
    if radius > 0:
        mask = ndimage.grey_dilation(mask, footprint=_disk(radius))
        mask = ndimage.gaussian_filter(mask, sigma=radius / 2)
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


def _disk(radius: float) -> np.ndarray:
    r = max(int(math.ceil(radius)), 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= radius * radius + 1e-9


def make_target(generator, image: np.ndarray, camera: np.ndarray, flame: Mapping[str, Any],
                mask: str = "head", mask_dilate: float = 0.04,
                info: Optional[Dict[str, Any]] = None) -> Target:
    """A Target from an image already at the render resolution (R, R, 3) uint8, its camera
    (25,) and FLAME parameters (any widths; fitted to the generator's head model)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        raise ValueError(f"target image must be (R, R, 3) uint8, got {image.dtype} {image.shape}")
    camera = np.asarray(camera, np.float32).reshape(-1)
    if camera.shape != (25,) or not np.all(np.isfinite(camera)):
        raise ValueError(f"camera must be a finite EG3D label (25,), got {camera.shape}")
    flame = flame_for_model(flame, generator.flame_model)
    resolution = image.shape[0]
    if mask == "head":
        weights = head_mask(generator.flame_model, flame, camera, resolution, mask_dilate)
    elif mask == "none":
        weights = np.ones((resolution, resolution), np.float32)
    else:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return Target(image=image, camera=camera, flame=flame, mask=weights, info=dict(info or {}))


def photo_target(image: np.ndarray, generator, resolution: int, *, embedding=None,
                 fit_resolution: int = 512, fit_steps: int = 300, mask: str = "head",
                 mask_dilate: float = 0.04) -> Tuple[Target, np.ndarray]:
    """A photo (H, W, 3) uint8 → (Target at `resolution`, the crop at `fit_resolution`).

    `fit_photo` with the generator's head model (`embedding`: its landmark embedding; default
    the template's, which only fits the template head), the crop resized with Lanczos to
    `resolution`. Raises `preprocess.PhotoSkipped` ("no face", "face too small")."""
    from PIL import Image
    from reta3d.fitting import preprocess
    model = generator.flame_model
    if embedding is None:
        if model.name != "template_head":
            raise ValueError(f"the head model '{model.name}' needs its landmark embedding "
                             "(--landmark_embedding: DECA's landmark_embedding.npy or FLAME's "
                             "flame_static_embedding.pkl)")
        from reta3d.fitting.embedding import template_embedding
        embedding = template_embedding()
    fit = preprocess.fit_photo(np.asarray(image, np.uint8), model, embedding, int(fit_resolution),
                               num_steps=int(fit_steps))
    crop = fit.prepared.crop
    small = crop if crop.shape[0] == resolution else np.asarray(
        Image.fromarray(crop).resize((resolution, resolution), Image.Resampling.LANCZOS))
    info = {"fit_resolution": int(fit_resolution), "fit_steps": int(fit_steps),
            "landmark_error_px": fit.error_px, "landmark_error_iod": fit.error_iod,
            "yaw_pitch_roll_deg": [float(v) for v in fit.yaw_pitch_roll_deg],
            "detection_score": fit.prepared.score, "notes": list(fit.prepared.notes),
            "crop_magnification": fit.prepared.magnification,
            "crop_outside_fraction": fit.prepared.outside_fraction,
            "head_model": model.name, "landmark_embedding": str(embedding.source)}
    target = make_target(generator, small, fit.label, fit.flame, mask, mask_dilate, info)
    return target, crop


# ------------------------------------------------------------------------------------------
# W statistics and the perceptual loss
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WStats:
    """w_avg (w_dim,), w_std (w_dim,) per-dimension std of mapped random z, and where w_avg
    came from ("tracked": the mapping's EMA; "samples": the mean of the samples, used when
    the tracked one is all zeros, i.e. a randomly initialised model)."""
    w_avg: np.ndarray
    w_std: np.ndarray
    source: str
    num_samples: int


def w_statistics(config, generator, g_vars, num_samples: int = 10000, seed: int = 0,
                 batch: int = 1000) -> WStats:
    """Maps `num_samples` standard normal z (conditioned on the frontal camera, as sampling
    does) → WStats."""
    from reta3d.cameras import conditioning_labels
    num_samples = int(num_samples)
    batch = max(1, min(int(batch), num_samples))
    rng = np.random.RandomState(seed)
    mapper = _mapper(generator)
    c = conditioning_labels(config, batch)
    parts = []
    for start in range(0, num_samples, batch):
        z = rng.randn(batch, generator.config.z_dim).astype(np.float32)
        parts.append(np.asarray(mapper(g_vars, z, c))[:, 0])
    w = np.concatenate(parts)[:num_samples].astype(np.float64)
    tracked = np.asarray(g_vars.get("mapping_state", {}).get("mapping", {}).get(
        "w_avg", np.zeros(0)), np.float64)
    if tracked.size == w.shape[1] and np.all(np.isfinite(tracked)) and np.any(tracked != 0):
        w_avg, source = tracked, "tracked"
    else:
        w_avg, source = w.mean(0), "samples"
    w_std = np.sqrt(np.mean((w - w_avg) ** 2, axis=0))
    w_std = np.maximum(w_std, 1e-8 + 1e-3 * float(w_std.mean()))
    return WStats(w_avg.astype(np.float32), w_std.astype(np.float32), source, num_samples)


@functools.lru_cache(maxsize=8)
def _mapper(generator):
    return jax.jit(lambda g_vars, z, c: generator.map_latents(g_vars, z, c))


@dataclasses.dataclass(frozen=True)
class Perceptual:
    """VGG16 parameters (an argument of the compiled steps, not a constant in them), the
    layers used and a description for metrics.json."""
    params: Any
    layers: Tuple[str, ...]
    description: str
    pretrained: bool


def make_perceptual(config, vgg16: Optional[str] = None) -> Perceptual:
    """The VGG16 of the perceptual loss: `vgg16` (a converted .npz or "random"; default
    config.loss.vgg16) on config.loss.vgg_layers. A missing file is an error saying how to
    convert torchvision's weights or to choose "random" explicitly."""
    from reta3d import vgg
    choice = config.loss.vgg16 if vgg16 is None else vgg16
    layers = tuple(config.loss.vgg_layers)
    if choice == "random":
        return Perceptual(vgg.random_vgg16_params(0)["params"], layers,
                          f"VGG16 with fixed RANDOM weights (vgg16='random'), layers {layers}: "
                          "a weaker perceptual distance than ImageNet VGG16", False)
    if not pathlib.Path(choice).is_file():
        raise errors.MissingInputError(
            f"VGG16 weights {choice!r} not found. Convert torchvision's vgg16-397923af.pth with "
            "`python experiments/convert_vgg16.py --input=vgg16-397923af.pth --output=vgg16.npz` "
            "and pass --vgg16=vgg16.npz, or pass --vgg16=random for a fixed random VGG16.")
    return Perceptual(vgg.load_vgg16_params(choice)["params"], layers,
                      f"VGG16 ImageNet weights from {choice}, layers {layers}", True)


def _downsample_for_vgg(images):
    size = images.shape[1]
    if size <= PERCEPTUAL_MAX_SIZE:
        return images
    factor = -(-size // PERCEPTUAL_MAX_SIZE)
    if size % factor == 0:
        b, h, w, c = images.shape
        return images.reshape(b, h // factor, factor, w // factor, factor, c).mean((2, 4))
    return jax.image.resize(images, (images.shape[0], PERCEPTUAL_MAX_SIZE, PERCEPTUAL_MAX_SIZE,
                                     images.shape[3]), "linear")


def perceptual_distance(vgg_params, layers: Tuple[str, ...], a, b):
    """LPIPS's form with uniform weights: images (B, R, R, 3) in [-1, 1] → (B,) distance:
    Σ_layers mean_pixels Σ_channels (â − b̂)², â = features / ‖features‖ over channels."""
    from reta3d import vgg
    module = vgg.VGG16Features(output_layers=tuple(layers))
    both = jnp.concatenate([_downsample_for_vgg(a), _downsample_for_vgg(b)], axis=0)
    feats = module.apply({"params": vgg_params}, vgg.imagenet_normalize(both.astype(jnp.float32)))
    total = 0.0
    n = a.shape[0]
    for name in layers:
        f = feats[name]
        f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
        total = total + jnp.mean(jnp.sum((f[:n] - f[n:]) ** 2, axis=-1), axis=(1, 2))
    return total


def image_terms(vgg_params, layers, images, targets, mask, background: float,
                perceptual: bool = True, reduce: bool = True) -> Dict[str, jax.Array]:
    """Loss terms of renders against targets, both (B, R, R, 3) in [-1, 1], restricted to
    `mask` (B, R, R, 1) in [0, 1]: outside it both images are the background. → {"l1", "l2"
    (masked means over pixels and channels), "perceptual"}, each the mean over the batch, or
    (B,) per image with reduce=False."""
    bg = 2.0 * background - 1.0
    x = mask * images + (1.0 - mask) * bg
    y = mask * targets + (1.0 - mask) * bg
    area = jnp.maximum(jnp.sum(mask, axis=(1, 2, 3)), 1.0) * images.shape[-1]
    diff = x - y
    terms = {"l1": jnp.sum(jnp.abs(diff), axis=(1, 2, 3)) / area,
             "l2": jnp.sum(diff * diff, axis=(1, 2, 3)) / area}
    if perceptual:
        terms["perceptual"] = perceptual_distance(vgg_params, layers, x, y)
    return {k: jnp.mean(v) for k, v in terms.items()} if reduce else terms


# ------------------------------------------------------------------------------------------
# Rendering ws (the differentiable forward)
# ------------------------------------------------------------------------------------------

def render_ws(generator, key: _RenderKey, g_vars, ws, flame, camera):
    """ws (B, num_ws, w_dim), flame dict of (B, k), camera (B, 25) → images (B, R, R, 3) in
    [-1, 1] (the whole generator: synthesis, FLAME, G_d, binding, rasterizer; differentiable)."""
    import rasterizer
    static = generator.synthesize(g_vars, ws, noise_mode="const")
    gaussians, _ = generator.animate(g_vars, static, flame, use_dynamic=True)
    cam = rasterizer.Camera.from_eg3d(camera, key.resolution)
    out = rasterizer.render(gaussians, cam, background=jnp.full((3,), key.background, jnp.float32),
                            backend=key.backend, capacity=key.capacity)
    return out.color * 2.0 - 1.0


@functools.lru_cache(maxsize=8)
def synthesize_fn(generator):
    """jitted (g_vars, ws (B, num_ws, w_dim)) → StaticMaps (constant noise), one per generator."""
    return jax.jit(lambda g_vars, ws: generator.synthesize(g_vars, ws, noise_mode="const"))


def _broadcast_ws(generator, w):
    """(B, 1 or num_ws, w_dim) → (B, num_ws, w_dim)."""
    num_ws = generator.config.num_ws
    return jnp.broadcast_to(w, (w.shape[0], num_ws, w.shape[2]))


@functools.lru_cache(maxsize=8)
def _projection_step(generator, key: _RenderKey, layers: Tuple[str, ...],
                     weights: Tuple[float, ...]):
    """The jitted Adam step of the latent optimisation (one compilation per generator, render
    settings, loss weights and latent shape; the schedule's lr and noise are arguments)."""
    import optax
    perceptual_w, l2_w, l1_w, reg_w = weights
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

    def loss_fn(u, noise, w_avg, w_std, g_vars, vgg_params, target, mask, flame, camera):
        w = w_avg + (u + noise) * w_std
        images = render_ws(generator, key, g_vars, _broadcast_ws(generator, w), flame, camera)
        terms = image_terms(vgg_params, layers, images, target, mask, key.background,
                            perceptual=perceptual_w > 0)
        terms["w_reg"] = jnp.mean(u * u)
        total = (perceptual_w * terms.get("perceptual", 0.0) + l2_w * terms["l2"]
                 + l1_w * terms["l1"] + reg_w * terms["w_reg"])
        return total, terms

    def step(u, opt_state, lr, noise_scale, tied, rng, w_avg, w_std, g_vars, vgg_params, target,
             mask, flame, camera):
        noise = noise_scale * jax.random.normal(rng, u.shape)
        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            u, noise, w_avg, w_std, g_vars, vgg_params, target, mask, flame, camera)
        # tied = 1: the layers' gradients are averaged, so a w+ that starts broadcast stays one w.
        grads = tied * jnp.mean(grads, axis=1, keepdims=True) + (1.0 - tied) * grads
        updates, opt_state = adam.update(grads, opt_state)
        return u - lr * updates, opt_state, dict(terms, total=total)

    return jax.jit(step), adam.init


def schedule(step: int, num_steps: int, settings: InversionSettings) -> Tuple[float, float, bool]:
    """(learning rate, latent-noise factor, tied) at `step` of `num_steps`.

    The run has one phase ("w", or "w+" with w_plus_tied = 0) or two ("w+": the first
    w_plus_tied of the steps optimise one shared w (tied), the rest every layer's w, at
    w_plus_lr_scale × the learning rate). Within a phase the learning rate follows StyleGAN2's
    projector: linear ramp-up over lr_rampup of the phase, cosine ramp-down over its last
    lr_rampdown. The noise (× initial_noise) decays quadratically to 0 at noise_ramp of the run."""
    num_steps = max(int(num_steps), 1)
    tied_steps = (num_steps if settings.space == "w"
                  else int(round(settings.w_plus_tied * num_steps)))
    tied = step < tied_steps
    if tied:
        t, scale = step / max(tied_steps, 1), 1.0
    else:
        t, scale = (step - tied_steps) / max(num_steps - tied_steps, 1), settings.w_plus_lr_scale
    ramp = min(1.0, (1.0 - t) / max(settings.lr_rampdown, 1e-8))
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp *= min(1.0, t / max(settings.lr_rampup, 1e-8)) if settings.lr_rampup > 0 else 1.0
    noise = settings.initial_noise * max(0.0, 1.0 - step / num_steps / max(settings.noise_ramp,
                                                                           1e-8)) ** 2
    return settings.learning_rate * scale * ramp, noise, tied


class _JsonLines:
    """Appends one JSON object per line (flushed), e.g. the loss log."""

    def __init__(self, path: Optional[pathlib.Path]):
        self.handle = None if path is None else open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _device_target(target: Target):
    image = jnp.asarray(target.image, jnp.float32)[None] / 127.5 - 1.0
    mask = jnp.asarray(target.mask, jnp.float32)[None, :, :, None]
    flame = {k: jnp.asarray(v, jnp.float32) for k, v in target.flame.items()}
    camera = jnp.asarray(target.camera, jnp.float32)[None]
    return image, mask, flame, camera


@dataclasses.dataclass
class ProjectionResult:
    """w (1, n, w_dim) the optimised latent (n = 1 for "w", num_ws for "w+"), ws (1, num_ws,
    w_dim) broadcast, the per-step log, seconds (incl. compilation) and the first step's
    seconds (≈ compilation)."""
    w: np.ndarray
    ws: np.ndarray
    log: List[Dict[str, float]]
    seconds: float
    first_step_seconds: float


def project(config, generator, g_vars, target: Target, settings: InversionSettings,
            perceptual: Perceptual, stats: Optional[WStats] = None, *,
            log_path: Optional[pathlib.Path] = None, progress: bool = True) -> ProjectionResult:
    """Optimises the latent (module doc, step 2) → ProjectionResult."""
    from reta3d.fitting.preprocess import Progress
    key = render_key(config, generator)
    if target.image.shape[0] != key.resolution:
        raise ValueError(f"target is {target.image.shape[0]}² but the generator renders "
                         f"{key.resolution}²")
    if stats is None:
        stats = w_statistics(config, generator, g_vars, settings.num_w_samples, settings.seed)
    weights = (float(settings.perceptual_weight), float(settings.l2_weight),
               float(settings.l1_weight), float(settings.w_reg_weight))
    step_fn, init_fn = _projection_step(generator, key, tuple(perceptual.layers), weights)
    n = 1 if settings.space == "w" else generator.config.num_ws
    u = jnp.zeros((1, n, generator.config.w_dim), jnp.float32)
    opt_state = init_fn(u)
    w_avg, w_std = jnp.asarray(stats.w_avg), jnp.asarray(stats.w_std)
    image, mask, flame, camera = _device_target(target)
    rng = jax.random.PRNGKey(settings.seed)
    noise_unit = math.sqrt(generator.config.w_dim)
    log_file = _JsonLines(log_path)
    bar = Progress(settings.num_steps, f"invert ({settings.space})") if progress else None
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    first = 0.0
    try:
        for i in range(settings.num_steps):
            lr, noise, tied = schedule(i, settings.num_steps, settings)
            u, opt_state, terms = step_fn(u, opt_state, jnp.float32(lr),
                                          jnp.float32(noise * noise_unit), jnp.float32(tied),
                                          jax.random.fold_in(rng, i), w_avg, w_std, g_vars,
                                          perceptual.params, image, mask, flame, camera)
            record = _log_step("invert", i, terms, start, history, log_file, bar,
                               lr=lr, noise=noise, tied=bool(tied))
            if i == 0:
                first = record["elapsed_s"]
    finally:
        log_file.close()
    seconds = time.perf_counter() - start
    w = np.asarray(w_avg + u * w_std, np.float32)
    ws = np.asarray(_broadcast_ws(generator, jnp.asarray(w)), np.float32)
    return ProjectionResult(w=w, ws=ws, log=history, seconds=seconds, first_step_seconds=first)


def _log_step(phase: str, step: int, terms, start: float, history: list, log_file, bar,
              **extra) -> Dict[str, Any]:
    """One optimisation step's record: the loss terms (fetched from the device: the loss is
    checked every step, so a diverging run stops where it diverged), `extra` and the elapsed
    time; appended to `history`, written to the loss log, shown on the progress bar.
    Raises FloatingPointError when the total loss is not finite."""
    record = {"phase": phase, "step": step,
              **{name: float(v) for name, v in jax.device_get(terms).items()},
              **extra, "elapsed_s": time.perf_counter() - start}
    if not math.isfinite(record["total"]):
        label = "inversion" if phase == "invert" else "PTI"
        raise FloatingPointError(f"{label} loss became {record['total']} at step {step}")
    history.append(record)
    log_file.write(record)
    if bar:
        bar.update(step + 1, f"loss {record['total']:.4f}")
    return record


# ------------------------------------------------------------------------------------------
# Pivotal tuning
# ------------------------------------------------------------------------------------------

def _split_params(g_vars):
    """The PTI-tuned subtrees present: a Tab. 1(c) generator without G_m has no
    mouth_synthesis / blend (its static generator is G alone)."""
    params = g_vars["params"]
    if "synthesis" not in params:
        raise ValueError(f"generator parameters {sorted(params)} lack 'synthesis': not a RETA3D "
                         "generator")
    return {k: params[k] for k in TUNED_SUBTREES if k in params}


def merge_tuned(g_vars, tuned: Mapping[str, Any]):
    """g_vars with params[synthesis / mouth_synthesis / blend] replaced by `tuned`'s."""
    return dict(g_vars, params=dict(g_vars["params"], **dict(tuned)))


@functools.lru_cache(maxsize=8)
def _pti_step(generator, key: _RenderKey, layers: Tuple[str, ...], weights: Tuple[float, ...],
              learning_rate: float, locality_batch: int, locality_t: float):
    import optax
    l2_w, perceptual_w, locality_w = weights
    tx = optax.adam(learning_rate)
    z_dim = generator.config.z_dim

    def loss_fn(train, g_vars, ws, vgg_params, target, mask, flame, camera):
        # The pivot and the locality latents go through ONE batched render of the tuned
        # generator (a smaller program to compile than two renders).
        tuned = merge_tuned(g_vars, train)
        images = render_ws(generator, key, tuned, ws, flame, camera)
        terms = image_terms(vgg_params, layers, images, target, mask, key.background,
                            perceptual=perceptual_w > 0, reduce=False)
        each = l2_w * terms["l2"] + perceptual_w * terms.get("perceptual", 0.0)
        out = {name: value[0] for name, value in terms.items()}
        total = each[0]
        if locality_w > 0:
            out["locality"] = jnp.mean(each[1:])
            total = total + locality_w * out["locality"]
        return total, out

    def step(train, opt_state, rng, g_vars, ws, vgg_params, target, mask, flame, camera, c_loc,
             flame_loc, camera_loc):
        if locality_w > 0:
            z = jax.random.normal(rng, (locality_batch, z_dim))
            w_r = ws + locality_t * (generator.map_latents(g_vars, z, c_loc) - ws)
            original = render_ws(generator, key, g_vars, w_r, flame_loc, camera_loc)
            ws = jnp.concatenate([ws, w_r])
            target = jnp.concatenate([target, original])
            mask = jnp.concatenate([mask, jnp.ones_like(original[..., :1])])
            flame = {k: jnp.concatenate([flame[k], flame_loc[k]]) for k in flame}
            camera = jnp.concatenate([camera, camera_loc])
        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            train, g_vars, ws, vgg_params, target, mask, flame, camera)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, dict(terms, total=total)

    return jax.jit(step), tx.init


@dataclasses.dataclass
class TuningResult:
    """tuned: {synthesis, mouth_synthesis, blend} parameters; log; seconds (incl. compile)."""
    tuned: Any
    log: List[Dict[str, float]]
    seconds: float


def pivotal_tuning(config, generator, g_vars, ws: np.ndarray, target: Target,
                   settings: InversionSettings, perceptual: Perceptual, *,
                   log_path: Optional[pathlib.Path] = None, progress: bool = True) -> TuningResult:
    """PTI around the pivot `ws` (1, num_ws, w_dim) for settings.pti_steps steps (module doc)."""
    from reta3d.cameras import conditioning_labels, frontal_label
    from reta3d.fitting.preprocess import Progress
    from reta3d.sequences import neutral_flame
    key = render_key(config, generator)
    k = int(settings.pti_locality_batch)
    step_fn, init_fn = _pti_step(
        generator, key, tuple(perceptual.layers),
        (float(settings.pti_l2_weight), float(settings.pti_perceptual_weight),
         float(settings.pti_locality_weight)),
        float(settings.pti_learning_rate), k, float(settings.pti_locality_t))
    train = jax.tree_util.tree_map(jnp.asarray, _split_params(g_vars))
    opt_state = init_fn(train)
    image, mask, flame, camera = _device_target(target)
    c_loc = conditioning_labels(config, k)
    c_loc = None if c_loc is None else jnp.asarray(c_loc)
    neutral = neutral_flame(generator.flame_model)
    flame_loc = {name: jnp.asarray(np.repeat(v, k, 0)) for name, v in neutral.items()}
    camera_loc = jnp.asarray(np.repeat(frontal_label()[None], k, 0))
    ws = jnp.asarray(ws, jnp.float32)
    rng = jax.random.PRNGKey(settings.seed + 1)
    log_file = _JsonLines(log_path)
    bar = Progress(settings.pti_steps, "pivotal tuning") if progress else None
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    try:
        for i in range(settings.pti_steps):
            train, opt_state, terms = step_fn(train, opt_state, jax.random.fold_in(rng, i), g_vars,
                                              ws, perceptual.params, image, mask, flame, camera,
                                              c_loc, flame_loc, camera_loc)
            _log_step("pti", i, terms, start, history, log_file, bar,
                      lr=settings.pti_learning_rate)
    finally:
        log_file.close()
    return TuningResult(jax.device_get(train), history, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# The identity file
# ------------------------------------------------------------------------------------------

def generator_fingerprint(g_vars) -> str:
    """sha256 (hex, 16 chars) over every array of the generator variables (paths, dtypes,
    shapes, bytes): an identity is tied to the weights it was inverted with."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(g_vars)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class Identity:
    """An identity file's content (numpy). ws (1, num_ws, w_dim), w (1, n, w_dim) as optimised,
    space "w" / "w+", face (1, R, R, 14), mouth (1, Rm, Rm, 14), flame: the fitted FLAME of the
    photo, dict of (1, k) float32; camera (25,) the fitted camera; fingerprint of the base
    generator; tuned_params: path of the PTI weights or None; metadata dict."""

    path: pathlib.Path
    ws: np.ndarray
    w: np.ndarray
    space: str
    face: np.ndarray
    mouth: np.ndarray
    flame: Dict[str, np.ndarray]
    camera: np.ndarray
    fingerprint: str
    tuned_params: Optional[pathlib.Path]
    tuned_sha256: Optional[str]
    metadata: Dict[str, Any]

    @property
    def shape(self) -> np.ndarray:
        """(1, S) the identity's FLAME shape (what every render of it uses)."""
        return self.flame["shape"]

    def apply_shape(self, flame: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """A FLAME dict / sequence (arrays (T, k)) with its shape replaced by the identity's,
        repeated over the T rows (and fitted to the sequence's shape width)."""
        return with_identity_shape(flame, self.shape)

    def apply_photo_expression(self, flame: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """`apply_shape(flame)` with the expression, jaw and eye pose fitted to the photo
        (dict of (1, k)): the head as reconstructed, which `novel_views.png` shows. On the
        embedded template head the photo's landmark fit puts part of the face's shape into
        expression coefficients (several standard deviations), so the identity at neutral
        expression can look quite unlike its photo."""
        out = self.apply_shape(flame)
        for key in ("expression", "jaw_pose", "eye_pose"):
            if key in out:
                out[key] = _fit_rows(self.flame[key], out[key].shape[1], out[key].shape[0])
        return out


def with_identity_shape(flame: Mapping[str, Any], shape: np.ndarray) -> Dict[str, np.ndarray]:
    """`flame` (dict of (T, k)) with "shape" = `shape` ((S,) or (1, S)) repeated over T rows
    (truncated / zero-padded to the width flame["shape"] has, or kept as is without one)."""
    out = {k: np.asarray(v, np.float32) for k, v in flame.items()}
    shape = np.asarray(shape, np.float32).reshape(-1)
    rows = int(next(iter(out.values())).shape[0]) if out else 1
    width = out["shape"].shape[1] if "shape" in out else shape.shape[0]
    out["shape"] = _fit_rows(shape, width, rows)
    return out


def _fit_rows(values, width: int, rows: int) -> np.ndarray:
    """One row of coefficients ((k,) or (1, k)) truncated / zero-padded to `width` and repeated
    over `rows` → (rows, width) float32."""
    values = np.asarray(values, np.float32).reshape(-1)[:width]
    values = np.pad(values, (0, width - values.shape[0]))
    return np.repeat(values[None], rows, axis=0)


def write_identity(path, *, ws: np.ndarray, w: np.ndarray, space: str, static, flame,
                   camera: np.ndarray, fingerprint: str, tuned: Optional[Any] = None,
                   metadata: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
    """Writes an identity file (and, with `tuned` PTI weights, TUNED_PARAMS_FILE beside it),
    each atomically. static: StaticMaps of batch 1. Returns the .npz path."""
    from flax import serialization
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"format": np.asarray(IDENTITY_FORMAT), "version": np.asarray(IDENTITY_VERSION),
              "space": np.asarray(space), "ws": np.asarray(ws, np.float32),
              "w": np.asarray(w, np.float32),
              "face": np.asarray(static.face, np.float32),
              "mouth": np.asarray(static.mouth, np.float32),
              "camera": np.asarray(camera, np.float32).reshape(25),
              "fingerprint": np.asarray(fingerprint),
              "metadata": np.asarray(json.dumps(dict(metadata or {})))}
    for key in FLAME_KEYS:
        arrays[f"flame_{key}"] = np.asarray(flame[key], np.float32).reshape(1, -1)
    if tuned is not None:
        data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, dict(tuned)))
        tuned_path = path.parent / TUNED_PARAMS_FILE
        atomic_files.write_bytes(tuned_path, data)
        arrays["tuned_params"] = np.asarray(TUNED_PARAMS_FILE)
        arrays["tuned_sha256"] = np.asarray(hashlib.sha256(data).hexdigest())
    else:
        arrays["tuned_params"] = np.asarray("")
        arrays["tuned_sha256"] = np.asarray("")
    atomic_files.save_npz(path, arrays)
    return path


def read_identity(path) -> Identity:
    """Reads an identity file (no generator needed). Raises FileNotFoundError, or ValueError
    naming the file when it is not a readable RETA3D identity."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise errors.MissingInputError(
            f"identity file not found: {path} (experiments/invert.py writes "
            f"OUT/{IDENTITY_FILE})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: archive[k] for k in archive.files}
    except Exception as e:  # zip / format errors all mean "not an identity file"
        raise errors.InputError(f"{path}: not a readable identity file ({type(e).__name__}: {e})") from e
    if str(data.get("format", "")) != IDENTITY_FORMAT:
        raise errors.InputError(f"{path}: not a RETA3D identity file (written by experiments/invert.py)")
    version = int(data["version"])
    if version > IDENTITY_VERSION:
        raise errors.InputError(f"{path}: identity format version {version} is newer than this code's "
                         f"{IDENTITY_VERSION}")
    tuned = str(data["tuned_params"])
    return Identity(
        path=path, ws=data["ws"], w=data["w"], space=str(data["space"]), face=data["face"],
        mouth=data["mouth"], flame={k: data[f"flame_{k}"] for k in FLAME_KEYS},
        camera=data["camera"], fingerprint=str(data["fingerprint"]),
        tuned_params=(path.parent / tuned) if tuned else None,
        tuned_sha256=str(data["tuned_sha256"]) or None, metadata=json.loads(str(data["metadata"])))


def load_identity(path, generator, g_vars, *, check_generator: bool = True):
    """An identity for rendering → (g_vars, static).

    g_vars: the given variables, with the PTI-tuned G / G_m / blending weights merged in when
    the identity has them (the mapping and G_d are never tuned). static: its StaticMaps
    (batch 1: face, mouth, ws), ready for `generator.animate` / `inference.make_frame_fn` /
    `make_view_fn` / `run_animation`. Render it with the identity's FLAME shape
    (`read_identity(path).apply_shape(flame)`): the maps were fitted on that head.
    check_generator: the identity must come from these weights (fingerprint) — a mismatch is
    a ValueError naming both (False: only the shapes are checked).
    """
    from flax import serialization
    from reta3d.networks.generator import StaticMaps
    identity = read_identity(path)
    cfg = generator.config
    expected = {"face": (1, cfg.uv_resolution, cfg.uv_resolution, cfg.feature_channels),
                "mouth": (1, cfg.mouth_resolution, cfg.mouth_resolution, cfg.feature_channels),
                "ws": (1, cfg.num_ws, cfg.w_dim)}
    for name, shape in expected.items():
        if getattr(identity, name).shape != shape:
            raise errors.InputError(f"{path}: {name} has shape {getattr(identity, name).shape} but this "
                             f"generator needs {shape}: the identity was inverted with another "
                             "model (pass that model's --workdir)")
    if check_generator:
        fingerprint = generator_fingerprint(g_vars)
        if fingerprint != identity.fingerprint:
            raise errors.InputError(f"{path} was inverted with generator weights {identity.fingerprint}, "
                             f"these are {fingerprint}: pass the --workdir (same checkpoint) it "
                             f"was made with ({identity.metadata.get('generator', 'unknown')})")
    if identity.tuned_params is not None:
        if not identity.tuned_params.is_file():
            raise errors.MissingInputError(
                f"{path} needs its PTI weights {identity.tuned_params} "
                "(keep them beside identity.npz)")
        data = identity.tuned_params.read_bytes()
        if identity.tuned_sha256 and hashlib.sha256(data).hexdigest() != identity.tuned_sha256:
            raise errors.InputError(f"{identity.tuned_params} does not match {path} (checksum): it was "
                             "overwritten by another inversion")
        template = jax.tree_util.tree_map(np.asarray, _split_params(g_vars))
        try:
            tuned = serialization.from_bytes(template, data)
        except Exception as e:
            raise errors.InputError(f"{identity.tuned_params}: not this generator's tuned weights "
                             f"({type(e).__name__}: {e})") from e
        for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(template)[0],
                             jax.tree_util.tree_leaves(tuned)):
            if np.shape(a) != np.shape(b):
                raise errors.InputError(f"{identity.tuned_params}: {jax.tree_util.keystr(p)} has shape "
                                 f"{np.shape(b)}, this generator's is {np.shape(a)}")
        g_vars = merge_tuned(g_vars, jax.tree_util.tree_map(jnp.asarray, tuned))
    static = StaticMaps(face=jnp.asarray(identity.face), mouth=jnp.asarray(identity.mouth),
                        ws=jnp.asarray(identity.ws))
    return g_vars, static


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

def image_metrics(reconstruction: np.ndarray, target: np.ndarray,
                  mask: Optional[np.ndarray] = None) -> Dict[str, Optional[float]]:
    """PSNR / SSIM (skimage.metrics, data range 255, SSIM over the RGB channels) of two
    (R, R, 3) uint8 images, and PSNR inside `mask` > 0.5 when given."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    a = np.asarray(reconstruction, np.uint8)
    b = np.asarray(target, np.uint8)
    out = {"psnr": float(peak_signal_noise_ratio(b, a, data_range=255)),
           "ssim": float(structural_similarity(b, a, channel_axis=-1, data_range=255))}
    if mask is not None:
        inside = np.asarray(mask) > 0.5
        if inside.any():
            mse = float(np.mean((a[inside].astype(np.float64) - b[inside]) ** 2))
            out["psnr_mask"] = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))
            out["mask_fraction"] = float(inside.mean())
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 arrays of equal shape (any number of images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@functools.lru_cache(maxsize=1)
def _lpips_model():
    import lpips  # optional: the learned LPIPS metric (pip install lpips; needs its weights)
    return lpips.LPIPS(net="alex", verbose=False)


def lpips_metric(a: np.ndarray, b: np.ndarray) -> Tuple[Optional[float], str]:
    """LPIPS (AlexNet, learned linear weights) of two (R, R, 3) uint8 images when the `lpips`
    package and its weights are available → (value or None, what happened)."""
    try:
        import torch
        model = _lpips_model()

        def to(x):
            return torch.from_numpy(np.asarray(x, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

        with torch.no_grad():
            return float(model(to(a), to(b)).item()), "lpips (AlexNet, learned weights)"
    except Exception as e:  # ImportError, or the backbone's weights cannot be fetched offline
        return None, f"not computed: the lpips package is unavailable ({type(e).__name__}: {e})"


# ------------------------------------------------------------------------------------------
# The job of experiments/invert.py
# ------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _png(path: pathlib.Path, image: np.ndarray) -> None:
    from PIL import Image
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _json(path: pathlib.Path, content: Mapping[str, Any]) -> None:
    atomic_files.write_bytes(path, (json.dumps(content, indent=2, allow_nan=False) + "\n").encode())


def render_identity_views(config, generator, g_vars, static, flame, labels: np.ndarray
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """(V, R, R, 3) uint8 renders of one identity (`load_identity`'s g_vars and static) in one
    pose (flame, dict of (1, k), with the identity's shape) seen by V cameras, through the
    inference path (`inference.make_view_fn`, the training render settings), and the
    rasterizer overflow per view."""
    from reta3d import inference
    key = render_key(config, generator)
    view_fn = inference.make_view_fn(config, generator, key.resolution, key.backend,
                                     capacity=key.capacity)
    flame = {k: jnp.asarray(v, jnp.float32) for k, v in flame.items()}
    return inference.render_views(view_fn, g_vars, static, flame, labels,
                                  chunk=len(NOVEL_VIEWS_DEG))


def novel_view_labels() -> np.ndarray:
    """(5, 25) EG3D labels of the novel views: yaw −30°, 0, +30° at pitch 0, pitch −15°, +15°."""
    from rasterizer.types import look_at_eg3d_label
    return np.stack([look_at_eg3d_label(math.radians(y), math.radians(p))
                     for y, p in NOVEL_VIEWS_DEG]).astype(np.float32)


def _result_names(pti: bool) -> List[str]:
    names = [IDENTITY_FILE, "input_crop.png", "reconstruction.png", "comparison.png",
             "novel_views.png", "animation.mp4", "animation_timing.json", "head.ply", LOSS_LOG_FILE]
    if pti:
        names.append(TUNED_PARAMS_FILE)
    return names + [METRICS_FILE]


def invert_photo(config, generator, g_vars, image: Union[str, os.PathLike, np.ndarray], out_dir,
                 settings: InversionSettings = InversionSettings(), *, embedding=None,
                 vgg16: Optional[str] = None, sequence: str = "builtin:talk",
                 num_frames: Optional[int] = None, fit_resolution: int = 512,
                 fit_steps: int = 300, source: Optional[str] = None,
                 generator_source: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """The whole one-shot reconstruction (module doc) → metrics.json's content.

    image: a photo path (read with `media.load_image`: clear errors for missing / unreadable
    files) or an (H, W, 3) uint8 array. out_dir: created if needed; results of an earlier run
    there are replaced only when this one succeeds. sequence / num_frames: the animation's FLAME
    sequence (`reta3d.sequences.get_sequence`). generator_source: recorded in the identity
    (e.g. the workdir). Raises `preprocess.PhotoSkipped` ("no face", "face too small"),
    FileNotFoundError / ValueError for bad inputs — before anything is written.
    """
    from reta3d import sequences
    from reta3d.fitting import media
    t_start = time.perf_counter()
    timing: Dict[str, float] = {}
    if isinstance(image, (str, os.PathLike)):
        source = source or str(image)
        image = media.load_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the photo must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    key = render_key(config, generator)
    perceptual = make_perceptual(config, vgg16)        # fails before any work when missing
    sequences.get_sequence(sequence, generator.flame_model, 1 if num_frames is None else num_frames)

    t = time.perf_counter()
    target, _ = photo_target(image, generator, key.resolution, embedding=embedding,
                                fit_resolution=fit_resolution, fit_steps=fit_steps,
                                mask=settings.mask, mask_dilate=settings.mask_dilate)
    timing["preprocess_s"] = time.perf_counter() - t

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        metrics = _invert_into(config, generator, g_vars, target, staging, settings,
                               perceptual, sequence, num_frames, timing, progress,
                               source=source, generator_source=generator_source)
        timing["total_s"] = time.perf_counter() - t_start
        metrics["timing"] = dict(timing)
        _json(staging / METRICS_FILE, metrics)
        _commit(staging, out, _result_names(settings.pti_steps > 0))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metrics


def _commit(staging: pathlib.Path, out: pathlib.Path, names: List[str]) -> None:
    """Moves the staged results into `out`: an earlier run's metrics.json (the marker of a
    complete result) goes first, this run's last; PTI weights of an earlier run that this one
    does not replace are removed (this identity does not use them)."""
    missing = [n for n in names if not (staging / n).is_file()]
    if missing:
        raise RuntimeError(f"inversion staged no {missing}")
    (out / METRICS_FILE).unlink(missing_ok=True)
    if TUNED_PARAMS_FILE not in names:
        (out / TUNED_PARAMS_FILE).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def _invert_into(config, generator, g_vars, target: Target, staging: pathlib.Path,
                 settings: InversionSettings, perceptual: Perceptual, sequence: str,
                 num_frames: Optional[int], timing: Dict[str, float],
                 progress: bool, *, source: Optional[str], generator_source: Optional[str]
                 ) -> Dict[str, Any]:
    from reta3d import inference, ply, sequences, video
    from reta3d.cameras import camera_path
    from reta3d.networks.generator import StaticMaps

    log_path = staging / LOSS_LOG_FILE
    t = time.perf_counter()
    stats = w_statistics(config, generator, g_vars, settings.num_w_samples, settings.seed)
    timing["w_statistics_s"] = time.perf_counter() - t
    result = project(config, generator, g_vars, target, settings, perceptual, stats,
                     log_path=log_path, progress=progress)
    timing["invert_s"] = result.seconds
    timing["invert_first_step_s (≈ compilation)"] = result.first_step_seconds
    timing["invert_steps_per_s (after step 0)"] = (
        (len(result.log) - 1) / max(result.seconds - result.first_step_seconds, 1e-9)
        if len(result.log) > 1 else None)

    synth = synthesize_fn(generator)
    pose = with_identity_shape(target.flame, target.flame["shape"])
    camera = target.camera[None]

    def reconstruct(variables, ws):
        static = synth(variables, jnp.asarray(ws))
        images, _ = render_identity_views(config, generator, variables, static, pose, camera)
        return static, images[0]

    static_w, recon_w = reconstruct(g_vars, result.ws)
    before = image_metrics(recon_w, target.image, target.mask)
    tuned = None
    pti_log: List[Dict[str, float]] = []
    if settings.pti_steps > 0:
        tuning = pivotal_tuning(config, generator, g_vars, result.ws, target, settings,
                                perceptual, log_path=log_path, progress=progress)
        tuned, pti_log = tuning.tuned, tuning.log
        timing["pti_s"] = tuning.seconds
        static = synth(merge_tuned(g_vars, jax.tree_util.tree_map(jnp.asarray, tuned)),
                       jnp.asarray(result.ws))
    else:
        static = static_w
    static = StaticMaps(face=np.asarray(static.face), mouth=np.asarray(static.mouth),
                        ws=np.asarray(static.ws))

    t = time.perf_counter()
    fingerprint = generator_fingerprint(g_vars)
    metadata = {"source": source, "generator": generator_source, "space": settings.space,
                "num_steps": settings.num_steps, "pti_steps": settings.pti_steps,
                "created": _now(),
                "head_model": generator.flame_model.name,
                "render_resolution": render_key(config, generator).resolution}
    identity_path = write_identity(staging / IDENTITY_FILE, ws=result.ws, w=result.w,
                                   space=settings.space, static=static, flame=target.flame,
                                   camera=target.camera, fingerprint=fingerprint, tuned=tuned,
                                   metadata=metadata)
    # Every output below is rendered from the identity file as written, through the same path
    # sample.py / animate.py / export_ply.py take with --identity.
    id_vars, id_static = load_identity(identity_path, generator, g_vars)
    identity = read_identity(identity_path)
    recon, overflow = render_identity_views(config, generator, id_vars, id_static, pose, camera)
    recon = recon[0]
    after = image_metrics(recon, target.image, target.mask)
    _png(staging / "input_crop.png", target.image)
    _png(staging / "reconstruction.png", recon)
    panels = [target.image, recon] + ([recon_w] if settings.pti_steps > 0 else [])
    _png(staging / "comparison.png", np.concatenate(panels, axis=1))
    views, view_overflow = render_identity_views(config, generator, id_vars, id_static, pose,
                                                 novel_view_labels())
    _png(staging / "novel_views.png", np.concatenate(list(views), axis=1))
    timing["views_s"] = time.perf_counter() - t

    t = time.perf_counter()
    key = render_key(config, generator)
    seq, seq_fps = sequences.get_sequence(sequence, generator.flame_model, num_frames)
    seq = identity.apply_shape(seq)
    frame_fn = inference.make_frame_fn(config, generator, key.resolution, key.backend,
                                       capacity=key.capacity)
    frames, anim_timing = inference.run_animation(frame_fn, id_vars, id_static, seq,
                                                  camera_path("fixed", seq["expression"].shape[0]))
    video.write_video(staging / "animation.mp4", video.side_by_side(frames), seq_fps)
    _json(staging / "animation_timing.json",
          {k: v for k, v in anim_timing.items() if k != "frame_ms"})
    timing["animation_s"] = time.perf_counter() - t

    gaussians, _ = generator.jit_animate(id_vars, id_static,
                                         {k: jnp.asarray(v) for k, v in pose.items()})
    ply.write_ply(staging / "head.ply",
                  jax.tree_util.tree_map(lambda x: np.asarray(x[0]), gaussians))

    lpips_after, lpips_note = lpips_metric(recon, target.image)
    if lpips_after is not None:
        after["lpips"] = lpips_after
        if settings.pti_steps > 0:
            before["lpips"] = lpips_metric(recon_w, target.image)[0]
    losses = [r["total"] for r in result.log]
    metrics = {
        "source": source,
        "reconstruction": after,
        "before_pti": before if settings.pti_steps > 0 else None,
        "lpips": lpips_note,
        "perceptual_loss": perceptual.description,
        "loss": {"first": losses[0], "last": losses[-1], "min": min(losses),
                 "pti_first": pti_log[0]["total"] if pti_log else None,
                 "pti_last": pti_log[-1]["total"] if pti_log else None},
        "w_statistics": {"w_avg_source": stats.source, "num_samples": stats.num_samples,
                         "w_std_mean": float(stats.w_std.mean())},
        "distance_to_w_avg_in_std": float(np.sqrt(np.mean(
            ((result.w - stats.w_avg) / stats.w_std) ** 2))),
        "settings": dataclasses.asdict(settings),
        "preprocess": target.info,
        "camera": [float(v) for v in target.camera],
        "rasterizer_overflow": inference.overflow_report(
            np.concatenate([overflow, view_overflow]), key.capacity),
        "animation": {"sequence": sequence, "frames": int(frames.shape[0]), "fps": float(seq_fps)},
        "render_resolution": key.resolution, "num_gaussians": generator.num_gaussians,
        "generator": generator_source, "generator_fingerprint": fingerprint,
        "files": _result_names(settings.pti_steps > 0),
        "date": _now(),
        **inference.device_description(),
    }
    return metrics
