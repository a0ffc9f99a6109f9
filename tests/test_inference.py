"""Inference: generator loading, FLAME sequences, the per-frame path, videos, .ply, scripts.

One tiny generator (32² UV map, 16² mouth patch, 64² renders over the template head) is
shared by every test. Its variables are random normal arrays with the structure of
`generator.init` (jax.eval_shape + numpy): the tests check inference plumbing, not the init
distribution, and a jit-compiled Flax init costs ~30 s of XLA compile on a small CPU.
Every animation uses the same T and one identity, so one per-frame compilation serves all.
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from rasterizer.types import Camera, Gaussians
from reta3d import inference, ply, template_head, train
from reta3d.networks.generator import StaticMaps

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def _geometry_on_surface(maps: jax.Array, uv_resolution: int) -> jax.Array:
    """Offsets 0 (Gaussians on the FLAME surface), isotropic scales big enough for the coarse
    map to cover the surface, opaque; the generator's colours are kept."""
    return (maps.at[..., 0:3].set(0.0).at[..., 3:6].set(np.log(256 / uv_resolution))
            .at[..., 13].set(5.0))


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
                                            inference.conditioning_labels(config, 1))
    static = StaticMaps(face=_geometry_on_surface(static.face, 32),
                        mouth=_geometry_on_surface(static.mouth, 32), ws=static.ws)
    model = generator.flame_model
    sequence = {k: np.repeat(v, NUM_FRAMES, 0) for k, v in inference.neutral_flame(model).items()}
    sequence["jaw_pose"][1, 0] = 0.35      # frame 1: mouth open
    sequence["neck_pose"][2, 0] = 0.3      # frame 2: head pitched (the forehead box can change)
    labels = inference.camera_path("fixed", NUM_FRAMES)
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
        return image[row - half:row + half, col - half:col + half]

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
                                            inference.conditioning_labels(config, 1))
    sequence, _ = inference.get_sequence("builtin:talk", generator.flame_model, NUM_FRAMES)
    labels = inference.camera_path("fixed", NUM_FRAMES)
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
        video = inference.read_video(tmp_path / name)
        assert video.shape == (NUM_FRAMES, 64, 64, 3), video.shape
        saved = json.loads(inference.timing_path(tmp_path / name).read_text())
        assert saved["frames"] == NUM_FRAMES and len(saved["frame_ms"]) == NUM_FRAMES
        assert saved == json.loads(json.dumps(timing))
        assert np.std(video) > 1.0                     # a picture, not a blank clip
    assert len(static_calls) == 2   # once per identity per clip, not once per frame


def test_realtime_mode_matches_per_frame_mode(tiny):
    config, generator, g_vars = tiny
    z = inference.latents_for_seeds([1], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            inference.conditioning_labels(config, 1))
    sequence, _ = inference.get_sequence("builtin:nod", generator.flame_model, NUM_FRAMES)
    labels = inference.camera_path("orbit", NUM_FRAMES)
    frame_fn = inference.make_frame_fn(config, generator)
    slow, timing = inference.run_animation(frame_fn, g_vars, static, sequence, labels)
    fast, rt_timing = inference.run_animation(frame_fn, g_vars, static, sequence, labels,
                                              realtime=True)
    np.testing.assert_array_equal(slow, fast)
    assert slow.shape == (NUM_FRAMES, 1, 64, 64, 3)
    assert rt_timing["mode"] == "realtime" and rt_timing["fps"] > 0 and timing["fps"] > 0
    assert not np.array_equal(slow[0], slow[NUM_FRAMES // 2])   # camera and head moved


def test_gif_keeps_identical_frames(tmp_path):
    frames = np.zeros((5, 10, 14, 3), np.uint8)
    frames[3:] = (200, 30, 10)
    inference.write_video(tmp_path / "still.gif", frames, fps=10)
    back = inference.read_video(tmp_path / "still.gif")
    assert back.shape == (5, 10, 14, 3)          # Pillow alone would merge frames 0-2 and 3-4
    np.testing.assert_array_equal(back, frames)  # two colours: the palette is exact
    inference.write_video(tmp_path / "odd.mp4", np.repeat(frames, 2, 0)[:, :9, :13], fps=10)
    assert inference.read_video(tmp_path / "odd.mp4").shape[0] == 10
    with pytest.raises(ValueError, match="must end in"):
        inference.write_video(tmp_path / "x.avi", frames)


def test_side_by_side_and_grid_layout():
    frames = np.arange(2 * 3 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 3, 4, 5, 3)
    tiled = inference.side_by_side(frames)
    assert tiled.shape == (2, 4, 15, 3)
    np.testing.assert_array_equal(tiled[1, :, 5:10], frames[1, 1])
    grid = inference.image_grid(frames)
    assert grid.shape == (8, 15, 3)
    np.testing.assert_array_equal(grid[4:8, 10:15], frames[1, 2])


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


# ------------------------------------------------------------------------------------------
# FLAME sequences
# ------------------------------------------------------------------------------------------

def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_sequence_file_layout_and_padding(tmp_path, tiny):
    _, generator, _ = tiny
    model = generator.flame_model
    path = _write_npz(tmp_path / "seq.npz", expression=np.ones((7, 50)), jaw_pose=np.full((7, 3), 0.1),
                      shape=np.ones(3), fps=np.array(25.0))
    sequence, fps = inference.get_sequence(str(path), model, num_frames=5)
    assert fps == 25.0
    assert sequence["expression"].shape == (5, model.num_expression)   # 50 cut to the model's 16
    assert sequence["shape"].shape == (5, model.num_shape)
    np.testing.assert_array_equal(sequence["shape"][:, :3], 1.0)
    np.testing.assert_array_equal(sequence["shape"][:, 3:], 0.0)
    np.testing.assert_array_equal(sequence["eye_pose"], np.zeros((5, 6)))   # missing → zeros
    np.testing.assert_allclose(sequence["jaw_pose"], 0.1)
    assert all(v.dtype == np.float32 for v in sequence.values())


@pytest.mark.parametrize("arrays, message", [
    (dict(jaw_pose=np.zeros((4, 2))), r"'jaw_pose' must be \(T, 3\)"),
    (dict(expression=np.zeros(4)), r"'expression' must be \(T, k\)"),
    (dict(eye_pose=np.zeros((4, 3))), r"'eye_pose' must be \(T, 6\)"),
    (dict(expression=np.zeros((4, 5)), jaw_pose=np.zeros((3, 3))), "disagree on the number of frames"),
    (dict(neck_pose=np.array([[0, np.nan, 0], [0, 0, 0]])), "'neck_pose' has 1 non-finite"),
    (dict(global_pose=np.array([[np.inf, 0, 0]])), "'global_pose' has 1 non-finite"),
    (dict(jaw=np.zeros((4, 3))), r"unknown array\(s\) \['jaw'\]"),
    (dict(fps=np.array(30.0)), "no per-frame FLAME array"),
    (dict(expression=np.zeros((4, 2)), shape=np.zeros((3, 2))), "'shape' must be"),
])
def test_bad_sequence_files_are_rejected(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        inference.load_flame_sequence(path, num_expression=16)
    assert "bad.npz" in str(info.value)


def test_missing_corrupt_and_unknown_sequences(tmp_path, tiny):
    model = tiny[1].flame_model
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        inference.get_sequence(str(tmp_path / "missing.npz"), model)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz: cannot read"):
        inference.get_sequence(str(tmp_path / "broken.npz"), model)
    with pytest.raises(ValueError, match="unknown builtin sequence 'builtin:dance'"):
        inference.get_sequence("builtin:dance", model)


def test_builtin_sequences_on_the_template_head():
    index = {n: i for i, n in enumerate(template_head.EXPRESSION_NAMES)}
    num = len(index)
    blink = inference.builtin_sequence("blink", 90, num, index)
    lids = blink["expression"][:, index["blink"]]
    assert lids.max() > 0.99 and lids.min() == 0.0 and (lids > 0.5).mean() < 0.3
    assert np.abs(blink["jaw_pose"]).max() == 0.0
    smile = inference.builtin_sequence("smile", 60, num, index)
    assert 1.9 < smile["expression"][:, index["smile"]].max() <= 2.0
    assert smile["expression"][0, index["smile"]] == 0.0
    talk = inference.builtin_sequence("talk", 60, num, index)
    jaw = talk["jaw_pose"][:, 0]
    assert jaw.min() >= 0.0 and jaw.max() > 0.08 and np.sum(np.diff(np.sign(np.diff(jaw))) != 0) > 6
    nod = inference.builtin_sequence("nod", 60, num, index)
    assert np.abs(nod["neck_pose"][:, 0]).max() > 0.15 and np.abs(nod["neck_pose"][[0, -1], 0]).max() < 1e-6
    for seq in (blink, smile, talk, nod):
        assert {k: v.shape[1] for k, v in seq.items()} == {
            "expression": num, "jaw_pose": 3, "neck_pose": 3, "global_pose": 3, "eye_pose": 6,
            "shape": 1}


def test_builtin_sequences_for_a_real_flame_layout_use_pose(caplog):
    blink = inference.builtin_sequence("blink", 90, 100, {})
    assert np.abs(blink["expression"]).max() == 0.0
    assert blink["eye_pose"][:, 0].max() > 0.3            # downward glance at blink times
    np.testing.assert_array_equal(blink["eye_pose"][:, 0], blink["eye_pose"][:, 3])
    with caplog.at_level("WARNING"):
        smile = inference.builtin_sequence("smile", 60, 100, {})
    assert "no named 'smile'" in caplog.text
    assert smile["jaw_pose"][:, 0].max() > 0.04 and np.abs(smile["expression"]).max() == 0.0
    named = inference.builtin_sequence("smile", 60, 100, inference.parse_expression_components("smile=3"))
    assert named["expression"][:, 3].max() > 1.9
    with pytest.raises(ValueError, match="outside the model"):
        inference.builtin_sequence("smile", 10, 100, {"smile": 100})


def test_parse_seeds_and_lists():
    assert inference.parse_seeds("0-3,7,2,10-11") == [0, 1, 2, 3, 7, 10, 11]
    for bad in ("", "a", "3-1", "-2"):
        with pytest.raises(ValueError):
            inference.parse_seeds(bad)
    assert inference.parse_floats("0.5, -1,2", "x") == [0.5, -1.0, 2.0]
    with pytest.raises(ValueError, match="--expression"):
        inference.parse_floats("1,nan", "--expression")
    z = inference.latents_for_seeds([4, 4, 5], 8)
    np.testing.assert_array_equal(z[0], z[1])
    np.testing.assert_array_equal(z[0], np.random.RandomState(4).randn(8).astype(np.float32))
    assert inference.orbit_labels(8).shape == (8, 25)
    assert inference.view_grid_labels([-0.3, 0.0, 0.3], [0.0, 0.2]).shape == (4, 25)


# ------------------------------------------------------------------------------------------
# .ply
# ------------------------------------------------------------------------------------------

def _random_gaussians(n, seed=0):
    rng = np.random.default_rng(seed)
    return Gaussians(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        scales=np.exp(rng.normal(-5, 1, size=(n, 3))).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        opacities=rng.uniform(0.01, 0.99, size=n).astype(np.float32),
        colors=rng.uniform(0, 1, size=(n, 3)).astype(np.float32))


def test_ply_roundtrip_and_3dgs_layout(tmp_path):
    gaussians = _random_gaussians(50)
    path = ply.write_ply(tmp_path / "head.ply", gaussians)
    back = ply.read_ply(path)
    for name in ("means", "quats"):
        np.testing.assert_array_equal(getattr(back, name), getattr(gaussians, name))
    for name in ("scales", "opacities", "colors"):
        np.testing.assert_allclose(getattr(back, name), getattr(gaussians, name), rtol=2e-6, atol=1e-6)

    # Independent parse: the header text and the raw stored (pre-activation) values.
    data = path.read_bytes()
    header, body = data.split(b"end_header\n")
    lines = header.decode().splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"] and "element vertex 50" in lines
    names = [line.split()[2] for line in lines if line.startswith("property float")]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    raw = np.frombuffer(body, dtype=np.dtype([(n, "<f4") for n in names]))
    assert raw.shape == (50,)
    o = gaussians.opacities.astype(np.float64)
    np.testing.assert_allclose(raw["opacity"], np.log(o / (1 - o)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw["scale_1"], np.log(gaussians.scales[:, 1]), rtol=1e-6)
    np.testing.assert_allclose(raw["f_dc_2"], (gaussians.colors[:, 2] - 0.5) / 0.28209479177387814,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(raw["rot_0"], gaussians.quats[:, 0])    # w first
    np.testing.assert_array_equal(raw["nx"], 0.0)


def test_ply_sh_degree_3_and_batch_of_one(tmp_path):
    gaussians = _random_gaussians(5)
    batched = jax.tree_util.tree_map(lambda x: x[None], gaussians)
    path = ply.write_ply(tmp_path / "sh3.ply", batched, sh_degree=3)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert header.count("property float f_rest_") == 45
    np.testing.assert_array_equal(ply.read_ply(path).means, gaussians.means)


def test_ply_errors(tmp_path):
    gaussians = _random_gaussians(4)
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        ply.read_ply(tmp_path / "nope.ply")
    path = ply.write_ply(tmp_path / "ok.ply", gaussians)
    (tmp_path / "cut.ply").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.ply: truncated"):
        ply.read_ply(tmp_path / "cut.ply")
    (tmp_path / "ascii.ply").write_bytes(path.read_bytes().replace(b"binary_little_endian", b"ascii"))
    with pytest.raises(ValueError, match="ascii.ply: PLY format 'ascii'"):
        ply.read_ply(tmp_path / "ascii.ply")
    renamed = path.read_bytes().replace(b"property float opacity", b"property float alpha")
    (tmp_path / "noop.ply").write_bytes(renamed)
    with pytest.raises(ValueError, match=r"missing 3DGS properties \['opacity'\]"):
        ply.read_ply(tmp_path / "noop.ply")
    two = jax.tree_util.tree_map(lambda x: np.stack([x, x]), gaussians)
    with pytest.raises(ValueError, match="batch of 2"):
        ply.write_ply(tmp_path / "two.ply", two)
    bad = Gaussians(gaussians.means.copy(), gaussians.scales, gaussians.quats,
                    gaussians.opacities, gaussians.colors)
    bad.means[0, 0] = np.nan
    with pytest.raises(ValueError, match="means has non-finite"):
        ply.write_ply(tmp_path / "nan.ply", bad)


# ------------------------------------------------------------------------------------------
# Scripts
# ------------------------------------------------------------------------------------------

def test_every_script_has_help():
    expected = {"sample": ("--seeds", "--psi", "--orbit_frames", "--expression", "--jaw"),
                "animate": ("--flame_sequence", "--frames", "--camera", "--realtime", "--seeds"),
                "export_ply": ("--frame", "--sh_degree", "--flame_sequence"),
                "benchmark": ("--identities", "--frames", "--throughput", "--batch")}
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "experiments" / f"{name}.py"), "--help"],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in expected}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        text = out.decode()
        assert proc.returncode in (0, 1), text
        for flag in ("--workdir", "--config", "--random_init", "--out") + expected[name]:
            assert flag in text, f"{name}.py --help lacks {flag}:\n{text}"
