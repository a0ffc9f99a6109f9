"""Inference (reta3d/inference.py): generator loading, the per-frame path, the animation job,
rasterizer-overflow reporting.

One tiny generator (32² UV map, 16² mouth patch, 64² renders over the template head) is
shared by every test. Its variables are random normal arrays with the structure of
`generator.init` (jax.eval_shape + numpy): the tests check inference plumbing, not the init
distribution, and a jit-compiled Flax init costs ~30 s of XLA compile on a small CPU.
Every animation uses the same T and one identity, so one per-frame compilation serves all.
"""
import io
import json

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from rasterizer import binning, projection
from rasterizer.types import Camera
from reta3d.binding import GAMMA_S
from reta3d import cameras, cli, inference, sequences, template_head, train, video
from reta3d.networks.generator import StaticMaps

NUM_FRAMES = 6   # every animation in this file: one compiled frame function


def tiny_config():
    c = demo.get_config()
    c.model.z_dim = c.model.w_dim = 16
    c.model.mapping_layers = 1
    c.model.uv_resolution = 32
    c.model.mouth_resolution = 16
    c.model.channel_base = 64
    c.model.channel_max = 8
    c.model.mouth_channel_base = 32
    c.model.mouth_channel_max = 4
    c.model.gd_channels = 4
    c.model.expression_dims = 4
    c.disc.channel_base = 64
    c.disc.channel_max = 8
    c.render.resolution = 64
    c.render.backend = "jax"
    return c


def random_like(abstract, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype)
        if jnp.issubdtype(s.dtype, jnp.floating) else rng.integers(0, 100, s.shape).astype(s.dtype),
        abstract)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    generator = train.build_generator(config)
    g_vars = random_like(jax.eval_shape(generator.init, jax.random.PRNGKey(0)), seed=0)
    return config, generator, g_vars


def _geometry_on_surface(maps: jax.Array, uv_resolution: int,
                         log_gamma_s: float = np.log(GAMMA_S)) -> jax.Array:
    """Offsets 0 (Gaussians on the FLAME surface), isotropic world scales γs·256/R (the paper's
    γs = e^−5.5 at 256², grown with the coarser texel spacing of an R² map, so that the map
    covers the surface), opaque; the generator's colours are kept. log_gamma_s: the ln γs the
    binding decodes the raw scale with (scale = exp(raw + ln γs))."""
    raw_scale = np.log(GAMMA_S * 256 / uv_resolution) - log_gamma_s
    return maps.at[..., 0:3].set(0.0).at[..., 3:6].set(raw_scale).at[..., 13].set(5.0)


# ------------------------------------------------------------------------------------------
# The per-frame path
# ------------------------------------------------------------------------------------------

def test_jaw_moves_mouth_region_not_forehead(tiny):
    config, generator, g_vars = tiny
    # G_d off (all its weights 0 → ΔF = 0), so only FLAME geometry moves between frames.
    g_vars = dict(g_vars, params=dict(g_vars["params"], dynamic=jax.tree_util.tree_map(
        jnp.zeros_like, g_vars["params"]["dynamic"])))
    z = inference.latents_for_seeds([3], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            cameras.conditioning_labels(config, 1))
    head = generator.head_binding
    static = StaticMaps(
        face=_geometry_on_surface(static.face, 32, getattr(head, "face_log_gamma_s", np.log(GAMMA_S))),
        mouth=_geometry_on_surface(static.mouth, 32, getattr(head, "mouth_log_gamma_s", np.log(GAMMA_S))),
        ws=static.ws)
    model = generator.flame_model
    sequence = {k: np.repeat(v, NUM_FRAMES, 0) for k, v in sequences.neutral_flame(model).items()}
    sequence["jaw_pose"][1, 0] = 0.35      # frame 1: mouth open
    sequence["neck_pose"][2, 0] = 0.3      # frame 2: head pitched (the forehead box can change)
    labels = cameras.camera_path("fixed", NUM_FRAMES)
    frame_fn = inference.make_frame_fn(config, generator)
    frames, _ = inference.run_animation(frame_fn, g_vars, static, sequence, labels)
    frames = frames[:, 0].astype(np.float64)

    # Boxes around the projections of FLAME landmarks (template: mouth line y = -0.05,
    # forehead y = +0.07, face front z ≈ 0.09) by the frontal camera.
    camera = Camera.from_eg3d(labels[0], 64)

    def pixel(point):
        world = np.asarray(model.to_world(jnp.asarray(point, jnp.float32)))
        cam = np.asarray(camera.world_to_camera) @ np.append(world, 1.0)
        uvw = np.asarray(camera.intrinsics) @ cam[:3]
        return uvw[:2] / uvw[2]

    def box(image, point, half=7):
        col, row = np.round(pixel(point)).astype(int)
        box = image[max(row - half, 0):row + half, max(col - half, 0):col + half]
        assert box.size >= half * half, (point, row, col)     # at least a quarter inside
        return box

    mouth_point = (0.0, template_head.MOUTH_LINE_Y - 0.015, 0.09)
    forehead_point = (0.0, 0.07, 0.09)
    jaw_delta = np.abs(frames[1] - frames[0]).mean(-1)
    nod_delta = np.abs(frames[2] - frames[0]).mean(-1)
    mouth_change, forehead_change = box(jaw_delta, mouth_point).mean(), box(jaw_delta, forehead_point).mean()
    assert mouth_change > 3.0, mouth_change
    assert mouth_change > 3.0 * forehead_change, (mouth_change, forehead_change)
    assert box(nod_delta, forehead_point).mean() > 1.0   # the forehead box is not blind
    np.testing.assert_array_equal(frames[3], frames[0])   # neutral again: deterministic


def _used_leaves(jitted, *args):
    """Paths of the flattened arguments that the traced per-frame computation reads."""
    closed = jax.make_jaxpr(jitted)(*args)
    (eqn,) = closed.jaxpr.eqns            # the jit call
    inner = eqn.params["jaxpr"].jaxpr
    used = set()
    for e in inner.eqns:
        used.update(id(v) for v in e.invars if not isinstance(v, jax_core.Literal))
    used.update(id(v) for v in inner.outvars if not isinstance(v, jax_core.Literal))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    assert len(paths) == len(inner.invars)
    return {path for path, var in zip(paths, inner.invars) if id(var) in used}


def test_per_frame_path_never_runs_the_static_generator(tiny):
    config, generator, g_vars = tiny
    z = inference.latents_for_seeds([0], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            cameras.conditioning_labels(config, 1))
    sequence, _ = sequences.get_sequence("builtin:talk", generator.flame_model, NUM_FRAMES)
    labels = cameras.camera_path("fixed", NUM_FRAMES)
    frame_fn = inference.make_frame_fn(config, generator)
    used = _used_leaves(frame_fn, g_vars, static, sequence, jnp.asarray(0, jnp.int32), labels)
    static_parts = ("'mapping'", "'synthesis'", "'mouth_synthesis'", "'blend'", "mapping_state",
                    "buffers")
    leaks = sorted(p for p in used if p.startswith("[0]") and any(s in p for s in static_parts))
    assert not leaks, f"the per-frame function reads static-generator variables: {leaks}"
    assert any("'dynamic'" in p for p in used)          # G_d runs every frame
    assert any(p.startswith("[1]") and "face" in p for p in used)  # from the static maps


def test_animation_video_one_frame_per_flame_frame(tiny, tmp_path, monkeypatch):
    config, generator, g_vars = tiny
    static_calls = []
    real_static = generator.jit_generate_static

    def counting_static(*args, **kwargs):
        static_calls.append(1)
        return real_static(*args, **kwargs)

    monkeypatch.setitem(generator.__dict__, "jit_generate_static", counting_static)
    for name in ("talk.gif", "talk.mp4"):
        timing = inference.animate_to_video(config, generator, g_vars, [0], "builtin:talk",
                                            tmp_path / name, num_frames=NUM_FRAMES)
        clip = video.read_video(tmp_path / name)
        assert clip.shape == (NUM_FRAMES, 64, 64, 3), clip.shape
        saved = json.loads(video.timing_path(tmp_path / name).read_text())
        assert saved["frames"] == NUM_FRAMES and len(saved["frame_ms"]) == NUM_FRAMES
        assert saved["backend"] == "jax"               # resolved, as the config asks
        assert saved == json.loads(json.dumps(timing))
        assert saved["rasterizer_overflow"]["capacity"] == binning.default_capacity(
            generator.num_gaussians, 64, 64)
        assert saved["rasterizer_overflow"]["images"] == NUM_FRAMES
        assert np.std(clip) > 1.0                      # a picture, not a blank clip
    assert len(static_calls) == 2   # once per identity per clip, not once per frame


def test_realtime_mode_matches_per_frame_mode(tiny):
    config, generator, g_vars = tiny
    z = inference.latents_for_seeds([1], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            cameras.conditioning_labels(config, 1))
    sequence, _ = sequences.get_sequence("builtin:nod", generator.flame_model, NUM_FRAMES)
    labels = cameras.camera_path("orbit", NUM_FRAMES)
    frame_fn = inference.make_frame_fn(config, generator)
    slow, timing = inference.run_animation(frame_fn, g_vars, static, sequence, labels)
    fast, rt_timing = inference.run_animation(frame_fn, g_vars, static, sequence, labels,
                                              realtime=True)
    np.testing.assert_array_equal(slow, fast)
    assert timing["rasterizer_overflow"] == rt_timing["rasterizer_overflow"]
    assert slow.shape == (NUM_FRAMES, 1, 64, 64, 3)
    assert rt_timing["mode"] == "realtime" and rt_timing["fps"] > 0 and timing["fps"] > 0
    assert not np.array_equal(slow[0], slow[NUM_FRAMES // 2])   # camera and head moved


def test_small_capacity_overflow_is_counted_reported_and_warned(tiny, tmp_path):
    config, generator, g_vars = tiny
    capacity = 300                  # far below the default: every frame overflows
    timing = inference.animate_to_video(config, generator, g_vars, [0], "builtin:talk",
                                        tmp_path / "small.gif", num_frames=NUM_FRAMES,
                                        capacity=capacity)
    report = timing["rasterizer_overflow"]
    saved = json.loads(video.timing_path(tmp_path / "small.gif").read_text())
    assert saved["rasterizer_overflow"] == report

    # Reference: each frame's tile intersections counted from its Gaussians (the video's
    # identity, FLAME frames and camera), with no capacity involved: projection radii →
    # tile rectangles → areas. An image with T > capacity intersections drops T − capacity.
    z = inference.latents_for_seeds([0], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            cameras.conditioning_labels(config, 1))
    sequence, _ = sequences.get_sequence("builtin:talk", generator.flame_model, NUM_FRAMES)
    labels = cameras.camera_path("fixed", NUM_FRAMES)

    @jax.jit
    def intersections(g_vars, static, flame, label):
        gaussians, _ = generator.animate(g_vars, static, flame)
        camera = Camera.from_eg3d(label[None], 64)
        proj = projection.project(gaussians.means, gaussians.scales, gaussians.quats,
                                  camera.world_to_camera, camera.intrinsics, 64, 64)
        x0, x1, y0, y1 = binning.tile_rectangles(proj.means2d, proj.radii, 64, 64)
        return jnp.sum((x1 - x0) * (y1 - y0))

    totals = np.array([int(intersections(g_vars, static, {k: v[t:t + 1] for k, v in sequence.items()},
                                         labels[t])) for t in range(NUM_FRAMES)])
    dropped = totals - capacity
    assert dropped.min() > 0, totals
    assert (report["capacity"], report["images"], report["images_with_overflow"]) == (
        capacity, NUM_FRAMES, NUM_FRAMES)
    # Equal on the development machine (~4,000 intersections per frame); a last-ulp difference
    # between two compilations could move a Gaussian across a tile line, hence the tolerance.
    np.testing.assert_allclose(report["dropped_tile_intersections"], dropped.sum(), rtol=1e-3)
    np.testing.assert_allclose(report["capacity_needed"], totals.max(), rtol=1e-3)
    np.testing.assert_allclose(report["max_dropped_fraction"], np.max(dropped / totals), rtol=1e-3)

    stream = io.StringIO()
    line = cli.warn_overflow(report, file=stream)
    assert line == stream.getvalue().strip()
    assert line.startswith(f"warning: rasterizer capacity overflow: "
                           f"{report['dropped_tile_intersections']} tile intersections dropped "
                           f"in {NUM_FRAMES} of {NUM_FRAMES} images")
    assert f"--capacity={report['capacity_needed']} or more (now {capacity})" in line


# ------------------------------------------------------------------------------------------
# Loading a generator
# ------------------------------------------------------------------------------------------

def test_load_generator_restores_g_ema_from_workdir(tiny, tmp_path):
    from reta3d.checkpoint import Checkpointer
    config, generator, _ = tiny
    discriminator = train.build_discriminator(config)
    abstract = jax.eval_shape(lambda r: train.create_train_state(config, generator, discriminator, r),
                              jax.random.PRNGKey(0))
    state = random_like(abstract, seed=7)
    state = state.replace(g_ema=random_like(abstract.g_ema, seed=8, scale=0.5))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(12, state, {"kimg": 0.1})
    checkpointer.close()
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))

    loaded_config, loaded_generator, g_vars = inference.load_generator(workdir=tmp_path)
    assert loaded_config.model.uv_resolution == 32
    assert loaded_generator.num_gaussians == generator.num_gaussians
    expected = jax.tree_util.tree_leaves_with_path(state.g_ema)
    got = jax.tree_util.tree_leaves_with_path(g_vars)
    assert [p for p, _ in expected] == [p for p, _ in got]
    for (path, want), (_, have) in zip(expected, got):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=str(path))
    # g_ema, not the raw generator weights
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(g_vars)[0]),
                              np.asarray(jax.tree_util.tree_leaves(state.g_vars)[0]))


def test_load_generator_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one.*neither"):
        inference.load_generator()
    with pytest.raises(ValueError, match="exactly one.*both"):
        inference.load_generator(workdir=tmp_path, config=tiny_config(), random_init=True)
    with pytest.raises(ValueError, match="random_init=True"):
        inference.load_generator(config=tiny_config())
    with pytest.raises(ValueError, match="ignores a workdir"):
        inference.load_generator(workdir=tmp_path, random_init=True)
    with pytest.raises(FileNotFoundError, match="training workdir not found"):
        inference.load_generator(workdir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        inference.load_generator(workdir=tmp_path)
    (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        inference.load_generator(workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        inference.load_generator(config=str(tmp_path / "missing.py"), random_init=True)
