"""The RETA3D generator: UV generator G, mouth generator G_m, blending ConvNet, dynamic module G_d.

Paper Sec. 2.2-2.3. Everything is NHWC. The generator is split the way the paper runs it:

    static (once per identity):  z, c ─ mapping ─► ws (B, num_ws, w_dim)
                                 ws ─ G (SynthesisNetwork 256²) ─► face map F   (B, 256, 256, 14)
                                 ws[:, s:s+10] ─ G_m (SynthesisNetwork 64²) ─► mouth map (B, 64, 64, 14)
                                 crop(F, mouth_rect) ⊕ mouth map ─ blending ConvNet ─► mouth map
    per frame:                   FLAME(params) ─► posed mesh; decode the static maps on it ─►
                                 Gaussian positions written back at their texels (xyz maps);
                                 G_d(F ⊕ xyz, expression ⊕ jaw) ─► ΔF;  F_d = F + ΔF (both maps)
                                 decode F_d ─► Gaussians (rasterizer.Gaussians)

`RETA3DGenerator` holds the static things (config, head model, texel bindings) and exposes pure
functions over a variables pytree (`init`, `generate_static`, `animate`, ...); `jit_generate_static`
and `jit_animate` are their jit-compiled forms. The variables pytree is the Flax one:
``{"params": {"mapping", "synthesis", "mouth_synthesis", "blend", "dynamic"}, "mapping_state":
{... w_avg}, "buffers": {... noise_const}}``; `dynamic_params(variables)` is the G_d subtree (the
paper's L_reg^{G_d} sums over it).

Choices the paper leaves open (documented here, configurable in `GeneratorConfig`):
- G_m reads `ws[:, mouth_ws_start : mouth_ws_start + mouth_num_ws]` (default: the LAST 10 of the
  face generator's 14 ws, "the later channels of w+").
- Blending ConvNet: `blend_layers` equalised-lr 3x3 convolutions (leaky ReLU between, linear last)
  on the 28-channel concatenation [face crop (14) | G_m output (14)] at 64²; its output replaces
  the mouth map (no residual path; the paper says the ConvNet "merges" the two).
- G_d: SEPARATE weights for the face and the mouth map (the mouth map samples a 16x smaller UV
  area, so the same texel neighbourhood means a different surface scale) and one SHARED
  expression embedding. Each branch: 3x3 conv (17 → gd_channels), `gd_layers` x [3x3 conv, FiLM
  from the expression embedding, leaky ReLU], 3x3 conv (→ 14) whose weights and bias start at
  zero, so ΔF = 0 at initialisation. The condition is the first `expression_dims` FLAME
  expression coefficients (zero-padded) ⊕ jaw pose (3, axis-angle) if `use_jaw_pose`.
- The xyz map is the world position μ of each valid texel's Gaussian decoded from the STATIC
  features on the current frame's posed mesh, times `gd_xyz_scale` (the head spans about ±0.3
  world units; the scale brings that to about ±1), zero at invalid texels.
- The generation-module ablation (Tab. 1(c)): `mouth_generator=False` drops G_m and the
  blending ConvNet (the mouth map is the face map's mouth crop, resampled onto the mouth grid,
  so the Gaussians stay the same); `dynamic_module=False` drops G_d, and the expression
  conditions the UV generator instead ("the baseline with a single UV feature generator
  only"): the G_d condition vector (expression ⊕ jaw) goes through `ExpressionMapping` (a
  2-layer MLP, last layer zero at initialisation) to a w offset added to every ws before G
  and G_m, so `animate` reruns G (and G_m) for every frame, the paper's reason the
  baseline drives slowly. The identity's ws stay expression-free (inversion and
  `StaticMaps.ws` unchanged); `generate_static` returns the maps at the neutral condition.
- Layers are StyleGAN2-style equalised learning-rate layers (weights stored ~N(0,1), scaled by
  1/sqrt(fan_in) at run time) so the whole generator trains well with one StyleGAN2 Adam setting.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reta3d.networks.initialization import jit_init
from reta3d.networks.stylegan2 import FullyConnectedLayer, MappingNetwork, SynthesisNetwork, channels_at

FEATURE_CHANNELS = 14
_LRELU_GAIN = math.sqrt(2.0)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FRAME_KINDS = ("consecutive", "naive", "global")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def ablation_row_name(mouth_generator: bool, dynamic_module: bool) -> str:
    """Tab. 1(c)'s name for a generator with / without G_m and G_d: "Baseline", "+ G_m",
    "+ G_m + G_d" (the paper's model) or "+ G_d" (not in the table)."""
    return {(False, False): "Baseline", (True, False): "+ G_m", (True, True): "+ G_m + G_d",
            (False, True): "+ G_d"}[(bool(mouth_generator), bool(dynamic_module))]


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of the whole generator. Defaults are the paper's sizes.

    Resolutions and channel counts follow StyleGAN2: channels(R) = min(channel_base // R,
    channel_max). `mouth_ws_start=None` feeds G_m the last `mouth_num_ws` ws of the face
    generator. `conv_clamp` 256 is what StyleGAN2-ADA/EG3D train with (None = no clamp).
    `dtype` is the convolution compute dtype ("float32" or "bfloat16"); parameters and
    accumulation stay float32.
    """

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 25
    feature_channels: int = FEATURE_CHANNELS
    uv_resolution: int = 256
    mouth_resolution: int = 64
    channel_base: int = 32768
    channel_max: int = 512
    mouth_channel_base: int = 32768
    mouth_channel_max: int = 512
    mapping_layers: int = 8
    conv_clamp: Optional[float] = 256.0
    w_avg_beta: float = 0.995
    mouth_ws_start: Optional[int] = None
    blend_channels: int = 64
    blend_layers: int = 3
    expression_dims: int = 50
    use_jaw_pose: bool = True
    gd_channels: int = 32
    gd_layers: int = 2
    gd_embed_dim: int = 128
    gd_xyz_scale: float = 3.0
    frame_kind: str = "consecutive"
    dtype: str = "float32"
    mouth_generator: bool = True
    dynamic_module: bool = True
    expression_mapping_layers: int = 2

    def __post_init__(self):
        for name in ("uv_resolution", "mouth_resolution"):
            res = getattr(self, name)
            if res < 4 or res & (res - 1):
                raise ValueError(f"GeneratorConfig.{name} must be a power of two >= 4, got {res}")
        if self.feature_channels != FEATURE_CHANNELS:
            raise ValueError(f"GeneratorConfig.feature_channels must be {FEATURE_CHANNELS} "
                             f"(offset 3, scale 3, quat 4, color 3, opacity 1), got {self.feature_channels}")
        if self.frame_kind not in FRAME_KINDS:
            raise ValueError(f"GeneratorConfig.frame_kind must be one of {FRAME_KINDS}, got {self.frame_kind!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"GeneratorConfig.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.blend_layers < 1 or self.gd_layers < 0:
            raise ValueError("GeneratorConfig: blend_layers must be >= 1 and gd_layers >= 0")
        if self.expression_mapping_layers < 1:
            raise ValueError("GeneratorConfig.expression_mapping_layers must be >= 1, got "
                             f"{self.expression_mapping_layers}")
        if self.expression_dims < 0:
            raise ValueError(f"GeneratorConfig.expression_dims must be >= 0, got {self.expression_dims}")
        start = self.resolved_mouth_ws_start
        if start < 0 or start + self.mouth_num_ws > self.num_ws:
            raise ValueError(
                f"GeneratorConfig.mouth_ws_start={self.mouth_ws_start}: G_m needs {self.mouth_num_ws} ws "
                f"but the face generator has only {self.num_ws}")

    @property
    def num_ws(self) -> int:
        """ws consumed by the face generator (= mapping broadcast width): 2·log2(R) − 2."""
        return 2 * int(math.log2(self.uv_resolution)) - 2

    @property
    def mouth_num_ws(self) -> int:
        return 2 * int(math.log2(self.mouth_resolution)) - 2

    @property
    def resolved_mouth_ws_start(self) -> int:
        if self.mouth_ws_start is None:
            return self.num_ws - self.mouth_num_ws
        return self.mouth_ws_start

    @property
    def condition_dim(self) -> int:
        """Width of G_d's condition vector: expression coefficients (+ 3 jaw pose)."""
        return self.expression_dims + (3 if self.use_jaw_pose else 0)

    @property
    def expression_conditioned(self) -> bool:
        """True for Tab. 1(c)'s rows without G_d: the expression conditions the UV generator
        itself, so `animate` reruns G (and G_m) for every frame."""
        return not self.dynamic_module

    @property
    def ablation_row(self) -> str:
        """Tab. 1(c)'s name for this generator (`ablation_row_name`)."""
        return ablation_row_name(self.mouth_generator, self.dynamic_module)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "GeneratorConfig":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def small(**changes) -> "GeneratorConfig":
        """A tiny configuration for tests and quick CPU runs (same structure, few channels)."""
        base = GeneratorConfig(
            z_dim=16, w_dim=16, c_dim=25, uv_resolution=16, mouth_resolution=8,
            channel_base=128, channel_max=16, mouth_channel_base=128, mouth_channel_max=16,
            mapping_layers=2, blend_channels=8, blend_layers=2, expression_dims=10,
            gd_channels=8, gd_layers=2, gd_embed_dim=16)
        return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------------------------
# Equalised learning-rate layers (StyleGAN2 parameterisation: W_eff = W / sqrt(fan_in))
# --------------------------------------------------------------------------------------------

def _zeros_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


class EqualizedConv(nn.Module):
    """k x k 'same' convolution with runtime weight gain 1/sqrt(k·k·C_in), bias, activation.

    x (B, H, W, C_in) → (B, H, W, features) float32. `compute_dtype` is the dtype of the
    convolution's operands; accumulation and the result are float32. `zero_init` starts weights
    and bias at 0 (G_d's last layer, so ΔF = 0 at initialisation).
    """

    features: int
    kernel_size: int = 3
    activation: str = "lrelu"
    zero_init: bool = False
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        k = self.kernel_size
        w_init = _zeros_init if self.zero_init else nn.initializers.normal(1.0)
        kernel = self.param("kernel", w_init, (k, k, c_in, self.features), jnp.float32)
        bias = self.param("bias", _zeros_init, (self.features,), jnp.float32)
        kernel = kernel * (1.0 / math.sqrt(c_in * k * k))
        y = jax.lax.conv_general_dilated(
            x.astype(self.compute_dtype), kernel.astype(self.compute_dtype), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        y = y + bias
        return _activate(y, self.activation)


def _activate(x, activation: str):
    if activation == "lrelu":
        return jax.nn.leaky_relu(x, 0.2) * _LRELU_GAIN
    if activation == "linear":
        return x
    raise ValueError(f"unknown activation {activation!r} (expected 'lrelu' or 'linear')")


# --------------------------------------------------------------------------------------------
# Mouth crop: bilinear resampling of the mouth rectangle of the face map onto the mouth grid
# --------------------------------------------------------------------------------------------

def texel_centre_uv(resolution: int, rect: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """UV of the texel centres of an R x R map covering `rect` = (u0, v0, u1, v1).

    Returns (R, R, 2) float64 with [..., 0] = u = u0 + (j+0.5)/R·(u1−u0) (column j) and
    [..., 1] = v = v1 − (i+0.5)/R·(v1−v0) (row i; row 0 = top = high v).
    """
    u0, v0, u1, v1 = (float(t) for t in rect)
    centres = (np.arange(resolution) + 0.5) / resolution
    u = u0 + centres * (u1 - u0)
    v = v1 - centres * (v1 - v0)
    return np.stack(np.broadcast_arrays(u[None, :], v[:, None]), axis=-1)


def _interp_matrix(positions: np.ndarray, size: int) -> np.ndarray:
    """Linear-interpolation weights (len(positions), size) sampling at continuous texel indices
    `positions` (texel k's centre sits at index k) with clamp-to-edge outside [0, size−1]."""
    positions = np.clip(positions, 0.0, size - 1.0)
    lower = np.minimum(np.floor(positions).astype(np.int64), size - 2) if size > 1 else np.zeros(len(positions), np.int64)
    frac = positions - lower
    weights = np.zeros((len(positions), size), np.float64)
    rows = np.arange(len(positions))
    weights[rows, lower] += 1.0 - frac
    if size > 1:
        weights[rows, lower + 1] += frac
    return weights


@functools.lru_cache(maxsize=32)
def mouth_crop_weights(mouth_rect: Tuple[float, float, float, float], face_resolution: int,
                       mouth_resolution: int) -> Tuple[np.ndarray, np.ndarray]:
    """Separable bilinear weights (row_weights (Rm, R), col_weights (Rm, R)) float32.

    Exact texel-centre mapping: mouth texel (a, b) has UV centre
    u = u0 + (b+0.5)/Rm·(u1−u0), v = v1 − (a+0.5)/Rm·(v1−v0) (see `texel_centre_uv`). On the face
    map (texel (i, j) centred at u = (j+0.5)/R, v = 1 − (i+0.5)/R) that point is at the continuous
    texel index col = u·R − 0.5, row = (1 − v)·R − 0.5, sampled bilinearly (PyTorch
    `grid_sample(align_corners=False, padding_mode='border')` semantics: clamp to the edge texels).
    Because the mouth grid is axis-aligned, bilinear sampling factorises into a row and a column
    interpolation matrix: crop[a, b] = Σ_ij row_weights[a, i] · face[i, j] · col_weights[b, j].
    """
    u0, v0, u1, v1 = (float(t) for t in mouth_rect)
    if not (0.0 <= u0 < u1 <= 1.0 and 0.0 <= v0 < v1 <= 1.0):
        raise ValueError(f"mouth_rect must be (u0, v0, u1, v1) with 0 <= u0 < u1 <= 1 and "
                         f"0 <= v0 < v1 <= 1, got {mouth_rect}")
    uv = texel_centre_uv(mouth_resolution, mouth_rect)
    cols = uv[0, :, 0] * face_resolution - 0.5
    rows = (1.0 - uv[:, 0, 1]) * face_resolution - 0.5
    return (_interp_matrix(rows, face_resolution).astype(np.float32),
            _interp_matrix(cols, face_resolution).astype(np.float32))


def crop_mouth(face_map: jax.Array, mouth_rect: Sequence[float], mouth_resolution: int) -> jax.Array:
    """Resample the mouth rectangle of a face UV map to the mouth grid.

    face_map (B, R, R, C) float → (B, Rm, Rm, C) float32; `mouth_rect` = (u0, v0, u1, v1) in UV;
    texel-centre mapping and edge handling as in `mouth_crop_weights`. Differentiable (a linear map).
    """
    chex.assert_rank(face_map, 4)
    if face_map.shape[1] != face_map.shape[2]:
        raise ValueError(f"crop_mouth: face map must be square (B, R, R, C), got {face_map.shape}")
    row_w, col_w = mouth_crop_weights(tuple(float(t) for t in mouth_rect), face_map.shape[1],
                                      int(mouth_resolution))
    face_map = face_map.astype(jnp.float32)
    rows = jnp.einsum("ai,nijc->najc", row_w, face_map, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bj,najc->nabc", col_w, rows, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------------
# Blending ConvNet and dynamic module G_d
# --------------------------------------------------------------------------------------------

class BlendingConvNet(nn.Module):
    """Merges the resampled face crop with G_m's map.

    face_crop (B, Rm, Rm, 14), mouth_map (B, Rm, Rm, 14) → blended mouth map (B, Rm, Rm, 14) float32:
    concat (28 channels) → (num_layers − 1) x [3x3 conv, leaky ReLU] → 3x3 conv (linear).
    """

    channels: int = 64
    num_layers: int = 3
    out_channels: int = FEATURE_CHANNELS
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, face_crop, mouth_map):
        chex.assert_equal_shape([face_crop, mouth_map])
        x = jnp.concatenate([face_crop.astype(jnp.float32), mouth_map.astype(jnp.float32)], axis=-1)
        for i in range(self.num_layers - 1):
            x = EqualizedConv(self.channels, 3, "lrelu", compute_dtype=self.compute_dtype, name=f"conv{i}")(x)
        return EqualizedConv(self.out_channels, 3, "linear", compute_dtype=self.compute_dtype,
                             name=f"conv{self.num_layers - 1}")(x)


class ExpressionEmbedding(nn.Module):
    """FLAME condition (B, condition_dim) → embedding (B, features): 2 dense leaky-ReLU layers."""

    features: int = 128

    @nn.compact
    def __call__(self, condition):
        chex.assert_rank(condition, 2)
        x = FullyConnectedLayer(self.features, activation="lrelu", name="fc0")(condition)
        return FullyConnectedLayer(self.features, activation="lrelu", name="fc1")(x)


class ExpressionMapping(nn.Module):
    """Tab. 1(c) baseline without G_d: FLAME condition (B, condition_dim) → w offset (B, w_dim)
    float32, added to every ws. `num_layers` equalised-lr dense layers (leaky ReLU between,
    linear last), at lr multiplier 1 as G_d's layers. The last layer's weights and bias start
    at zero (as G_d's last layers): at initialisation the expression changes nothing, rather
    than shifting the identity along random directions. (At the mapping network's multiplier
    0.01 a zero-started layer would take ~100x as many steps to grow.)
    """

    w_dim: int
    num_layers: int = 2
    lr_multiplier: float = 1.0

    @nn.compact
    def __call__(self, condition):
        chex.assert_rank(condition, 2)
        x = condition.astype(jnp.float32)
        for i in range(self.num_layers - 1):
            x = FullyConnectedLayer(self.w_dim, activation="lrelu",
                                    lr_multiplier=self.lr_multiplier, name=f"fc{i}")(x)
        # FullyConnectedLayer's parameterisation (W·lr/sqrt(in), b·lr) with a zero start.
        last = f"fc{self.num_layers - 1}"
        kernel = self.param(f"{last}_kernel", _zeros_init, (x.shape[-1], self.w_dim))
        bias = self.param(f"{last}_bias", _zeros_init, (self.w_dim,))
        gain = self.lr_multiplier / math.sqrt(x.shape[-1])
        return (jnp.dot(x, kernel * gain, precision=jax.lax.Precision.HIGHEST)
                + bias * self.lr_multiplier)


class DynamicBranch(nn.Module):
    """One G_d branch: input (B, R, R, 17) = static (14) ⊕ xyz (3), embedding (B, E) → ΔF (B, R, R, 14).

    conv 3x3 (→ channels, leaky ReLU); num_layers x [conv 3x3, FiLM (x·(1+γ)+β, γ and β from the
    embedding; γ = β = 0 would be the identity), leaky ReLU]; conv 3x3 (→ 14) zero-initialised.
    """

    channels: int = 32
    num_layers: int = 2
    out_channels: int = FEATURE_CHANNELS
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        chex.assert_rank([x, embedding], [4, 2])
        chex.assert_equal(x.shape[0], embedding.shape[0])
        x = EqualizedConv(self.channels, 3, "lrelu", compute_dtype=self.compute_dtype, name="conv_in")(x)
        for i in range(self.num_layers):
            x = EqualizedConv(self.channels, 3, "linear", compute_dtype=self.compute_dtype, name=f"conv{i}")(x)
            film = FullyConnectedLayer(2 * self.channels, name=f"film{i}")(embedding)
            scale, shift = jnp.split(film, 2, axis=-1)
            x = x * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
            x = _activate(x, "lrelu")
        return EqualizedConv(self.out_channels, 3, "linear", zero_init=True,
                             compute_dtype=self.compute_dtype, name="conv_out")(x)


class DynamicModule(nn.Module):
    """G_d: residual features for the face and the mouth map from (static ⊕ xyz) and the FLAME condition.

    face_input (B, R, R, 17), mouth_input (B, Rm, Rm, 17), condition (B, condition_dim) →
    (ΔF_face (B, R, R, 14), ΔF_mouth (B, Rm, Rm, 14)) float32. Separate branch weights for the two
    maps, one shared expression embedding.
    """

    channels: int = 32
    num_layers: int = 2
    embed_dim: int = 128
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, face_input, mouth_input, condition):
        embedding = ExpressionEmbedding(self.embed_dim, name="embed")(condition)
        branch = functools.partial(DynamicBranch, self.channels, self.num_layers,
                                   compute_dtype=self.compute_dtype)
        return branch(name="face")(face_input, embedding), branch(name="mouth")(mouth_input, embedding)


# --------------------------------------------------------------------------------------------
# Analytic FLOP counts (2 FLOPs per multiply-add of the convolutions and dense layers)
# --------------------------------------------------------------------------------------------

def _conv_flops(resolution: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * resolution * resolution * kernel * kernel * c_in * c_out


def synthesis_flops(resolution: int, channel_base: int, channel_max: int,
                    out_channels: int = FEATURE_CHANNELS) -> int:
    """Multiply-add FLOPs of one StyleGAN2 skip-architecture synthesis pass (batch 1).

    Counts the 3x3 convolutions and the 1x1 ToFeature layers. conv0 (x2 upsampling) is a
    stride-2 transposed convolution, as in the reference: every INPUT texel meets the 3x3 kernel
    once, so it costs a 3x3 conv at the block's input resolution. The styles' affine layers,
    modulation, FIR filters and bias/activations are small next to these and are left out
    (cross-checked against XLA's cost_analysis in the tests).
    """
    total = 0
    res = 4
    while res <= resolution:
        c_out = channels_at(res, channel_base, channel_max)
        if res > 4:
            c_in = channels_at(res // 2, channel_base, channel_max)
            total += _conv_flops(res // 2, c_in, c_out, 3)
        total += _conv_flops(res, c_out, c_out, 3)
        total += _conv_flops(res, c_out, out_channels, 1)
        res *= 2
    return total


def static_generator_flops(config: GeneratorConfig) -> int:
    """FLOPs (batch 1) of G + G_m + blending ConvNet; the mapping network (~5 MFLOPs) left out."""
    g = synthesis_flops(config.uv_resolution, config.channel_base, config.channel_max, config.feature_channels)
    if not config.mouth_generator:
        return g
    g_m = synthesis_flops(config.mouth_resolution, config.mouth_channel_base, config.mouth_channel_max,
                          config.feature_channels)
    rm = config.mouth_resolution
    blend, c_in = 0, 2 * config.feature_channels
    for i in range(config.blend_layers):
        c_out = config.feature_channels if i == config.blend_layers - 1 else config.blend_channels
        blend += _conv_flops(rm, c_in, c_out, 3)
        c_in = c_out
    return g + g_m + blend


def dynamic_module_flops(config: GeneratorConfig) -> int:
    """FLOPs (batch 1) of G_d's convolutions on both maps (the embedding MLP, ~0.1 MFLOPs, and
    FiLM/activations are left out); 0 without G_d."""
    if not config.dynamic_module:
        return 0
    c, f = config.gd_channels, config.feature_channels
    per_texel = (_conv_flops(1, f + 3, c, 3) + config.gd_layers * _conv_flops(1, c, c, 3)
                 + _conv_flops(1, c, f, 3))
    return per_texel * (config.uv_resolution ** 2 + config.mouth_resolution ** 2)


# --------------------------------------------------------------------------------------------
# All networks in one Flax module (one variables pytree)
# --------------------------------------------------------------------------------------------

class RETA3DNetworks(nn.Module):
    """Mapping, G, G_m, blending ConvNet and G_d; use the methods through `apply(..., method=)`.

    Submodule names (= top-level keys of variables["params"]): mapping, synthesis,
    mouth_synthesis, blend (with G_m), dynamic (with G_d), expression_mapping (without G_d,
    Tab. 1(c)'s expression-conditioned UV generator). `mouth_rect` (u0, v0, u1, v1) is the head model's mouth
    patch rectangle in UV (static).
    """

    config: GeneratorConfig
    mouth_rect: Tuple[float, float, float, float]

    def setup(self):
        cfg = self.config
        dtype = cfg.compute_dtype
        self.mapping = MappingNetwork(
            z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, num_ws=cfg.num_ws,
            num_layers=cfg.mapping_layers, w_avg_beta=cfg.w_avg_beta)
        self.synthesis = SynthesisNetwork(
            w_dim=cfg.w_dim, img_resolution=cfg.uv_resolution, img_channels=cfg.feature_channels,
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, conv_clamp=cfg.conv_clamp,
            compute_dtype=dtype)
        if cfg.mouth_generator:
            self.mouth_synthesis = SynthesisNetwork(
                w_dim=cfg.w_dim, img_resolution=cfg.mouth_resolution, img_channels=cfg.feature_channels,
                channel_base=cfg.mouth_channel_base, channel_max=cfg.mouth_channel_max,
                conv_clamp=cfg.conv_clamp, compute_dtype=dtype)
            self.blend = BlendingConvNet(cfg.blend_channels, cfg.blend_layers, cfg.feature_channels,
                                         compute_dtype=dtype)
        if cfg.dynamic_module:
            self.dynamic = DynamicModule(cfg.gd_channels, cfg.gd_layers, cfg.gd_embed_dim,
                                         compute_dtype=dtype)
        else:
            self.expression_mapping = ExpressionMapping(cfg.w_dim, cfg.expression_mapping_layers)

    def map_latents(self, z, c, truncation_psi=1.0, truncation_cutoff=None, update_w_avg=False):
        """z (B, z_dim), c (B, c_dim) or None → ws (B, num_ws, w_dim) float32."""
        if self.config.c_dim == 0:
            c = None
        return self.mapping(z, c, truncation_psi=truncation_psi,
                            truncation_cutoff=truncation_cutoff, update_w_avg=update_w_avg)

    def synthesize(self, ws, noise_mode="const"):
        """ws (B, num_ws, w_dim) → (face (B, R, R, 14), blended mouth (B, Rm, Rm, 14)) float32."""
        cfg = self.config
        chex.assert_shape(ws, (None, cfg.num_ws, cfg.w_dim))
        face = self.synthesis(ws, noise_mode=noise_mode)
        face_crop = crop_mouth(face, self.mouth_rect, cfg.mouth_resolution)
        if not cfg.mouth_generator:   # Tab. 1(c) baseline: the face map's own mouth region
            return face, face_crop
        start = cfg.resolved_mouth_ws_start
        mouth_raw = self.mouth_synthesis(ws[:, start:start + cfg.mouth_num_ws], noise_mode=noise_mode)
        return face, self.blend(face_crop, mouth_raw)

    def expression_offset(self, condition):
        """Without G_d: condition (B, condition_dim) → w offset (B, w_dim) (`ExpressionMapping`)."""
        chex.assert_shape(condition, (None, self.config.condition_dim))
        return self.expression_mapping(condition)

    def dynamic_residual(self, face_input, mouth_input, condition):
        """G_d: (B, R, R, 17), (B, Rm, Rm, 17), (B, condition_dim) → (ΔF_face, ΔF_mouth)."""
        cfg = self.config
        chex.assert_shape(face_input, (None, cfg.uv_resolution, cfg.uv_resolution, cfg.feature_channels + 3))
        chex.assert_shape(mouth_input, (None, cfg.mouth_resolution, cfg.mouth_resolution,
                                        cfg.feature_channels + 3))
        chex.assert_shape(condition, (None, cfg.condition_dim))
        return self.dynamic(face_input, mouth_input, condition)

    def __call__(self, z, c, face_input, mouth_input, condition):
        """Touches every submodule (used by `init`)."""
        ws = self.map_latents(z, c)
        face, mouth = self.synthesize(ws, noise_mode="const")
        if not self.config.dynamic_module:
            return face, mouth, self.expression_offset(condition)
        return face, mouth, self.dynamic_residual(face_input, mouth_input, condition)


# --------------------------------------------------------------------------------------------
# The generator with the paper's static / dynamic inference split
# --------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass, data_fields=["face", "mouth", "ws"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StaticMaps:
    """What the static generator computes once per identity.

    face  (B, R, R, 14) float32    UV feature map F from G
    mouth (B, Rm, Rm, 14) float32  blended mouth map (G_m + blending ConvNet; without G_m,
                                   Tab. 1(c), the face map's mouth crop)
    ws    (B, num_ws, w_dim) float32

    A frozen dataclass and a JAX pytree: identity i of a batch is
    `jax.tree_util.tree_map(lambda x: x[i:i + 1], static)`.
    """

    face: jax.Array
    mouth: jax.Array
    ws: jax.Array


def expression_condition(flame_params, config: GeneratorConfig, batch: int) -> jax.Array:
    """G_d's condition (B, condition_dim) float32: the first `expression_dims` FLAME expression
    coefficients (zero-padded when fewer are given, missing = zeros) ⊕ jaw pose (3) if used."""
    flame_params = flame_params or {}
    parts = []
    expression = flame_params.get("expression")
    if expression is None:
        expression = jnp.zeros((batch, 0), jnp.float32)
    expression = jnp.asarray(expression, jnp.float32)
    chex.assert_rank(expression, 2)
    if expression.shape[0] != batch:
        raise ValueError(f"flame_params['expression'] has batch {expression.shape[0]}, expected {batch}")
    expression = expression[:, :config.expression_dims]
    parts.append(jnp.pad(expression, ((0, 0), (0, config.expression_dims - expression.shape[1]))))
    if config.use_jaw_pose:
        jaw = flame_params.get("jaw_pose")
        jaw = jnp.zeros((batch, 3), jnp.float32) if jaw is None else jnp.asarray(jaw, jnp.float32)
        chex.assert_shape(jaw, (batch, 3))
        parts.append(jaw)
    return jnp.concatenate(parts, axis=1)


def _flame_batch(flame_params) -> Optional[int]:
    sizes = {int(jnp.shape(v)[0]) for v in (flame_params or {}).values() if v is not None}
    if len(sizes) > 1:
        raise ValueError(f"flame_params have different batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


@dataclasses.dataclass(frozen=True, eq=False)
class RETA3DGenerator:
    """The RETA3D generator as pure functions over a Flax variables pytree.

    Build with `RETA3DGenerator.create(config, flame_model=None)` (None: the embedded template
    head). The head model and its texel bindings are static (closed over by jit); the variables
    pytree holds everything learned.

        variables = gen.init(rng)
        static = gen.jit_generate_static(variables, z, c)              # once per identity
        gaussians, aux = gen.jit_animate(variables, static, flame)     # per frame
    """

    config: GeneratorConfig
    flame_model: Any
    head_binding: Any

    @staticmethod
    def create(config: Optional[GeneratorConfig] = None, flame_model=None,
               log_gamma_s: Optional[float] = None) -> "RETA3DGenerator":
        """log_gamma_s: ln γs for both maps; None measures it from the texel spacing at the
        configured UV resolutions (`binding.HeadBinding.from_model`)."""
        from reta3d import binding, flame  # the head model is only needed for animation
        config = GeneratorConfig() if config is None else config
        flame_model = flame.load() if flame_model is None else flame_model
        head_binding = binding.HeadBinding.from_model(flame_model, config.uv_resolution,
                                                      config.mouth_resolution, log_gamma_s)
        return RETA3DGenerator(config, flame_model, head_binding)

    @functools.cached_property
    def networks(self) -> RETA3DNetworks:
        return RETA3DNetworks(self.config, tuple(float(t) for t in self.flame_model.mouth_rect))

    @property
    def num_gaussians(self) -> int:
        return self.head_binding.num_gaussians

    # -- initialisation -----------------------------------------------------------------------
    def init(self, rng: jax.Array):
        """Fresh variables {"params", "buffers", "mapping_state"} (G_d's last layers are zero).
        jit-compiled (op-by-op initialisation would compile every random draw separately), with
        LLVM's optimisation off (`networks.initialization`): it runs once."""
        return self._jit_init(rng)

    @functools.cached_property
    def _jit_init(self):
        return jit_init(functools.partial(init_networks, self.networks))

    # -- static part (once per identity) --------------------------------------------------------
    def map_latents(self, variables, z, c=None, truncation_psi=1.0, truncation_cutoff=None,
                    update_w_avg=False):
        """z (B, z_dim), c (B, c_dim) → ws (B, num_ws, w_dim); with update_w_avg also returns the
        new {"mapping_state": ...} collection (training: EMA of w with beta = w_avg_beta)."""
        z, c = self._check_latents(z, c)
        if update_w_avg:
            return self.networks.apply(variables, z, c, truncation_psi, truncation_cutoff, True,
                                       method=RETA3DNetworks.map_latents, mutable=["mapping_state"])
        return self.networks.apply(variables, z, c, truncation_psi, truncation_cutoff,
                                   method=RETA3DNetworks.map_latents)

    def synthesize(self, variables, ws, noise_mode="const", rng=None, condition=None) -> StaticMaps:
        """ws (B, num_ws, w_dim) → StaticMaps (G, G_m, blending). rng: for noise_mode="random".

        Without G_d (`config.expression_conditioned`, Tab. 1(c)) the maps are those of the FLAME
        `condition` (B, condition_dim) (None: the neutral one, zeros): G runs on
        ws + ExpressionMapping(condition); the returned StaticMaps.ws stay the identity's ws.
        With G_d, passing a condition is an error (the static maps are expression-free)."""
        rngs = {} if rng is None else {"noise": rng}
        ws_in = ws
        if self.config.expression_conditioned:
            if condition is None:
                condition = jnp.zeros((ws.shape[0], self.config.condition_dim), jnp.float32)
            offset = self.networks.apply(variables, condition, method=RETA3DNetworks.expression_offset)
            ws_in = ws + offset[:, None, :]
        elif condition is not None:
            raise ValueError("synthesize: a FLAME condition is only used without G_d "
                             "(GeneratorConfig.dynamic_module=False); with G_d the static maps "
                             "are expression-free and animate applies the expression")
        face, mouth = self.networks.apply(variables, ws_in, noise_mode, rngs=rngs,
                                          method=RETA3DNetworks.synthesize)
        return StaticMaps(face=face, mouth=mouth, ws=ws)

    def generate_static(self, variables, z, c=None, truncation_psi=1.0, truncation_cutoff=None,
                        noise_mode="const", rng=None) -> StaticMaps:
        """z (B, z_dim), c (B, c_dim) EG3D camera label (or None when c_dim = 0) → StaticMaps:
        face (B, R, R, 14), mouth (B, Rm, Rm, 14), ws (B, num_ws, w_dim). Mapping → G → G_m →
        blending ConvNet."""
        ws = self.map_latents(variables, z, c, truncation_psi, truncation_cutoff)
        return self.synthesize(variables, ws, noise_mode, rng)

    # -- dynamic part (per frame) ---------------------------------------------------------------
    def dynamic_residual(self, variables, static: StaticMaps, face_xyz, mouth_xyz, condition):
        """G_d on (static ⊕ xyz): face_xyz (B, R, R, 3), mouth_xyz (B, Rm, Rm, 3), condition
        (B, condition_dim) → (ΔF_face (B, R, R, 14), ΔF_mouth (B, Rm, Rm, 14)).
        Raises ValueError for a generator without G_d."""
        if not self.config.dynamic_module:
            raise ValueError("this generator has no G_d (GeneratorConfig.dynamic_module=False)")
        face_in = jnp.concatenate([static.face, face_xyz], axis=-1)
        mouth_in = jnp.concatenate([static.mouth, mouth_xyz], axis=-1)
        return self.networks.apply(variables, face_in, mouth_in, condition,
                                   method=RETA3DNetworks.dynamic_residual)

    def animate(self, variables, static: StaticMaps, flame_params, use_dynamic: bool = True,
                noise_mode: str = "const", rng=None):
        """One frame per identity: StaticMaps (batch B, or 1 broadcast to the FLAME batch) and
        flame_params (dict of (B, n): shape, expression, global_pose, neck_pose, jaw_pose,
        eye_pose; missing = zeros) → (rasterizer.Gaussians with N = num_gaussians, aux).

        With use_dynamic, the static maps are decoded on the posed mesh, their Gaussian positions
        written back at their texels (xyz maps), G_d predicts ΔF and F_d = F + ΔF is decoded;
        without, F itself is decoded (the paper's I_s for L_ID). Never runs the static generator.

        Without G_d (`config.expression_conditioned`, Tab. 1(c)'s baseline rows) the expression
        conditions G itself: every call reruns G (and G_m, blending) from static.ws and this
        frame's condition (`synthesize`, with `noise_mode` / `rng`), whatever use_dynamic says.

        aux: offset_raw (B, N, 3) raw offsets, scale_raw (B, N, 3), scales (B, N, 3) activated
        scales, means (B, N, 3), surface_points (B, N, 3) (each Gaussian's point p on the posed
        mesh, before its offset: where a Gaussian belongs on the face), vertices_world (B, V, 3)
        (the posed FLAME mesh, EG3D world space), up (B, 3), face_features / mouth_features
        (the decoded maps, F_d or F), delta_face / delta_mouth (ΔF, zeros without G_d),
        dynamic_applied () bool.

        Not jitted (`jit_animate` is), so it can sit inside a caller's jax.jit / jax.grad:
        differentiable in `variables`, `static` and every FLAME parameter.
        """
        from reta3d.binding import decode_head, pose_head
        cfg = self.config
        static = self._broadcast_static(static, flame_params)
        batch = static.face.shape[0]
        # FLAME is posed once; both decodes (static maps for the xyz input, then F_d) share it.
        posed = pose_head(self.flame_model, flame_params, batch, static.face.dtype)
        decode = functools.partial(decode_head, self.head_binding, self.flame_model.faces,
                                   posed=posed, kind=cfg.frame_kind)
        applied = bool(use_dynamic) and not cfg.expression_conditioned
        if cfg.expression_conditioned:   # Tab. 1(c) without G_d: G itself sees the expression
            condition = expression_condition(flame_params, cfg, batch)
            framed = self.synthesize(variables, static.ws, noise_mode, rng, condition=condition)
            face, mouth = framed.face, framed.mouth
            gaussians, aux = decode(face, mouth)
        elif applied:
            _, static_aux = decode(static.face, static.mouth)
            face_xyz, mouth_xyz = self.position_maps(static_aux["means"])
            condition = expression_condition(flame_params, cfg, batch)
            delta_face, delta_mouth = self.dynamic_residual(variables, static, face_xyz, mouth_xyz, condition)
            face, mouth = static.face + delta_face, static.mouth + delta_mouth
            gaussians, aux = decode(face, mouth)
        else:
            face, mouth = static.face, static.mouth
            gaussians, aux = decode(face, mouth)
        if not applied:
            delta_face, delta_mouth = jnp.zeros_like(face), jnp.zeros_like(mouth)
        aux = dict(aux, scales=gaussians.scales, face_features=face, mouth_features=mouth,
                   delta_face=delta_face, delta_mouth=delta_mouth,
                   dynamic_applied=jnp.asarray(applied))
        return gaussians, aux

    def position_maps(self, means):
        """G_d's xyz input: Gaussian world positions (B, N, 3) (face texels first, then mouth, as
        `head_gaussians` orders them) written back at their texels and scaled by gd_xyz_scale →
        (face_xyz (B, R, R, 3), mouth_xyz (B, Rm, Rm, 3)) float32, zeros at invalid texels."""
        from reta3d.binding import scatter_texels
        hb = self.head_binding
        chex.assert_shape(means, (None, hb.num_gaussians, 3))
        means = means * self.config.gd_xyz_scale
        return (scatter_texels(means[:, :hb.num_face], hb.face),
                scatter_texels(means[:, hb.num_face:], hb.mouth))

    def _broadcast_static(self, static: StaticMaps, flame_params) -> StaticMaps:
        """Checks the maps' shapes; a batch-1 identity is broadcast to the FLAME batch."""
        static = self._check_static(static)
        batch = _flame_batch(flame_params)
        if batch is None or batch == static.face.shape[0]:
            return static
        if static.face.shape[0] != 1:
            raise ValueError(f"static maps have batch {static.face.shape[0]} but flame_params have "
                             f"batch {batch} (use the same batch, or static maps of batch 1)")
        return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), static)

    # -- jit-compiled forms ------------------------------------------------------------------
    @functools.cached_property
    def jit_generate_static(self):
        """jax.jit(generate_static); truncation_psi, truncation_cutoff and noise_mode are static."""
        return jax.jit(self.generate_static,
                       static_argnames=("truncation_psi", "truncation_cutoff", "noise_mode"))

    @functools.cached_property
    def jit_animate(self):
        """jax.jit(animate); use_dynamic and noise_mode are static."""
        return jax.jit(self.animate, static_argnames=("use_dynamic", "noise_mode"))

    # -- checks ---------------------------------------------------------------------------------
    def _check_latents(self, z, c):
        cfg = self.config
        z = jnp.asarray(z)
        chex.assert_shape(z, (None, cfg.z_dim))
        if cfg.c_dim > 0:
            if c is None:
                raise ValueError(f"the mapping is camera-conditioned (c_dim={cfg.c_dim}): pass c of "
                                 f"shape (B, {cfg.c_dim}) (EG3D's 25-number label)")
            c = jnp.asarray(c)
            chex.assert_shape(c, (z.shape[0], cfg.c_dim))
        else:
            c = None
        return z, c

    def _check_static(self, static: StaticMaps) -> StaticMaps:
        cfg = self.config
        r, rm, f = cfg.uv_resolution, cfg.mouth_resolution, cfg.feature_channels
        if not isinstance(static, StaticMaps):
            raise TypeError(f"animate expects StaticMaps from generate_static, got {type(static).__name__}")
        chex.assert_shape(static.face, (None, r, r, f))
        chex.assert_shape(static.mouth, (static.face.shape[0], rm, rm, f))
        return static


def init_networks(networks: RETA3DNetworks, rng: jax.Array):
    """Initialise every submodule of `networks` with batch-1 dummy inputs."""
    cfg = networks.config
    z = jnp.zeros((1, cfg.z_dim), jnp.float32)
    c = jnp.zeros((1, cfg.c_dim), jnp.float32) if cfg.c_dim > 0 else None
    face_in = jnp.zeros((1, cfg.uv_resolution, cfg.uv_resolution, cfg.feature_channels + 3), jnp.float32)
    mouth_in = jnp.zeros((1, cfg.mouth_resolution, cfg.mouth_resolution, cfg.feature_channels + 3), jnp.float32)
    condition = jnp.zeros((1, cfg.condition_dim), jnp.float32)
    return networks.init({"params": rng}, z, c, face_in, mouth_in, condition)


def dynamic_params(variables):
    """The G_d parameter subtree (what the paper's L_reg^{G_d} = Σ‖w_i‖₂ sums over).
    Raises KeyError naming the ablation for a generator built without G_d."""
    params = variables["params"]
    if "dynamic" not in params:
        raise KeyError("these variables have no G_d (a Tab. 1(c) ablation generator with "
                       "dynamic_module=False)")
    return params["dynamic"]


def count_parameters(tree) -> int:
    """Total number of elements of the arrays (or ShapeDtypeStructs) in a pytree."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))
