"""StyleGAN2 ops: parity with the official PyTorch ops, naive float64 references, statistics."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d.networks import ops

REF_DIR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "pytorch"
OPS_FILE = REF_DIR / "sg2_ops.npz"


def nhwc(a):
    return jnp.asarray(a, jnp.float32).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def hwio(w):
    return jnp.asarray(w, jnp.float32).transpose(2, 3, 1, 0)


def assert_close_rel(ours, ref, rel=1e-5, abs_=1e-5):
    """README tolerance: |ours - ref| <= rel * max|ref| + abs."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref))
    assert err <= rel * np.max(np.abs(ref)) + abs_, f"max abs err {err}, max|ref| {np.abs(ref).max()}"


# --------------------------------------------------------------------------------------------
# Naive float64 references (loops over kernel taps, no lax.conv)


def naive_correlate(x, w, stride=1):
    """VALID correlation. x (N, H, W, Cin), w (kh, kw, Cin, Cout) -> (N, Ho, Wo, Cout)."""
    kh, kw = w.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nhwc,cd->nhwd", x[:, a:a + ho, b:b + wo, :], w[a, b])
    return out[:, ::stride, ::stride, :]


def naive_pad(x, py0, py1, px0, px1):
    x = np.pad(x, ((0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0)), (0, 0)))
    return x[:, max(-py0, 0):x.shape[1] - max(-py1, 0), max(-px0, 0):x.shape[2] - max(-px1, 0)]


def naive_upfirdn2d(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """The definition: zero insertion, pad/crop, true convolution with f*gain, decimation."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    u = np.zeros((n, h * up, w * up, c))
    u[:, ::up, ::up] = x
    px0, px1, py0, py1 = pad
    u = naive_pad(u, py0, py1, px0, px1)
    k = np.asarray(f, np.float64) * gain
    if not flip_filter:
        k = k[::-1, ::-1]
    out = np.zeros((n, u.shape[1] - k.shape[0] + 1, u.shape[2] - k.shape[1] + 1, c))
    for a in range(k.shape[0]):
        for b in range(k.shape[1]):
            out += u[:, a:a + out.shape[1], b:b + out.shape[2]] * k[a, b]
    return out[:, ::down, ::down]


def naive_modconv(x, w, styles, up=1, demodulate=True):
    """Per-sample explicit conv with modulated (and demodulated) weights.

    up=1: 'same' correlation (padding k//2). up=2 is README's definition of SynthesisLayer conv0:
    zero-insertion x2, pad 3/2, FIR [1,3,3,1] gain 4, VALID correlation with the FLIPPED kernel.
    """
    x, w, styles = (np.asarray(a, np.float64) for a in (x, w, styles))
    outs = []
    for i in range(x.shape[0]):
        wi = w * styles[i][None, None, :, None]
        if demodulate:
            wi = wi / np.sqrt(np.sum(wi ** 2, axis=(0, 1, 2), keepdims=True) + 1e-8)
        xi = x[i:i + 1]
        if up == 1:
            p = w.shape[0] // 2
            outs.append(naive_correlate(naive_pad(xi, p, p, p, p), wi))
        else:
            xi = naive_upfirdn2d(xi, ops.setup_filter(), up=2, down=1, pad=(3, 2, 3, 2), gain=4.0)
            outs.append(naive_correlate(xi, wi[::-1, ::-1]))
    return np.concatenate(outs, axis=0)


# --------------------------------------------------------------------------------------------
# Parity with the official PyTorch ops


@pytest.fixture(scope="module")
def ops_ref():
    if not OPS_FILE.is_file():
        pytest.skip(f"reference file {OPS_FILE} not present")
    with np.load(OPS_FILE) as d:
        return {k: d[k] for k in d.files}


def test_setup_filter_matches_pytorch_buffer(ops_ref):
    np.testing.assert_array_equal(ops.setup_filter((1, 3, 3, 1)), ops_ref["filter"])


@pytest.mark.parametrize("name", ["up_out", "down_out", "up8_out", "down8_out"])
def test_resample_parity(ops_ref, name):
    x = nhwc(ops_ref["ud_x8" if "8" in name else "ud_x"])
    fn = ops.upsample2d if name.startswith("up") else ops.downsample2d
    assert_close_rel(nchw(fn(x, ops_ref["filter"])), ops_ref[name])
    # The separable taps give the same filter as the stored 2-D buffer.
    assert_close_rel(nchw(fn(x, ops.setup_filter(separable=True))), ops_ref[name])


@pytest.mark.parametrize("fused", [False, True])
def test_modulated_conv_parity(ops_ref, fused):
    x, w, s = nhwc(ops_ref["mc_x"]), hwio(ops_ref["mc_w"]), jnp.asarray(ops_ref["mc_styles"])
    f = ops_ref["filter"]
    assert_close_rel(nchw(ops.modulated_conv2d(x, w, s, padding=1, fused=fused)),
                     ops_ref["mc_up1_out"])
    assert_close_rel(nchw(ops.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=f,
                                               flip_weight=False, fused=fused)),
                     ops_ref["mc_up2_out"])
    assert_close_rel(nchw(ops.modulated_conv2d(x, hwio(ops_ref["mc_w1x1"]), s, demodulate=False,
                                               fused=fused)), ops_ref["mc_torgb_out"])


def test_conv2d_resample_down_parity(ops_ref):
    x, f = nhwc(ops_ref["ud_x8"]), ops_ref["filter"]
    assert_close_rel(nchw(ops.conv2d_resample(x, hwio(ops_ref["cr_w3"]), f, down=2, padding=1)),
                     ops_ref["cr_down3_out"])
    assert_close_rel(nchw(ops.conv2d_resample(x, hwio(ops_ref["cr_w1"]), f, down=2, padding=0)),
                     ops_ref["cr_down1_out"])


def test_bias_act_normalize_mbstd_parity(ops_ref):
    x, b = nhwc(ops_ref["ba_x"]), jnp.asarray(ops_ref["ba_b"])
    assert_close_rel(nchw(ops.bias_act(x, b, act="lrelu", clamp=256)),
                     ops_ref["ba_lrelu_clamp256_out"])
    assert_close_rel(nchw(ops.bias_act(x, b, act="lrelu")), ops_ref["ba_lrelu_out"])
    assert_close_rel(nchw(ops.bias_act(x, b, act="linear", clamp=256)),
                     ops_ref["ba_linear_clamp256_out"])
    assert_close_rel(ops.normalize_2nd_moment(jnp.asarray(ops_ref["n2m_x"])), ops_ref["n2m_out"])
    assert_close_rel(nchw(ops.minibatch_std(nhwc(ops_ref["mbstd_x"]), 4, 1)),
                     ops_ref["mbstd_g4_out"])


# --------------------------------------------------------------------------------------------
# Naive references


@pytest.mark.parametrize("up,down,pad,flip", [
    (1, 1, (1, 2, 0, 3), False),
    (2, 1, (2, 1, 2, 1), False),
    (1, 2, (1, 1, 1, 1), True),
    (3, 2, (-1, 2, 3, -2), False),  # negative padding crops
])
def test_upfirdn2d_matches_definition(up, down, pad, flip):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    f = rng.standard_normal((4, 3)).astype(np.float32)  # asymmetric: flips matter
    ours = ops.upfirdn2d(jnp.asarray(x), f, up=up, down=down, padding=pad, flip_filter=flip,
                         gain=1.7)
    ref = naive_upfirdn2d(x, f, up, down, pad, flip_filter=flip, gain=1.7)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_separable_taps_equal_outer_product():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
    taps = np.array([1.0, 2.0, 4.0], np.float32)  # asymmetric
    a = ops.upfirdn2d(x, taps, up=2, padding=1, gain=4.0)
    b = ops.upfirdn2d(x, np.outer(taps, taps), up=2, padding=1, gain=4.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_conv2d_resample_matches_readme_definitions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    w3 = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)  # generic (asymmetric) kernel
    w1 = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    f = ops.setup_filter()
    # down=2, 3x3: FIR with pad 2/2, then stride-2 VALID correlation.
    ref = naive_correlate(naive_upfirdn2d(x, f, 1, 1, (2, 2, 2, 2)), w3, stride=2)
    np.testing.assert_allclose(np.asarray(ops.conv2d_resample(jnp.asarray(x), w3, f, down=2,
                                                              padding=1)), ref, atol=1e-5)
    # down=2, 1x1: downsample2d (pad 1/1, FIR, every 2nd pixel), then 1x1.
    ref = naive_correlate(naive_upfirdn2d(x, f, 1, 2, (1, 1, 1, 1)), w1)
    np.testing.assert_allclose(np.asarray(ops.conv2d_resample(jnp.asarray(x), w1, f, down=2)),
                               ref, atol=1e-5)
    # up=2 with flip_weight=False: zero insertion, pad 3/2, FIR gain 4, correlate flipped kernel.
    ref = naive_correlate(naive_upfirdn2d(x, f, 2, 1, (3, 2, 3, 2), gain=4.0), w3[::-1, ::-1])
    np.testing.assert_allclose(np.asarray(ops.conv2d_resample(jnp.asarray(x), w3, f, up=2,
                                                              padding=1, flip_weight=False)),
                               ref, atol=1e-5)
    # up=1, flip_weight=False is a true convolution.
    ref = naive_correlate(naive_pad(x, 1, 1, 1, 1), w3[::-1, ::-1])
    np.testing.assert_allclose(np.asarray(ops.conv2d_resample(jnp.asarray(x), w3, padding=1,
                                                              flip_weight=False)), ref, atol=1e-5)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("fused", [False, True])
def test_modulated_conv_equals_per_sample_conv(up, fused):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    styles = (1 + 0.5 * rng.standard_normal((3, 4))).astype(np.float32)
    noise = rng.standard_normal((3, 5 * up, 5 * up, 1)).astype(np.float32)
    ours = ops.modulated_conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(styles),
                                noise=jnp.asarray(noise), up=up, padding=1,
                                resample_filter=ops.setup_filter(), flip_weight=(up == 1),
                                fused=fused)
    ref = naive_modconv(x, w, styles, up=up) + noise
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=2e-5)
    # Without demodulation the styles scale the output linearly.
    ours = ops.modulated_conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(styles), up=up,
                                padding=1, resample_filter=ops.setup_filter(),
                                flip_weight=(up == 1), demodulate=False, fused=fused)
    np.testing.assert_allclose(np.asarray(ours), naive_modconv(x, w, styles, up, False),
                               rtol=1e-4, atol=5e-5)


def test_demodulation_gives_unit_variance():
    """Unit-variance iid input -> unit-variance output, whatever the styles' scale."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((8, 24, 24, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 32)), jnp.float32)
    for scale in (0.1, 1.0, 30.0):
        styles = jnp.asarray(scale * (1 + 0.5 * rng.standard_normal((8, 64))), jnp.float32)
        y = np.asarray(ops.modulated_conv2d(x, w, styles, padding=1))[:, 1:-1, 1:-1]  # no border
        assert abs(y.var() - 1) < 0.03, y.var()
        var_per_sample = y.var(axis=(1, 2, 3))  # each sample has its own styles
        assert np.all(np.abs(var_per_sample - 1) < 0.1), var_per_sample
    # Without demodulation the variance follows the styles (sanity check of the test itself).
    y = np.asarray(ops.modulated_conv2d(x, w, 3 * jnp.ones((8, 64)), padding=1, demodulate=False))
    assert y.var() > 100


def test_bias_act_hand_computed():
    x = jnp.array([[-2.0, 0.5, 300.0]])
    b = jnp.array([1.0, -1.0, 0.0])
    s2 = math.sqrt(2)
    # lrelu: x+b = [-1, -0.5, 300] -> [-0.2, -0.1, 300] * sqrt2, clamp 256 on the last.
    np.testing.assert_allclose(np.asarray(ops.bias_act(x, b, act="lrelu", clamp=256)),
                               [[-0.2 * s2, -0.1 * s2, 256.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.bias_act(x, b, act="linear", gain=2.0)),
                               [[-2.0, -1.0, 600.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.bias_act(x, None, act="relu", gain=1.0)),
                               [[0.0, 0.5, 300.0]], rtol=1e-6)
    # Clamped values get no gradient (as torch's clamp).
    g = jax.grad(lambda v: ops.bias_act(v, b, act="lrelu", clamp=256).sum())(x)
    np.testing.assert_allclose(np.asarray(g), [[0.2 * s2, 0.2 * s2, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.bias_act(x, act="gelu_typo")


def test_normalize_2nd_moment_unit_mean_square():
    x = jax.random.normal(jax.random.key(0), (5, 9)) * jnp.arange(1, 6)[:, None]
    y = ops.normalize_2nd_moment(x)
    np.testing.assert_allclose(np.asarray(jnp.mean(y ** 2, axis=1)), np.ones(5), rtol=1e-5)


def test_minibatch_std_matches_loop_over_groups():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 2, 4)).astype(np.float32)  # N=6, G=3 -> 2 groups, F=2
    ours = np.asarray(ops.minibatch_std(jnp.asarray(x), group_size=3, num_channels=2))
    assert ours.shape == (6, 3, 2, 6)
    np.testing.assert_array_equal(ours[..., :4], x)
    n_groups = 2
    for i in range(6):
        members = x[[j for j in range(6) if j % n_groups == i % n_groups]].astype(np.float64)
        for f in range(2):
            chunk = members[..., 2 * f:2 * f + 2]  # channel slice f (C/F = 2 channels)
            expected = np.sqrt(chunk.var(axis=0) + 1e-8).mean()
            np.testing.assert_allclose(ours[i, :, :, 4 + f], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        ops.minibatch_std(jnp.asarray(x[:5]), group_size=3)


def test_bf16_compute_close_to_fp32_and_returns_fp32():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)
    s = jnp.asarray(1 + 0.3 * rng.standard_normal((2, 16)), jnp.float32)
    ref = ops.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=ops.setup_filter(),
                               flip_weight=False)
    low = ops.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=ops.setup_filter(),
                               flip_weight=False, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < rel < 3e-2, rel  # bf16 really used (not bit-identical), but close


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d_resample(x, jnp.zeros((3, 3, 5, 2)))
    with pytest.raises(ValueError, match="FIR filter is required"):
        ops.conv2d_resample(x, jnp.zeros((3, 3, 3, 2)), down=2)
    with pytest.raises(ValueError, match="smaller than the filter"):
        ops.upfirdn2d(jnp.zeros((1, 2, 2, 1)), ops.setup_filter(), padding=0)
    with pytest.raises(ValueError, match="padding"):
        ops.upfirdn2d(x, None, padding=(1, 2, 3))
