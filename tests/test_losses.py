"""Tests for reta3d.losses, reta3d.vgg and experiments/convert_vgg16.py."""
import dataclasses
import functools
import importlib.util
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d import losses, vgg

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Adversarial terms and R1.


def test_generator_adversarial_hand_computed():
    logits = jnp.array([[0.0], [math.log(3.0)]])
    # softplus(0) = ln 2; softplus(-ln 3) = ln(1 + 1/3).
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    np.testing.assert_allclose(losses.generator_adversarial(logits), expected, rtol=1e-6)


def test_discriminator_adversarial_hand_computed():
    fake = jnp.array([[0.0], [math.log(3.0)]])  # softplus(+x): ln 2, ln 4
    real = jnp.array([[math.log(3.0)]])  # softplus(-ln 3) = ln(4/3)
    expected = (math.log(2.0) + math.log(4.0)) / 2 + math.log(4.0 / 3.0)
    np.testing.assert_allclose(losses.discriminator_adversarial(fake, real), expected, rtol=1e-6)


def test_adversarial_rejects_flat_logits():
    with pytest.raises(AssertionError):
        losses.generator_adversarial(jnp.zeros((4,)))


def _normal(seed, shape):
    # numpy, not jax.random: threefry's first compile costs seconds on a loaded CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _cameras(batch, seed=0):
    return _normal(seed, (batch, 25))


def test_r1_linear_discriminator_equals_weight_norm_squared():
    images = _normal(1, (3, 4, 5, 3))
    weight = _normal(2, (4, 5, 3))
    cameras = _cameras(3)

    def d_apply(x, c):  # D(x|c) = <w, x> + c_0: gradient w.r.t. x is w for every sample.
        return (jnp.sum(x * weight, axis=(1, 2, 3)) + c[:, 0])[:, None]

    penalty, logits = jax.jit(losses.r1_penalty, static_argnums=0)(d_apply, images, cameras)
    np.testing.assert_allclose(penalty, jnp.sum(weight**2), rtol=1e-5)
    np.testing.assert_allclose(logits, d_apply(images, cameras), rtol=1e-6)
    with pytest.raises(AssertionError):  # cameras must be (B, 25) EG3D labels
        losses.r1_penalty(d_apply, images, cameras[:, :16])


def test_r1_quadratic_camera_conditioned_discriminator():
    batch = 3
    images = _normal(3, (batch, 2, 2, 3))
    a = _normal(4, (12, 12))
    a_sym = a + a.T
    cameras = _cameras(batch, seed=5)

    # D(x|c) = (1 + c_0) · ½ xᵀAx  ->  ∇x = (1 + c_0) A x (A symmetric), per sample.
    def d_apply(x, c):
        flat = x.reshape(x.shape[0], -1)
        return ((1.0 + c[:, 0]) * 0.5 * jnp.einsum("bi,ij,bj->b", flat, a_sym, flat))[:, None]

    penalty, _ = losses.r1_penalty(d_apply, images, cameras)
    flat = np.asarray(images, np.float64).reshape(batch, -1)
    grads = (1.0 + np.asarray(cameras[:, 0], np.float64))[:, None] * (flat @ np.asarray(a_sym, np.float64))
    np.testing.assert_allclose(penalty, np.mean(np.sum(grads**2, axis=1)), rtol=1e-5)


def test_r1_double_backward_to_discriminator_parameters():
    images = _normal(6, (4, 2, 3, 3))
    cameras = _cameras(4)
    matrix = _normal(7, (18, 18))

    def r1_of(params):
        def d_apply(x, c):  # D(x) = ½ ||M x||²  ->  ∇x = MᵀM x
            flat = x.reshape(x.shape[0], -1)
            return 0.5 * jnp.sum((flat @ params.T) ** 2, axis=1, keepdims=True)

        return losses.r1_penalty(d_apply, images, cameras)[0]

    # R1(M) = mean_b ||MᵀM x_b||²; checked against central finite differences in float64.
    m = np.asarray(matrix, np.float64)
    x = np.asarray(images, np.float64).reshape(4, -1)

    def r1_numpy(mat):
        return np.mean(np.sum((x @ (mat.T @ mat).T) ** 2, axis=1))

    grad = np.asarray(jax.grad(r1_of)(matrix))
    rng = np.random.default_rng(0)
    for _ in range(5):
        i, j = rng.integers(0, 18, size=2)
        step = np.zeros_like(m)
        step[i, j] = 1e-5
        numeric = (r1_numpy(m + step) - r1_numpy(m - step)) / 2e-5
        np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-3, atol=1e-2)


def test_r1_loss_scaling():
    np.testing.assert_allclose(losses.r1_loss(jnp.float32(2.0)), 16.0)  # 2 · 1/2 · 16
    np.testing.assert_allclose(losses.r1_loss(jnp.float32(3.0), gamma=10.0, interval=1), 15.0)
    with pytest.raises(ValueError, match="interval"):
        losses.r1_loss(jnp.float32(1.0), interval=0)


def test_lazy_regularization_adam_numbers():
    # StyleGAN2 D: lr 0.002, betas (0, 0.99), every 16 steps; mb_ratio = 16/17.
    lr, b1, b2 = losses.lazy_regularization_adam(0.002, 0.0, 0.99, 16)
    assert lr == pytest.approx(0.0018823529, rel=1e-7)
    assert b1 == 0.0
    assert b2 == pytest.approx(0.9905855, rel=1e-6)  # exp(16/17 · ln 0.99)
    # G path-length style: interval 4 -> ratio 0.8.
    lr, b1, b2 = losses.lazy_regularization_adam(0.0025, 0.5, 0.99, 4)
    assert (lr, b1, b2) == pytest.approx((0.002, 0.5743492, 0.9919920), rel=1e-6)
    with pytest.raises(ValueError):
        losses.lazy_regularization_adam(0.002, 0.0, 0.99, 0)


# ---------------------------------------------------------------------------------------
# Regularisers.


def test_offset_regularizer_hand_computed_and_masked():
    offsets = jnp.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]]])
    # norms: head 0 -> 5, 0; head 1 -> 3, 1.  mean of head means = (2.5 + 2) / 2.
    np.testing.assert_allclose(losses.offset_regularizer(offsets), 2.25, rtol=1e-6)
    mask = jnp.array([True, False])  # shared (N,) mask: only the first Gaussian counts.
    np.testing.assert_allclose(losses.offset_regularizer(offsets, mask), (5.0 + 3.0) / 2, rtol=1e-6)
    per_head = jnp.array([[True, True], [False, True]])
    np.testing.assert_allclose(losses.offset_regularizer(offsets, per_head), (2.5 + 1.0) / 2, rtol=1e-6)
    # Invalid texels may hold anything; they must not leak into the value or the gradient.
    poisoned = offsets.at[:, 1].set(jnp.nan)
    value, grad = jax.value_and_grad(losses.offset_regularizer)(poisoned, mask)
    np.testing.assert_allclose(value, 4.0, rtol=1e-6)
    assert np.all(np.isfinite(grad))


def test_offset_regularizer_gradient_finite_at_zero():
    grad = jax.grad(losses.offset_regularizer)(jnp.zeros((1, 2, 3)).at[0, 0].set(jnp.array([3.0, 4.0, 0.0])))
    assert np.all(np.isfinite(grad))
    # d||o||/do = o/||o||, divided by N = 2 Gaussians; 0 (a subgradient) at o = 0.
    np.testing.assert_allclose(grad[0, 0], jnp.array([0.3, 0.4, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(grad[0, 1], 0.0)


def test_scale_regularizer_hand_computed():
    gamma = math.exp(-5.5)
    scales = jnp.full((1, 2, 3), gamma).at[0, 0].add(jnp.array([3e-3, 4e-3, 0.0]))
    np.testing.assert_allclose(losses.scale_regularizer(scales), 2.5e-3, rtol=1e-4)
    np.testing.assert_allclose(losses.scale_regularizer(scales, gamma_s=0.0),
                               (math.sqrt((gamma + 3e-3) ** 2 + (gamma + 4e-3) ** 2 + gamma**2)
                                + math.sqrt(3) * gamma) / 2, rtol=1e-5)
    assert losses.TARGET_SCALE == pytest.approx(0.00408677, rel=1e-5)
    assert np.all(np.isfinite(jax.grad(losses.scale_regularizer)(jnp.full((1, 4, 3), gamma))))


def test_weight_l2_hand_computed_and_safe_gradient():
    params = {"conv": {"kernel": jnp.array([[3.0, 4.0], [0.0, 0.0]]), "bias": jnp.zeros(3)},
              "dense": [jnp.array([1.0, 2.0, 2.0])]}
    value, grad = jax.value_and_grad(losses.weight_l2)(params)
    np.testing.assert_allclose(value, 5.0 + 0.0 + 3.0, rtol=1e-6)
    np.testing.assert_allclose(grad["conv"]["kernel"], [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(grad["conv"]["bias"], 0.0)  # the zero tensor: finite, 0
    np.testing.assert_allclose(grad["dense"][0], [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Identity loss and Eq. 2.


def test_identity_loss_hand_computed_with_simple_features():
    def features_fn(x):
        return {"a": x, "b": 2.0 * x[:, ::2, ::2]}

    static = jnp.zeros((2, 4, 4, 3))
    dynamic = static + 0.1
    # layer a: 0.1, layer b: 0.2 -> mean over layers 0.15
    np.testing.assert_allclose(losses.identity_loss(features_fn, dynamic, static), 0.15, rtol=1e-5)


def test_identity_loss_with_vgg():
    # Two shallow layers keep compile time small; the four default layers are checked
    # against torch in test_converted_vgg_matches_torch.
    random_vgg_features = vgg.make_vgg16_features_fn(vgg.random_vgg16_params(seed=0),
                                                     layers=("relu1_2", "relu2_2"))
    static = jnp.clip(0.5 * _normal(0, (2, 8, 8, 3)), -1, 1)
    dynamic = jnp.clip(static + 0.3 * _normal(1, static.shape), -1, 1)
    assert float(losses.identity_loss(random_vgg_features, static, static)) == 0.0
    loss_fn = lambda d, s: losses.identity_loss(random_vgg_features, d, s)  # noqa: E731
    value = loss_fn(dynamic, static)
    assert float(value) > 1e-3
    grad_dynamic, grad_static = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(dynamic, static)
    assert np.all(np.isfinite(grad_dynamic)) and float(jnp.abs(grad_dynamic).max()) > 0
    np.testing.assert_array_equal(grad_static, 0.0)  # the static image is a fixed target
    grad_both = jax.jit(jax.grad(lambda s: losses.identity_loss(random_vgg_features, dynamic, s,
                                                                stop_gradient_static=False)))(static)
    assert float(jnp.abs(grad_both).max()) > 0


def test_generator_total_eq2():
    terms = {"adversarial": 1.0, "offset": 2.0, "scale": 3.0, "dynamic_weights": 4.0, "identity": 5.0}
    # 1 + 0.1·2 + 0.1·3 + 0.001·4 + 0.1·5
    np.testing.assert_allclose(losses.generator_total(terms), 2.004, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_total({"adversarial": 1.0, "scale": 3.0}), 1.3, rtol=1e-6)
    custom = losses.LossWeights(offset=1.0, scale=0.0, dynamic_weights=1.0, identity=0.0)
    np.testing.assert_allclose(losses.generator_total(terms, custom), 7.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        losses.generator_total({"adversarial": 1.0, "ofset": 2.0})
    with pytest.raises(ValueError, match="adversarial"):
        losses.generator_total({"offset": 2.0})
    grad = jax.grad(lambda t: losses.generator_total(t))(
        {k: jnp.float32(v) for k, v in terms.items()})
    assert grad == pytest.approx({"adversarial": 1.0, "offset": 0.1, "scale": 0.1,
                                  "dynamic_weights": 0.001, "identity": 0.1})


def test_loss_weights_paper_defaults_and_frozen():
    weights = losses.LossWeights()
    assert (weights.offset, weights.scale, weights.dynamic_weights, weights.identity,
            weights.r1_gamma) == (0.1, 0.1, 0.001, 0.1, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.offset = 1.0


# ---------------------------------------------------------------------------------------
# VGG16 and the converter.


@pytest.fixture(scope="module")
def fake_torchvision_checkpoint(tmp_path_factory):
    """A torchvision-style VGG16 state dict of random tensors, saved with torch.save."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for _, c_in, c_out, index in vgg.VGG16_CONVS:
        std = math.sqrt(2.0 / (9 * c_out))
        state_dict[f"features.{index}.weight"] = std * torch.randn(c_out, c_in, 3, 3, generator=generator)
        state_dict[f"features.{index}.bias"] = 0.1 * torch.randn(c_out, generator=generator)
    state_dict["classifier.6.bias"] = torch.zeros(1000)  # must be ignored
    path = tmp_path_factory.mktemp("vgg") / vgg.VGG16_WEIGHTS_FILE
    torch.save(state_dict, path)
    return path, state_dict


@functools.cache
def _load_converter():
    # Loaded once: absl flags may be defined only once per process.
    spec = importlib.util.spec_from_file_location("convert_vgg16", REPO / "experiments" / "convert_vgg16.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted_npz(fake_torchvision_checkpoint, tmp_path_factory):
    checkpoint, _ = fake_torchvision_checkpoint
    output = tmp_path_factory.mktemp("npz") / "vgg16.npz"
    arrays = _load_converter().convert(str(checkpoint), str(output))
    assert sorted(arrays) == sorted(vgg.torch_key_names())
    return output


def _torch_vgg_reference(state_dict, images_nchw):
    """torchvision's VGG16 `features` written out with torch.nn.functional."""
    import torch.nn.functional as F

    outputs, x = {}, images_nchw
    for position, (name, _, _, index) in enumerate(vgg.VGG16_CONVS[:10]):
        x = F.relu(F.conv2d(x, state_dict[f"features.{index}.weight"], state_dict[f"features.{index}.bias"],
                            padding=1))
        outputs[vgg.RELU_LAYERS[position]] = x
        if name in ("conv1_2", "conv2_2", "conv3_3"):
            x = F.max_pool2d(x, 2, 2)
    return outputs


def test_converted_vgg_matches_torch(fake_torchvision_checkpoint, converted_npz):
    torch = pytest.importorskip("torch")
    _, state_dict = fake_torchvision_checkpoint
    params = vgg.load_vgg16_params(converted_npz)
    assert params["params"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
    assert params["params"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)

    images = jnp.clip(0.5 * _normal(0, (2, 20, 20, 3)), -1, 1)
    normalized = vgg.imagenet_normalize(images)
    with torch.no_grad():
        reference = _torch_vgg_reference(state_dict, torch.from_numpy(np.array(normalized)).permute(0, 3, 1, 2))

    # First conv on its own: our conv + ReLU equals torch's conv2d + ReLU.
    first = vgg.VGG16Features(output_layers=("relu1_1",)).apply(params, normalized)["relu1_1"]
    np.testing.assert_allclose(first, reference["relu1_1"].permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    # The four perceptual layers through make_vgg16_features_fn (which normalises itself).
    ours = vgg.make_vgg16_features_fn(params)(images)
    assert list(ours) == list(vgg.DEFAULT_FEATURE_LAYERS)
    for name, value in ours.items():
        expected = reference[name].permute(0, 2, 3, 1).numpy()
        assert value.shape == expected.shape, name
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)
    assert ours["relu4_3"].shape == (2, 2, 2, 512)  # 20 -> 10 -> 5 -> 2 (floor, as torch)


def test_imagenet_normalize_values():
    out = vgg.imagenet_normalize(jnp.array([[-1.0, 0.0, 1.0]]))
    np.testing.assert_allclose(out, [[-0.485 / 0.229, (0.5 - 0.456) / 0.224, (1 - 0.406) / 0.225]], rtol=1e-6)


def test_random_vgg16_params_fixed_and_complete():
    a, b = vgg.random_vgg16_params(3), vgg.random_vgg16_params(3)
    c = vgg.random_vgg16_params(4)
    assert sorted(a["params"]) == sorted(name for name, *_ in vgg.VGG16_CONVS)
    np.testing.assert_array_equal(a["params"]["conv2_1"]["kernel"], b["params"]["conv2_1"]["kernel"])
    assert not np.array_equal(a["params"]["conv2_1"]["kernel"], c["params"]["conv2_1"]["kernel"])
    assert a["params"]["conv4_2"]["kernel"].shape == (3, 3, 512, 512)
    # Paper resolution only through eval_shape: 512² renders -> relu4_3 at 64².
    shapes = jax.eval_shape(vgg.make_vgg16_features_fn(a), jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    assert shapes["relu1_2"].shape == (1, 512, 512, 64)
    assert shapes["relu4_3"].shape == (1, 64, 64, 512)
    with pytest.raises(ValueError, match="unknown layer"):
        vgg.make_vgg16_features_fn(a, layers=("relu6_1",))


def test_load_vgg16_params_errors(tmp_path, fake_torchvision_checkpoint):
    _, state_dict = fake_torchvision_checkpoint
    arrays = {name: tensor.numpy() for name, tensor in state_dict.items() if name.startswith("features")}

    missing_path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*vgg16-397923af\.pth"):
        vgg.load_vgg16_params(missing_path)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="corrupt.npz"):
        vgg.load_vgg16_params(corrupt)

    partial = tmp_path / "partial.npz"
    np.savez(partial, **{k: v for k, v in arrays.items() if k != "features.28.bias"})
    with pytest.raises(ValueError, match=r"partial\.npz.*features\.28\.bias"):
        vgg.load_vgg16_params(partial)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{**arrays, "features.5.weight": np.zeros((128, 64, 3, 1), np.float32)})
    with pytest.raises(ValueError, match=r"wrong\.npz.*features\.5\.weight.*\(128, 64, 3, 3\)"):
        vgg.load_vgg16_params(wrong)

    nan = tmp_path / "nan.npz"
    np.savez(nan, **{**arrays, "features.0.bias": np.full(64, np.nan, np.float32)})
    with pytest.raises(ValueError, match=r"nan\.npz.*NaN"):
        vgg.load_vgg16_params(nan)


def test_converter_errors(tmp_path):
    torch = pytest.importorskip("torch")
    converter = _load_converter()
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        converter.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.npz"))
    not_vgg = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, not_vgg)
    with pytest.raises(ValueError, match=r"resnet\.pth.*missing 26"):
        converter.convert(str(not_vgg), str(tmp_path / "out.npz"))
    assert not (tmp_path / "out.npz").exists()


def test_converter_help_runs():
    result = subprocess.run([sys.executable, "experiments/convert_vgg16.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    # absl's --help prints the usage and exits with status 1 by design.
    assert result.returncode in (0, 1), result.stderr
    assert "Converts torchvision" in result.stdout
    assert "--input" in result.stdout and "--output" in result.stdout
    assert "Traceback" not in result.stderr
