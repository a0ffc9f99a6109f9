"""StyleGAN2 networks: paper-size shapes/counts, small forward/backward, mapping semantics,
noise modes, mixed precision, and parity with the official PyTorch networks."""
import functools
import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d.networks import convert
from reta3d.networks import stylegan2 as sg

REPO = pathlib.Path(__file__).resolve().parents[1]
REF_DIR = REPO / ".." / "shared" / "pytorch"

SMALL_G = dict(z_dim=16, c_dim=25, w_dim=16, img_resolution=8, img_channels=14,
               mapping_layers=2, channel_base=128, channel_max=16)
TINY_G = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, mapping_layers=2,
              channel_base=64, channel_max=8)
SMALL_D = dict(c_dim=25, img_resolution=16, img_channels=3, channel_base=128, channel_max=16,
               mapping_layers=2, mbstd_group_size=2)


def KEY(seed):
    """PRNG key for compiled code; 'rbg' compiles several times faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _load_compare_module():
    spec = importlib.util.spec_from_file_location("_compare_stylegan2",
                                                  REPO / "experiments" / "_compare_stylegan2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _count(tree):
    leaves = jax.tree.leaves(tree)
    return len(leaves), sum(int(np.prod(x.shape)) for x in leaves)


def random_variables(module, seed, noise_strength=0.3):
    """Variables shaped by jax.eval_shape(module.init), filled like the reference init
    (kernels ~N(0,1)/lr, affine biases 1, other biases 0, const/noise ~N(0,1)) but with a
    nonzero noise_strength so the noise paths matter. Avoids compiling init in every test."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [p.key for p in path]
        if names[-1] == "kernel":
            scale = 100.0 if "mapping" in names and names[-2].startswith("fc") else 1.0
            return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)
        if names[-1] == "bias":
            return jnp.full(leaf.shape, 1.0 if "affine" in names else 0.0, jnp.float32)
        if names[-1] == "noise_strength":
            return jnp.full(leaf.shape, noise_strength, jnp.float32)
        if names[-1] == "w_avg":
            return jnp.zeros(leaf.shape, jnp.float32)
        return jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)  # const, noise_const

    return jax.tree_util.tree_map_with_path(fill, convert.abstract_variables(module))


@pytest.fixture(scope="module")
def small_g():
    module = sg.Generator(**SMALL_G)
    variables = random_variables(module, 0)
    z = normal(1, (4, 16))
    c = normal(2, (4, 25))
    return module, variables, z, c


@pytest.fixture(scope="module")
def small_d():
    module = sg.Discriminator(**SMALL_D)
    variables = random_variables(module, 3)
    img = normal(4, (4, 16, 16, 3))
    c = normal(5, (4, 25))
    return module, variables, img, c


# --------------------------------------------------------------------------------------------
# Paper configuration (shapes only, through jax.eval_shape)


@pytest.mark.parametrize("listing,module,out_shape", [
    ("g_uv256.txt", sg.Generator(), (1, 256, 256, 14)),
    ("g_mouth64.txt", sg.Generator(c_dim=0, img_resolution=64), (1, 64, 64, 14)),
    ("d512.txt", sg.Discriminator(), (1, 1)),
])
def test_paper_parameter_and_buffer_counts(listing, module, out_shape):
    path = REF_DIR / listing
    if not path.is_file():
        pytest.skip(f"{path} not present")
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    m = re.search(r"(\d+) tensors; (\d+) parameters \((\d+) elems\), (\d+) buffers \((\d+) elems\)",
                  header)
    n_tensors, n_params, param_elems, n_buffers, buffer_elems = map(int, m.groups())
    variables = convert.abstract_variables(module)
    n_filters = len(convert.filter_buffer_names(variables))
    ours_params = _count(variables["params"])
    ours_buffers = _count({k: v for k, v in variables.items() if k != "params"})
    assert ours_params == (n_params, param_elems)
    # PyTorch also stores the fixed 4x4 FIR filter as a buffer in every conv layer and block.
    assert (ours_buffers[0] + n_filters, ours_buffers[1] + 16 * n_filters) == (n_buffers,
                                                                              buffer_elems)
    assert ours_params[0] + ours_buffers[0] + n_filters == n_tensors
    args, kwargs = convert.example_inputs(module)
    out = jax.eval_shape(lambda v: module.apply(v, *args, **kwargs), variables)
    assert out.shape == out_shape and out.dtype == jnp.float32


def test_num_ws_and_channels():
    assert [sg.synthesis_num_ws(r) for r in (32, 64, 256)] == [8, 10, 14]
    assert sg.channels_at(128, 32768, 512) == 256 and sg.channels_at(8, 32768, 512) == 512
    with pytest.raises(ValueError, match="power of two"):
        sg.synthesis_num_ws(48)


# --------------------------------------------------------------------------------------------
# Small networks


def test_init_follows_reference():
    module = sg.Generator(**{**TINY_G, "img_resolution": 4})
    variables = convert.init_variables(module, KEY(0))
    params = variables["params"]
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name, value in flat.items():
        if name.endswith("['bias']"):
            np.testing.assert_array_equal(value, 1.0 if "'affine'" in name else 0.0, err_msg=name)
        if name.endswith("['noise_strength']"):
            assert value.shape == () and value == 0.0
    # Equalised lr: stored weights ~N(0, 1) (mapping: N(0, 1/lr^2), lr = 0.01).
    assert 60 < params["mapping"]["fc0"]["kernel"].std() < 140
    assert 0.8 < params["synthesis"]["b4"]["conv1"]["kernel"].std() < 1.2
    assert params["synthesis"]["b4"]["const"].shape == (4, 4, 8)
    assert variables["buffers"]["synthesis"]["b4"]["conv1"]["noise_const"].shape == (4, 4)
    np.testing.assert_array_equal(variables["mapping_state"]["mapping"]["w_avg"], np.zeros(8))


def test_small_generator_forward_backward(small_g):
    module, variables, z, c = small_g

    def loss(params):
        img = module.apply({**variables, "params": params}, z, c, noise_mode="random",
                           rngs={"noise": KEY(7)})
        return jnp.mean(img ** 2), img

    (value, img), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert img.shape == (4, 8, 8, 14) and img.dtype == jnp.float32
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(img)))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"parameter {jax.tree_util.keystr(path)} gets no gradient"


def test_small_discriminator_forward_backward(small_d):
    module, variables, img, c = small_d

    def loss(params, img):
        logits, blocks = module.apply({"params": params}, img, c, return_block_outputs=True)
        return jnp.sum(jax.nn.softplus(logits)), (logits, blocks)

    (grads, grad_img), (logits, blocks) = jax.jit(
        jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], img)
    assert np.all(np.isfinite(np.asarray(grad_img))) and np.any(np.asarray(grad_img) != 0)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(np.asarray(g))), path
        assert np.any(np.asarray(g) != 0), f"parameter {jax.tree_util.keystr(path)} unused"
    assert logits.shape == (4, 1) and np.all(np.isfinite(np.asarray(logits)))
    assert blocks["b16"].shape == (4, 8, 8, 16) and blocks["b8"].shape == (4, 4, 4, 16)
    assert blocks["cmap"].shape == (4, 16)


def test_unconditional_discriminator():
    module = sg.Discriminator(**{**SMALL_D, "c_dim": 0})
    variables = convert.abstract_variables(module)
    assert "mapping" not in variables["params"]
    assert variables["params"]["b4"]["out"]["kernel"].shape == (16, 1)
    out = jax.eval_shape(lambda v: module.apply(v, jnp.ones((2, 16, 16, 3))), variables)
    assert out.shape == (2, 1)


def test_jit_matches_eager():
    module = sg.Generator(**TINY_G)
    variables = random_variables(module, 11)
    z = normal(0, (2, 8))
    run = lambda v, z: module.apply(v, z, truncation_psi=0.7, noise_mode="const")  # noqa: E731
    np.testing.assert_allclose(np.asarray(run(variables, z)),
                               np.asarray(jax.jit(run)(variables, z)), rtol=1e-5, atol=1e-5)


def test_truncation(small_g):
    module, variables, z, c = small_g
    w_avg = normal(9, (16,))
    variables = {**variables, "mapping_state": {"mapping": {"w_avg": w_avg}}}
    mapping = lambda **kw: module.apply(variables, z, c, method=module.map_latents, **kw)  # noqa: E731
    ws = mapping()
    assert ws.shape == (4, module.num_ws, 16)
    np.testing.assert_array_equal(np.asarray(ws[:, 0]), np.asarray(ws[:, -1]))  # broadcast
    np.testing.assert_allclose(np.asarray(mapping(truncation_psi=0.0)),
                               np.broadcast_to(np.asarray(w_avg), ws.shape), atol=1e-6)
    cut = mapping(truncation_psi=0.0, truncation_cutoff=2)
    np.testing.assert_allclose(np.asarray(cut[:, :2]),
                               np.broadcast_to(np.asarray(w_avg), (4, 2, 16)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cut[:, 2:]), np.asarray(ws[:, 2:]))
    half = np.asarray(w_avg) + 0.5 * (np.asarray(ws) - np.asarray(w_avg))
    np.testing.assert_allclose(np.asarray(mapping(truncation_psi=0.5)), half, atol=1e-5)
    # A traced psi (e.g. a jitted sampler with psi as an argument) gives the same result.
    traced = jax.jit(lambda psi: module.apply(variables, z, c, truncation_psi=psi,
                                              method=module.map_latents))(jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(traced), half, atol=1e-5)


def test_w_avg_update(small_g):
    module, variables, z, c = small_g
    old = normal(10, (16,))
    variables = {**variables, "mapping_state": {"mapping": {"w_avg": old}}}
    ws, state = module.apply(variables, z, c, update_w_avg=True, mutable=["mapping_state"],
                             method=module.map_latents)
    mean = np.asarray(ws[:, 0]).mean(axis=0)
    expected = mean + 0.995 * (np.asarray(old) - mean)
    np.testing.assert_allclose(np.asarray(state["mapping_state"]["mapping"]["w_avg"]), expected,
                               rtol=1e-6, atol=1e-6)
    _, state = module.apply(variables, z, c, mutable=["mapping_state"], method=module.map_latents)
    np.testing.assert_array_equal(np.asarray(state["mapping_state"]["mapping"]["w_avg"]),
                                  np.asarray(old))
    with pytest.raises(ValueError, match="mutable"):
        module.apply(variables, z, c, update_w_avg=True, method=module.map_latents)
    beta_module = sg.Generator(**SMALL_G, w_avg_beta=0.5)  # beta is configurable
    _, state = beta_module.apply(variables, z, c, update_w_avg=True, mutable=["mapping_state"],
                                 method=beta_module.map_latents)
    np.testing.assert_allclose(np.asarray(state["mapping_state"]["mapping"]["w_avg"]),
                               mean + 0.5 * (np.asarray(old) - mean), rtol=1e-6, atol=1e-6)


def test_style_mixing():
    ws = jnp.zeros((2, 6, 3))
    other = jnp.ones((2, 6, 3))
    mixed = np.asarray(sg.mix_styles(ws, other, 4))
    assert np.all(mixed[:, :4] == 0) and np.all(mixed[:, 4:] == 1)
    keys = jax.random.split(KEY(0), 200)
    crossover = jax.jit(jax.vmap(sg.style_mixing_crossover, in_axes=(0, None, None)),
                        static_argnums=1)
    assert np.all(np.asarray(crossover(keys, 6, 0.0)) == 6)
    always = np.asarray(crossover(keys, 6, 1.0))
    assert always.min() == 1 and always.max() == 5  # uniform over [1, num_ws)
    assert 0.3 < np.mean(np.asarray(crossover(keys, 6, 0.5)) < 6) < 0.7
    out = np.asarray(sg.apply_style_mixing(KEY(3), ws, other, 1.0))
    cut = int(np.argmax(out[0, :, 0]))
    assert 1 <= cut < 6 and np.all(out[:, cut:] == 1) and np.all(out[:, :cut] == 0)


def test_noise_modes_of_synthesis_layer():
    layer = sg.SynthesisLayer(out_channels=4, resolution=8, activation="linear")
    x = normal(0, (2, 8, 8, 3))
    w = normal(1, (2, 5))
    variables = jax.jit(functools.partial(layer.init, noise_mode="const"))(
        KEY(2), x, w)
    variables = {**variables, "params": {**variables["params"],
                                         "noise_strength": jnp.float32(0.3)}}
    # One compile for the three modes.
    all_modes = jax.jit(lambda v, key: {mode: layer.apply(v, x, w, noise_mode=mode,
                                                          rngs={"noise": key})
                                        for mode in sg.NOISE_MODES})
    out5, out6 = all_modes(variables, KEY(5)), all_modes(variables, KEY(6))
    none = np.asarray(out5["none"])
    noise_const = np.asarray(variables["buffers"]["noise_const"])
    # Linear activation: the noise term is exactly additive, one (R, R) map for all channels.
    np.testing.assert_allclose(np.asarray(out5["const"]) - none,
                               np.broadcast_to(0.3 * noise_const[None, :, :, None], none.shape),
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out6["const"]), np.asarray(out5["const"]))
    diff = np.asarray(out5["random"]) - none
    np.testing.assert_allclose(diff, np.broadcast_to(diff[..., :1], diff.shape), atol=1e-5)
    assert np.abs(diff[0] - diff[1]).max() > 1e-2  # fresh noise per sample
    assert np.abs(diff).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(all_modes(variables, KEY(5))["random"]),
                                  np.asarray(out5["random"]))
    assert np.abs(np.asarray(out6["random"]) - np.asarray(out5["random"])).max() > 1e-2
    trace = lambda v, **kw: jax.eval_shape(lambda: layer.apply(v, x, w, **kw))  # noqa: E731
    with pytest.raises(ValueError, match="rng stream 'noise'"):
        trace(variables, noise_mode="random")
    with pytest.raises(ValueError, match="noise_mode"):
        trace(variables, noise_mode="bogus")
    with pytest.raises(ValueError, match="buffers"):
        trace({"params": variables["params"]}, noise_mode="const")


def test_bf16_compute_generator():
    module = sg.Generator(**TINY_G)
    low = sg.Generator(**TINY_G, compute_dtype=jnp.bfloat16)
    variables = random_variables(module, 12)
    z = normal(0, (2, 8))
    ref = jax.jit(lambda v: module.apply(v, z, noise_mode="const"))(variables)
    out = jax.jit(lambda v: low.apply(v, z, noise_mode="const"))(variables)
    assert out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(convert.abstract_variables(low)))
    rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < rel < 5e-2, rel


def test_bad_inputs(small_g, small_d):
    module, variables, z, c = small_g
    shape_of = lambda fn: jax.eval_shape(fn, variables)  # noqa: E731 - trace only, no compute
    with pytest.raises(ValueError, match="conditioning c"):
        shape_of(lambda v: module.apply(v, z, None, noise_mode="const"))
    with pytest.raises(AssertionError):  # chex shape check on ws: 5 ws instead of 4
        shape_of(lambda v: module.apply(v, jnp.zeros((4, 5, 16)), noise_mode="const",
                                        method=module.synthesize))
    with pytest.raises(ValueError, match="truncation_cutoff"):
        jax.eval_shape(lambda: sg.MappingNetwork(16, 0, 16, num_ws=None).init(
            KEY(0), z, truncation_psi=0.5, truncation_cutoff=2))
    d_module, d_vars, img, dc = small_d
    with pytest.raises(ValueError, match="camera label"):
        jax.eval_shape(lambda v: d_module.apply(v, img), d_vars)
    with pytest.raises(AssertionError):
        jax.eval_shape(lambda v: d_module.apply(v, img[:, :8], dc), d_vars)


# --------------------------------------------------------------------------------------------
# Parity with the official PyTorch networks


@pytest.mark.parametrize("filename", ["sg2_small_G.npz", "sg2_G64_nocond.npz", "sg2_small_D.npz",
                                      "sg2_D64_cond.npz"])
def test_parity_with_pytorch(filename):
    """Every stored output (ws*, img*, w_avg update, block outputs, logits, cmap) within
    1e-5 * max|ref| + 1e-5. G runs our default (unfused) modulated conv; the fused path is
    covered by test_convert_pytorch (compare main() with the file's own config)."""
    path = REF_DIR / filename
    if not path.is_file():
        pytest.skip(f"reference file {path} not present")
    compare = _load_compare_module()
    overrides = {"fused_modconv": False} if "_G" in filename else {}
    results = compare.compare_reference(str(path), log=lambda _: None,
                                        module_overrides=overrides)
    with np.load(path) as data:
        expected = set(json.loads(str(data["config"]))["outputs"])
    assert {r.name for r in results} == expected  # every stored output was reproduced
    failed = [(r.name, r.max_abs_err, r.tolerance) for r in results if not r.ok]
    assert not failed, failed
