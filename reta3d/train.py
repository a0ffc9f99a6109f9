"""RETA3D training (Sec. 2.4): state, the pmap train steps, and the training loop.

Phases, each ONE compiled `jax.pmap` function (no per-step recompilation):
  g_step      generator: L_G = L_adv + λo·L_offset + λs·L_scale + λr·L_reg^{G_d} + λID·L_ID (Eq. 2);
              L_ID's gradient reaches G_d only (Sec. 2.4; `generator_gradients`)
  d_step      discriminator: softplus(D(fake)) + softplus(−D(real))
  d_reg_step  discriminator R1 (γ), lazily every `r1_interval` steps, scaled by the interval
Gradients are averaged over devices with `lax.pmean`. The D optimiser uses StyleGAN2's
lazy-regularisation correction of Adam's learning rate and betas (mb_ratio = I/(I+1)); G has
no lazy regulariser and uses the plain setting. G's EMA follows StyleGAN2 (ema_kimg with a
ramp-up). Fakes are conditioned on cameras and FLAME parameters drawn from the dataset's labels
(the real batch's labels: a random draw of dataset conditions, as EG3D's gen_c), and the generator runs
exactly as at inference: generate_static (mapping → G → G_m → blending) then animate (FLAME →
G_d → binding) and the rasterizer.

Data layout of a step's batch (per device D, per-device batch B): image (D,B,R,R,3) float32 in
[-1,1], camera (D,B,25), FLAME fields (D,B,k).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

import rasterizer
from rasterizer.render import resolve_backend
from reta3d import atomic_files, errors
from reta3d import flame as flame_lib
from reta3d import losses
from reta3d.networks import generator as generator_lib
from reta3d.networks import stylegan2
from reta3d.networks.initialization import jit_init

FLAME_KEYS = ("shape", "expression", "global_pose", "neck_pose", "jaw_pose", "eye_pose")


# ------------------------------------------------------------------------------------------
# Models built from a config
# ------------------------------------------------------------------------------------------

def generator_config(config: ml_collections.ConfigDict) -> generator_lib.GeneratorConfig:
    m = config.model
    return generator_lib.GeneratorConfig(
        z_dim=m.z_dim, w_dim=m.w_dim, c_dim=m.c_dim, uv_resolution=m.uv_resolution,
        mouth_resolution=m.mouth_resolution, channel_base=m.channel_base,
        channel_max=m.channel_max, mouth_channel_base=m.mouth_channel_base,
        mouth_channel_max=m.mouth_channel_max, mapping_layers=m.mapping_layers,
        conv_clamp=m.conv_clamp, expression_dims=m.expression_dims, gd_channels=m.gd_channels,
        frame_kind=config.head.frame_kind, dtype=m.dtype,
        mouth_generator=m.get("mouth_generator", True), dynamic_module=m.get("dynamic_module", True))


def build_generator(config) -> generator_lib.RETA3DGenerator:
    model = flame_lib.load(config.head.flame_model, config.head.flame_uv)
    return generator_lib.RETA3DGenerator.create(generator_config(config), model,
                                                config.head.get("log_gamma_s"))


def sees_alpha(config) -> bool:
    """Whether D sees alpha as a 4th channel (`config.disc.alpha_channel`; GGHead's
    `use_masks`, not in the paper, whose D sees RGB only)."""
    return bool(config.disc.get("alpha_channel", False))


def discriminator_channels(config) -> int:
    """D's input channels: RGB, plus alpha when `sees_alpha(config)`."""
    return 4 if sees_alpha(config) else 3


def discriminator_view(config, images, alpha, xp=jnp):
    """What D sees of an image: images (..., R, R, 3) in [-1, 1], with alpha (..., R, R) or
    (..., R, R, 1) in [0, 1] as a 4th channel in [-1, 1] when `sees_alpha(config)` (the real
    images' mattes, the fakes' rendered alpha). xp: jnp in the steps, np on the host."""
    if not sees_alpha(config):
        return images
    alpha = alpha if alpha.ndim == images.ndim else alpha[..., None]
    return xp.concatenate([images, alpha * 2.0 - 1.0], axis=-1).astype(images.dtype)


def real_images(config, batch) -> np.ndarray:
    """The loader's batch (image in [-1, 1], alpha in [0, 1]; the loader leaves alpha out
    when D does not see it) → D's view of its images, (..., R, R, 3 or 4) float32, on the
    host (`discriminator_view`)."""
    return discriminator_view(config, batch["image"], batch.get("alpha"), xp=np)


def check_alpha_data(config) -> None:
    """Raises `errors.InputError` when D is to see alpha but the dataset's images carry none
    (an all-opaque matte would teach D that a head fills the frame)."""
    if not sees_alpha(config):
        return
    if config.data.get("synthetic", False):
        from reta3d import synthetic
        if not synthetic.writes_matte(config.render.background):
            raise errors.InputError(
                "config.disc.alpha_channel is True but the synthetic dataset keeps its alpha "
                f"only over white (config.render.background=1.0, got {config.render.background})"
                ": pass --config.disc.alpha_channel=False or --config.render.background=1.0")
        return
    from reta3d.data import folder as folder_lib
    path = pathlib.Path(config.data.path)
    if not path.is_dir():
        return  # prepare_data words the missing folder
    missing = folder_lib.images_without_alpha(path)
    if missing:
        raise errors.InputError(
            f"config.disc.alpha_channel is True but {len(missing)} "
            f"{'image of' if len(missing) == 1 else 'images of'} {path} "
            f"{'has' if len(missing) == 1 else 'have'} no alpha channel "
            f"(first: {path / missing[0]}): D would see "
            f"{'it' if len(missing) == 1 else 'them'} as opaque "
            "everywhere. Give every image its matte as an RGBA PNG (alpha = foreground), or "
            "pass --config.disc.alpha_channel=False")


def build_discriminator(config) -> stylegan2.Discriminator:
    d = config.disc
    return stylegan2.Discriminator(
        c_dim=25, img_resolution=config.render.resolution,
        img_channels=discriminator_channels(config),
        channel_base=d.channel_base, channel_max=d.channel_max, conv_clamp=d.conv_clamp,
        mbstd_group_size=d.mbstd_group_size)


def uses_vgg(config) -> bool:
    """Whether training computes L_ID (Sec. 2.4), i.e. needs the VGG16 of config.loss.vgg16: only
    with G_d (the Tab. 1(c) rows without it have no L_ID) and lambda_id > 0."""
    return bool(config.model.get("dynamic_module", True)) and config.loss.lambda_id > 0


def check_vgg_weights(config) -> None:
    """Raises MissingInputError when L_ID is on and config.loss.vgg16 names no file."""
    choice = config.loss.vgg16
    if uses_vgg(config) and choice != "random" and not pathlib.Path(choice).is_file():
        raise errors.MissingInputError(
            f"config.loss.vgg16={choice!r}: VGG16 weights not found. Convert torchvision's "
            "vgg16-397923af.pth with `python experiments/convert_vgg16.py "
            "--input=vgg16-397923af.pth --output=vgg16.npz` (README, 'Pretrained VGG16 for L_ID'), or set "
            "--config.loss.vgg16=random to use a fixed random VGG16 explicitly.")


# Settings that do not change the networks' parameters: a run may resume with others (the
# FLAME files' paths too: a moved file is the same model).
_RESUMABLE_MODEL_KEYS = {"model.dtype", "model.conv_clamp", "disc.conv_clamp",
                         "disc.mbstd_group_size", "head.flame_model", "head.flame_uv"}
# What a run saved before a setting existed did: its value then.
_SETTING_BEFORE_IT_EXISTED = {"disc.alpha_channel": False}


def check_resume_config(workdir: pathlib.Path, config) -> None:
    """Raises `errors.InputError` when `workdir` holds checkpoints of another network: its
    config.json differs from `config` in `model`, `head`, `disc` or `render.resolution`
    (other than the settings in _RESUMABLE_MODEL_KEYS). A key the saved config lacks (a run from
    before it existed) counts as what such runs did (_SETTING_BEFORE_IT_EXISTED), or is not
    compared. Without this, the restore fails deep in orbax with pages of shape errors, after
    the run's config.json was overwritten."""
    saved_file = workdir / "config.json"
    checkpoints = workdir / "checkpoints"
    if not saved_file.is_file() or not checkpoints.is_dir() or not any(
            child.name.isdigit() for child in checkpoints.iterdir()):
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as error:
        raise errors.InputError(f"{saved_file} cannot be read ({error}): the checkpoints beside "
                                "it cannot be matched to this config; use a new --workdir")
    wanted = config.to_dict()
    differ = []
    for section in ("model", "head", "disc"):
        have, want = saved.get(section, {}), wanted.get(section, {})
        for key in sorted(want):
            name = f"{section}.{key}"
            if name in _RESUMABLE_MODEL_KEYS:
                continue
            if key not in have and name not in _SETTING_BEFORE_IT_EXISTED:
                continue
            old = have.get(key, _SETTING_BEFORE_IT_EXISTED.get(name))
            if old != want[key]:
                differ.append((name, old, want[key]))
    old_res = saved.get("render", {}).get("resolution")
    if old_res != config.render.resolution:
        differ.append(("render.resolution", old_res, config.render.resolution))
    if differ:
        listing = ", ".join(f"{name}={old!r} there, {new!r} here" for name, old, new in differ)
        flags = " ".join(f"--config.{name}={old}" for name, old, _ in differ)
        raise errors.InputError(
            f"{workdir} holds checkpoints of another network ({listing}): use a new --workdir "
            f"for this config, or resume that run with its own settings ({flags})")


def check_workdir(workdir: pathlib.Path) -> None:
    """Raises InputError when `workdir` exists and is not a folder (or lies under a file)."""
    for path in (workdir, *workdir.parents):
        if path.exists() and not path.is_dir():
            raise errors.InputError(
                f"--workdir={workdir}: {path} is a file, not a folder; choose another --workdir")


def build_vgg_features(config):
    """The VGG16 feature function for L_ID and a description of which weights it uses."""
    from reta3d import vgg
    choice = config.loss.vgg16
    layers = tuple(config.loss.vgg_layers)
    if choice == "random":
        return vgg.make_vgg16_features_fn(vgg.random_vgg16_params(0), layers), \
            f"VGG16 for L_ID: fixed random initialisation (config.loss.vgg16='random'), {layers}"
    check_vgg_weights(config)
    return vgg.make_vgg16_features_fn(vgg.load_vgg16_params(choice), layers), \
        f"VGG16 for L_ID: pretrained weights from {choice}, {layers}"


# ------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    """Everything a checkpoint holds (arrays only). Replicated over devices when training."""
    step: jax.Array           # () int32, completed iterations
    g_vars: Any               # generator variables {"params", "buffers", "mapping_state"}
    g_ema: Any                # EMA copy of g_vars (what sampling and metrics use)
    d_vars: Any               # discriminator variables {"params"}
    g_opt: Any
    d_opt: Any
    rng: jax.Array            # (2,) uint32 raw key data


def make_optimizers(config):
    o = config.optim
    g_tx = optax.adam(o.g_lr, b1=o.b1, b2=o.b2, eps=o.eps)
    lr, b1, b2 = losses.lazy_regularization_adam(o.d_lr, o.b1, o.b2, config.loss.r1_interval)
    d_tx = optax.adam(lr, b1=b1, b2=b2, eps=o.eps)
    return g_tx, d_tx


def create_train_state(config, generator, discriminator, rng) -> TrainState:
    init_key, rng = jax.random.split(rng)
    # Initialisation draws from "rbg" keys made from the run's key: threefry's many random
    # draws take XLA twice as long to compile. Jitted (Flax init run op by op is far
    # slower), with LLVM's optimisation off: the programs run once (networks.initialization).
    init_key = jax.random.wrap_key_data(jax.random.bits(init_key, (4,), jnp.uint32), impl="rbg")
    g_key, d_key = jax.random.split(init_key)
    g_vars = generator.init(g_key)    # jit_init already
    res = config.render.resolution
    d_vars = jit_init(discriminator.init)(
        d_key, jnp.zeros((1, res, res, discriminator.img_channels)), jnp.zeros((1, 25)))
    g_tx, d_tx = make_optimizers(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32), g_vars=g_vars, g_ema=g_vars, d_vars=d_vars,
        g_opt=g_tx.init(g_vars["params"]), d_opt=d_tx.init(d_vars["params"]),
        rng=jax.random.key_data(rng))


def ema_beta(config, step: int) -> float:
    """StyleGAN2's G EMA: half-life ema_kimg, ramped up to `ema_rampup` × images seen."""
    batch = config.train.batch_size
    ema_nimg = config.train.ema_kimg * 1000
    if config.train.ema_rampup is not None:
        ema_nimg = min(ema_nimg, (step + 1) * batch * config.train.ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


# ------------------------------------------------------------------------------------------
# The generator as the steps use it
# ------------------------------------------------------------------------------------------

def fit_flame(flame: Dict[str, jax.Array], model) -> Dict[str, jax.Array]:
    """Dataset FLAME vectors → the head model's sizes (the dataset stores 100 shape / 50
    expression coefficients; the embedded template holds fewer; missing ones count as zero)."""
    out = {}
    for key in FLAME_KEYS:
        value = flame[key]
        if key == "shape":
            value = value[:, :model.num_shape]
        elif key == "expression":
            value = value[:, :model.num_expression]
        out[key] = value
    return out


def fake_conditions(batch):
    """Cameras and FLAME parameters for the fakes: the labels of this step's real batch.

    The real batch is a uniform random draw from the dataset, so its labels are a random draw
    of dataset conditions (EG3D draws gen_c from the dataset's labels the same way); using
    them as they are keeps a step identical whatever the number of devices."""
    return batch["camera"], {k: batch[k] for k in FLAME_KEYS}


def random_batch(config, num_devices: int, per_device: int, rng):
    """A random training batch shaped as the train steps take it, for benchmarks and profiling:
    images (D, B, R, R, C) uniform in [-1, 1] (C = `discriminator_channels`), look-at cameras
    (D, B, 25), FLAME fields (D, B, k) float32 with the dataset's widths (100 shape, 50
    expression)."""
    from rasterizer.types import look_at_eg3d_label
    n = num_devices * per_device
    res = config.render.resolution
    cams = np.stack([look_at_eg3d_label(rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.2))
                     for _ in range(n)])
    batch = {"image": rng.uniform(-1, 1, (n, res, res, discriminator_channels(config))),
             "camera": cams,
             "shape": rng.normal(0, 0.5, (n, 100)), "expression": rng.normal(0, 0.5, (n, 50)),
             "global_pose": np.zeros((n, 3)), "neck_pose": rng.normal(0, 0.05, (n, 3)),
             "jaw_pose": np.abs(rng.normal(0, 0.1, (n, 3))), "eye_pose": np.zeros((n, 6))}
    return {k: np.asarray(v, np.float32).reshape((num_devices, per_device) + v.shape[1:])
            for k, v in batch.items()}


def swap_conditioning(key, cameras, prob: float):
    """EG3D's generator pose conditioning regulariser: with probability `prob` per sample the
    mapping network sees another sample's camera (the batch rolled by one), so the generator
    cannot tie its 3D content to the camera it will be rendered from."""
    if prob <= 0:
        return cameras
    swap = jax.random.uniform(key, (cameras.shape[0], 1)) < prob
    return jnp.where(swap, jnp.roll(cameras, 1, axis=0), cameras)


def global_latents(key, per_device: int, z_dim: int):
    """This device's slice of latents drawn for the GLOBAL batch, so that the fakes of a step
    do not depend on how the batch is split over devices."""
    num = jax.lax.psum(1, "batch")
    z = jax.random.normal(key, (num * per_device, z_dim))
    return jax.lax.dynamic_slice_in_dim(z, jax.lax.axis_index("batch") * per_device, per_device)


def render_capacity(config, num_gaussians: int) -> int:
    """The rasterizer's intersection capacity for training renders: `config.render.capacity`,
    or the rasterizer's default for N Gaussians at the render resolution."""
    capacity = config.render.get("capacity")
    if capacity:
        return int(capacity)
    res = config.render.resolution
    return rasterizer.binning.default_capacity(num_gaussians, res, res)


def _render_kwargs(config, gaussians, cameras25):
    """The training renders' keyword arguments for `rasterizer.render`/`render_pair`."""
    return dict(camera=rasterizer.Camera.from_eg3d(cameras25, config.render.resolution),
                background=jnp.full((3,), config.render.background, jnp.float32),
                backend=config.render.backend,
                capacity=render_capacity(config, gaussians.means.shape[-2]))


def render_images(config, gaussians, cameras25, *, rgb_only: bool = False):
    """Gaussians (B,N,·) seen by EG3D cameras (B,25) → (images (B,R,R,C) in [-1,1] as D sees
    them (`discriminator_view`: C = 3, or 4 with alpha last; C = 3 with rgb_only), needed (B,)
    int32: the tile intersections each image has, i.e. the capacity it needs; those beyond
    the capacity were dropped, `rasterizer.RenderOutput.intersections`)."""
    out = rasterizer.render(gaussians, **_render_kwargs(config, gaussians, cameras25))
    if rgb_only:
        return out.color * 2.0 - 1.0, out.intersections
    return discriminator_view(config, out.color * 2.0 - 1.0, out.alpha), out.intersections


def render_images_pair(config, gaussians, gaussians_b, cameras25):
    """`render_images` through `rasterizer.render_pair`: one render of `gaussians`, returned
    as (images, images_b, needed) with images_b's gradient going to `gaussians_b` (same
    values, another gradient path). images as D sees them; images_b RGB only (for L_ID)."""
    out, out_b = rasterizer.render_pair(gaussians, gaussians_b,
                                        **_render_kwargs(config, gaussians, cameras25))
    return (discriminator_view(config, out.color * 2.0 - 1.0, out.alpha),
            out_b.color * 2.0 - 1.0, out.intersections)


def dropped_fraction(overflow, capacity: int):
    """Fraction of an image's tile intersections dropped: an image that overflows by o has
    used all `capacity` slots, so it had capacity + o intersections. (B,) float32."""
    overflow = overflow.astype(jnp.float32)
    return overflow / (capacity + overflow)


def _noise_key(rng):
    """The key of G's per-layer noise in a forward keyed by `rng` (synthesize_static's, and
    animate's per-frame rerun of G for the generators without G_d)."""
    return jax.random.split(rng, 3)[2]


def animate_fakes(generator, g_vars, static, flame, rng, *, train: bool, noise_mode: str,
                  use_dynamic: bool = True):
    """generator.animate for a training/sampling forward. Only the Tab. 1(c) generators without
    G_d rerun G in animate; they get the same noise as `synthesize_static` would use."""
    if generator.config.expression_conditioned:
        return generator.animate(g_vars, static, flame, use_dynamic=use_dynamic,
                                 noise_mode=noise_mode if train else "const", rng=_noise_key(rng))
    return generator.animate(g_vars, static, flame, use_dynamic=use_dynamic)


def synthesize_static(config, generator, g_vars, z, cameras, rng, *, train: bool,
                      style_mixing_prob: float = 0.0, noise_mode: str = "random", cond_cameras=None):
    """The static part of a training/sampling forward: mapping (conditioned on `cond_cameras`,
    default `cameras`), style mixing, G, G_m and the blending ConvNet.

    z (B, z_dim), cameras (B, 25) → (StaticMaps, mapping_state: the updated w_avg when
    `train`, else None). `rng` is the same key `generate_images` takes.
    """
    mix_key, z2_key, _ = jax.random.split(rng, 3)
    noise_key = _noise_key(rng)
    cond = cameras if cond_cameras is None else cond_cameras
    mapping_state = None
    if train:
        ws, updated = generator.map_latents(g_vars, z, cond, update_w_avg=True)
        mapping_state = updated["mapping_state"]
    else:
        ws = generator.map_latents(g_vars, z, cond)
    if style_mixing_prob > 0:
        z2 = jax.random.normal(z2_key, z.shape)
        ws2 = generator.map_latents(g_vars, z2, cond)
        ws = stylegan2.apply_style_mixing(mix_key, ws, ws2, style_mixing_prob)
    static = generator.synthesize(g_vars, ws, noise_mode=noise_mode if train else "const",
                                  rng=noise_key)
    return static, mapping_state


def render_static_images(config, generator, g_vars, static, flame, cameras):
    """I_s: the static maps decoded without G_d and rendered → (RGB images (B,R,R,3) in
    [-1,1], needed (B,) int32). `flame` already fitted to the head model (`fit_flame`)."""
    gaussians, _ = generator.animate(g_vars, static, flame, use_dynamic=False)
    return render_images(config, gaussians, cameras, rgb_only=True)


def generate_images(config, generator, g_vars, z, cameras, flame, rng, *, train: bool,
                    static_images: bool = False, style_mixing_prob: float = 0.0,
                    noise_mode: str = "random", cond_cameras=None):
    """z (B,z_dim), cameras (B,25), FLAME dict → dict(images (B,R,R,C) as D sees them,
    `render_images`; [static_images] (B,R,R,3), aux,
    mapping_state, needed (B,) int32 tile intersections (`render_images`), the larger of the two
    renders).

    `cameras` are the rendering cameras; the mapping network is conditioned on `cond_cameras`
    (default: the same), as EG3D's generator pose conditioning.

    The same split as inference: generate_static (mapping, G, G_m, blending) once, then
    animate (FLAME, G_d, binding); `static_images` also renders I_s (the static maps without
    G_d) for L_ID.
    """
    flame = fit_flame(flame, generator.flame_model)
    static, mapping_state = synthesize_static(
        config, generator, g_vars, z, cameras, rng, train=train,
        style_mixing_prob=style_mixing_prob, noise_mode=noise_mode, cond_cameras=cond_cameras)
    gaussians, aux = animate_fakes(generator, g_vars, static, flame, rng, train=train,
                                   noise_mode=noise_mode)
    images, needed = render_images(config, gaussians, cameras)
    out = {"images": images, "aux": aux, "mapping_state": mapping_state, "needed": needed}
    if static_images:
        out["static_images"], needed_s = render_static_images(config, generator, g_vars, static,
                                                                flame, cameras)
        out["needed"] = jnp.maximum(needed, needed_s)
    return out


def generator_gradients(config, generator, weights, d_logits_fn, vgg_features, g_vars, z,
                        cameras, flame, rng, *, style_mixing_prob=0.0, noise_mode="random",
                        cond_cameras=None):
    """Eq. 2 and its gradient with respect to g_vars["params"], with L_ID reaching G_d only.

    The paper introduces L_ID "specifically for the dynamic module" (Sec. 2.4): it keeps
    I_d = render(F + ΔF) close to I_s = render(F) by training G_d; it must not also pull
    G, G_m and the blending ConvNet (which I_d depends on through F) toward whatever
    makes the two renders agree. A plain jax.grad of the sum cannot do that, because L_adv
    and L_ID meet at the same image I_d. So the forward is taken as two VJPs, the static
    part (mapping → F) and the dynamic part (G_d, decoding, render: (θ_d, F) → I_d), and the
    dynamic part carries two handles on I_d: the one every term but L_ID sees (its
    cotangent reaches θ_d and F, and on through the static part) and L_ID's, computed from F
    with its gradient stopped (its cotangent λ_ID·∂L_ID/∂I_d reaches θ_d only).
    `rasterizer.render_pair` renders I_d once for both and pulls the two cotangents back in
    one reverse sweep; the only extra work is a second backward of G_d and the decoding.
    The result equals jax.grad of every term but L_ID, plus the gradient of λ_ID·L_ID
    masked to params["dynamic"] (tests/test_train_reference.py checks exactly that).

    z (B, z_dim), cameras (B, 25), flame: dict of (B, k). weights: losses.LossWeights.
    d_logits_fn(images, cameras) → (B, 1) logits. vgg_features: needed when weights.identity > 0.
    Returns (total scalar, terms dict of scalars, mapping_state, needed (B,) int32, grads).
    """
    g_params = g_vars["params"]
    use_id = weights.identity > 0
    flame = fit_flame(flame, generator.flame_model)
    # L_scale's target per Gaussian, (N, 1): the same γs the decoding uses.
    gamma_s = jnp.exp(jnp.asarray(generator.head_binding.log_gamma_s))[:, None]

    def render_terms(outputs):
        images, offset_raw, scales = outputs
        terms = {"adversarial": losses.generator_adversarial(d_logits_fn(images, cameras)),
                 "offset": losses.offset_regularizer(offset_raw),
                 "scale": losses.scale_regularizer(scales, gamma_s=gamma_s)}
        return losses.generator_total(terms, weights), terms

    if generator.config.expression_conditioned:
        return _gradients_without_gd(config, generator, render_terms, g_vars, z, cameras, flame,
                                     rng, style_mixing_prob, noise_mode, cond_cameras)

    def static_part(params):
        return synthesize_static(config, generator, dict(g_vars, params=params), z, cameras, rng,
                                 train=True, style_mixing_prob=style_mixing_prob,
                                 noise_mode=noise_mode, cond_cameras=cond_cameras)

    def dynamic_part(dynamic_params, static):
        variables = dict(g_vars, params=dict(g_params, dynamic=dynamic_params))
        gaussians, aux = generator.animate(variables, static, flame, use_dynamic=True)
        if not use_id:
            images, needed = render_images(config, gaussians, cameras)
            return (images, aux["offset_raw"], aux["scales"]), needed
        # L_ID's handle on the same Gaussians: F's gradient stopped, so its cotangent reaches
        # θ_d only. The forward is the same computation (XLA merges it); render_pair renders
        # once and pulls both cotangents back in one sweep.
        gaussians_id, _ = generator.animate(variables, jax.lax.stop_gradient(static), flame,
                                            use_dynamic=True)
        images, images_id, needed = render_images_pair(config, gaussians, gaussians_id,
                                                         cameras)
        return (images, aux["offset_raw"], aux["scales"], images_id), needed

    static, static_pullback, mapping_state = jax.vjp(static_part, g_params, has_aux=True)
    outputs, dynamic_pullback, needed = jax.vjp(dynamic_part, g_params["dynamic"], static,
                                                  has_aux=True)
    (_, terms), cotangent = jax.value_and_grad(render_terms, has_aux=True)(outputs[:3])
    if use_id:
        static_images, needed_s = render_static_images(
            config, generator, g_vars, jax.lax.stop_gradient(static), flame, cameras)
        needed = jnp.maximum(needed, needed_s)
        identity, id_cotangent = jax.value_and_grad(
            lambda images: losses.identity_loss(vgg_features, images, static_images))(outputs[3])
        cotangent = cotangent + (weights.identity * id_cotangent,)
        terms["identity"] = identity
    grad_dynamic, grad_static = dynamic_pullback(cotangent)
    terms["dynamic_weights"], grad_l2 = jax.value_and_grad(losses.weight_l2)(g_params["dynamic"])
    (grads,) = static_pullback(grad_static)
    grads = dict(grads, dynamic=jax.tree_util.tree_map(
        lambda a, b, c: a + b + weights.dynamic_weights * c,
        grads["dynamic"], grad_dynamic, grad_l2))
    total = losses.generator_total(terms, weights)
    return total, terms, mapping_state, needed, grads


def _gradients_without_gd(config, generator, render_terms, g_vars, z, cameras, flame, rng,
                          style_mixing_prob, noise_mode, cond_cameras):
    """Eq. 2 for Tab. 1(c)'s generators without G_d: L_adv + L_offset + L_scale. L_ID and
    L_reg^{G_d} are the dynamic module's terms (Sec. 2.4) and drop out with it; every frame's
    maps come from G itself (the expression conditions it), so one plain gradient suffices.
    Returns what `generator_gradients` returns."""

    def loss(params):
        out = generate_images(config, generator, dict(g_vars, params=params), z, cameras, flame,
                              rng, train=True, style_mixing_prob=style_mixing_prob,
                              noise_mode=noise_mode, cond_cameras=cond_cameras)
        aux = out["aux"]
        total, terms = render_terms((out["images"], aux["offset_raw"], aux["scales"]))
        return total, (terms, out["mapping_state"], out["needed"])

    (total, (terms, mapping_state, needed)), grads = jax.value_and_grad(loss, has_aux=True)(
        g_vars["params"])
    return total, terms, mapping_state, needed, grads


# ------------------------------------------------------------------------------------------
# The steps (per device; pmapped by `make_steps`)
# ------------------------------------------------------------------------------------------

def _step_keys(state: TrainState, phase: int):
    """(shared key, per-device key) for this step and phase: latents come from the shared one
    (see `global_latents`), per-sample noise and style mixing from the per-device one."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), phase)
    return key, jax.random.fold_in(key, jax.lax.axis_index("batch"))


def make_steps(config, generator, discriminator, vgg_features=None, devices=None):
    """Returns dict(g_step, d_step, d_reg_step), each a jax.pmap over axis "batch" (over
    `devices`, default all local devices), and `trace_counts`: how often each was traced
    (1 per phase in a healthy run: every recompilation retraces)."""
    g_tx, d_tx = make_optimizers(config)
    weights = losses.LossWeights(offset=config.loss.lambda_offset, scale=config.loss.lambda_scale,
                                 dynamic_weights=config.loss.lambda_gd,
                                 identity=config.loss.lambda_id, r1_gamma=config.loss.r1_gamma)
    use_id = weights.identity > 0 and generator.config.dynamic_module
    if use_id and vgg_features is None:
        raise ValueError("lambda_id > 0 needs a VGG16 feature function")
    z_dim = config.model.z_dim
    mixing = float(config.train.style_mixing_prob)
    noise_mode = config.train.noise_mode
    gpc_prob = float(config.train.gpc_reg_prob)
    capacity = render_capacity(config, generator.num_gaussians)

    def d_logits(d_params, images, cameras):
        return discriminator.apply({"params": d_params}, images, cameras)

    def g_step(state: TrainState, batch, ema_decay):
        z_key, gen_key = _step_keys(state, 0)
        cameras, flame = fake_conditions(batch)
        z = global_latents(z_key, cameras.shape[0], z_dim)
        cond = swap_conditioning(jax.random.fold_in(gen_key, 7), cameras, gpc_prob)

        total, terms, mapping_state, needed, grads = generator_gradients(
            config, generator, weights, functools.partial(d_logits, state.d_vars["params"]),
            vgg_features, state.g_vars, z, cameras, flame, gen_key, style_mixing_prob=mixing,
            noise_mode=noise_mode, cond_cameras=cond)
        grads = jax.lax.pmean(grads, "batch")
        mapping_state = jax.lax.pmean(mapping_state, "batch")
        updates, g_opt = g_tx.update(grads, state.g_opt, state.g_vars["params"])
        g_params = optax.apply_updates(state.g_vars["params"], updates)
        g_vars = dict(state.g_vars, params=g_params, mapping_state=mapping_state)
        # EMA of the parameters; the tracked w_avg and the noise buffers are copied.
        g_ema = dict(g_vars, params=jax.tree_util.tree_map(
            lambda e, p: p + (e - p) * ema_decay, state.g_ema["params"], g_params))
        metrics = {f"g_{k}": v for k, v in terms.items()}
        metrics["g_total"] = total
        overflow = jnp.maximum(needed - capacity, 0)
        metrics["render_dropped_fraction"] = jnp.mean(dropped_fraction(overflow, capacity))
        metrics = jax.lax.pmean(metrics, "batch")
        # The largest overflow of any image on any device: what the capacity must grow by;
        # the most intersections of any image: what it may shrink to (train_and_evaluate).
        metrics["render_overflow_max"] = jax.lax.pmax(jnp.max(overflow), "batch")
        metrics["render_intersections_max"] = jax.lax.pmax(jnp.max(needed), "batch")
        return state.replace(g_vars=g_vars, g_ema=g_ema, g_opt=g_opt), metrics

    def d_step(state: TrainState, batch):
        z_key, gen_key = _step_keys(state, 1)
        cameras, flame = fake_conditions(batch)
        z = global_latents(z_key, cameras.shape[0], z_dim)
        cond = swap_conditioning(jax.random.fold_in(gen_key, 7), cameras, gpc_prob)
        fake = generate_images(config, generator, state.g_vars, z, cameras, flame, gen_key,
                               train=True, style_mixing_prob=mixing, noise_mode=noise_mode,
                               cond_cameras=cond)["images"]
        fake = jax.lax.stop_gradient(fake)

        def loss_fn(d_params):
            fake_logits = d_logits(d_params, fake, cameras)
            real_logits = d_logits(d_params, batch["image"], batch["camera"])
            loss = losses.discriminator_adversarial(fake_logits, real_logits)
            return loss, (jnp.mean(fake_logits), jnp.mean(real_logits))

        (loss, (fake_mean, real_mean)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.d_vars["params"])
        grads = jax.lax.pmean(grads, "batch")
        updates, d_opt = d_tx.update(grads, state.d_opt, state.d_vars["params"])
        d_params = optax.apply_updates(state.d_vars["params"], updates)
        metrics = jax.lax.pmean({"d_loss": loss, "d_fake_logits": fake_mean,
                                 "d_real_logits": real_mean}, "batch")
        return state.replace(d_vars=dict(state.d_vars, params=d_params), d_opt=d_opt,
                             step=state.step + 1), metrics

    def d_reg_step(state: TrainState, batch):
        def loss_fn(d_params):
            penalty, _ = losses.r1_penalty(lambda x, c: d_logits(d_params, x, c),
                                           batch["image"], batch["camera"])
            return losses.r1_loss(penalty, weights.r1_gamma, config.loss.r1_interval), penalty

        (loss, penalty), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.d_vars["params"])
        grads = jax.lax.pmean(grads, "batch")
        updates, d_opt = d_tx.update(grads, state.d_opt, state.d_vars["params"])
        d_params = optax.apply_updates(state.d_vars["params"], updates)
        metrics = jax.lax.pmean({"d_r1_penalty": penalty, "d_r1_loss": loss}, "batch")
        return state.replace(d_vars=dict(state.d_vars, params=d_params), d_opt=d_opt), metrics

    trace_counts = {"g_step": 0, "d_step": 0, "d_reg_step": 0}

    def counted(name, fn):
        # Runs only while tracing: a retrace (and so a recompilation) shows up in the count.
        @functools.wraps(fn)
        def wrapper(*args):
            trace_counts[name] += 1
            return fn(*args)
        return wrapper

    pmap = functools.partial(jax.pmap, axis_name="batch", donate_argnums=(0,), devices=devices)
    steps = {name: pmap(counted(name, fn)) for name, fn in
             (("g_step", g_step), ("d_step", d_step), ("d_reg_step", d_reg_step))}
    steps["trace_counts"] = trace_counts
    return steps


def replicate(tree, devices=None):
    """One copy per device (default: all local devices) along a new leading axis, placed the way
    a pmapped step returns its outputs, so the first step does not compile a second variant
    for differently placed inputs."""
    devices = jax.local_devices() if devices is None else list(devices)
    stacked = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (len(devices),) + jnp.shape(x)), tree)
    return jax.pmap(lambda x: x, axis_name="batch", devices=devices)(stacked)


def phase_args(batch, num_devices: int, ema_decay: float = 0.999) -> Dict[str, tuple]:
    """The arguments after `state` of each step of make_steps, for benchmarks timing the
    phases one by one: {"g_step": (batch, decay), "d_step": (batch,), "d_reg_step": (batch,)}."""
    decay = jnp.full((num_devices,), ema_decay, jnp.float32)
    return {"g_step": (batch, decay), "d_step": (batch,), "d_reg_step": (batch,)}


# Benchmarks grow the capacity to at most this many times where it started: at random init the
# paper config's worst training image overflows so far that training grows it to N·tiles
# (64.5M at 512², from 0.5M) for its first steps, then shrinks it (SHRINK_WINDOW_STEPS); a
# benchmark's few steps would time only that start (README, "A grown capacity shrinks again").
BENCHMARK_CAPACITY_GROWTH = 16


def warm_up_steps(config, generator, discriminator, vgg_features, state, batch, warmup: int,
                  capacity_limit: Optional[int] = None):
    """make_steps, then `warmup` (>= 1) calls of each phase on `batch`, for benchmarks. When
    the G step's renders drop tile intersections (a random-init generator at 512² does), the
    capacity grows as in train_and_evaluate, up to `capacity_limit` (config.render.capacity is
    set), and the steps are made and warmed up again, so that what a benchmark then times is
    the step training runs. `state` replicated. Returns (steps, state, the last G step's
    step_overflow)."""
    args = phase_args(batch, state.step.shape[0])
    while True:
        steps = make_steps(config, generator, discriminator, vgg_features)
        for _ in range(max(1, warmup)):
            for phase, phase_arguments in args.items():
                state, metrics = steps[phase](state, *phase_arguments)
                jax.block_until_ready(metrics)
                if phase == "g_step":
                    overflow = step_overflow(metrics)
        grown = capacity_after(config, generator.num_gaussians, overflow, capacity_limit)
        if grown is None:
            return steps, state, overflow
        logging.info("benchmark warm-up: rasterizer capacity %d -> %d", render_capacity(
            config, generator.num_gaussians), grown)
        set_render_capacity(config, grown)


def unreplicate(tree):
    """The first replica of a replicated tree, as device arrays (one gather per leaf)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def host_replica(tree):
    """The first local replica of a replicated tree as numpy arrays, copied from device 0's
    buffers without any device computation: `jax.device_get(unreplicate(tree))` dispatches
    one gather per leaf (808 for the demo's state, about 1 s at the first checkpoint, 7 ms
    this way)."""
    def first(x):
        if isinstance(x, jax.Array):
            x = x.addressable_shards[0].data   # (1, ...) on CPU and GPU alike
        # A copy: on the CPU np.asarray can alias the device buffer, which the next step donates.
        return np.array(np.asarray(x)[0])
    return jax.tree_util.tree_map(first, tree)


def train_iteration(steps, state, batch, ema_decay, step: int, r1_interval: int):
    """One iteration: G step, D step, and the lazy R1 step when `step % r1_interval == 0`.
    `state` is replicated (leading axis = the devices the steps were pmapped over)."""
    num_devices = state.step.shape[0]
    decay = jnp.full((num_devices,), ema_decay, jnp.float32)
    state, g_metrics = steps["g_step"](state, batch, decay)
    state, d_metrics = steps["d_step"](state, batch)
    metrics = {**g_metrics, **d_metrics}
    if r1_interval > 0 and step % r1_interval == 0:
        state, r_metrics = steps["d_reg_step"](state, batch)
        metrics.update(r_metrics)
    return state, metrics


# ------------------------------------------------------------------------------------------
# Evaluation helpers: sample grids and SWD
# ------------------------------------------------------------------------------------------

def make_sample_fn(config, generator):
    """jit: (g_vars, z (B,z), cameras (B,25), flame, cond_cameras (B,25)) → RGB images
    (B,R,R,3) in [-1,1] (const noise), rendered at `cameras`, the mapping conditioned on
    `cond_cameras`."""
    def sample(g_vars, z, cameras, flame, cond_cameras):
        return generate_images(config, generator, g_vars, z, cameras, flame,
                               jax.random.PRNGKey(0), train=False,
                               cond_cameras=cond_cameras)["images"][..., :3]
    return jax.jit(sample)


def _to_uint8(images):
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_grid_inputs(config, source, num_latents=4, seed=1234):
    """Fixed latents × (3 cameras + 2 expressions): rows are identities, columns conditions."""
    from rasterizer.types import look_at_eg3d_label
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_latents, config.model.z_dim)).astype(np.float32)
    example = source[0]
    zero = {k: np.zeros_like(np.asarray(example[k], np.float32)) for k in FLAME_KEYS}
    columns = []
    for yaw in (-0.5, 0.0, 0.5):
        columns.append((look_at_eg3d_label(yaw, 0.0), dict(zero)))
    for record in (source[1 % len(source)], source[2 % len(source)]):
        flame = dict(zero, expression=np.asarray(record["expression"], np.float32),
                     jaw_pose=np.asarray(record["jaw_pose"], np.float32))
        columns.append((look_at_eg3d_label(0.0, 0.0), flame))
    return z, columns


SAMPLE_BATCH = 16   # every sampling call is padded to this batch: one compilation per run


def sample_in_batches(sample_fn, g_vars, z, cameras, flame, cond_cameras, batch=SAMPLE_BATCH):
    """`sample_fn` (from `make_sample_fn`) over any number of images, in calls of exactly
    `batch` (the last padded by repeating its final row, the padding dropped), so that one
    compilation serves the grids and the metrics. z (B, z_dim), cameras and cond_cameras
    (B, 25), flame dict of (B, k) → (B, R, R, 3) float32 in [-1, 1]."""
    n = int(np.shape(z)[0])
    out = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        pad = batch - (stop - start)

        def take(a):
            a = np.asarray(a)[start:stop]
            return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a
        images = sample_fn(g_vars, take(z), take(cameras), {k: take(v) for k, v in flame.items()},
                           take(cond_cameras))
        out.append(np.asarray(images)[:stop - start])
    return np.concatenate(out)


def render_sample_grid(sample_fn, g_vars, z, columns) -> np.ndarray:
    """(rows·R, cols·R, 3) uint8 grid; the mapping is conditioned on the frontal camera (as
    EG3D renders its videos), so the columns show one 3D head from several cameras."""
    from rasterizer.types import look_at_eg3d_label
    n = z.shape[0]
    cams = np.concatenate([np.repeat(camera[None], n, 0) for camera, _ in columns])
    flame = {k: np.concatenate([np.repeat(fl[k][None], n, 0) for _, fl in columns])
             for k in columns[0][1]}
    frontal = np.repeat(look_at_eg3d_label(0.0, 0.0)[None], len(cams), 0)
    images = sample_in_batches(sample_fn, g_vars, np.tile(z, (len(columns), 1)), cams, flame,
                               frontal)
    grid = _to_uint8(images).reshape((len(columns), n) + images.shape[1:])  # (cols, n, R, R, 3)
    cols, n, r = grid.shape[:3]
    return grid.transpose(1, 2, 0, 3, 4).reshape(n * r, cols * r, 3)


def evaluate_swd(config, sample_fn, g_vars, source, num_images, seed=0, batch=SAMPLE_BATCH):
    """SWD (Karras et al. 2018; ×1e3) between `num_images` dataset images and as many fakes
    conditioned on the same images' cameras and FLAME parameters."""
    from reta3d import metrics
    num_images = min(num_images, len(source))
    rng = np.random.default_rng(seed)
    index = rng.permutation(len(source))[:num_images]
    real, fake = [], []
    for start in range(0, num_images, batch):
        records = [source[int(i)] for i in index[start:start + batch]]
        cams = np.stack([np.asarray(r["camera"], np.float32) for r in records])
        flame = {k: np.stack([np.asarray(r[k], np.float32) for r in records]) for k in FLAME_KEYS}
        z = rng.standard_normal((len(records), config.model.z_dim)).astype(np.float32)
        # EG3D's metrics condition the mapping on the same camera the image is rendered from.
        fake.append(_to_uint8(sample_in_batches(sample_fn, g_vars, z, cams, flame, cams,
                                                batch)))
        real.append(np.stack([_resize_uint8(np.asarray(r["image"]), config.render.resolution)
                              for r in records]))
    return metrics.swd(np.concatenate(real), np.concatenate(fake), seed=seed)


def _resize_uint8(image, resolution):
    if image.shape[0] == resolution:
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.LANCZOS))


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

class _StopRequested(Exception):
    pass


def _maybe_initialize_distributed():
    """Multi-host: `jax.distributed.initialize` (before any JAX computation) when a
    coordinator is configured: JAX_COORDINATOR_ADDRESS (host:port of process 0, reachable
    from every host) with JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 … N−1), or a cluster JAX
    auto-detects (SLURM with several tasks, Open MPI, TPU pods), which supplies whatever of
    the three is unset; not again when already initialised. With several processes, a first
    barrier follows. Does nothing for a single process."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not jax.distributed.is_initialized() and (
            address or os.environ.get("SLURM_NTASKS", "1") != "1"):
        count, rank = _process_setting("JAX_NUM_PROCESSES"), _process_setting("JAX_PROCESS_ID")
        if count is not None and count < 1:
            raise errors.InputError(f"JAX_NUM_PROCESSES={count}: must be 1 or more")
        if count is not None and rank is not None and not 0 <= rank < count:
            raise errors.InputError(f"JAX_PROCESS_ID={rank} with JAX_NUM_PROCESSES={count}: the "
                                    f"process ids are 0 … {count - 1}, one per process")
        # JAX waits up to 5 minutes for every process, then aborts with a C++ stack trace:
        # say what it is waiting for first.
        print(f"Multi-host: process {'?' if rank is None else rank} of "
              f"{'?' if count is None else count}, waiting up to 300 s for all of them at the "
              f"coordinator {address or '(from the cluster)'} …", flush=True)
        jax.distributed.initialize(coordinator_address=address or None,
                                   num_processes=count, process_id=rank)
    if jax.process_count() > 1:
        # On CPU the first collective creates the gloo context, which waits only 30 s for
        # the other processes: make it now, while they are in step, not in the wait while
        # process 0 prepares the dataset (later collectives wait far longer).
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jax.distributed initialized")


def _process_setting(name: str):
    """An integer environment variable of the multi-host setup, None when unset."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.InputError(f"{name}={value!r}: not an integer") from None


def _all_loader_states(state: Dict[str, str]) -> list:
    """Every process's data-loader state, in process order. Orbax writes a checkpoint's JSON
    metadata from process 0 only, and each process reads its own slice of the data."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array(data.size)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes)]


def _own_loader_state(meta: Dict[str, Any]) -> Dict[str, str]:
    """This process's loader state from a checkpoint's metadata (see `_all_loader_states`)."""
    states = meta.get("loaders") or [meta["loader"]]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint's data-loader state is from {len(states)} process(es), "
                         f"this run has {jax.process_count()}: resume with the same number")
    return states[jax.process_index()]


def prepare_data(config):
    """The dataset source (TFDS array_record, read without TensorFlow); builds the embedded
    synthetic dataset first when the config asks for it and it is missing."""
    from reta3d.data import tfds_builder
    path = pathlib.Path(config.data.path)
    # Process 0 builds it (the path is shared by all hosts); the others wait below.
    if config.data.synthetic and jax.process_index() == 0:
        from reta3d import synthetic
        recipe = synthetic.recipe(config.data.synthetic_num_images, config.render.resolution,
                                  seed=config.seed, background=config.render.background,
                                  uv_resolution=config.data.synthetic_uv_resolution)
        try:
            reason = synthetic.rebuild_reason(path, recipe)
        except errors.InputError as e:
            raise errors.InputError(
                f"config.data.synthetic is True but {path} is not the synthetic dataset ({e}): "
                "to train on the dataset there pass --config.data.synthetic=False; for the "
                "synthetic one choose another --config.data.path") from e
        if reason:
            print(f"Building the synthetic dataset in {path} ({reason}; "
                  f"{config.data.synthetic_num_images} images at {config.render.resolution}px)...",
                  flush=True)
            t0 = time.time()
            synthetic.make_synthetic_dataset(path, config.data.synthetic_num_images,
                                             config.render.resolution, seed=config.seed,
                                             background=config.render.background,
                                             uv_resolution=config.data.synthetic_uv_resolution)
            print(f"  done in {time.time() - t0:.0f}s", flush=True)
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging
    tfds.disable_progress_bar()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds' per-call notices, not ours
    try:
        if jax.process_index() == 0:
            # Its warnings are printed, not logged: the verbosity above hides absl's.
            tfds_builder.prepare_dataset(path, config.render.resolution, warn=print)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("dataset prepared")
        # The masks are decoded only for a D that sees them.
        source = tfds_builder.load_data_source(path, config.render.resolution,
                                               masks=sees_alpha(config))
    finally:
        absl_logging.set_verbosity(verbosity)
    print(f"Dataset {path}: {len(source)} images at {config.render.resolution}px", flush=True)
    return source


def check_batch_size(batch_size: int, num_images: int, path, num_local_devices: int) -> None:
    """Raises `errors.InputError` (saying which flag to change) unless the dataset at `path`
    fills at least one global batch and the batch splits evenly over all devices, before
    anything is compiled or written."""
    devices = num_local_devices * jax.process_count()
    if batch_size <= 0 or batch_size % devices:
        raise errors.InputError(
            f"config.train.batch_size = {batch_size} must be a positive multiple of the "
            f"{devices} device(s) of this job: pass e.g. "
            f"--config.train.batch_size={devices * max(1, batch_size // devices)}")
    if num_images < batch_size:
        fits = num_images // devices * devices
        raise errors.InputError(
            f"{path} holds {num_images} image(s), fewer than one batch of {batch_size}: add "
            "images" + (f", or pass --config.train.batch_size={fits} (or less, a multiple "
                        f"of the {devices} device(s))" if fits else ""))


def seconds_left(steps_left: int, batch_size: int, window_rate: float, average_rate: float,
                 final_seconds: float = 0.0) -> float:
    """The ETA of the progress line, in seconds.

    The rate falls as training goes (the Gaussians grow and each image intersects more tiles),
    so the average rate since the first step overstates what is left; the last logging
    window's rate follows the slow-down but is noisy (a grid or checkpoint may fall in it).
    The slower of the two is the honest one. `final_seconds` adds the work after the last
    step (the final SWD, timed by the one at step 0).

    Args: steps left; global batch; window and average rates in images/s (> 0);
    final_seconds ≥ 0. Returns seconds (float).
    """
    rate = max(min(window_rate, average_rate), 1e-9)
    return steps_left * batch_size / rate + final_seconds


def run_result(step: int, meta: Dict[str, Any]) -> Dict[str, Any]:
    """What `train_and_evaluate` returns and prints last: the step, SWD at step 0 and at the
    end where measured, and their ratio when both are. A checkpoint's metadata can lack
    `swd_start` (written by a version that did not keep it), so it is never assumed."""
    result = {"step": step, **{k: meta[k] for k in ("swd_start", "swd_end") if meta.get(k) is not None}}
    if "swd_start" in result and "swd_end" in result:
        result["swd_ratio"] = result["swd_end"] / result["swd_start"]
    return result


def swd_summary(result: Dict[str, Any]) -> str:
    """The last line before the result's JSON: SWD at both ends and their ratio, as measured."""
    end = f"at step {result['step']}: {result['swd_end']:.2f}"
    if "swd_start" not in result:
        return f"swd {end}"
    return f"swd at step 0: {result['swd_start']:.2f}  ->  {end}  (ratio {result['swd_ratio']:.2f})"


def _progress_line(step, total_steps, kimg, img_per_s, metrics, left):
    """One line per logged step. left (seconds) None: not yet known (the first step includes
    compilation, so its rate says nothing about the rest)."""
    def fmt(v):
        return f"{v:.3f}"
    shown = " ".join(f"{k}={fmt(v)}" for k, v in sorted(metrics.items())
                     if k in ("g_adversarial", "g_total", "d_loss", "d_r1_penalty", "g_identity"))
    dropped = metrics.get("render_dropped_fraction", 0.0)
    if dropped > 0:
        shown += f" dropped={100 * dropped:.2f}%"
    if left is None:
        return (f"step {step}/{total_steps} kimg {kimg:.2f} {shown} "
                f"(first step, compilation included: {img_per_s:.0f} s)")
    eta = time.strftime("%H:%M:%S", time.gmtime(max(left, 0)))
    return (f"step {step}/{total_steps} kimg {kimg:.2f} {img_per_s:.1f} img/s {shown} "
            f"left {eta}")


def grown_capacity(capacity: int, overflow: int, num_gaussians: int, resolution: int) -> int:
    """The next capacity bucket after an overflow of `overflow` intersections at `capacity`:
    a power of two at least 1.25× what the worst image needed (so that a slowly growing
    generator recompiles a few times, not every step), at most N·tiles (every Gaussian in
    every tile)."""
    return capacity_bucket(capacity + overflow, num_gaussians, resolution)


def capacity_bucket(intersections: int, num_gaussians: int, resolution: int) -> int:
    """The power of two at least 1.25·intersections, at most N·tiles (`grown_capacity`)."""
    from rasterizer.binning import tile_grid
    tiles_x, tiles_y = tile_grid(resolution, resolution)
    needed = max(1, int(math.ceil(1.25 * intersections)))
    return int(min(1 << (needed - 1).bit_length(), num_gaussians * tiles_x * tiles_y))


# Training shrinks a grown capacity when, over this many steps, no image needed more than a
# quarter of it (a random-init generator's first steps can need N·tiles; a trained head far
# fewer, and the sort and compositing cost grows with the capacity).
SHRINK_WINDOW_STEPS = 200


def shrunk_capacity(current: int, needed: int, floor: int, num_gaussians: int,
                    resolution: int) -> Optional[int]:
    """The capacity to shrink to when the most intersections any image had over the last
    SHRINK_WINDOW_STEPS steps was `needed`: the growth rule's bucket for it (a power of two
    at least 1.25·needed, `grown_capacity`), never below `floor` (the run's starting capacity:
    the config's or the rasterizer's default), and only when that is at most a quarter of
    `current` (so that growing and shrinking cannot alternate); else None."""
    target = max(int(floor), capacity_bucket(needed, num_gaussians, resolution))
    return target if 4 * target <= current else None


def set_render_capacity(config, capacity: int) -> None:
    """Sets config.render.capacity (the config may be locked); make_steps reads it."""
    with config.unlocked():
        config.render.capacity = int(capacity)


def step_overflow(metrics) -> Dict[str, Any]:
    """The rasterizer counts of a g_step's (replicated) metrics, on the host, in one transfer:
    {"render_overflow_max": the worst image's dropped intersections (int),
     "render_dropped_fraction": their mean fraction over the batch (float),
     "render_intersections_max": the most intersections of any image (int)}."""
    keys = ("render_overflow_max", "render_dropped_fraction", "render_intersections_max")
    values = {key: value[0] for key, value in
              jax.device_get({key: metrics[key] for key in keys}).items()}
    return {"render_overflow_max": int(values["render_overflow_max"]),
            "render_dropped_fraction": float(values["render_dropped_fraction"]),
            "render_intersections_max": int(values["render_intersections_max"])}


def capacity_after(config, num_gaussians: int, overflow: Dict[str, Any],
                   limit: Optional[int] = None) -> Optional[int]:
    """The capacity training would grow to after a g_step with `overflow` (step_overflow) at
    the current capacity (grown_capacity), at most `limit`; None when nothing was dropped or
    the capacity cannot grow further. For benchmarks, which time the step training runs."""
    if overflow["render_overflow_max"] <= 0:
        return None
    current = render_capacity(config, num_gaussians)
    new = grown_capacity(current, overflow["render_overflow_max"], num_gaussians,
                         config.render.resolution)
    if limit is not None:
        new = min(new, int(limit))
    return new if new > current else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) in `workdir`: orbax checkpoints, metrics.jsonl, TensorBoard events,
    sample grids. Returns the final metrics (including swd_start and swd_end)."""
    from reta3d.checkpoint import Checkpointer
    from reta3d.data import loader as loader_lib

    t_launch = time.time()
    _maybe_initialize_distributed()
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    # The checks that need nothing built come before the dataset, which can take minutes to
    # copy or synthesise.
    check_workdir(workdir)
    check_resume_config(workdir, config)
    check_vgg_weights(config)
    check_alpha_data(config)
    source = prepare_data(config)
    num_devices = jax.local_device_count()
    batch_size = config.train.batch_size
    check_batch_size(batch_size, len(source), config.data.path, num_devices)
    workdir.mkdir(parents=True, exist_ok=True)   # after the data's checks: a run that
    if is_main:                                  # cannot start leaves no workdir behind
        atomic_files.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    if config.train.swd_num_images > len(source) and is_main:
        print(f"Note: SWD compares {len(source)} dataset images (all there are), not "
              f"config.train.swd_num_images = {config.train.swd_num_images}", flush=True)
    total_steps = max(1, int(math.ceil(config.train.total_kimg * 1000 / batch_size)))

    generator = build_generator(config)
    discriminator = build_discriminator(config)
    vgg_features = None
    if not generator.config.dynamic_module:
        print(f"Tab. 1(c) ablation row '{generator.config.ablation_row}': no G_d, the expression "
              "conditions the UV generator (rerun per frame); L_ID and L_reg^G_d are off",
              flush=True)
    elif uses_vgg(config):
        vgg_features, vgg_note = build_vgg_features(config)
        logging.info(vgg_note)
        print(vgg_note, flush=True)
    print(f"Generator: {generator.num_gaussians} Gaussians; UV {config.model.uv_resolution}², "
          f"mouth {config.model.mouth_resolution}²; renders {config.render.resolution}² "
          f"(rasterizer backend {resolve_backend(config.render.backend)}); "
          f"{num_devices} local device(s) ({jax.devices()[0].device_kind}); "
          f"{total_steps} steps of {batch_size}", flush=True)
    print("Discriminator: " + ("RGB + alpha (config.disc.alpha_channel; not in the paper, whose D "
                               "sees RGB)" if sees_alpha(config) else "RGB, as the paper's"),
          flush=True)
    hb = generator.head_binding
    print(f"Target scale γs: face e^{hb.face_log_gamma_s:.2f}, mouth e^{hb.mouth_log_gamma_s:.2f} "
          + ("(config.head.log_gamma_s)" if config.head.get("log_gamma_s") is not None else
             "(measured texel spacing)")
          + f"; rasterizer capacity {render_capacity(config, generator.num_gaussians)} "
            "intersections per image", flush=True)

    state = create_train_state(config, generator, discriminator, jax.random.PRNGKey(config.seed))
    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    loader = loader_lib.make_loader(
        source, batch_size, num_devices, seed=config.seed, flip=config.data.flip,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        worker_count=config.data.worker_count, alpha=sees_alpha(config))
    meta = {}
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        _, state, meta = restored
        loader.set_state(_own_loader_state(meta))
        print(f"Resumed from {checkpointer.directory} at step {int(state.step)}", flush=True)
    start_step = int(state.step)

    sample_fn = make_sample_fn(config, generator)
    grid_z, grid_columns = sample_grid_inputs(config, source)
    metrics_path = workdir / "metrics.jsonl"

    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is the record of truth
        SummaryWriter = None
        if is_main:
            print("tensorboardX is not installed: no TensorBoard events", flush=True)
    writer = None

    def tensorboard():
        """The TensorBoard writer (None without tensorboardX), opened on first use, so that
        resuming a finished run adds no empty events file."""
        nonlocal writer
        if writer is None and SummaryWriter is not None:
            writer = SummaryWriter(str(workdir / "tensorboard"))
        return writer

    def log_metrics(record):
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if (events := tensorboard()) is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        events.add_scalar(k, v, record["step"])
                events.flush()

    def measure_swd(g_vars, step):
        result = evaluate_swd(config, sample_fn, g_vars, source, config.train.swd_num_images,
                              seed=config.seed)
        record = {"step": step, "swd": result["mean"],
                  **{f"swd_{r}": v for r, v in result["levels"].items()}}
        log_metrics(record)
        return result["mean"]

    def save_grid(g_vars, step):
        if is_main:
            grid = render_sample_grid(sample_fn, g_vars, grid_z, grid_columns)
            atomic_files.save_png(workdir / f"samples_{step:07d}.png", grid)
            if (events := tensorboard()) is not None:
                events.add_image("samples", grid, step, dataformats="HWC")

    if start_step == 0:
        t0 = time.time()
        meta["swd_start"] = measure_swd(state.g_ema, 0)
        meta["swd_seconds"] = time.time() - t0   # the final SWD's share of the ETA
        print(f"swd at step 0: {meta['swd_start']:.2f} ({meta['swd_seconds']:.0f} s)", flush=True)
        save_grid(state.g_ema, 0)
    if start_step >= total_steps:
        print(f"Training already finished ({start_step}/{total_steps} steps); nothing to do.",
              flush=True)
        result = run_result(start_step, meta)
        print(json.dumps(result), flush=True)
        return result

    floor = render_capacity(config, generator.num_gaussians)   # what shrinking returns to
    if meta.get("render_capacity", 0) > floor:
        set_render_capacity(config, meta["render_capacity"])  # grown by an earlier run
        sample_fn = make_sample_fn(config, generator)
    steps = make_steps(config, generator, discriminator, vgg_features)
    state = replicate(state)
    warned = {"overflow": False}
    window = {"start": start_step, "needed": 0}   # the most intersections since a change

    def change_capacity(new, at_step):
        nonlocal steps, sample_fn
        set_render_capacity(config, new)
        meta["render_capacity"] = new
        steps = make_steps(config, generator, discriminator, vgg_features)
        sample_fn = make_sample_fn(config, generator)
        window.update(start=at_step, needed=0)

    def check_shrink(at_step):
        """Shrinks a grown capacity once SHRINK_WINDOW_STEPS steps all needed far less."""
        if at_step - window["start"] < SHRINK_WINDOW_STEPS:
            return
        current = render_capacity(config, generator.num_gaussians)
        new = shrunk_capacity(current, window["needed"], floor, generator.num_gaussians,
                              config.render.resolution)
        if new is None:
            window.update(start=at_step, needed=0)
            return
        print(f"rasterizer capacity {current} -> {new} at step {at_step}: no image needed more "
              f"than {window['needed']} intersections in the last {at_step - window['start']} "
              "steps; recompiling", flush=True)
        log_metrics({"step": at_step, "render_capacity": new,
                     "render_intersections_max": window["needed"]})
        change_capacity(new, at_step)

    def check_overflow(metrics, at_step, used):
        """Rasterizer overflow of the step that returned `metrics`, rendered with capacity
        `used`: logged, warned about once, and the capacity grown (steps recompiled) so that
        it does not happen again. The check runs one step late, so the step after an
        overflow was already dispatched with the old capacity: its overflow is logged, and
        recompiles only if the capacity grown meanwhile would not have held it. Steps without
        overflow may shrink a grown capacity instead (`check_shrink`)."""
        counts = step_overflow(metrics)
        window["needed"] = max(window["needed"], counts["render_intersections_max"])
        worst, fraction = counts["render_overflow_max"], counts["render_dropped_fraction"]
        if worst <= 0:
            check_shrink(at_step)
            return
        current = render_capacity(config, generator.num_gaussians)
        new = max(current, grown_capacity(used, worst, generator.num_gaussians,
                                          config.render.resolution))
        if not warned["overflow"]:
            warned["overflow"] = True
            logging.warning("rasterizer overflow during training: images were rendered with "
                            "tile intersections dropped")
        if new > current:
            action = f"capacity {current} -> {new}, recompiling"
        elif current > used:
            action = f"the capacity is already {current}"
        else:   # already every Gaussian in every tile: cannot overflow; nothing to grow
            action = f"capacity {current} is already the most it can be"
        print(f"warning: rasterizer overflow at step {at_step}: {100 * fraction:.2f}% of the tile "
              f"intersections dropped on average (worst image {worst} over capacity {used}); "
              f"{action}", flush=True)
        log_metrics({"step": at_step, "render_dropped_fraction": fraction,
                     "render_overflow_max": worst, "render_capacity": new})
        if new <= current:
            return
        change_capacity(new, at_step)

    def save(step):
        host_state = host_replica(state)
        meta.pop("loader", None)   # a single-process checkpoint's key (still read on resume)
        meta["loaders"] = _all_loader_states(loader.get_state())
        meta["kimg"] = step * batch_size / 1000
        checkpointer.save(step, host_state, meta)

    stop = {"requested": False}

    def on_sigterm(signum, frame):
        stop["requested"] = True
    previous = signal.signal(signal.SIGTERM, on_sigterm)

    t_start = time.time()
    t_last, step_last = t_start, start_step
    paused = 0.0     # seconds in grids, checkpoints and SWD since the last log line
    t_first = None   # end of the first step: rates and the ETA count from there (no compile)
    step = start_step
    pending = None   # the previous step's metrics: checked one step late, so no sync stalls
    try:
        while step < total_steps:
            batch = next(loader)
            batch = dict(batch, image=real_images(config, batch))
            batch = {k: batch[k] for k in ("image", "camera") + FLAME_KEYS}
            used = render_capacity(config, generator.num_gaussians)
            state, metrics = train_iteration(steps, state, batch, ema_beta(config, step), step,
                                             config.loss.r1_interval)
            step += 1
            if pending is not None:
                check_overflow(*pending)
            pending = (metrics, step, used)
            if step % config.train.log_every == 0 or step == total_steps or step == start_step + 1:
                metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                if t_first is None:
                    t_first = now
                    rate, left = now - t_start, None
                    print(f"First training step done {now - t_launch:.0f} s after launch "
                          f"(the step itself, compilation included: {now - t_start:.0f} s)",
                          flush=True)
                else:
                    # The window's rate is the steps' own: a grid or checkpoint in it would
                    # make the ETA pessimistic for one line (the average still counts them).
                    rate = (step - step_last) * batch_size / max(now - t_last - paused, 1e-9)
                    done_rate = (step - start_step - 1) * batch_size / max(now - t_first, 1e-9)
                    left = seconds_left(total_steps - step, batch_size, rate, done_rate,
                                        meta.get("swd_seconds", 0.0))
                print(_progress_line(step, total_steps, step * batch_size / 1000, rate, metrics,
                                     left), flush=True)
                record = {"step": step, "kimg": step * batch_size / 1000, **metrics}
                if left is not None:
                    record["img_per_s"] = rate
                log_metrics(record)
                t_last, step_last, paused = now, step, 0.0
            grid = step % config.train.sample_every == 0 or step == total_steps
            swd_due = step % config.train.swd_every == 0 and step != total_steps
            checkpoint = step % config.train.checkpoint_every == 0 and step != total_steps
            if grid or swd_due or checkpoint:
                jax.block_until_ready(state)   # the step's own compute is not a pause
                t_pause = time.time()
                if grid:
                    save_grid(unreplicate(state.g_ema), step)
                if swd_due:
                    swd = measure_swd(unreplicate(state.g_ema), step)
                    print(f"swd at step {step}: {swd:.2f}", flush=True)
                if checkpoint:
                    save(step)  # the last step is saved after the final SWD, below
                paused += time.time() - t_pause
            if stop["requested"]:
                raise _StopRequested()
    except (KeyboardInterrupt, _StopRequested):
        if step not in checkpointer.steps():
            print(f"Interrupted at step {step}: saving a checkpoint before exiting.", flush=True)
            save(step)
        else:
            print(f"Interrupted at step {step}, which is already saved.", flush=True)
        checkpointer.close()
        signal.signal(signal.SIGTERM, previous)
        raise SystemExit(130)
    signal.signal(signal.SIGTERM, previous)
    if pending is not None:
        check_overflow(*pending)

    g_ema = unreplicate(state.g_ema)
    meta["swd_end"] = measure_swd(g_ema, step)
    save(step)  # keeps swd_end in the checkpoint's metadata
    checkpointer.close()
    result = run_result(step, meta)
    print(swd_summary(result), flush=True)
    print(json.dumps(result), flush=True)
    if writer is not None:
        writer.close()
    return result
