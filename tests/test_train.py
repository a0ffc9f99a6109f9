"""The train step: pmap equivalence, resume equivalence, one compilation per phase, EMA.

Uses a tiny configuration (16² UV map over the template head, 32² renders) and in-memory
batches, so every test shares the same compiled steps.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from rasterizer.types import look_at_eg3d_label
from reta3d import train
from reta3d.checkpoint import Checkpointer


def tiny_config():
    c = demo.get_config()
    c.model.z_dim = c.model.w_dim = 16
    c.model.mapping_layers = 1
    c.model.uv_resolution = 16
    c.model.mouth_resolution = 8
    c.model.channel_base = 64
    c.model.channel_max = 8
    c.model.mouth_channel_base = 32
    c.model.mouth_channel_max = 4
    c.model.gd_channels = 4
    c.model.expression_dims = 4
    c.disc.channel_base = 64
    c.disc.channel_max = 8
    c.disc.mbstd_group_size = 1   # groups must not straddle the device split (see test_pmap)
    c.render.resolution = 32
    c.train.batch_size = 4
    c.train.style_mixing_prob = 0.0
    c.train.noise_mode = "const"
    c.train.gpc_reg_prob = 0.0    # the swap rolls within a device's batch (see test_pmap)
    c.loss.r1_interval = 2
    # Adam's first step is g/(|g| + eps): with eps = 1e-8 it is sign(g), so gradients that are
    # ~0 and differ only by float summation order (1 vs 2 devices) flip whole updates. A large
    # eps keeps the update linear in g, so the comparison tests the step, not rounding.
    c.optim.eps = 1e-2
    # L_ID = |VGG(I_d) - VGG(I_s)|_1 has the kink of |x| at I_d = I_s (G_d starts at ΔF = 0), so
    # its gradient sign flips with rounding; it is tested in test_losses.py. The step with L_ID
    # on is checked against a hand-written one in test_train_reference.py.
    c.loss.lambda_id = 0.0
    return c


def make_batches(num, batch_size, res, seed=0, channels=None):
    """Batches as the train steps take them: images (B, R, R, C) in [-1, 1] with C =
    `train.discriminator_channels` of `tiny_config()` unless given (the demo's D sees alpha)."""
    channels = train.discriminator_channels(tiny_config()) if channels is None else channels
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        cams = np.stack([look_at_eg3d_label(rng.uniform(-0.4, 0.4), rng.uniform(-0.2, 0.2))
                         for _ in range(batch_size)])
        out.append({
            "image": rng.uniform(-1, 1, (batch_size, res, res, channels)).astype(np.float32),
            "camera": cams,
            "shape": rng.normal(0, 0.5, (batch_size, 100)).astype(np.float32),
            "expression": rng.normal(0, 0.5, (batch_size, 50)).astype(np.float32),
            "global_pose": np.zeros((batch_size, 3), np.float32),
            "neck_pose": rng.normal(0, 0.05, (batch_size, 3)).astype(np.float32),
            "jaw_pose": np.abs(rng.normal(0, 0.1, (batch_size, 3))).astype(np.float32),
            "eye_pose": rng.normal(0, 0.05, (batch_size, 6)).astype(np.float32),
        })
    return out


def per_device(batch, num_devices):
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def setup(num_devices):
    config = tiny_config()
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    state = train.create_train_state(config, generator, discriminator, jax.random.PRNGKey(0))
    steps = train.make_steps(config, generator, discriminator, None,
                             devices=jax.local_devices()[:num_devices])
    return config, state, steps


def run(num_devices, batches, state=None, first_step=0):
    config, init_state, steps = setup(num_devices)
    state = init_state if state is None else state
    state = train.replicate(state, jax.local_devices()[:num_devices])
    history = []
    for i, batch in enumerate(batches):
        step = first_step + i
        batch = per_device(batch, num_devices)
        state, metrics = train.train_iteration(steps, state, batch, train.ema_beta(config, step),
                                               step, config.loss.r1_interval)
        history.append({k: float(np.asarray(v)[0]) for k, v in metrics.items()})
    return jax.device_get(train.unreplicate(state)), history


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_two_devices_match_one_device_with_same_global_batch():
    assert jax.local_device_count() >= 2, "conftest sets 2 host devices"
    batches = make_batches(2, 4, 32)
    one, h1 = run(1, batches)
    two, h2 = run(2, batches)
    assert_trees_close(one.g_vars, two.g_vars)
    assert_trees_close(one.d_vars, two.d_vars)
    assert_trees_close(one.g_ema, two.g_ema)
    # The parameters really moved (a step that did nothing would pass the comparison).
    _, init, _ = setup(1)
    moved = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                                   one.g_vars["params"], init.g_vars["params"])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4
    for key in ("g_total", "d_loss", "d_r1_penalty"):
        assert np.isfinite(h1[0][key]) and abs(h1[0][key] - h2[0][key]) < 1e-3 * (1 + abs(h1[0][key]))


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    batches = make_batches(4, 4, 32, seed=1)
    straight, _ = run(1, batches)
    half, _ = run(1, batches[:2])
    ck = Checkpointer(tmp_path)
    ck.save(2, half, {"loader": {}})
    _, template, _ = setup(1)
    step, restored, _ = Checkpointer(tmp_path).restore_latest(template)
    assert step == 2 and int(restored.step) == 2
    resumed, _ = run(1, batches[2:], state=restored, first_step=2)
    assert_trees_close(straight.g_vars, resumed.g_vars, rtol=1e-6, atol=1e-7)
    assert_trees_close(straight.d_opt, resumed.d_opt, rtol=1e-6, atol=1e-7)
    assert_trees_close(straight.g_ema, resumed.g_ema, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_one_compilation_per_phase():
    config, state, steps = setup(1)
    batches = make_batches(3, 4, 32, seed=2)
    run(1, batches)
    counts = steps["trace_counts"]
    assert set(counts) == {"g_step", "d_step", "d_reg_step"}
    for name, count in counts.items():
        assert count == 1, f"{name} was traced (compiled) {count} times"


def test_sample_grid_calls_one_batch_size_and_places_every_cell():
    """Grids and SWD sample in calls of exactly SAMPLE_BATCH (one compilation per run), and
    the grid's cell (row i, column j) is latent i under column j's camera and FLAME."""
    from rasterizer.types import look_at_eg3d_label
    sizes = []

    def sample_fn(g_vars, z, cameras, flame, cond):
        sizes.append(len(z))
        # Pixel values: the latent's id (z[:, 0]), the camera's x (cameras[:, 3]), the jaw.
        value = z[:, 0] * 10 + cameras[:, 3] + flame["jaw_pose"][:, 0] * 100
        np.testing.assert_array_equal(cond, np.repeat(look_at_eg3d_label(0.0, 0.0)[None],
                                                      len(z), 0))
        return np.broadcast_to(value[:, None, None, None], (len(z), 2, 2, 3)) / 1000.0

    z = np.zeros((4, 3), np.float32)
    z[:, 0] = np.arange(4)
    zero = {k: np.zeros(3, np.float32) for k in ("jaw_pose", "expression")}
    columns = [(look_at_eg3d_label(yaw, 0.0), dict(zero)) for yaw in (-0.5, 0.0, 0.5)]
    columns.append((look_at_eg3d_label(0.0, 0.0), dict(zero, jaw_pose=np.full(3, 0.3,
                                                                              np.float32))))
    grid = train.render_sample_grid(sample_fn, None, z, columns)
    assert grid.shape == (4 * 2, 4 * 2, 3) and grid.dtype == np.uint8
    assert set(sizes) == {train.SAMPLE_BATCH} and len(sizes) == 1      # 16 cells, one call
    for i in range(4):
        for j, (camera, flame) in enumerate(columns):
            expected = (i * 10 + camera[3] + flame["jaw_pose"][0] * 100) / 1000.0
            cell = grid[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert np.all(cell == train._to_uint8(np.float32(expected))), (i, j)
    sizes.clear()
    out = train.sample_in_batches(sample_fn, None, np.tile(z, (5, 1)), np.repeat(
        look_at_eg3d_label(0.1, 0.0)[None], 20, 0), {"jaw_pose": np.zeros((20, 3))},
        np.repeat(look_at_eg3d_label(0.0, 0.0)[None], 20, 0))
    assert out.shape == (20, 2, 2, 3) and sizes == [16, 16]
    np.testing.assert_allclose(out[:, 0, 0, 0], (np.tile(np.arange(4), 5) * 10
                                                 + look_at_eg3d_label(0.1, 0.0)[3]) / 1000.0,
                               rtol=1e-6)


def test_the_discriminator_sees_alpha_of_reals_and_fakes_only_when_asked():
    """disc.alpha_channel (the demo's): D takes 4 channels, the reals' mattes and the fakes'
    rendered alpha as the 4th, in [-1, 1]; the samples stay RGB. Off (the paper): RGB only."""
    import rasterizer
    config = tiny_config()
    config.render.resolution = 16
    generator = train.build_generator(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (2, 3, 16, 16, 3)).astype(np.float32),
             "alpha": rng.uniform(0, 1, (2, 3, 16, 16, 1)).astype(np.float32)}
    cams = np.stack([look_at_eg3d_label(y, 0.0) for y in (-0.3, 0.4)]).astype(np.float32)
    g_vars = generator.init(jax.random.PRNGKey(1))
    static = generator.generate_static(g_vars, jnp.asarray(rng.standard_normal((2, 16)),
                                                           jnp.float32), cams)
    gaussians, _ = generator.animate(g_vars, static, {})
    out = rasterizer.render(gaussians, rasterizer.Camera.from_eg3d(cams, 16),
                            background=jnp.ones(3), capacity=train.render_capacity(
                                config, generator.num_gaussians))
    for sees in (True, False):
        config.disc.alpha_channel = sees
        assert train.build_discriminator(config).img_channels == (4 if sees else 3)
        real = train.real_images(config, batch)
        fake, _ = train.render_images(config, gaussians, cams)
        assert real.shape[-1] == fake.shape[-1] == (4 if sees else 3)
        np.testing.assert_array_equal(real[..., :3], batch["image"])
        np.testing.assert_allclose(fake[..., :3], out.color * 2 - 1, atol=1e-6)
        if not sees:   # the loader leaves alpha out of the batches of an RGB D
            np.testing.assert_array_equal(
                train.real_images(config, {"image": batch["image"]}), real)
        if sees:
            np.testing.assert_allclose(real[..., 3:], batch["alpha"] * 2 - 1, atol=1e-7)
            np.testing.assert_allclose(fake[..., 3], out.alpha * 2 - 1, atol=1e-6)
            assert 0.05 < float(np.mean(out.alpha)) < 0.95   # a head and a background
        flame = {k: v for k, v in make_batches(1, 2, 16, channels=3)[0].items()
                 if k in train.FLAME_KEYS}
        sample = train.make_sample_fn(config, generator)(
            g_vars, jnp.zeros((2, 16)), cams, flame, cams)
        assert sample.shape == (2, 16, 16, 3)


def test_ema_beta_follows_stylegan2():
    config = tiny_config()
    config.train.ema_kimg = 10.0
    config.train.ema_rampup = 0.05
    config.train.batch_size = 32
    # Early: ramp-up limits the half-life to 5% of the images seen.
    step = 10
    nimg = min(10_000, (step + 1) * 32 * 0.05)
    assert train.ema_beta(config, step) == pytest.approx(0.5 ** (32 / nimg))
    # Late: half-life of 10k images.
    assert train.ema_beta(config, 10**6) == pytest.approx(0.5 ** (32 / 10_000))


def test_fit_flame_truncates_to_the_model():
    config, _, _ = setup(1)
    model = train.build_generator(config).flame_model
    flame = {k: jnp.ones((2, n)) for k, n in
             [("shape", 100), ("expression", 50), ("global_pose", 3), ("neck_pose", 3),
              ("jaw_pose", 3), ("eye_pose", 6)]}
    fitted = train.fit_flame(flame, model)
    assert fitted["shape"].shape == (2, min(100, model.num_shape))
    assert fitted["expression"].shape == (2, min(50, model.num_expression))


def test_missing_vgg_weights_is_a_clear_error(tmp_path):
    config = tiny_config()
    config.loss.vgg16 = str(tmp_path / "vgg16.npz")
    with pytest.raises(FileNotFoundError, match="convert_vgg16"):
        train.build_vgg_features(config)
    config.loss.vgg16 = "random"     # explicit: a fixed random VGG16, and the note says so
    features, note = train.build_vgg_features(config)
    assert "random" in note and callable(features)


def test_a_run_that_cannot_start_says_which_flag_and_writes_nothing(tmp_path):
    """Before anything is compiled or written: a user's folder under a synthetic config is not
    replaced (the error names the flag), and a dataset smaller than one batch names the batch
    size that fits (the devices: conftest's 2)."""
    from reta3d import errors
    from reta3d.data import folder as folder_lib
    config = tiny_config()
    mine = tmp_path / "mine"
    rng = np.random.default_rng(0)
    folder_lib.write_folder(mine, rng.integers(0, 255, (3, 32, 32, 3), np.uint8),
                            np.stack([look_at_eg3d_label(0.0, 0.0)] * 3), {})
    listing = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    config.data.path = str(mine)
    config.data.synthetic = True
    with pytest.raises(errors.InputError, match="pass --config.data.synthetic=False"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == listing
    config.data.synthetic = False
    # The demo's D sees alpha: a folder of RGB images has none to show it.
    assert config.disc.alpha_channel
    with pytest.raises(errors.InputError, match=f"config.disc.alpha_channel is True but 3 images "
                       f"of {mine} have no alpha channel .first: {mine}/images/00000.png.*"
                       "--config.disc.alpha_channel=False"):
        train.train_and_evaluate(config, tmp_path / "run")
    config.disc.alpha_channel = False
    with pytest.raises(errors.InputError, match=f"{mine} holds 3 image.s., fewer than one batch "
                       "of 4: add images, or pass --config.train.batch_size=2 "):
        train.train_and_evaluate(config, tmp_path / "run")
    config.train.batch_size = 3
    with pytest.raises(errors.InputError, match="multiple of the 2 device"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # Checked before the dataset is touched: a --workdir that is a file, missing VGG16 weights.
    config.data.path = str(tmp_path / "never_built")
    config.data.synthetic = True
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(errors.InputError, match="a_file is a file, not a folder"):
        train.train_and_evaluate(config, tmp_path / "a_file" / "run")
    config.loss.lambda_id = 1.0
    config.loss.vgg16 = str(tmp_path / "vgg16.npz")
    with pytest.raises(errors.MissingInputError, match="VGG16 weights not found"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "never_built").exists() and not (tmp_path / "run").exists()


def test_an_alpha_seeing_discriminator_needs_a_matte_for_every_image(tmp_path):
    """check_alpha_data: a folder of RGBA images passes; one RGB image among them is named;
    the synthetic dataset (RGBA over white) passes, but not over another background."""
    from reta3d import errors
    from reta3d.data import folder as folder_lib
    config = tiny_config()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (3, 8, 8, 4), np.uint8)
    path = folder_lib.write_folder(tmp_path / "matted", rgba,
                                   np.stack([look_at_eg3d_label(0.0, 0.0)] * 3), {})
    config.data.path = str(path)
    config.data.synthetic = False
    train.check_alpha_data(config)
    from PIL import Image
    Image.fromarray(rgba[1, ..., :3]).save(path / "images/00001.png")
    with pytest.raises(errors.InputError, match=f"1 image of {path} has no alpha channel "
                       f".first: {path}/images/00001.png"):
        train.check_alpha_data(config)
    config.disc.alpha_channel = False
    train.check_alpha_data(config)
    config.disc.alpha_channel = True
    config.data.synthetic = True
    train.check_alpha_data(config)
    config.render.background = 0.0
    with pytest.raises(errors.InputError, match="only over white"):
        train.check_alpha_data(config)


def test_resuming_another_network_is_refused_before_anything_is_written(tmp_path):
    """A workdir whose checkpoints come from another network (here the RGB D of a run saved
    before disc.alpha_channel existed) is a one-line error naming the setting and the flag to
    resume it, and its config.json is left as it was; settings that do not change the
    parameters (the training length, the compute dtype) may change on resume."""
    import json
    from reta3d import errors
    old = tiny_config()
    saved = json.loads(old.to_json_best_effort())
    del saved["disc"]["alpha_channel"]           # a run from before the setting
    run = tmp_path / "run"
    (run / "checkpoints" / "300").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(saved))
    config = tiny_config()
    assert config.disc.alpha_channel
    with pytest.raises(errors.InputError, match=re.escape(
            f"{run} holds checkpoints of another network (disc.alpha_channel=False there, True "
            "here): use a new --workdir for this config, or resume that run with its own "
            "settings (--config.disc.alpha_channel=False)")):
        train.train_and_evaluate(config, run)
    assert json.loads((run / "config.json").read_text()) == saved
    config.disc.alpha_channel = False
    config.train.total_kimg = 9.6
    config.model.dtype = "bfloat16"
    train.check_resume_config(run, config)
    config.model.uv_resolution = 32
    config.render.resolution = 64
    with pytest.raises(errors.InputError, match="model.uv_resolution=16 there, 32 here.*"
                       "render.resolution=32 there, 64 here"):
        train.check_resume_config(run, config)
    train.check_resume_config(tmp_path / "fresh", config)   # nothing there yet


def test_host_replica_is_the_first_replica_as_numpy_copies():
    """What a checkpoint saves: device 0's copy of each leaf (pmapped over 2 devices, one
    replica changed after replicating so that the replicas differ), as numpy arrays."""
    assert jax.local_device_count() == 2
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7, jnp.int32),
            "nested": (jnp.ones((4,), jnp.bfloat16),)}
    replicated = train.replicate(tree)
    replicated = jax.pmap(lambda t, i: jax.tree_util.tree_map(lambda x: x + i.astype(x.dtype),
                                                                t))(
        replicated, jnp.arange(2))   # replica 1 = replica 0 + 1
    host = train.host_replica(replicated)
    expected = jax.device_get(train.unreplicate(replicated))
    for got, want, source in zip(jax.tree_util.tree_leaves(host),
                                 jax.tree_util.tree_leaves(expected),
                                 jax.tree_util.tree_leaves(tree)):
        assert isinstance(got, np.ndarray) and got.dtype == source.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, np.asarray(source))   # replica 0, not 1
        assert got.flags.writeable   # a copy: a view of a device buffer is read-only
    assert train.host_replica({"a": np.asarray([[1, 2], [3, 4]])})["a"].tolist() == [1, 2]


def test_swap_conditioning_rolls_the_batch():
    cams = jnp.arange(4 * 25, dtype=jnp.float32).reshape(4, 25)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(train.swap_conditioning(key, cams, 0.0), cams)
    np.testing.assert_array_equal(train.swap_conditioning(key, cams, 1.0), jnp.roll(cams, 1, 0))
    half = np.asarray(train.swap_conditioning(key, cams, 0.5))
    for i in range(4):  # each row is its own camera or its neighbour's, never anything else
        assert (half[i] == cams[i]).all() or (half[i] == cams[i - 1]).all()


def test_run_result_has_the_ratio_only_when_both_swds_were_measured():
    assert train.run_result(300, {"swd_start": 400.0, "swd_end": 100.0, "other": 1}) == {
        "step": 300, "swd_start": 400.0, "swd_end": 100.0, "swd_ratio": 0.25}
    # A checkpoint whose metadata lacks SWD at step 0 (None or absent): no ratio, no crash.
    for meta in ({"swd_end": 100.0}, {"swd_start": None, "swd_end": 100.0}):
        assert train.run_result(300, meta) == {"step": 300, "swd_end": 100.0}
    assert train.run_result(0, {}) == {"step": 0}
    assert train.swd_summary(train.run_result(300, {"swd_start": 400.0, "swd_end": 100.0})) == \
        "swd at step 0: 400.00  ->  at step 300: 100.00  (ratio 0.25)"
    assert train.swd_summary(train.run_result(300, {"swd_end": 100.0})) == "swd at step 300: 100.00"


def test_eta_follows_a_falling_rate_and_counts_the_final_swd():
    # Rate fell from 8 (average) to 5 img/s (last window): 100 steps of 8 images at the
    # slower rate, plus the final SWD's 10 s.
    assert train.seconds_left(100, 8, 5.0, 8.0, 10.0) == pytest.approx(100 * 8 / 5 + 10)
    # A window sped up by chance does not make the ETA optimistic: the average bounds it.
    assert train.seconds_left(100, 8, 12.0, 8.0) == pytest.approx(100)
    assert train.seconds_left(0, 8, 5.0, 8.0, 10.0) == pytest.approx(10)
    line = train._progress_line(50, 300, 0.4, 5.0, {"g_total": 1.0}, 3725.0)
    assert line.endswith("left 01:02:05") and "5.0 img/s" in line


@pytest.mark.parametrize("count, rank, message", [
    ("2", "2", "JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2: the process ids are 0 … 1"),
    ("two", "0", "JAX_NUM_PROCESSES='two': not an integer"),
    ("0", "0", "JAX_NUM_PROCESSES=0: must be 1 or more"),
])
def test_inconsistent_multi_host_settings_are_one_line_errors(monkeypatch, count, rank, message):
    """Checked before jax.distributed.initialize, which would wait 5 minutes, then abort."""
    from reta3d import errors
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", count)
    monkeypatch.setenv("JAX_PROCESS_ID", rank)
    with pytest.raises(errors.InputError, match=re.escape(message)):
        train._maybe_initialize_distributed()
