"""StyleGAN2-ADA low-level ops in JAX, NHWC, with the semantics of NVIDIA's reference code.

Reference: NVlabs/stylegan2-ada-pytorch, `torch_utils/ops/{upfirdn2d,bias_act,conv2d_resample}.py`
and `training/networks.py` (see /work/shared/pytorch/README.txt). Parity with the official
PyTorch implementation is tested against seeded reference vectors (tests/test_stylegan2_ops.py).

Layouts (differ from PyTorch on purpose, JAX/XLA prefers them):
- activations NHWC: (N, H, W, C);
- conv weights HWIO: (kh, kw, in, out) (torch: (out, in, kh, kw));
- FIR filters: 1-D taps (n,) meaning the separable outer product, or a 2-D (fh, fw) array.

Mixed precision: every convolution takes `compute_dtype`; operands are cast to it while the
accumulation and the result stay float32 (`preferred_element_type`), so bf16 only halves the
memory traffic of the conv operands. Everything else (styles, demodulation, bias, activation,
FIR filters) runs in float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding = Union[int, Sequence[int]]

DEFAULT_FILTER_TAPS = (1, 3, 3, 1)

# name -> (default alpha, default gain); same table as stylegan2-ada's bias_act.activation_funcs.
ACTIVATIONS = {
    "linear": (0.0, 1.0),
    "relu": (0.0, math.sqrt(2.0)),
    "lrelu": (0.2, math.sqrt(2.0)),
    "tanh": (0.0, 1.0),
    "sigmoid": (0.0, 1.0),
    "elu": (0.0, 1.0),
    "selu": (0.0, 1.0),
    "softplus": (0.0, 1.0),
    "swish": (0.0, math.sqrt(2.0)),
}


# --------------------------------------------------------------------------------------------
# FIR filters and upfirdn2d


def setup_filter(taps: Sequence[float] = DEFAULT_FILTER_TAPS, normalize: bool = True,
                 separable: bool = False) -> np.ndarray:
    """FIR filter as stylegan2-ada's `upfirdn2d.setup_filter`.

    taps: (n,) 1-D taps. Returns (n, n) float32, the outer product normalised to sum 1
    (the `resample_filter` buffer of the PyTorch modules), or the normalised (n,) taps when
    `separable` (whose outer product is the same 2-D filter).
    """
    f = np.asarray(taps, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"FIR taps must be a non-empty 1-D sequence, got shape {f.shape}")
    if not separable:
        f = np.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f.astype(np.float32)


def _filter_size(f: Optional[Array]) -> Tuple[int, int]:
    """(fh, fw) of a 1-D (separable) or 2-D filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    if f.ndim == 1:
        return f.shape[0], f.shape[0]
    if f.ndim == 2:
        return f.shape[0], f.shape[1]
    raise ValueError(f"FIR filter must be 1-D (separable taps) or 2-D, got shape {f.shape}")


def _parse_scaling(s: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(sx, sy) from an int or a pair; torch order is x first."""
    if isinstance(s, int):
        s = (s, s)
    sx, sy = (int(v) for v in s)
    if sx < 1 or sy < 1:
        raise ValueError(f"up/down factors must be >= 1, got {s}")
    return sx, sy


def _parse_padding(padding: Padding) -> Tuple[int, int, int, int]:
    """(px0, px1, py0, py1) from an int, (px, py) or (px0, px1, py0, py1): torch's order."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    if len(padding) == 4:
        return tuple(padding)  # type: ignore[return-value]
    raise ValueError(f"padding must be an int, 2 or 4 ints, got {padding}")


def _pad_or_crop(x: Array, py0: int, py1: int, px0: int, px1: int) -> Array:
    """Pads (positive) or crops (negative) the H and W axes of NHWC `x`."""
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, ((0, 0, 0), (py0, py1, 0), (px0, px1, 0), (0, 0, 0)))


def _depthwise_correlate(x: Array, kernel_hw: Array, stride_h: int = 1,
                         stride_w: int = 1) -> Array:
    """VALID per-channel correlation of NHWC `x` with one (kh, kw) kernel, keeping every
    stride-th output: a weighted sum of kh·kw shifted (strided) slices.

    Written as slices rather than a grouped convolution (`feature_group_count = C`): XLA's
    CPU backend runs depthwise convolutions several times slower than the same arithmetic
    as fused elementwise ops, and the FIR filters here have at most 4×4 taps. Only the kept
    outputs are computed (the reference filters, then drops samples).
    """
    kh, kw = kernel_hw.shape
    h_out = (x.shape[1] - kh) // stride_h + 1
    w_out = (x.shape[2] - kw) // stride_w + 1
    kernel = kernel_hw.astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            part = jax.lax.slice(
                x, (0, i, j, 0),
                (x.shape[0], i + stride_h * (h_out - 1) + 1, j + stride_w * (w_out - 1) + 1,
                 x.shape[3]), (1, stride_h, stride_w, 1))
            part = part * kernel[i, j]
            out = part if out is None else out + part
    return out


def upfirdn2d(x: Array, f: Optional[Any], up: Union[int, Sequence[int]] = 1,
              down: Union[int, Sequence[int]] = 1, padding: Padding = 0,
              flip_filter: bool = False, gain: float = 1.0) -> Array:
    """Upsample, FIR filter, downsample: stylegan2-ada's `upfirdn2d` (reference path), NHWC.

    x: (N, H, W, C) float. f: (n,) separable taps, (fh, fw) 2-D filter, or None (identity).
    1. upsample by inserting up-1 zeros after every sample (length H*up);
    2. pad by `padding` = int | (px, py) | (px0, px1, py0, py1) (negative values crop);
    3. convolve with f (a true convolution; `flip_filter=True` makes it a correlation) scaled
       by gain (2-D f) or sqrt(gain) per pass (separable f), VALID;
    4. keep every down-th sample.
    Returns (N, H', W', C) with H' = (H*up_y + py0 + py1 - fh + 1) // down_y (rounded up).
    """
    chex.assert_rank(x, 4)
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    n, h, w, c = x.shape
    if f is None:
        f = jnp.ones((1, 1), jnp.float32)
    f = jnp.asarray(f, jnp.float32)
    fh, fw = _filter_size(f)

    if upx > 1 or upy > 1:
        # lax.pad's interior padding inserts zeros *between* samples; the trailing up-1 zeros
        # of the reference go into the high-side padding.
        zero = jnp.zeros((), x.dtype)
        x = jax.lax.pad(x, zero, ((0, 0, 0), (0, upy - 1, upy - 1), (0, upx - 1, upx - 1),
                                  (0, 0, 0)))
    x = _pad_or_crop(x, py0, py1, px0, px1)
    if x.shape[1] < fh or x.shape[2] < fw:
        raise ValueError(f"upfirdn2d: padded input {x.shape[1:3]} is smaller than the filter "
                         f"({fh}, {fw}); input (N,H,W,C)={(n, h, w, c)}, padding={padding}")

    if not flip_filter:
        f = jnp.flip(f)  # the reference convolves; conv_general_dilated correlates
    if f.ndim == 1:
        f = f * (gain ** 0.5)
        x = _depthwise_correlate(x, f[:, None], stride_h=downy)
        x = _depthwise_correlate(x, f[None, :], stride_w=downx)
    else:
        f = f * gain
        x = _depthwise_correlate(x, f, downy, downx)
    return x


def upsample2d(x: Array, f: Any, up: int = 2, padding: Padding = 0, flip_filter: bool = False,
               gain: float = 1.0) -> Array:
    """(N, H, W, C) -> (N, H*up, W*up, C): zero insertion + FIR with gain up², as stylegan2-ada."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fh, fw = _filter_size(jnp.asarray(f))
    p = (px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2,
         py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2)
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * upx * upy)


def downsample2d(x: Array, f: Any, down: int = 2, padding: Padding = 0,
                 flip_filter: bool = False, gain: float = 1.0) -> Array:
    """(N, H, W, C) -> (N, ceil(H/down), ceil(W/down), C): FIR then decimation, as stylegan2-ada."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fh, fw = _filter_size(jnp.asarray(f))
    p = (px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2,
         py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2)
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain)


# --------------------------------------------------------------------------------------------
# Convolutions


def _conv(x: Array, w: Array, stride: int = 1, padding: Tuple[int, int, int, int] = (0, 0, 0, 0),
          flip_weight: bool = True, lhs_dilation: int = 1, feature_group_count: int = 1,
          compute_dtype: Any = None) -> Array:
    """NHWC x HWIO convolution, torch `_conv2d_wrapper` semantics.

    flip_weight=True is a correlation (what torch.conv2d does); False flips the kernel, i.e. a
    true convolution. padding = (py0, py1, px0, px1). Accumulates in float32.
    """
    if not flip_weight and (w.shape[0] > 1 or w.shape[1] > 1):
        w = w[::-1, ::-1]
    dtype = jnp.float32 if compute_dtype is None else compute_dtype
    py0, py1, px0, px1 = padding
    return jax.lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), window_strides=(stride, stride),
        padding=((py0, py1), (px0, px1)), lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=feature_group_count,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)


def _conv_transpose(x: Array, w: Array, stride: int, padding: Tuple[int, int],
                    flip_weight: bool, feature_group_count: int = 1,
                    compute_dtype: Any = None) -> Array:
    """torch.conv_transpose2d(x, w, stride, padding) for NHWC x and HWIO w (in -> out).

    out[n] = sum_i x[i] k[n + p - stride*i] with k = w (flip_weight=True, torch's "no flip")
    or k = w flipped. Computed as a correlation of the lhs-dilated input with the flipped k.
    """
    kh, kw = w.shape[0], w.shape[1]
    pyt, pxt = padding
    # Correlating with flip(k) == correlating with w when torch would have flipped it.
    kernel = w[::-1, ::-1] if flip_weight else w
    return _conv(x, kernel, stride=1,
                 padding=(kh - 1 - pyt, kh - 1 - pyt, kw - 1 - pxt, kw - 1 - pxt),
                 flip_weight=True, lhs_dilation=stride,
                 feature_group_count=feature_group_count, compute_dtype=compute_dtype)


def conv2d_resample(x: Array, w: Array, f: Optional[Any] = None, up: int = 1, down: int = 1,
                    padding: Padding = 0, flip_weight: bool = True, flip_filter: bool = False,
                    feature_group_count: int = 1, compute_dtype: Any = None) -> Array:
    """2-D convolution with optional FIR up/downsampling: stylegan2-ada's `conv2d_resample`.

    x: (N, H, W, Cin) float32. w: (kh, kw, Cin // groups, Cout) HWIO, raw (no weight gain).
    f: FIR filter (taps or 2-D), needed when up > 1 or down > 1. padding: as `upfirdn2d`.
    flip_weight=True: correlation (torch conv2d); False: true convolution. The up=2 path
    follows the reference exactly: stride-2 transposed conv, then FIR with gain up².
    Returns (N, H', W', Cout) float32.
    """
    chex.assert_rank([x, w], 4)
    if x.shape[-1] != w.shape[2] * feature_group_count:
        raise ValueError(f"conv2d_resample: x has {x.shape[-1]} channels but weight {w.shape} "
                         f"(HWIO) with {feature_group_count} groups expects "
                         f"{w.shape[2] * feature_group_count}")
    if not (isinstance(up, int) and isinstance(down, int) and up >= 1 and down >= 1):
        raise ValueError(f"conv2d_resample: up/down must be ints >= 1, got up={up} down={down}")
    if (up > 1 or down > 1) and f is None:
        raise ValueError("conv2d_resample: a FIR filter is required for up/downsampling")
    kh, kw = w.shape[0], w.shape[1]
    f_arr = None if f is None else jnp.asarray(f, jnp.float32)
    fh, fw = _filter_size(f_arr)
    px0, px1, py0, py1 = _parse_padding(padding)
    conv_kwargs = dict(feature_group_count=feature_group_count, compute_dtype=compute_dtype)

    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # 1x1 with downsampling only: downsample first, then convolve (cheaper).
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f_arr, down=down, padding=(px0, px1, py0, py1), flip_filter=flip_filter)
        return _conv(x, w, flip_weight=flip_weight, **conv_kwargs)
    # 1x1 with upsampling only: convolve first, then upsample.
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, flip_weight=flip_weight, **conv_kwargs)
        return upfirdn2d(x, f_arr, up=up, padding=(px0, px1, py0, py1), gain=up ** 2,
                         flip_filter=flip_filter)
    # Downsampling only: FIR, then strided convolution.
    if down > 1 and up == 1:
        x = upfirdn2d(x, f_arr, padding=(px0, px1, py0, py1), flip_filter=flip_filter)
        return _conv(x, w, stride=down, flip_weight=flip_weight, **conv_kwargs)
    # Upsampling: strided transposed convolution, then FIR.
    if up > 1:
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv_transpose(x, w, stride=up, padding=(pyt, pxt), flip_weight=not flip_weight,
                            **conv_kwargs)
        x = upfirdn2d(x, f_arr, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt),
                      gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f_arr, down=down, flip_filter=flip_filter)
        return x
    # No resampling.
    if px0 >= 0 and px1 >= 0 and py0 >= 0 and py1 >= 0:
        return _conv(x, w, padding=(py0, py1, px0, px1), flip_weight=flip_weight, **conv_kwargs)
    x = _pad_or_crop(x, py0, py1, px0, px1)
    return _conv(x, w, flip_weight=flip_weight, **conv_kwargs)


def modulated_conv2d(x: Array, weight: Array, styles: Array, noise: Optional[Array] = None,
                     up: int = 1, down: int = 1, padding: Padding = 0,
                     resample_filter: Optional[Any] = None, demodulate: bool = True,
                     flip_weight: bool = True, fused: bool = False,
                     compute_dtype: Any = None) -> Array:
    """StyleGAN2 modulated convolution: stylegan2-ada's `modulated_conv2d`, NHWC.

    x: (N, H, W, Cin) float32; weight: (kh, kw, Cin, Cout) HWIO, raw; styles: (N, Cin) float32;
    noise: broadcastable to the (N, H', W', Cout) output, added after demodulation (and before
    the caller's bias). Per sample: W' = W * styles[n] over Cin; if demodulate,
    W' *= rsqrt(sum over (kh, kw, Cin) of W'^2 + 1e-8).

    fused=True convolves with the per-sample weights (one grouped convolution, groups = N),
    as torch's fused path. fused=False (default) scales x by the styles, convolves with the
    shared weight and scales the output by the demodulation coefficients: the same linear map
    (torch's unfused path), and a plain batched convolution, which XLA runs faster.
    Returns (N, H', W', Cout) float32.
    """
    chex.assert_rank([x, weight, styles], [4, 4, 2])
    n = x.shape[0]
    kh, kw, cin, cout = weight.shape
    chex.assert_shape(styles, (n, cin))
    if x.shape[-1] != cin:
        raise ValueError(f"modulated_conv2d: x has {x.shape[-1]} channels, weight {weight.shape} "
                         f"(HWIO) expects {cin}")
    styles = styles.astype(jnp.float32)
    weight = weight.astype(jnp.float32)

    dcoefs = None
    if demodulate:
        # sum_{kh,kw,cin} (W*s)^2 = sum_cin s^2 * sum_{kh,kw} W^2: avoids the (N,kh,kw,Cin,Cout) tensor.
        w_sq = jnp.sum(jnp.square(weight), axis=(0, 1))  # (Cin, Cout)
        dcoefs = jax.lax.rsqrt(jnp.dot(jnp.square(styles), w_sq,
                                       precision=jax.lax.Precision.HIGHEST) + 1e-8)  # (N, Cout)

    if fused:
        w = weight[None] * styles[:, None, None, :, None]  # (N, kh, kw, Cin, Cout)
        if demodulate:
            w = w * dcoefs[:, None, None, None, :]
        # Fold the batch into channels: groups = N, sample n uses its own (Cin -> Cout) weight.
        w = jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(kh, kw, cin, n * cout)
        h, wd = x.shape[1], x.shape[2]
        xg = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, wd, n * cin)
        y = conv2d_resample(xg, w, f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight, feature_group_count=n,
                            compute_dtype=compute_dtype)
        y = jnp.transpose(y.reshape(y.shape[1], y.shape[2], n, cout), (2, 0, 1, 3))
    else:
        y = conv2d_resample(x * styles[:, None, None, :], weight, f=resample_filter, up=up,
                            down=down, padding=padding, flip_weight=flip_weight,
                            compute_dtype=compute_dtype)
        if demodulate:
            y = y * dcoefs[:, None, None, :]
    if noise is not None:
        y = y + noise
    return y


# --------------------------------------------------------------------------------------------
# Pointwise ops


def bias_act(x: Array, b: Optional[Array] = None, act: str = "linear", alpha: Optional[float] = None,
             gain: Optional[float] = None, clamp: Optional[float] = None, axis: int = -1) -> Array:
    """Bias, activation, gain, clamp, in that order: stylegan2-ada's `bias_act`.

    x: (..., C, ...) float; b: (C,) added along `axis` (default last: NHWC / (N, C) features).
    gain None uses the activation's default (sqrt(2) for lrelu/relu/swish, else 1); alpha None
    uses 0.2 for lrelu. clamp None (or < 0) disables clamping to [-clamp, clamp].
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    def_alpha, def_gain = ACTIVATIONS[act]
    alpha = def_alpha if alpha is None else float(alpha)
    gain = def_gain if gain is None else float(gain)
    if b is not None:
        axis = axis % x.ndim
        chex.assert_shape(b, (x.shape[axis],))
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        x = x + b.reshape(shape).astype(x.dtype)
    if act == "relu":
        x = jax.nn.relu(x)
    elif act == "lrelu":
        x = jnp.where(x >= 0, x, x * alpha)
    elif act == "tanh":
        x = jnp.tanh(x)
    elif act == "sigmoid":
        x = jax.nn.sigmoid(x)
    elif act == "elu":
        x = jax.nn.elu(x)
    elif act == "selu":
        x = jax.nn.selu(x)
    elif act == "softplus":
        x = jax.nn.softplus(x)
    elif act == "swish":
        x = jax.nn.sigmoid(x) * x
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = jnp.clip(x, -clamp, clamp)
    return x


def normalize_2nd_moment(x: Array, axis: int = 1, eps: float = 1e-8) -> Array:
    """x * rsqrt(mean(x², axis) + eps): StyleGAN's pixel norm of latents. x: (N, D) float32."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def minibatch_std(x: Array, group_size: Optional[int] = 4, num_channels: int = 1) -> Array:
    """Minibatch standard deviation layer (stylegan2-ada `MinibatchStdLayer`), NHWC.

    x: (N, H, W, C) float32 -> (N, H, W, C + num_channels). G = min(group_size, N) (N when
    group_size is None); sample i is in group i mod (N/G), as the reference's reshape
    (G, N/G, ...). For each group and each of the F = num_channels channel slices: biased std
    over the group (+1e-8 inside the sqrt), averaged over (H, W, C/F); appended as channels.
    """
    chex.assert_rank(x, 4)
    n, h, w, c = x.shape
    g = n if group_size is None else min(int(group_size), n)
    f = int(num_channels)
    if n % g != 0:
        raise ValueError(f"minibatch_std: batch {n} is not divisible by the group size {g}")
    if f < 1 or c % f != 0:
        raise ValueError(f"minibatch_std: {c} channels not divisible by num_channels={f}")
    y = x.astype(jnp.float32).reshape(g, n // g, h, w, f, c // f)
    y = y - jnp.mean(y, axis=0)
    y = jnp.mean(jnp.square(y), axis=0)  # (n/G, H, W, F, C/F)
    y = jnp.sqrt(y + 1e-8)
    y = jnp.mean(y, axis=(1, 2, 4))  # (n/G, F)
    y = jnp.tile(y, (g, 1))  # row i = group i mod (n/G)
    y = jnp.broadcast_to(y[:, None, None, :], (n, h, w, f)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)
