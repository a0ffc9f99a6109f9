"""StyleGAN2-ADA networks in Flax (linen), NHWC, parameterised exactly like NVIDIA's code.

Reference: NVlabs/stylegan2-ada-pytorch `training/networks.py` (EG3D's
`networks_stylegan2.py` has the same state-dict layout); see /work/shared/pytorch/README.txt.
Module and parameter names equal the PyTorch state-dict names (`mapping.fc0`, `synthesis.b8.conv0
.affine`, `b4.fc`, ...) so that `reta3d.networks.convert` is a renaming plus layout transposes.

Variable collections:
- "params": everything trainable. Weights are stored as in PyTorch, ~N(0, 1) ("equalised
  learning rate"), with the gains applied in the forward pass; layouts are JAX's: conv kernels
  HWIO (kh, kw, in, out), dense kernels (in, out), the 4x4 constant (4, 4, C).
- "buffers": `noise_const` (R, R) of every SynthesisLayer (non-trainable; random init).
- "mapping_state": `w_avg` (w_dim,), the tracked average of w (EMA, updated only when the
  caller passes `update_w_avg=True` and marks the collection mutable).
The PyTorch `resample_filter` buffers are not variables here: they are the fixed FIR filter
given by the `resample_filter` attribute (taps, default [1, 3, 3, 1]); the converter checks
that a checkpoint's buffers hold that filter.

RNG streams: "params" for init; "noise" for `noise_mode="random"`.

Precision: float32 by default (bit-for-bit the reference's math up to float rounding). The
`compute_dtype` attribute (e.g. jnp.bfloat16) casts only the convolution operands; parameters,
accumulation and all other math stay float32.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from reta3d.networks import ops

Array = jax.Array
NOISE_MODES = ("random", "const", "none")


def _normal_init(scale: float = 1.0):
    """N(0, 1) * scale initialiser (PyTorch's randn / lr_multiplier)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * scale
    return init


def _check_power_of_two(resolution: int, what: str) -> int:
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution < 4 or 2 ** log2 != resolution:
        raise ValueError(f"{what} must be a power of two >= 4, got {resolution}")
    return log2


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature width of the block at `resolution`: min(channel_base // R, channel_max)."""
    return min(channel_base // resolution, channel_max)


def synthesis_num_ws(img_resolution: int) -> int:
    """Number of w vectors a SynthesisNetwork consumes: 2*log2(res) - 2 (14 at 256², 10 at 64²)."""
    return 2 * _check_power_of_two(img_resolution, "img_resolution") - 2


# --------------------------------------------------------------------------------------------
# Layers


class FullyConnectedLayer(nn.Module):
    """Equalised-lr dense layer: y = act((x @ W) * lr/sqrt(in) + b * lr) (* act gain).

    x: (N, in) float32 -> (N, features) float32. Stored kernel (in, features) ~ N(0, 1/lr²),
    bias initialised to `bias_init` (not divided by lr, as the reference).
    """
    features: int
    activation: str = "linear"
    lr_multiplier: float = 1.0
    use_bias: bool = True
    bias_init: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chex.assert_rank(x, 2)
        in_features = x.shape[-1]
        kernel = self.param("kernel", _normal_init(1.0 / self.lr_multiplier),
                            (in_features, self.features))
        weight_gain = self.lr_multiplier / math.sqrt(in_features)
        x = jnp.dot(x.astype(jnp.float32), kernel * weight_gain,
                    precision=jax.lax.Precision.HIGHEST)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
            bias = bias * self.lr_multiplier
        return ops.bias_act(x, bias, act=self.activation)


class Conv2dLayer(nn.Module):
    """Equalised-lr conv with optional FIR up/down-sampling (the discriminator's conv layer).

    x: (N, H, W, in) float32 -> (N, H*up/down, W*up/down, out_channels) float32.
    W_eff = W / sqrt(in*k*k); then bias, activation, act gain * `gain`, clamp conv_clamp * `gain`.
    """
    out_channels: int
    kernel_size: int
    use_bias: bool = True
    activation: str = "linear"
    up: int = 1
    down: int = 1
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, gain: float = 1.0) -> Array:
        chex.assert_rank(x, 4)
        in_channels = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", _normal_init(), (k, k, in_channels, self.out_channels))
        weight_gain = 1.0 / math.sqrt(in_channels * k * k)
        x = ops.conv2d_resample(x, kernel * weight_gain, f=ops.setup_filter(self.resample_filter),
                                up=self.up, down=self.down, padding=k // 2,
                                flip_weight=(self.up == 1), compute_dtype=self.compute_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.out_channels,))
        act_gain = ops.ACTIVATIONS[self.activation][1] * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, bias, act=self.activation, gain=act_gain, clamp=act_clamp)


class SynthesisLayer(nn.Module):
    """Modulated conv layer of the synthesis network (style -> modulate -> demodulate -> noise).

    x: (N, R/up, R/up, in) float32, w: (N, w_dim) float32 -> (N, R, R, out_channels) float32.
    styles = affine(w) (bias init 1); conv with demodulation (no weight gain); + noise
    (`noise_mode`: "random" needs the "noise" rng, "const" uses buffers/noise_const, "none");
    + bias; lrelu * sqrt(2) * gain; clamp conv_clamp * gain. up=2 is the transposed conv + FIR
    of the reference (flipped kernel).
    """
    out_channels: int
    resolution: int
    kernel_size: int = 3
    up: int = 1
    use_noise: bool = True
    activation: str = "lrelu"
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32
    fused_modconv: bool = False

    @nn.compact
    def __call__(self, x: Array, w: Array, noise_mode: str = "random", gain: float = 1.0) -> Array:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        n, in_channels = x.shape[0], x.shape[-1]
        in_res = self.resolution // self.up
        chex.assert_shape(x, (n, in_res, in_res, in_channels))
        chex.assert_rank(w, 2)
        k = self.kernel_size
        styles = FullyConnectedLayer(in_channels, bias_init=1.0, name="affine")(w)
        kernel = self.param("kernel", _normal_init(), (k, k, in_channels, self.out_channels))

        noise = None
        if self.use_noise:
            noise_const = _noise_const_variable(self, (self.resolution, self.resolution))
            strength = self.param("noise_strength", nn.initializers.zeros_init(), ())
            if noise_mode == "random":
                if not self.is_initializing() and not self.has_rng("noise"):
                    raise ValueError(f"{self.name}: noise_mode='random' needs an rng stream "
                                     "'noise': apply(..., rngs={'noise': key}); or use "
                                     "noise_mode='const' / 'none'")
                noise = jax.random.normal(self.make_rng("noise"),
                                          (n, self.resolution, self.resolution, 1)) * strength
            elif noise_mode == "const":
                noise = (noise_const * strength)[None, :, :, None]

        x = ops.modulated_conv2d(x, kernel, styles, noise=noise, up=self.up, padding=k // 2,
                                 resample_filter=ops.setup_filter(self.resample_filter),
                                 demodulate=True, flip_weight=(self.up == 1),
                                 fused=self.fused_modconv, compute_dtype=self.compute_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.out_channels,))
        act_gain = ops.ACTIVATIONS[self.activation][1] * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, bias, act=self.activation, gain=act_gain, clamp=act_clamp)


def _noise_const_variable(module: nn.Module, shape: Tuple[int, int]) -> Array:
    """The (R, R) constant-noise buffer; a clear error when the caller dropped "buffers"."""
    if not module.is_initializing() and not module.has_variable("buffers", "noise_const"):
        raise ValueError(f"{module.name}: variables['buffers'] is missing noise_const; pass all "
                         "collections returned by init (params, buffers, mapping_state)")
    return module.variable("buffers", "noise_const",
                           lambda: jax.random.normal(module.make_rng("params"), shape)).value


class ToFeatureLayer(nn.Module):
    """Skip-architecture output layer ("ToRGB" generalised to any number of channels).

    x: (N, R, R, in) float32, w: (N, w_dim) -> (N, R, R, out_channels) float32.
    Modulated 1x1 conv WITHOUT demodulation, styles scaled by 1/sqrt(in*k*k); + bias, linear,
    clamp to conv_clamp.
    """
    out_channels: int
    kernel_size: int = 1
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32
    fused_modconv: bool = False

    @nn.compact
    def __call__(self, x: Array, w: Array) -> Array:
        chex.assert_rank([x, w], [4, 2])
        in_channels = x.shape[-1]
        k = self.kernel_size
        weight_gain = 1.0 / math.sqrt(in_channels * k * k)
        styles = FullyConnectedLayer(in_channels, bias_init=1.0, name="affine")(w) * weight_gain
        kernel = self.param("kernel", _normal_init(), (k, k, in_channels, self.out_channels))
        x = ops.modulated_conv2d(x, kernel, styles, demodulate=False, padding=k // 2,
                                 fused=self.fused_modconv, compute_dtype=self.compute_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.out_channels,))
        return ops.bias_act(x, bias, act="linear", clamp=self.conv_clamp)


ToRGBLayer = ToFeatureLayer


# --------------------------------------------------------------------------------------------
# Synthesis


class SynthesisBlock(nn.Module):
    """One resolution of the skip-architecture synthesis network.

    x: (N, R/2, R/2, in_channels) or None for the first block (uses the learned 4x4 `const`);
    img: (N, R/2, R/2, img_channels) or None; ws: (N, num_conv + 1, w_dim) (the last w feeds
    the torgb layer and is shared with the next block's first conv).
    Returns x (N, R, R, out_channels), img (N, R, R, img_channels) = upsample2d(img) + torgb(x).
    """
    in_channels: int  # 0 for the first (4x4) block
    out_channels: int
    resolution: int
    img_channels: int
    use_noise: bool = True
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32
    fused_modconv: bool = False

    @property
    def num_conv(self) -> int:
        return 1 if self.in_channels == 0 else 2

    @nn.compact
    def __call__(self, x: Optional[Array], img: Optional[Array], ws: Array,
                 noise_mode: str = "random") -> Tuple[Array, Array]:
        n = ws.shape[0]
        chex.assert_shape(ws, (n, self.num_conv + 1, None))
        layer_kwargs = dict(resolution=self.resolution, use_noise=self.use_noise,
                            resample_filter=self.resample_filter, conv_clamp=self.conv_clamp,
                            compute_dtype=self.compute_dtype, fused_modconv=self.fused_modconv)
        if self.in_channels == 0:
            const = self.param("const", _normal_init(),
                               (self.resolution, self.resolution, self.out_channels))
            x = jnp.broadcast_to(const[None], (n,) + const.shape)
            x = SynthesisLayer(self.out_channels, name="conv1", **layer_kwargs)(
                x, ws[:, 0], noise_mode=noise_mode)
        else:
            if x is None:
                raise ValueError(f"synthesis block b{self.resolution} needs the previous x")
            chex.assert_shape(x, (n, self.resolution // 2, self.resolution // 2, self.in_channels))
            x = SynthesisLayer(self.out_channels, up=2, name="conv0", **layer_kwargs)(
                x, ws[:, 0], noise_mode=noise_mode)
            x = SynthesisLayer(self.out_channels, name="conv1", **layer_kwargs)(
                x, ws[:, 1], noise_mode=noise_mode)
        y = ToFeatureLayer(self.img_channels, conv_clamp=self.conv_clamp,
                           compute_dtype=self.compute_dtype, fused_modconv=self.fused_modconv,
                           name="torgb")(x, ws[:, self.num_conv])
        if img is not None:
            chex.assert_shape(img, (n, self.resolution // 2, self.resolution // 2,
                                    self.img_channels))
            img = ops.upsample2d(img, ops.setup_filter(self.resample_filter)) + y
        else:
            img = y
        return x, img


class SynthesisNetwork(nn.Module):
    """StyleGAN2 synthesis network, skip architecture: w+ -> (N, R, R, img_channels).

    ws: (N, num_ws, w_dim) float32 with num_ws = 2*log2(R) - 2. Output: the last block's img,
    no tanh or clamp (float32). With `return_block_outputs`, also a dict
    {"b4": (x, img), "b8": (x, img), ...} of every block's outputs (NHWC).
    Paper UV generator: w_dim=512, img_resolution=256, img_channels=14, channel_base=32768,
    channel_max=512; the mouth generator G_m is the same at img_resolution=64.
    """
    w_dim: int
    img_resolution: int
    img_channels: int
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: Optional[float] = None
    use_noise: bool = True
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    compute_dtype: Any = jnp.float32
    fused_modconv: bool = False

    @property
    def num_ws(self) -> int:
        return synthesis_num_ws(self.img_resolution)

    @property
    def block_resolutions(self) -> Tuple[int, ...]:
        log2 = _check_power_of_two(self.img_resolution, "img_resolution")
        return tuple(2 ** i for i in range(2, log2 + 1))

    @nn.compact
    def __call__(self, ws: Array, noise_mode: str = "random",
                 return_block_outputs: bool = False):
        chex.assert_shape(ws, (None, self.num_ws, self.w_dim))
        ws = ws.astype(jnp.float32)
        x = img = None
        w_idx = 0
        block_outputs: Dict[str, Tuple[Array, Array]] = {}
        for res in self.block_resolutions:
            in_channels = channels_at(res // 2, self.channel_base, self.channel_max) if res > 4 else 0
            block = SynthesisBlock(
                in_channels=in_channels,
                out_channels=channels_at(res, self.channel_base, self.channel_max),
                resolution=res, img_channels=self.img_channels, use_noise=self.use_noise,
                resample_filter=self.resample_filter, conv_clamp=self.conv_clamp,
                compute_dtype=self.compute_dtype, fused_modconv=self.fused_modconv,
                name=f"b{res}")
            num_conv = 1 if res == 4 else 2
            x, img = block(x, img, ws[:, w_idx:w_idx + num_conv + 1], noise_mode=noise_mode)
            w_idx += num_conv
            block_outputs[f"b{res}"] = (x, img)
        if return_block_outputs:
            return img, block_outputs
        return img


# --------------------------------------------------------------------------------------------
# Mapping


class MappingNetwork(nn.Module):
    """StyleGAN2 mapping network: z (N, z_dim) [+ c (N, c_dim)] -> w.

    x = normalize_2nd_moment(z); with c_dim > 0, x = concat(x, normalize_2nd_moment(embed(c)))
    (EG3D-style camera conditioning); then `num_layers` lrelu FC layers with lr multiplier
    `lr_multiplier`. Returns (N, num_ws, w_dim) (broadcast w+), or (N, w_dim) if num_ws is None.
    z_dim=0 gives the discriminator's conditioning mapping (c only).

    w_avg (w_dim,) lives in the "mapping_state" collection (absent when w_avg_beta is None).
    `update_w_avg=True` (requires mutable=["mapping_state"]) applies
    w_avg <- mean_batch(w) + beta * (w_avg - mean_batch(w)) on the untruncated w.
    Truncation (psi != 1): w = w_avg + psi * (w - w_avg) on all ws, or on ws[:, :cutoff].
    """
    z_dim: int
    c_dim: int
    w_dim: int
    num_ws: Optional[int]
    num_layers: int = 8
    embed_features: Optional[int] = None
    layer_features: Optional[int] = None
    activation: str = "lrelu"
    lr_multiplier: float = 0.01
    w_avg_beta: Optional[float] = 0.995

    @nn.compact
    def __call__(self, z: Optional[Array], c: Optional[Array] = None,
                 truncation_psi: Union[float, Array] = 1.0,
                 truncation_cutoff: Optional[int] = None, update_w_avg: bool = False) -> Array:
        if self.z_dim == 0 and self.c_dim == 0:
            raise ValueError("MappingNetwork needs z_dim > 0 or c_dim > 0")
        embed_features = self.embed_features
        if embed_features is None:
            embed_features = self.w_dim if self.c_dim > 0 else 0
        layer_features = self.w_dim if self.layer_features is None else self.layer_features

        x = None
        if self.z_dim > 0:
            if z is None:
                raise ValueError(f"MappingNetwork: z of shape (N, {self.z_dim}) is required")
            chex.assert_shape(z, (None, self.z_dim))
            x = ops.normalize_2nd_moment(z.astype(jnp.float32))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"MappingNetwork: conditioning c of shape (N, {self.c_dim}) is "
                                 "required (c_dim > 0)")
            chex.assert_shape(c, (None, self.c_dim))
            y = FullyConnectedLayer(embed_features, name="embed")(c.astype(jnp.float32))
            y = ops.normalize_2nd_moment(y)
            x = y if x is None else jnp.concatenate([x, y], axis=1)

        for idx in range(self.num_layers):
            features = self.w_dim if idx == self.num_layers - 1 else layer_features
            x = FullyConnectedLayer(features, activation=self.activation,
                                    lr_multiplier=self.lr_multiplier, name=f"fc{idx}")(x)

        w_avg = None
        if self.w_avg_beta is not None:
            w_avg = self.variable("mapping_state", "w_avg", jnp.zeros, (self.w_dim,), jnp.float32)
        if update_w_avg:
            if w_avg is None:
                raise ValueError("update_w_avg=True but this mapping has no w_avg "
                                 "(w_avg_beta is None)")
            if not self.is_mutable_collection("mapping_state"):
                raise ValueError("update_w_avg=True needs apply(..., mutable=['mapping_state'])")
            batch_mean = jnp.mean(jax.lax.stop_gradient(x), axis=0)
            w_avg.value = batch_mean + self.w_avg_beta * (w_avg.value - batch_mean)

        if self.num_ws is not None:
            x = jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_ws, self.w_dim))

        skip_truncation = isinstance(truncation_psi, (int, float)) and truncation_psi == 1
        if not skip_truncation:
            if w_avg is None:
                raise ValueError("truncation needs w_avg, but this mapping has w_avg_beta=None")
            avg = w_avg.value
            if truncation_cutoff is None:
                x = avg + truncation_psi * (x - avg)
            else:
                if self.num_ws is None:
                    raise ValueError("truncation_cutoff needs num_ws (broadcast w+)")
                truncated = avg + truncation_psi * (x[:, :truncation_cutoff] - avg)
                x = jnp.concatenate([truncated, x[:, truncation_cutoff:]], axis=1)
        return x


def style_mixing_crossover(rng: Array, num_ws: int, prob: float) -> Array:
    """StyleGAN2's style-mixing crossover index: () int32.

    With probability `prob`, uniform in [1, num_ws); otherwise num_ws (no mixing).
    """
    key_cut, key_use = jax.random.split(rng)
    cutoff = jax.random.randint(key_cut, (), 1, num_ws, dtype=jnp.int32)
    use = jax.random.uniform(key_use, ()) < prob
    return jnp.where(use, cutoff, jnp.int32(num_ws))


def mix_styles(ws: Array, ws_other: Array, crossover: Union[int, Array]) -> Array:
    """ws[:, crossover:] replaced by ws_other[:, crossover:]. ws, ws_other: (N, num_ws, w_dim)."""
    chex.assert_equal_shape([ws, ws_other])
    chex.assert_rank(ws, 3)
    take_other = jnp.arange(ws.shape[1]) >= crossover
    return jnp.where(take_other[None, :, None], ws_other, ws)


def apply_style_mixing(rng: Array, ws: Array, ws_other: Array, prob: float) -> Array:
    """Style-mixing regularisation as in stylegan2-ada's loss (style_mixing_prob, default 0.9).

    ws: (N, num_ws, w_dim) from z; ws_other: the same from a second z (computed WITHOUT the
    w_avg update). One crossover for the whole batch, like the reference.
    """
    return mix_styles(ws, ws_other, style_mixing_crossover(rng, ws.shape[1], prob))


# --------------------------------------------------------------------------------------------
# Generator (mapping + synthesis)


class Generator(nn.Module):
    """StyleGAN2 generator: mapping (-> w+) then skip-architecture synthesis, NHWC output.

    z: (N, z_dim), c: (N, c_dim) or None -> img (N, R, R, img_channels) float32.
    Submodules `mapping` and `synthesis` (names = the PyTorch state-dict prefixes); use
    `map_latents` / `synthesize` through `apply(..., method=...)` to run one part.
    """
    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 14
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: Optional[float] = 0.995
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: Optional[float] = None
    use_noise: bool = True
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    compute_dtype: Any = jnp.float32
    fused_modconv: bool = False

    @property
    def num_ws(self) -> int:
        return synthesis_num_ws(self.img_resolution)

    def setup(self):
        self.mapping = MappingNetwork(
            z_dim=self.z_dim, c_dim=self.c_dim, w_dim=self.w_dim, num_ws=self.num_ws,
            num_layers=self.mapping_layers, lr_multiplier=self.mapping_lr_multiplier,
            w_avg_beta=self.w_avg_beta)
        self.synthesis = SynthesisNetwork(
            w_dim=self.w_dim, img_resolution=self.img_resolution, img_channels=self.img_channels,
            channel_base=self.channel_base, channel_max=self.channel_max,
            conv_clamp=self.conv_clamp, use_noise=self.use_noise,
            resample_filter=self.resample_filter, compute_dtype=self.compute_dtype,
            fused_modconv=self.fused_modconv)

    def map_latents(self, z: Array, c: Optional[Array] = None, truncation_psi=1.0,
                    truncation_cutoff: Optional[int] = None, update_w_avg: bool = False) -> Array:
        """(N, z_dim), (N, c_dim) -> ws (N, num_ws, w_dim)."""
        return self.mapping(z, c, truncation_psi=truncation_psi,
                            truncation_cutoff=truncation_cutoff, update_w_avg=update_w_avg)

    def synthesize(self, ws: Array, noise_mode: str = "random", return_block_outputs: bool = False):
        """ws (N, num_ws, w_dim) -> img (N, R, R, img_channels)."""
        return self.synthesis(ws, noise_mode=noise_mode, return_block_outputs=return_block_outputs)

    def __call__(self, z: Array, c: Optional[Array] = None, truncation_psi=1.0,
                 truncation_cutoff: Optional[int] = None, noise_mode: str = "random",
                 update_w_avg: bool = False, return_block_outputs: bool = False):
        ws = self.map_latents(z, c, truncation_psi, truncation_cutoff, update_w_avg)
        return self.synthesize(ws, noise_mode=noise_mode, return_block_outputs=return_block_outputs)


# --------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """Residual discriminator block at `resolution` (R -> R/2).

    x: (N, R, R, tmp_channels) or None for the first block, which maps img (N, R, R,
    img_channels) with `fromrgb` (1x1, lrelu). Then y = skip(x) * sqrt(0.5) (1x1, down 2, no
    bias, no clamp); x = conv1(conv0(x)) with conv1 gain sqrt(0.5) (3x3, down 2); returns y + x
    of shape (N, R/2, R/2, out_channels).
    """
    in_channels: int  # 0 for the first block (reads the image)
    tmp_channels: int
    out_channels: int
    resolution: int
    activation: str = "lrelu"
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Optional[Array], img: Optional[Array]) -> Array:
        conv_kwargs = dict(resample_filter=self.resample_filter, compute_dtype=self.compute_dtype)
        if self.in_channels == 0:
            if img is None:
                raise ValueError(f"discriminator block b{self.resolution} needs the image")
            chex.assert_shape(img, (None, self.resolution, self.resolution, None))
            x = Conv2dLayer(self.tmp_channels, kernel_size=1, activation=self.activation,
                            conv_clamp=self.conv_clamp, name="fromrgb", **conv_kwargs)(img)
        chex.assert_shape(x, (None, self.resolution, self.resolution, self.tmp_channels))
        y = Conv2dLayer(self.out_channels, kernel_size=1, use_bias=False, down=2, name="skip",
                        **conv_kwargs)(x, gain=math.sqrt(0.5))
        x = Conv2dLayer(self.tmp_channels, kernel_size=3, activation=self.activation,
                        conv_clamp=self.conv_clamp, name="conv0", **conv_kwargs)(x)
        x = Conv2dLayer(self.out_channels, kernel_size=3, activation=self.activation, down=2,
                        conv_clamp=self.conv_clamp, name="conv1", **conv_kwargs)(
                            x, gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nn.Module):
    """4x4 epilogue: minibatch std -> conv 3x3 (lrelu) -> fc (lrelu) -> out.

    x: (N, 4, 4, C) float32, cmap: (N, cmap_dim) or None -> logits (N, 1) float32.
    Projection conditioning: logits = sum(out * cmap, 1) / sqrt(cmap_dim). The fc input is the
    NCHW flatten of the 4x4 map (index c*16 + h*4 + w), as in the reference, so converted fc
    weights need no permutation.
    """
    in_channels: int
    cmap_dim: int
    resolution: int = 4
    mbstd_group_size: Optional[int] = 4
    mbstd_num_channels: int = 1
    activation: str = "lrelu"
    conv_clamp: Optional[float] = None
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cmap: Optional[Array]) -> Array:
        chex.assert_shape(x, (None, self.resolution, self.resolution, self.in_channels))
        if self.mbstd_num_channels > 0:
            x = ops.minibatch_std(x, self.mbstd_group_size, self.mbstd_num_channels)
        x = Conv2dLayer(self.in_channels, kernel_size=3, activation=self.activation,
                        conv_clamp=self.conv_clamp, compute_dtype=self.compute_dtype,
                        name="conv")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = FullyConnectedLayer(self.in_channels, activation=self.activation, name="fc")(x)
        x = FullyConnectedLayer(1 if self.cmap_dim == 0 else self.cmap_dim, name="out")(x)
        if self.cmap_dim > 0:
            if cmap is None:
                raise ValueError("DiscriminatorEpilogue: cmap is required when cmap_dim > 0")
            chex.assert_shape(cmap, (x.shape[0], self.cmap_dim))
            x = jnp.sum(x * cmap, axis=1, keepdims=True) * (1.0 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator, conditioned on the camera label by projection.

    img: (N, R, R, img_channels) float32, c: (N, c_dim) (EG3D's 25-number label) or None when
    c_dim == 0 -> logits (N, 1) float32 (no sigmoid). With `return_block_outputs`, also a dict
    {"b{R}": x after block R (N, R/2, R/2, C), ..., "cmap": (N, cmap_dim) or None}.
    Conditioning mapping: MappingNetwork(z_dim=0, c_dim, w_dim=cmap_dim, no w_avg).
    """
    c_dim: int = 25
    img_resolution: int = 512
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    cmap_dim: Optional[int] = None
    conv_clamp: Optional[float] = None
    mbstd_group_size: Optional[int] = 4
    mbstd_num_channels: int = 1
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
    compute_dtype: Any = jnp.float32

    @property
    def block_resolutions(self) -> Tuple[int, ...]:
        log2 = _check_power_of_two(self.img_resolution, "img_resolution")
        return tuple(2 ** i for i in range(log2, 2, -1))

    @property
    def effective_cmap_dim(self) -> int:
        if self.c_dim == 0:
            return 0
        if self.cmap_dim is None:
            return channels_at(4, self.channel_base, self.channel_max)
        return self.cmap_dim

    @nn.compact
    def __call__(self, img: Array, c: Optional[Array] = None, return_block_outputs: bool = False):
        res = self.img_resolution
        chex.assert_shape(img, (None, res, res, self.img_channels))
        img = img.astype(jnp.float32)
        x = None
        block_outputs: Dict[str, Optional[Array]] = {}
        for block_res in self.block_resolutions:
            in_channels = channels_at(block_res, self.channel_base, self.channel_max) \
                if block_res < res else 0
            x = DiscriminatorBlock(
                in_channels=in_channels,
                tmp_channels=channels_at(block_res, self.channel_base, self.channel_max),
                out_channels=channels_at(block_res // 2, self.channel_base, self.channel_max),
                resolution=block_res, resample_filter=self.resample_filter,
                conv_clamp=self.conv_clamp, compute_dtype=self.compute_dtype,
                name=f"b{block_res}")(x, img if in_channels == 0 else None)
            block_outputs[f"b{block_res}"] = x
        cmap = None
        cmap_dim = self.effective_cmap_dim
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"Discriminator: camera label c of shape (N, {self.c_dim}) is "
                                 "required (c_dim > 0)")
            chex.assert_shape(c, (img.shape[0], self.c_dim))
            cmap = MappingNetwork(z_dim=0, c_dim=self.c_dim, w_dim=cmap_dim, num_ws=None,
                                  num_layers=self.mapping_layers,
                                  lr_multiplier=self.mapping_lr_multiplier, w_avg_beta=None,
                                  name="mapping")(None, c)
        block_outputs["cmap"] = cmap
        logits = DiscriminatorEpilogue(
            channels_at(4, self.channel_base, self.channel_max), cmap_dim=cmap_dim,
            mbstd_group_size=self.mbstd_group_size, mbstd_num_channels=self.mbstd_num_channels,
            conv_clamp=self.conv_clamp, compute_dtype=self.compute_dtype, name="b4")(x, cmap)
        if return_block_outputs:
            return logits, block_outputs
        return logits
