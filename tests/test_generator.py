"""Tests of the RETA3D generator: G + G_m + blending ConvNet (static) and G_d (per frame).

Small configurations only; paper sizes through jax.eval_shape / lowering (no full-size compute).
"""
import math
import pathlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d.networks import generator as gen_lib
from reta3d.networks.generator import (GeneratorConfig, RETA3DGenerator, RETA3DNetworks, StaticMaps,
                                       count_parameters, crop_mouth, dynamic_module_flops,
                                       dynamic_params, expression_condition, mouth_crop_weights,
                                       static_generator_flops, synthesis_flops, texel_centre_uv)

SHARED_PYTORCH = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "pytorch"
# Parameter element counts of the official StyleGAN2-ADA modules at the paper's sizes, summed
# from the state-dict listings g_uv256.txt / g_mouth64.txt (buffers excluded).
PAPER_PARAM_COUNTS = {"mapping": 2376704, "synthesis": 27965551, "mouth_synthesis": 24959567}
PAPER_MOUTH_RECT = (0.35, 0.05, 0.65, 0.35)  # any valid rect: sizes don't depend on it


@pytest.fixture(scope="module")
def small_gen():
    return RETA3DGenerator.create(GeneratorConfig.small())


@pytest.fixture(scope="module")
def small_vars(small_gen):
    # An "rbg" key: XLA compiles its random draws ~3x faster than threefry's (the init of ~50
    # parameter arrays otherwise dominates this file's run time); the values don't matter here.
    return small_gen.init(jax.random.key(0, impl="rbg"))


# Test inputs come from numpy's RNG: eager jax.random draws would compile once per shape.
def _latents(config, batch, seed=1):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(batch, config.z_dim)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(batch, config.c_dim)), jnp.float32) if config.c_dim else None
    return z, c


def _flame_params(batch, seed=2, scale=0.3):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "expression": scale * normal(batch, 10),
        "jaw_pose": jnp.abs(scale * normal(batch, 3)) * jnp.array([1.0, 0.0, 0.0]),
        "global_pose": 0.3 * scale * normal(batch, 3),
        "neck_pose": 0.3 * scale * normal(batch, 3),
    }


def _perturb_dynamic(variables, seed=3, scale=0.3):
    """G_d weights made non-zero everywhere (its last layer starts at zero)."""
    rng = np.random.default_rng(seed)
    gd = jax.tree_util.tree_map(lambda x: x + scale * rng.normal(size=x.shape).astype(np.float32),
                                dynamic_params(variables))
    return dict(variables, params=dict(variables["params"], dynamic=gd))


# ---------------------------------------------------------------------------------------------
# Paper-size structure, parameter counts and FLOPs (no full-size compute)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_networks():
    config = GeneratorConfig()
    networks = RETA3DNetworks(config, PAPER_MOUTH_RECT)
    shapes = jax.eval_shape(lambda key: gen_lib.init_networks(networks, key), jax.random.key(0))
    return config, networks, shapes


def test_the_paper_config_builds_the_listed_networks():
    """configs/ffhq512.py trains the networks whose sizes the listings give (until 2026-12-02
    its G_m had channel_base 16384: half the channels at 64², 21.7M parameters, not 25.0M)."""
    from configs import ffhq512
    from reta3d import train
    generator = train.build_generator(ffhq512.get_config())
    for field in ("channel_base", "channel_max", "mouth_channel_base", "mouth_channel_max",
                  "uv_resolution", "mouth_resolution", "z_dim", "w_dim"):
        assert getattr(generator.config, field) == getattr(GeneratorConfig(), field), field


def test_paper_parameter_counts_match_official_listings(paper_networks):
    config, _, shapes = paper_networks
    params = shapes["params"]
    for name, expected in PAPER_PARAM_COUNTS.items():
        assert count_parameters(params[name]) == expected, name
    # G_d is compact: a few hundred times smaller than G.
    assert count_parameters(params["dynamic"]) * 100 < PAPER_PARAM_COUNTS["synthesis"]
    assert shapes["mapping_state"]["mapping"]["w_avg"].shape == (config.w_dim,)
    print("paper parameter counts:", {k: count_parameters(v) for k, v in params.items()})


@pytest.mark.skipif(not SHARED_PYTORCH.is_dir(), reason="shared/pytorch reference listings absent")
def test_paper_counts_equal_listing_totals():
    """The hard-coded counts above are the listings' sums (independent of our code)."""
    def totals(path):
        sums = {}
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                continue
            name, shape = line.split()
            if any(b in name for b in ("noise_const", "resample_filter", "w_avg")):
                continue
            dims = [int(d) for d in shape.strip("[]").split(",") if d]
            sums[name.split(".")[0]] = sums.get(name.split(".")[0], 0) + math.prod(dims)
        return sums
    uv = totals(SHARED_PYTORCH / "g_uv256.txt")
    mouth = totals(SHARED_PYTORCH / "g_mouth64.txt")
    assert uv["mapping"] == PAPER_PARAM_COUNTS["mapping"]
    assert uv["synthesis"] == PAPER_PARAM_COUNTS["synthesis"]
    assert mouth["synthesis"] == PAPER_PARAM_COUNTS["mouth_synthesis"]


def test_paper_output_shapes(paper_networks):
    config, networks, shapes = paper_networks
    batch = 2
    ws = jax.ShapeDtypeStruct((batch, config.num_ws, config.w_dim), jnp.float32)
    face, mouth = jax.eval_shape(
        lambda v, w: networks.apply(v, w, method=RETA3DNetworks.synthesize), shapes, ws)
    assert face.shape == (batch, 256, 256, 14) and mouth.shape == (batch, 64, 64, 14)
    assert config.num_ws == 14 and config.mouth_num_ws == 10 and config.resolved_mouth_ws_start == 4
    face_in = jax.ShapeDtypeStruct((batch, 256, 256, 17), jnp.float32)
    mouth_in = jax.ShapeDtypeStruct((batch, 64, 64, 17), jnp.float32)
    cond = jax.ShapeDtypeStruct((batch, 53), jnp.float32)
    d_face, d_mouth = jax.eval_shape(
        lambda v, a, b, c: networks.apply(v, a, b, c, method=RETA3DNetworks.dynamic_residual),
        shapes, face_in, mouth_in, cond)
    assert d_face.shape == (batch, 256, 256, 14) and d_mouth.shape == (batch, 64, 64, 14)


def test_paper_generate_static_and_animate_shapes():
    """The public functions at paper size on the template head, traced only (eval_shape)."""
    gen = RETA3DGenerator.create(GeneratorConfig())
    variables = jax.eval_shape(gen.init, jax.random.key(0))
    z = jax.ShapeDtypeStruct((1, 512), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 25), jnp.float32)
    static = jax.eval_shape(gen.generate_static, variables, z, c)
    assert static.face.shape == (1, 256, 256, 14) and static.mouth.shape == (1, 64, 64, 14)
    assert static.ws.shape == (1, 14, 512)
    flame = {"expression": jax.ShapeDtypeStruct((1, 16), jnp.float32),
             "jaw_pose": jax.ShapeDtypeStruct((1, 3), jnp.float32)}
    gaussians, aux = jax.eval_shape(gen.animate, variables, static, flame)
    n = gen.num_gaussians
    assert n == gen.head_binding.num_face + gen.head_binding.num_mouth > 256 * 256 // 2
    assert gaussians.means.shape == (1, n, 3) and gaussians.opacities.shape == (1, n)
    assert aux["offset_raw"].shape == (1, n, 3) and aux["delta_face"].shape == (1, 256, 256, 14)
    print(f"paper-size head: {n} Gaussians ({gen.head_binding.num_face} face + "
          f"{gen.head_binding.num_mouth} mouth)")


def test_dynamic_module_flops_at_most_one_twentieth_of_G(paper_networks):
    """XLA's cost analysis of the lowered (not compiled, not run) paper-size functions, and the
    analytic counts cross-checked against it."""
    config, networks, shapes = paper_networks
    ws = jax.ShapeDtypeStruct((1, config.num_ws, config.w_dim), jnp.float32)
    synth_only = lambda v, w: networks.apply(v, w, method=RETA3DNetworks.synthesize)
    static_flops = jax.jit(synth_only).lower(shapes, ws).cost_analysis()["flops"]
    face_in = jax.ShapeDtypeStruct((1, 256, 256, 17), jnp.float32)
    mouth_in = jax.ShapeDtypeStruct((1, 64, 64, 17), jnp.float32)
    cond = jax.ShapeDtypeStruct((1, config.condition_dim), jnp.float32)
    gd = lambda v, a, b, c: networks.apply(v, a, b, c, method=RETA3DNetworks.dynamic_residual)
    gd_flops = jax.jit(gd).lower(shapes, face_in, mouth_in, cond).cost_analysis()["flops"]

    g_face = synthesis_flops(256, config.channel_base, config.channel_max)
    print(f"paper FLOPs (batch 1): static G+G_m+blend {static_flops / 1e9:.2f} G (analytic "
          f"{static_generator_flops(config) / 1e9:.2f}), G alone {g_face / 1e9:.2f} G, "
          f"G_d {gd_flops / 1e9:.3f} G (analytic {dynamic_module_flops(config) / 1e9:.3f})")
    assert static_generator_flops(config) == pytest.approx(static_flops, rel=0.03)
    assert dynamic_module_flops(config) == pytest.approx(gd_flops, rel=0.03)
    assert gd_flops <= g_face / 20  # against the face generator G alone (the stricter reading)
    assert gd_flops <= static_flops / 20


def test_synthesis_flops_formula_hand_count():
    # 8² synthesis, channels 4 everywhere, 14 outputs: b4 conv1 + torgb, b8 conv0 (transposed:
    # at 4²) + conv1 + torgb.
    expected = (2 * 16 * 9 * 4 * 4 + 2 * 16 * 4 * 14
                + 2 * 16 * 9 * 4 * 4 + 2 * 64 * 9 * 4 * 4 + 2 * 64 * 4 * 14)
    assert synthesis_flops(8, 32, 4) == expected


# ---------------------------------------------------------------------------------------------
# Mouth crop
# ---------------------------------------------------------------------------------------------

def test_mouth_crop_samples_documented_texel_centres(small_gen):
    """A face map whose values are its own texel-centre UVs: the crop must equal the UVs of the
    mouth grid's texel centres (bilinear interpolation reproduces a linear function exactly)."""
    rect = tuple(small_gen.flame_model.mouth_rect)
    for face_res, mouth_res in ((256, 64), (32, 16)):
        face_uv = jnp.asarray(texel_centre_uv(face_res)[None], jnp.float32)
        crop = np.asarray(crop_mouth(face_uv, rect, mouth_res)[0])
        # Independent texel-centre formula (brief): u = u0 + (b+0.5)/Rm (u1-u0), v = v1 - (a+0.5)/Rm (v1-v0).
        a, b = np.meshgrid(np.arange(mouth_res), np.arange(mouth_res), indexing="ij")
        u = rect[0] + (b + 0.5) / mouth_res * (rect[2] - rect[0])
        v = rect[3] - (a + 0.5) / mouth_res * (rect[3] - rect[1])
        np.testing.assert_allclose(crop[..., 0], u, atol=2e-6)
        np.testing.assert_allclose(crop[..., 1], v, atol=2e-6)


def test_mouth_crop_matches_naive_bilinear_with_edge_clamp():
    rng = np.random.default_rng(0)
    face = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    rect = (0.0, 0.4, 0.3, 1.0)  # touches the left and top border: exercises the clamp
    crop = np.asarray(crop_mouth(jnp.asarray(face), rect, 4))
    ref = np.zeros_like(crop)
    for a in range(4):
        for b in range(4):
            u = rect[0] + (b + 0.5) / 4 * (rect[2] - rect[0])
            v = rect[3] - (a + 0.5) / 4 * (rect[3] - rect[1])
            x = min(max(u * 8 - 0.5, 0.0), 7.0)
            y = min(max((1 - v) * 8 - 0.5, 0.0), 7.0)
            x0, y0 = min(int(math.floor(x)), 6), min(int(math.floor(y)), 6)
            fx, fy = x - x0, y - y0
            ref[:, a, b] = ((1 - fy) * ((1 - fx) * face[:, y0, x0] + fx * face[:, y0, x0 + 1])
                            + fy * ((1 - fx) * face[:, y0 + 1, x0] + fx * face[:, y0 + 1, x0 + 1]))
    np.testing.assert_allclose(crop, ref, atol=1e-6)
    # Hand check: mouth texel (0, 0) is at u = 0.0375, v = 0.925 → face col −0.2 (clamped to 0),
    # row 0.1 → 0.9·face[0, 0] + 0.1·face[1, 0].
    np.testing.assert_allclose(crop[:, 0, 0], 0.9 * face[:, 0, 0] + 0.1 * face[:, 1, 0], atol=1e-6)


def test_mouth_crop_rejects_bad_rect():
    with pytest.raises(ValueError, match="mouth_rect"):
        mouth_crop_weights((0.5, 0.2, 0.4, 0.6), 32, 8)
    with pytest.raises(ValueError, match="mouth_rect"):
        mouth_crop_weights((0.1, 0.2, 0.4, 1.2), 32, 8)


# ---------------------------------------------------------------------------------------------
# Small configuration: forward, backward, G_d at initialisation, jit, static/dynamic split
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_static(small_gen, small_vars):
    z, c = _latents(small_gen.config, 2)
    return small_gen.jit_generate_static(small_vars, z, c)


def test_small_forward_shapes_and_finite(small_gen, small_vars, small_static):
    cfg = small_gen.config
    assert small_static.face.shape == (2, cfg.uv_resolution, cfg.uv_resolution, 14)
    assert small_static.mouth.shape == (2, cfg.mouth_resolution, cfg.mouth_resolution, 14)
    assert small_static.ws.shape == (2, cfg.num_ws, cfg.w_dim)
    assert np.isfinite(np.asarray(small_static.face)).all()
    assert np.isfinite(np.asarray(small_static.mouth)).all()
    # Different latents give different maps (the generator is not ignoring z).
    assert float(jnp.abs(small_static.face[0] - small_static.face[1]).max()) > 1e-3
    gaussians, aux = small_gen.jit_animate(small_vars, small_static, _flame_params(2))
    n = small_gen.num_gaussians
    assert gaussians.means.shape == (2, n, 3) and gaussians.colors.shape == (2, n, 3)
    assert aux["offset_raw"].shape == (2, n, 3) and aux["scales"].shape == (2, n, 3)
    assert bool(aux["dynamic_applied"])
    for leaf in jax.tree_util.tree_leaves(gaussians):
        assert np.isfinite(np.asarray(leaf)).all()


def test_small_backward_finite_and_reaches_every_network(small_gen, small_vars):
    cfg = small_gen.config
    z, c = _latents(cfg, 2)
    flame = _flame_params(2)
    variables = _perturb_dynamic(small_vars)

    def loss(params):
        v = dict(variables, params=params)
        static = small_gen.generate_static(v, z, c)
        gaussians, aux = small_gen.animate(v, static, flame)
        return (jnp.mean(gaussians.means ** 2) + jnp.mean(gaussians.colors)
                + jnp.mean(gaussians.opacities) + jnp.mean(aux["scales"]))

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(float(value))
    for name in ("mapping", "synthesis", "mouth_synthesis", "blend", "dynamic"):
        leaves = jax.tree_util.tree_leaves(grads[name])
        assert all(np.isfinite(np.asarray(g)).all() for g in leaves), name
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0, f"no gradient reaches {name}"


def test_dynamic_module_starts_as_identity(small_gen, small_vars, small_static):
    """ΔF = 0 with the initial weights → the same Gaussians with and without G_d; a perturbed G_d
    changes them (so this comparison can fail)."""
    flame = _flame_params(2)
    with_gd, aux = small_gen.jit_animate(small_vars, small_static, flame, use_dynamic=True)
    without_gd, aux_s = small_gen.jit_animate(small_vars, small_static, flame, use_dynamic=False)
    assert bool(aux["dynamic_applied"]) and not bool(aux_s["dynamic_applied"])
    assert float(jnp.abs(aux["delta_face"]).max()) == 0.0
    assert float(jnp.abs(aux["delta_mouth"]).max()) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(with_gd), jax.tree_util.tree_leaves(without_gd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    perturbed = _perturb_dynamic(small_vars)
    moved, aux_p = small_gen.jit_animate(perturbed, small_static, flame)
    assert float(jnp.abs(aux_p["delta_face"]).max()) > 1e-3
    assert float(jnp.abs(aux_p["delta_mouth"]).max()) > 1e-3
    assert float(jnp.abs(moved.colors - without_gd.colors).max()) > 1e-4
    np.testing.assert_allclose(np.asarray(aux_p["face_features"]),
                               np.asarray(small_static.face + aux_p["delta_face"]), atol=1e-6)


def test_dynamic_residual_depends_on_expression_and_jaw(small_gen, small_vars, small_static):
    variables = _perturb_dynamic(small_vars)
    base = _flame_params(2)
    _, aux0 = small_gen.jit_animate(variables, small_static, base)
    smile = dict(base, expression=base["expression"] + 1.0)
    _, aux1 = small_gen.jit_animate(variables, small_static, smile)
    assert float(jnp.abs(aux1["delta_face"] - aux0["delta_face"]).max()) > 1e-3
    jaw = dict(base, jaw_pose=base["jaw_pose"] + jnp.array([0.2, 0.0, 0.0]))
    _, aux2 = small_gen.jit_animate(variables, small_static, jaw)
    assert float(jnp.abs(aux2["delta_mouth"] - aux0["delta_mouth"]).max()) > 1e-3


def test_expression_condition_layout():
    cfg = GeneratorConfig.small(expression_dims=4)
    cond = expression_condition({"expression": jnp.array([[1.0, 2.0]]),
                                 "jaw_pose": jnp.array([[0.1, 0.2, 0.3]])}, cfg, 1)
    np.testing.assert_allclose(np.asarray(cond), [[1, 2, 0, 0, 0.1, 0.2, 0.3]], atol=1e-7)
    cond = expression_condition({"expression": jnp.arange(6.0)[None]}, cfg, 1)  # truncated
    np.testing.assert_allclose(np.asarray(cond), [[0, 1, 2, 3, 0, 0, 0]])
    no_jaw = GeneratorConfig.small(expression_dims=3, use_jaw_pose=False)
    assert expression_condition({}, no_jaw, 2).shape == (2, 3)


def test_position_maps_hold_static_gaussian_positions(small_gen, small_vars, small_static):
    from reta3d.binding import gather_texels
    flame = _flame_params(2)
    gaussians, _ = small_gen.jit_animate(small_vars, small_static, flame, use_dynamic=False)
    face_xyz, mouth_xyz = small_gen.position_maps(gaussians.means)
    hb, scale = small_gen.head_binding, small_gen.config.gd_xyz_scale
    np.testing.assert_allclose(np.asarray(gather_texels(face_xyz, hb.face)),
                               np.asarray(gaussians.means[:, :hb.num_face] * scale), atol=1e-6)
    np.testing.assert_allclose(np.asarray(gather_texels(mouth_xyz, hb.mouth)),
                               np.asarray(gaussians.means[:, hb.num_face:] * scale), atol=1e-6)
    if (~hb.face.valid).any():
        assert float(jnp.abs(face_xyz[:, ~hb.face.valid]).max()) == 0.0
    if (~hb.mouth.valid).any():
        assert float(jnp.abs(mouth_xyz[:, ~hb.mouth.valid]).max()) == 0.0


def test_jit_and_eager_agree(small_gen, small_vars, small_static):
    z, c = _latents(small_gen.config, 2)  # the latents of small_static (jit-compiled)
    eager = small_gen.generate_static(small_vars, z, c)
    jitted = small_static
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    variables = _perturb_dynamic(small_vars)
    flame = _flame_params(2)
    g_eager, _ = small_gen.animate(variables, eager, flame)
    g_jit, _ = small_gen.jit_animate(variables, eager, flame)
    for a, b in zip(jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_jit)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _count_primitive(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_primitive(sub, name)
    return count


def test_animate_never_runs_the_static_generator(small_gen, small_vars, small_static):
    cfg = small_gen.config
    flame = _flame_params(2)
    # 1) The jaxpr of animate holds exactly G_d's convolutions; generate_static holds many more.
    gd_convs = 2 * (cfg.gd_layers + 2)
    animate_jaxpr = jax.make_jaxpr(lambda v, s: small_gen.animate(v, s, flame))(small_vars, small_static)
    assert _count_primitive(animate_jaxpr.jaxpr, "conv_general_dilated") == gd_convs
    z, c = _latents(cfg, 2)
    static_jaxpr = jax.make_jaxpr(lambda v: small_gen.generate_static(v, z, c))(small_vars)
    # (The FIR resampling filters are shifted sums, not convolutions: only the 3x3/1x1 layers
    # of G, G_m and blending count here.)
    assert _count_primitive(static_jaxpr.jaxpr, "conv_general_dilated") > gd_convs
    # 2) animate runs with variables stripped of everything but G_d, with identical results.
    only_gd = {"params": {"dynamic": dynamic_params(small_vars)}}
    full, _ = small_gen.jit_animate(small_vars, small_static, flame)
    stripped, _ = small_gen.animate(only_gd, small_static, flame)  # eager: no new compile
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(stripped)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_static_batch_one_broadcasts_over_frames(small_gen, small_vars, small_static):
    one = jax.tree_util.tree_map(lambda x: x[:1], small_static)
    flame = _flame_params(2)
    broadcast, _ = small_gen.animate(small_vars, one, flame)  # eager: no new compile
    repeated = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), one)
    explicit, _ = small_gen.jit_animate(small_vars, repeated, flame)
    for a, b in zip(jax.tree_util.tree_leaves(broadcast), jax.tree_util.tree_leaves(explicit)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    # Frames differ (different FLAME parameters), the identity is the same.
    assert float(jnp.abs(broadcast.means[0] - broadcast.means[1]).max()) > 1e-4
    np.testing.assert_allclose(np.asarray(broadcast.colors[0]), np.asarray(broadcast.colors[1]), atol=1e-6)


def test_w_avg_update_and_mouth_ws_slice(small_gen, small_vars):
    cfg = small_gen.config
    z, c = _latents(cfg, 2)
    start, count = cfg.resolved_mouth_ws_start, cfg.mouth_num_ws

    def by_hand(m, w):
        # The static maps are G(ws) and blend(crop(G(ws)), G_m(ws[start:start+mouth_num_ws])).
        face = m.synthesis(w, noise_mode="const")
        mouth = m.mouth_synthesis(w[:, start:start + count], noise_mode="const")
        return face, m.blend(crop_mouth(face, small_gen.flame_model.mouth_rect, cfg.mouth_resolution), mouth)

    raw_mouth = lambda v, w: small_gen.networks.apply(
        v, w, method=lambda m, x: m.mouth_synthesis(x[:, start:start + count], noise_mode="const"))

    @jax.jit
    def run(v):
        ws, state = small_gen.map_latents(v, z, c, update_w_avg=True)
        static = small_gen.synthesize(v, ws)
        hand = small_gen.networks.apply(v, ws, method=by_hand)
        raws = [raw_mouth(v, w) for w in (ws, ws.at[:, start + count - 1].add(1.0), ws.at[:, :start].add(1.0))]
        return ws, state, static, hand, raws

    ws, state, static, (face, mouth), raws = run(small_vars)
    w_avg = state["mapping_state"]["mapping"]["w_avg"]
    expected = jnp.mean(ws[:, 0], axis=0) * (1 - cfg.w_avg_beta)  # initial w_avg is 0
    np.testing.assert_allclose(np.asarray(w_avg), np.asarray(expected), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(static.face), np.asarray(face), atol=1e-6)
    np.testing.assert_allclose(np.asarray(static.mouth), np.asarray(mouth), atol=1e-6)
    # G_m really reads those ws: changing the last one changes its map, changing earlier ones doesn't.
    assert float(jnp.abs(raws[1] - raws[0]).max()) > 1e-3
    # Not bitwise: XLA may fuse the three calls differently (1-ulp differences at -O0).
    np.testing.assert_allclose(np.asarray(raws[2]), np.asarray(raws[0]), rtol=0, atol=1e-5)


def _conv_operand_dtypes(jaxpr):
    dtypes = []
    for eqn in jaxpr.eqns:
        # Dense convolutions only: the FIR resampling filters (depthwise, feature_group_count =
        # channels) stay float32 by the StyleGAN2 modules' design.
        if eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] == 1:
            dtypes += [v.aval.dtype for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            dtypes += _conv_operand_dtypes(sub)
    return dtypes


def test_bfloat16_config_convolves_in_bfloat16(small_gen, small_vars, small_static):
    """Every convolution of both functions takes bf16 operands; outputs stay float32; G_d in
    bf16 is close to float32 (but not identical, so bf16 is really used)."""
    bf16 = RETA3DGenerator(small_gen.config.replace(dtype="bfloat16"), small_gen.flame_model,
                           small_gen.head_binding)
    z, c = _latents(small_gen.config, 2)
    flame = _flame_params(2)
    static_jaxpr = jax.make_jaxpr(lambda v: bf16.generate_static(v, z, c))(small_vars)
    animate_jaxpr = jax.make_jaxpr(lambda v, s: bf16.animate(v, s, flame))(small_vars, small_static)
    for jaxpr in (static_jaxpr, animate_jaxpr):
        dtypes = _conv_operand_dtypes(jaxpr.jaxpr)
        assert dtypes and all(d == jnp.bfloat16 for d in dtypes), set(dtypes)
    out = jax.eval_shape(lambda v: bf16.generate_static(v, z, c), small_vars)
    assert out.face.dtype == jnp.float32 and out.mouth.dtype == jnp.float32

    variables = _perturb_dynamic(small_vars)
    r, rm = small_gen.config.uv_resolution, small_gen.config.mouth_resolution
    xyz = (jnp.ones((2, r, r, 3)), jnp.ones((2, rm, rm, 3)),
           expression_condition(flame, small_gen.config, 2))
    ref = jax.jit(small_gen.dynamic_residual)(variables, small_static, *xyz)[0]
    low = jax.jit(bf16.dynamic_residual)(variables, small_static, *xyz)[0]
    err, scale = float(jnp.abs(low - ref).max()), float(jnp.abs(ref).max())
    assert 0 < err < 0.05 * scale


def test_bad_inputs_raise_clear_errors(small_gen, small_vars, small_static):
    cfg = small_gen.config
    with pytest.raises(ValueError, match="c_dim"):
        small_gen.generate_static(small_vars, jnp.zeros((1, cfg.z_dim)), None)
    with pytest.raises(AssertionError):
        small_gen.generate_static(small_vars, jnp.zeros((1, cfg.z_dim + 1)), jnp.zeros((1, 25)))
    with pytest.raises(ValueError, match="batch"):
        small_gen.animate(small_vars, small_static, _flame_params(3))
    with pytest.raises(TypeError, match="StaticMaps"):
        small_gen.animate(small_vars, (small_static.face, small_static.mouth), _flame_params(2))
    wrong = StaticMaps(face=small_static.face[:, :-1], mouth=small_static.mouth, ws=small_static.ws)
    with pytest.raises(AssertionError):
        small_gen.animate(small_vars, wrong, _flame_params(2))
    with pytest.raises(ValueError, match="frame_kind"):
        GeneratorConfig.small(frame_kind="tangent")
    with pytest.raises(ValueError, match="mouth_ws_start"):
        GeneratorConfig.small(mouth_ws_start=3)
    with pytest.raises(ValueError, match="uv_resolution"):
        GeneratorConfig.small(uv_resolution=48)
