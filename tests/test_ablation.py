"""Tab. 1(c)'s generation-module ablation: the rows' configs, the generators without G_m or
G_d, and their training step.

The baseline ("a single UV feature generator only") has no G_m and no G_d; the expression
conditions G, so driving reruns G for every frame. Checked here by what would break if that
were wired wrong: a frame's maps must be G's output for that frame's condition, depend on
G's weights (the full model's frames do not: G ran once, before), differ between
expressions, and the training gradient must be the plain gradient of Eq. 2's remaining
terms, written out below.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablation
from rasterizer.types import look_at_eg3d_label
from reta3d import binding, flame, train
from reta3d.networks.generator import (GeneratorConfig, RETA3DGenerator, crop_mouth,
                                       dynamic_params, expression_condition)
from test_train import make_batches, tiny_config

ROW_MODULES = {"baseline": {"mapping", "synthesis", "expression_mapping"},
               "gm": {"mapping", "synthesis", "mouth_synthesis", "blend", "expression_mapping"},
               "gm_gd": {"mapping", "synthesis", "mouth_synthesis", "blend", "dynamic"}}


def _as_if_trained(variables, key=7):
    """The expression MLP's last layer starts at zero (the expression changes nothing at
    initialisation); give it weights and a bias, as training would, so the checks have power."""
    params = variables["params"]
    if "expression_mapping" not in params:
        return variables
    em = dict(params["expression_mapping"])
    keys = jax.random.split(jax.random.PRNGKey(key), len(em))
    for k, (name, leaf) in zip(keys, sorted(em.items())):
        if name.endswith(("_kernel", "_bias")):
            em[name] = jax.random.normal(k, leaf.shape, leaf.dtype)
    return dict(variables, params=dict(params, expression_mapping=em))


def _with_noise(params, strength=0.5):
    """StyleGAN2's per-layer noise strengths start at 0; non-zero, the noise reaches the maps."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, strength) if "noise_strength" in jax.tree_util.keystr(path)
        else x, params)


def _generator(mouth_generator, dynamic_module):
    cfg = GeneratorConfig.small(mouth_generator=mouth_generator, dynamic_module=dynamic_module)
    gen = RETA3DGenerator.create(cfg, flame.load())
    return gen, _as_if_trained(gen.init(jax.random.PRNGKey(0)))


def _inputs(cfg, batch=2):
    z = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.z_dim))
    c = jnp.tile(jnp.asarray(look_at_eg3d_label(0.2, 0.1), jnp.float32)[None], (batch, 1))
    rng = np.random.default_rng(0)
    frames = [{"expression": jnp.asarray(rng.normal(0, 1.0, (batch, 10)), jnp.float32),
               "jaw_pose": jnp.asarray(np.abs(rng.normal(0, 0.2, (batch, 3))), jnp.float32)}
              for _ in range(2)]
    return z, c, frames


def test_rows_build_the_generators_the_table_names():
    for row, modules in ROW_MODULES.items():
        config = ablation.get_config(row)
        gen_cfg = train.generator_config(config)
        assert config.render.resolution == 512, row                  # FFHQ@512² rows
        cfg = GeneratorConfig.small(mouth_generator=gen_cfg.mouth_generator,
                                    dynamic_module=gen_cfg.dynamic_module)
        params = jax.eval_shape(RETA3DGenerator.create(cfg, flame.load()).init,
                                jax.random.PRNGKey(0))["params"]
        assert set(params) == modules, row
    assert train.generator_config(ablation.get_config("baseline")).ablation_row == "Baseline"
    assert train.generator_config(ablation.get_config("gm")).ablation_row == "+ G_m"
    assert train.generator_config(ablation.get_config("gm_gd")).ablation_row == "+ G_m + G_d"
    for row in ablation.FRAME_ROWS:
        config = ablation.get_config(row)
        assert config.head.frame_kind == row and config.render.resolution == 256
        assert config.model.dynamic_module and config.model.mouth_generator
    demo_row = ablation.get_config("baseline,demo")
    assert demo_row.render.resolution == 64 and not demo_row.model.dynamic_module
    with pytest.raises(ValueError, match="ROW or ROW,demo"):
        ablation.get_config("no_such_row")


@pytest.mark.slow
def test_baseline_reruns_the_uv_generator_for_every_frame():
    gen, variables = _generator(False, False)
    cfg = gen.config
    z, c, frames = _inputs(cfg)
    static = gen.jit_generate_static(variables, z, c)
    # generate_static gives the neutral frame's maps (the offset of a zero condition is the
    # last layer's bias, non-zero here); animate at the neutral condition agrees.
    _, aux0 = gen.jit_animate(variables, static, {"expression": jnp.zeros((2, 10))})
    np.testing.assert_allclose(aux0["face_features"], static.face, atol=1e-5)
    bare = gen.networks.apply(variables, static.ws, "const", method=type(gen.networks).synthesize)
    assert np.abs(np.asarray(bare[0]) - np.asarray(static.face)).max() > 1e-2
    # At initialisation the expression changes nothing (the MLP's last layer is zero).
    fresh = gen.init(jax.random.PRNGKey(0))
    fresh_static = gen.jit_generate_static(fresh, z, c)
    _, aux_fresh = gen.jit_animate(fresh, fresh_static, frames[0])
    np.testing.assert_allclose(aux_fresh["face_features"], fresh_static.face, atol=1e-5)

    feats = []
    for frame in frames:
        _, aux = gen.jit_animate(variables, static, frame)
        cond = expression_condition(frame, cfg, 2)
        # Independent path: G on ws + MLP(condition), written out with the networks' methods.
        offset = gen.networks.apply(variables, cond, method=type(gen.networks).expression_offset)
        face, _ = gen.networks.apply(variables, static.ws + offset[:, None], "const",
                                     method=type(gen.networks).synthesize)
        np.testing.assert_allclose(aux["face_features"], face, rtol=1e-5, atol=1e-5)
        assert not bool(aux["dynamic_applied"])
        feats.append(np.asarray(aux["face_features"]))
    assert np.abs(feats[0] - feats[1]).max() > 1e-2, "the expression must change G's output"
    with pytest.raises(KeyError, match="no G_d"):
        dynamic_params(variables)


def test_frames_depend_on_g_only_without_gd():
    """A frame with the static maps held fixed, after G's weights change: unchanged for the
    paper's model (G ran once per identity, before), changed for the baseline (G reruns per
    frame). The weights change by a whole second draw (not a small step), so "unchanged" is
    exact and "changed" is far above rounding."""
    for mouth, dynamic, expect_rerun in ((False, False, True), (True, True, False)):
        gen, variables = _generator(mouth, dynamic)
        z, c, frames = _inputs(gen.config)
        static = gen.jit_generate_static(variables, z, c)
        other = gen.init(jax.random.PRNGKey(3))["params"]["synthesis"]
        changed = dict(variables, params=dict(variables["params"], synthesis=other))
        before, _ = gen.jit_animate(variables, static, frames[0])
        after, _ = gen.jit_animate(changed, static, frames[0])
        moved = max(float(jnp.abs(a - b).max()) for a, b in
                    ((before.colors, after.colors), (before.means, after.means)))
        assert (moved > 1e-4) == expect_rerun, (mouth, dynamic, moved)
        if not expect_rerun:
            assert moved == 0.0, moved


def test_without_mouth_generator_the_mouth_map_is_the_face_crop():
    gen, variables = _generator(False, True)
    z, c, _ = _inputs(gen.config)
    static = gen.jit_generate_static(variables, z, c)
    expected = crop_mouth(static.face, gen.flame_model.mouth_rect, gen.config.mouth_resolution)
    np.testing.assert_allclose(static.mouth, expected, atol=1e-6)
    assert {"mouth_synthesis", "blend"}.isdisjoint(variables["params"])


def _baseline_setup():
    config = tiny_config()
    config.model.dynamic_module = False
    config.model.mouth_generator = False
    config.loss.lambda_id = 0.1                 # ignored without G_d: there is nothing to train
    config.train.noise_mode = "random"
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    state = train.create_train_state(config, generator, discriminator, jax.random.PRNGKey(0))
    g_vars = _as_if_trained(state.g_vars)
    g_vars = dict(g_vars, params=_with_noise(g_vars["params"]))
    return config, generator, discriminator, state.replace(g_vars=g_vars)


@pytest.mark.slow
def test_baseline_training_gradient_is_the_plain_gradient_of_eq2():
    """The reference renders every fake written out from the generator's parts (mapping,
    G on ws + MLP(condition) with random noise, decoding on the posed head, the
    rasterizer), not through the training code's synthesize_static / animate_fakes."""
    config, generator, discriminator, state = _baseline_setup()
    batch = make_batches(1, 4, config.render.resolution, seed=3)[0]
    flame_params = {k: jnp.asarray(batch[k]) for k in train.FLAME_KEYS}
    cams = jnp.asarray(batch["camera"])
    z = jax.random.normal(jax.random.PRNGKey(5), (4, config.model.z_dim))
    key = jax.random.PRNGKey(6)
    gamma_s = jnp.exp(jnp.asarray(generator.head_binding.log_gamma_s))[None, :, None]
    weights = train.losses.LossWeights(offset=config.loss.lambda_offset,
                                       scale=config.loss.lambda_scale,
                                       dynamic_weights=config.loss.lambda_gd,
                                       identity=config.loss.lambda_id)
    fitted = train.fit_flame(flame_params, generator.flame_model)
    condition = expression_condition(fitted, generator.config, 4)
    noise_key = jax.random.split(key, 3)[2]      # the noise key of the training forward

    def d_logits(images, cameras):
        return discriminator.apply({"params": state.d_vars["params"]}, images, cameras)

    def reference(params):
        variables = dict(state.g_vars, params=params)
        ws = generator.map_latents(variables, z, cams)
        maps = generator.synthesize(variables, ws, "random", rng=noise_key, condition=condition)
        gaussians, aux = binding.head_gaussians(generator.flame_model, generator.head_binding,
                                                maps.face, maps.mouth, fitted)
        images, _ = train.render_images(config, gaussians, cams)
        adversarial = jnp.mean(jax.nn.softplus(-d_logits(images, cams)))
        offset = jnp.mean(jnp.linalg.norm(aux["offset_raw"], axis=-1))
        scale = jnp.mean(jnp.linalg.norm(gaussians.scales - gamma_s, axis=-1))
        return adversarial + config.loss.lambda_offset * offset + config.loss.lambda_scale * scale

    ref_total, ref_grads = jax.jit(jax.value_and_grad(reference))(state.g_vars["params"])
    total, terms, _, _, grads = jax.jit(lambda v: train.generator_gradients(
        config, generator, weights, d_logits, None, v, z, cams, flame_params, key,
        noise_mode="random"))(state.g_vars)
    assert set(terms) == {"adversarial", "offset", "scale"}
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert len(flat) == len(flat_ref)
    scale = max(float(jnp.abs(g).max()) for _, g in flat_ref)
    assert scale > 1e-6
    for path, g in flat_ref:
        np.testing.assert_allclose(flat[path], g, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # The expression MLP is trained by it (the frames' expressions reach G through it).
    em = grads["expression_mapping"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(em)) > 0


@pytest.mark.slow
def test_baseline_train_iteration_runs_and_moves_the_expression_mlp():
    config, generator, discriminator, state = _baseline_setup()
    steps = train.make_steps(config, generator, discriminator, None,
                             devices=jax.local_devices()[:1])
    batch = {k: v[None] for k, v in make_batches(1, 4, config.render.resolution, seed=4)[0].items()}
    new, metrics = train.train_iteration(steps, train.replicate(state, jax.local_devices()[:1]),
                                         batch, 0.9, 0, config.loss.r1_interval)
    metrics = {k: float(np.asarray(v)[0]) for k, v in metrics.items()}
    assert "g_identity" not in metrics and "g_dynamic_weights" not in metrics
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    new = train.unreplicate(new)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   new.g_vars["params"]["expression_mapping"],
                                   state.g_vars["params"]["expression_mapping"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_export_refuses_static_only_without_gd(tmp_path):
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, "experiments/export_ply.py", "--config=configs/ablation.py:baseline,demo",
         "--random_init", "--nouse_dynamic", f"--out={tmp_path / 'head.ply'}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "has no G_d" in result.stderr
    assert not (tmp_path / "head.ply").exists()


def test_ablation_table_reads_each_runs_own_files(tmp_path):
    import json
    import subprocess
    import sys

    from reta3d.evaluation import ablation as table
    runs = {}
    for row, fid, fps in (("baseline", 7.5, 3.25), ("gm_gd", 5.5, 9.75), ("naive", None, None)):
        run = tmp_path / f"run_{row}"
        (run / "eval").mkdir(parents=True)
        (run / "config.json").write_text(ablation.get_config(row).to_json())
        if fid is not None:
            (run / "eval" / "metrics.json").write_text(json.dumps(
                {"metrics": {"fid": fid, "aed": 0.25, "swd": float("nan")}}))
            (run / "benchmark.json").write_text(json.dumps({"dri_fps": fps, "device": "cpu"}))
        runs[row] = str(run)
    rows = [table.run_row(runs[r]) for r in ("baseline", "gm_gd", "naive")]
    assert [table.row_label(r) for r in rows] == ["Baseline", "+ G_m + G_d (consecutive local)",
                                                  "Naive local"]
    assert rows[0]["fid"] == 7.5 and rows[0]["dri_fps"] == 3.25 and rows[0]["swd"] is None
    assert rows[2]["fid"] is None and len(rows[2]["notes"]) == 2
    out = subprocess.run(
        [sys.executable, "experiments/ablation_table.py", f"--runs={','.join(runs.values())}",
         f"--out={tmp_path / 'table.md'}"], capture_output=True, text=True, check=True)
    text = (tmp_path / "table.md").read_text()
    assert text == out.stdout
    assert "| **Baseline** (" in text and "| 7.5 | 0.25 | 3.25 |" in text
    assert "| Baseline (paper, FFHQ) | 512² | 6.8 | 0.10 | 31.5 |" in text
    assert "run experiments/evaluate.py --workdir=" + runs["naive"] in text
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        table.run_row(str(tmp_path))
