"""The browser viewer (reta3d/viewer.py, experiments/viewer.py).

Unit tests: the camera conversion (viser's camera → EG3D label), the FLAME parameters of the
controls, the .npz export, the aspect padding, the render loop's coalescing.

Browser test: the viewer serves the demo model on 127.0.0.1 (a free port) in this process, and
Debian's Chromium (headless, driven by playwright's Python API with `executable_path`; never a
downloaded browser) opens the page. The test checks that the browser's initial camera arrives
as the frontal EG3D camera, moves the jaw slider and then the seed through the page's DOM
(keyboard on the slider thumb, typing in the seed box), reads the rendered image back from the
page (the control panel's <img>, a lossless PNG) and checks that it is exactly what the
Renderer draws for that state, that opening the jaw changes the mouth region far more than
the forehead (regions from the template head's 68 landmarks projected with the camera), that a
new seed changes the whole head, that an orbit drag re-renders from the new camera, that the
FLAME .npz download holds the slider values, that no error reached the browser console, and
that stopping the viewer leaves no thread or open port behind.

The demo generator's weights are drawn with numpy from `generator.init`'s distribution
(`init_like`: kernels, constants and noise inputs standard normal — the mapping network's
kernels ×100, its learning-rate multiplier is 0.01 — biases 0, modulation biases 1, noise
strengths 0, G_d's output convolutions 0): the jitted Flax init costs 20-50 s of XLA
compilation on a 2-core CPU, the numpy draw none. The browser test's Renderer puts each
identity's Gaussians on the FLAME surface (`SurfaceRenderer`: offsets 0, scales about a texel,
opaque; colours from the generator), so that a jaw opening changes the mouth and nothing
above the brows; random weights alone scatter big Gaussians over the whole image.

Without a browser: the sequence player (play, pause, a file loaded by path, a missing file)
through viser's server-side GUI handles; G_d on/off, the .ply export and `benchmark` on the
Renderer; the script's --help.

Chromium: `shutil.which("chromium")`; when it is missing and this runs as root with apt-get,
the session fixture runs `apt-get update` and `apt-get install -y --no-install-recommends
chromium` once; otherwise, or when that fails, the browser test is skipped with the reason.
"""
import os
import shutil
import socket
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from rasterizer.types import look_at_eg3d_label
from reta3d import sequences, template_head, train, viewer
from reta3d.binding import GAMMA_S
from reta3d.networks import stylegan2
from reta3d.networks.generator import StaticMaps
from reta3d.viewer import ViewerState

# One worker runs the whole module: the demo renderer and Chromium (module and session
# fixtures) start once, not on each worker.
pytestmark = pytest.mark.xdist_group("viewer")


JAW_MAX = 0.6   # the jaw slider's maximum (the End key moves it there)
MAPPING_LR_MULTIPLIER = stylegan2.MappingNetwork.lr_multiplier   # its kernels: std 1 / 0.01


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def init_like(generator, seed=0):
    """Variables with the structure and distribution of `generator.init` (see the module
    docstring), drawn with numpy."""
    abstract = jax.eval_shape(generator.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "['bias']" in name:
            value = 1.0 if "['affine']" in name else 0.0
            return np.full(leaf.shape, value, leaf.dtype)
        if "noise_strength" in name or "w_avg" in name or (
                "['dynamic']" in name and "['conv_out']" in name):
            return np.zeros(leaf.shape, leaf.dtype)
        scale = 1.0 / MAPPING_LR_MULTIPLIER if "['mapping']['fc" in name else 1.0
        return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def project(points, label, resolution):
    """World points (P, 3) → pixel coordinates (P, 2) (column, row) for an EG3D label."""
    cam2world = np.asarray(label[:16], np.float64).reshape(4, 4)
    k = np.asarray(label[16:], np.float64).reshape(3, 3) * resolution
    k[2, 2] = 1.0
    world_to_camera = np.linalg.inv(cam2world)
    cam = (world_to_camera[:3, :3] @ np.asarray(points, np.float64).T).T + world_to_camera[:3, 3]
    uv = (k @ cam.T).T
    return uv[:, :2] / uv[:, 2:3]


def face_regions(model, flame_states, label, resolution):
    """(mouth box, forehead box) as (row0, row1, col0, col1) pixel slices: the mouth box
    covers the mouth landmarks (48-67) of every FLAME state given (margin 2 px); the forehead
    box lies above the brows (17-26), as tall as the brow-to-nose-tip distance, 2 px clear
    of the brows."""
    from reta3d.binding import pose_head
    from reta3d.fitting.embedding import landmarks_3d, template_embedding
    points = []
    for flame in flame_states:
        posed = pose_head(model, {k: jnp.asarray(v) for k, v in flame.items()}, 1)
        points.append(np.asarray(landmarks_3d(posed.vertices_world, model.faces,
                                              template_embedding()))[0])
    pixels = [project(p, label, resolution) for p in points]
    mouth = np.concatenate([p[48:68] for p in pixels])
    brows, nose_tip = pixels[0][17:27], pixels[0][30]

    def clip(v):
        return int(np.clip(v, 0, resolution))

    mouth_box = (clip(np.floor(mouth[:, 1].min()) - 2), clip(np.ceil(mouth[:, 1].max()) + 2),
                 clip(np.floor(mouth[:, 0].min()) - 2), clip(np.ceil(mouth[:, 0].max()) + 2))
    brow_top = brows[:, 1].min()
    height = nose_tip[1] - brow_top
    forehead_box = (clip(np.floor(brow_top - 2 - height)), clip(np.floor(brow_top - 2)),
                    clip(np.floor(brows[:, 0].min())), clip(np.ceil(brows[:, 0].max())))
    return mouth_box, forehead_box


def region_change(a, b, box):
    """Mean absolute difference of two uint8 images over a box (0..255)."""
    r0, r1, c0, c1 = box
    assert r1 > r0 and c1 > c0, box
    return float(np.abs(a[r0:r1, c0:c1].astype(np.float64)
                        - b[r0:r1, c0:c1].astype(np.float64)).mean())


class SurfaceRenderer(viewer.Renderer):
    """The viewer's Renderer with each identity's Gaussians put ON the FLAME surface: the
    static maps' offsets 0, isotropic scales of about a texel, opaque (colours kept, as in
    tests/test_inference.py). Random weights scatter big Gaussians over the whole image
    (noise-like heads, where a jaw opening changes pixels everywhere); on the surface a jaw
    opening moves only the jaw's Gaussians, so the page can be checked region by region."""

    def static_maps(self, seed, psi):
        static, ms = super().static_maps(seed, psi)
        head, model_config = self.generator.head_binding, self.config.model

        def on_surface(maps, resolution, log_gamma_s):
            raw_scale = np.log(GAMMA_S * 256 / resolution) - log_gamma_s
            return maps.at[..., 0:3].set(0.0).at[..., 3:6].set(raw_scale).at[..., 13].set(5.0)

        return StaticMaps(
            face=on_surface(static.face, model_config.uv_resolution, head.face_log_gamma_s),
            mouth=on_surface(static.mouth, model_config.mouth_resolution,
                             head.mouth_log_gamma_s),
            ws=static.ws), ms


@pytest.fixture(scope="module")
def demo_renderer():
    config = demo.get_config()
    generator = train.build_generator(config)
    renderer = SurfaceRenderer(config, generator, init_like(generator))
    renderer.warm_up(use_dynamic=(True,))
    return renderer


# ------------------------------------------------------------------------------------------
# The camera
# ------------------------------------------------------------------------------------------

def test_initial_camera_is_the_frontal_eg3d_camera():
    np.testing.assert_allclose(viewer.frontal_label(), look_at_eg3d_label(0.0, 0.0), atol=1e-6)
    np.testing.assert_allclose(viewer.FRONTAL_FOV, np.deg2rad(13.37), atol=1e-3)
    # The same camera as viser reports it: position and R_world_camera as a quaternion.
    tf = pytest.importorskip("viser.transforms")
    label = look_at_eg3d_label(0.0, 0.0)
    wxyz = tf.SO3.from_matrix(label[:16].reshape(4, 4)[:3, :3].astype(np.float64)).wxyz
    np.testing.assert_allclose(
        viewer.camera_label_from_viser(viewer.FRONTAL_POSITION, wxyz, viewer.FRONTAL_FOV),
        label, atol=1e-6)


@pytest.mark.parametrize("yaw,pitch", [(0.5, 0.0), (-0.4, 0.0), (0.0, 0.3), (0.3, -0.2)])
def test_orbit_matches_eg3d_look_at(yaw, pitch):
    tf = pytest.importorskip("viser.transforms")
    expected = look_at_eg3d_label(yaw, pitch)
    position = expected.reshape(-1)[:16].reshape(4, 4)[:3, 3]
    # EG3D's sampler: on a sphere around the origin, looking at (0, 0, 0.2).
    got = viewer.camera_label_from_viser(position, look_at=viewer.FRONTAL_LOOK_AT,
                                         fov=viewer.FRONTAL_FOV)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    wxyz = tf.SO3.from_matrix(got[:16].reshape(4, 4)[:3, :3].astype(np.float64)).wxyz
    np.testing.assert_allclose(viewer.camera_label_from_viser(position, wxyz, viewer.FRONTAL_FOV),
                               expected, atol=1e-5)
    # viser's orbit: a sphere around its look-at point (0, 0, 0.2). The same view as EG3D's
    # sampler looking at the origin, shifted by the look-at point.
    target = np.asarray(viewer.FRONTAL_LOOK_AT)
    around_origin = look_at_eg3d_label(yaw, pitch, radius=2.5, target=(0.0, 0.0, 0.0))
    orbit = viewer.camera_label_from_viser(
        around_origin[:16].reshape(4, 4)[:3, 3] + target, look_at=target, fov=viewer.FRONTAL_FOV)
    shifted = around_origin.copy().reshape(-1)
    shifted[[3, 7, 11]] += target
    np.testing.assert_allclose(orbit, shifted, atol=1e-6)


def test_fov_sets_the_normalised_focal_length():
    label = viewer.camera_label_from_viser((0, 0, 3), look_at=(0, 0, 0), fov=np.pi / 2)
    np.testing.assert_allclose(label[16:], [0.5, 0, 0.5, 0, 0.5, 0.5, 0, 0, 1], atol=1e-7)
    with pytest.raises(ValueError, match="exactly one"):
        viewer.camera_label_from_viser((0, 0, 3), fov=0.5)
    with pytest.raises(ValueError, match="field of view"):
        viewer.camera_label_from_viser((0, 0, 3), look_at=(0, 0, 0), fov=0.0)


def test_fit_to_aspect_pads_and_crops_at_the_centre():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    wide = viewer.fit_to_aspect(image, 2.0, 255)
    assert wide.shape == (4, 8, 3)
    np.testing.assert_array_equal(wide[:, 2:6], image)
    assert (wide[:, :2] == 255).all() and (wide[:, 6:] == 255).all()
    tall = viewer.fit_to_aspect(image, 0.5, 255)
    np.testing.assert_array_equal(tall, image[:, 1:3])
    assert viewer.fit_to_aspect(image, 1.0, 0) is image


# ------------------------------------------------------------------------------------------
# FLAME parameters of the controls
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    from reta3d import flame
    return flame.load()


def test_flame_from_state_jaw_and_named_expression(model):
    components = viewer.expression_components(model)
    assert [name for name, _ in components] == list(template_head.EXPRESSION_NAMES)
    index = sequences.template_expression_index(model)
    names = [name for name, _ in components]
    values = [0.0] * len(components)
    values[names.index("brow_raise")] = 1.5
    values[names.index("blink")] = -0.5
    flame = viewer.flame_from_state(ViewerState(jaw=0.3, expression=tuple(values)), model)
    assert {k: v.shape for k, v in flame.items()} == {
        "expression": (1, model.num_expression), "shape": (1, model.num_shape),
        "jaw_pose": (1, 3), "neck_pose": (1, 3), "global_pose": (1, 3), "eye_pose": (1, 6)}
    np.testing.assert_allclose(flame["jaw_pose"], [[0.3, 0.0, 0.0]], atol=1e-7)
    expected = np.zeros((1, model.num_expression), np.float32)
    expected[0, index["brow_raise"]], expected[0, index["blink"]] = 1.5, -0.5
    np.testing.assert_array_equal(flame["expression"], expected)
    for key in ("neck_pose", "global_pose", "eye_pose", "shape"):
        assert not flame[key].any(), key


def test_flame_from_state_rotations_and_gaze(model):
    flame = viewer.flame_from_state(
        ViewerState(neck=(0.2, 0.0, 0.0), rotation=(0.0, 0.1, 0.0), gaze=(0.15, -0.05)), model)
    np.testing.assert_allclose(flame["neck_pose"], [[0.0, 0.2, 0.0]], atol=1e-6)   # yaw: +y
    np.testing.assert_allclose(flame["global_pose"], [[0.1, 0.0, 0.0]], atol=1e-6)  # pitch: +x
    from scipy.spatial.transform import Rotation
    gaze = Rotation.from_euler("YX", [0.15, -0.05]).as_rotvec()
    np.testing.assert_allclose(flame["eye_pose"], [np.concatenate([gaze, gaze])], atol=1e-6)
    roll = viewer.flame_from_state(ViewerState(rotation=(0.0, 0.0, 0.25)), model)
    np.testing.assert_allclose(roll["global_pose"], [[0.0, 0.0, 0.25]], atol=1e-6)


def test_flame_from_state_with_a_sequence(model):
    sequence, _ = sequences.get_sequence("builtin:talk", model, 30)
    frame = viewer.flame_from_state(ViewerState(sequence="builtin:talk", frame=12), model,
                                    sequence)
    for key, value in sequence.items():
        np.testing.assert_allclose(frame[key][0], value[12], atol=1e-6, err_msg=key)
    # A tracked sequence's head shape is not put on the identity: it drives the motion only.
    tracked = dict(sequence, shape=np.ones_like(sequence["shape"]))
    moved = viewer.flame_from_state(ViewerState(frame=12), model, tracked)
    assert not moved["shape"].any()
    np.testing.assert_allclose(moved["expression"][0], sequence["expression"][12], atol=1e-6)
    clamped = viewer.flame_from_state(ViewerState(frame=99), model, sequence)
    np.testing.assert_allclose(clamped["jaw_pose"][0], sequence["jaw_pose"][-1], atol=1e-6)
    values = (0.0,) * 9 + (0.7,)      # 'lips_part' is the 10th named component
    added = viewer.flame_from_state(ViewerState(frame=12, jaw=0.1, expression=values), model,
                                    sequence)
    lips = sequences.template_expression_index(model)["lips_part"]
    assert added["expression"][0, lips] == pytest.approx(sequence["expression"][12, lips] + 0.7)
    # Rotations about the same axis compose by adding their angles.
    assert added["jaw_pose"][0, 0] == pytest.approx(sequence["jaw_pose"][12, 0] + 0.1, abs=1e-6)


def test_flame_npz_is_a_one_frame_sequence(model, tmp_path):
    flame = viewer.flame_from_state(ViewerState(jaw=0.25, expression=(1.0, 2.0)), model)
    path = tmp_path / "pose.npz"
    path.write_bytes(viewer.flame_npz_bytes(flame))
    loaded, fps = sequences.load_flame_sequence(path, model.num_expression, model.num_shape)
    assert fps is None
    for key in flame:
        np.testing.assert_array_equal(loaded[key], flame[key], err_msg=key)


def test_real_flame_gets_its_first_ten_components():
    class Flame:
        name, num_expression, num_shape = "flame", 50, 100
    components = viewer.expression_components(Flame())
    assert [i for _, i in components] == list(range(10))


# ------------------------------------------------------------------------------------------
# The render loop
# ------------------------------------------------------------------------------------------

def test_render_loop_renders_the_latest_state_and_drops_stale_ones():
    rendered, shown = [], []
    gate = threading.Event()

    def render(state):
        gate.wait(5.0)
        rendered.append(state)
        return state * 10

    loop = viewer.RenderLoop(render, lambda s, r: shown.append((s, r)),
                             name="test-render-loop").start()
    loop.request(0)                      # rendered while the burst arrives
    time.sleep(0.05)
    for i in range(1, 21):
        loop.request(i)
    gate.set()
    assert loop.wait_idle(5.0)
    assert rendered == [0, 20] and shown == [(0, 0), (20, 200)]
    assert loop.dropped == 19
    loop.request(20)                     # unchanged: not rendered again
    assert loop.wait_idle(5.0) and loop.rendered == 2
    errors = []
    loop._render = lambda s: 1 / 0
    loop._on_error = lambda s, e: errors.append(type(e))
    loop.request(21)
    assert loop.wait_idle(5.0) and errors == [ZeroDivisionError]
    loop.stop()
    assert not any(t.name == "test-render-loop" for t in threading.enumerate())


# ------------------------------------------------------------------------------------------
# The page in a real browser
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium: its path, installed once with apt-get when missing (as root)."""
    pytest.importorskip("viser")
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:   # a fresh machine has no package lists yet: update them first
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=150,
                           env=env)
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                           check=True, capture_output=True, timeout=300, env=env)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"chromium is not installed and apt-get could not install it: {e}")
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the "
                    "browser test drives the system Chromium, never a downloaded one")
    import importlib.util
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright (Python package) is not installed: pip install -r "
                    "requirements-viewer.txt")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _page_image(page):
    """The control panel's image as the page has decoded it (drawn onto a canvas and read
    back; the panel sends a lossless PNG) → uint8 (H, W, 3), or None while none is loaded."""
    data = page.evaluate("""() => {
        const img = document.querySelector('img[src^="blob:"]');
        if (!img || !img.complete || !img.naturalWidth) return null;
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let s = '';
        for (let i = 0; i < rgba.length; i++) s += String.fromCharCode(rgba[i]);
        return [canvas.height, canvas.width, btoa(s)];
    }""")
    if data is None:
        return None
    import base64
    height, width, pixels = data
    rgba = np.frombuffer(base64.b64decode(pixels), np.uint8).reshape(height, width, 4)
    return rgba[..., :3]


def _page_shows(page, image):
    shown = _page_image(page)
    return shown is not None and shown.shape == image.shape and np.array_equal(shown, image)


def _input_id(page, label):
    return page.locator("label", has_text=label).first.get_attribute("for")


def test_browser_jaw_and_seed(chromium, demo_renderer, tmp_path):
    from playwright.sync_api import sync_playwright
    renderer = demo_renderer
    threads_before = {t.ident for t in threading.enumerate()}
    port = _free_port()
    app = viewer.Viewer(renderer, port=port).start()
    console = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800},
                                        accept_downloads=True)
                page.on("console", lambda m: console.append((m.type, m.text)))
                page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
                page.goto(app.url)

                # The browser's camera starts at the frontal EG3D camera (viser's client first
                # reports its default view, then applies the server's initial camera).
                frontal = look_at_eg3d_label(0, 0)

                def shown_from_front():
                    last = app.last_frame
                    return last if last and last[0].camera is not None and np.allclose(
                        last[0].camera, frontal, atol=2e-3) and \
                        _page_shows(page, last[1].image) else None
                state0, frame0 = _wait(shown_from_front, 60, lambda: "a render from the frontal "
                                       f"camera; the browser's camera: {app.state.camera}")
                assert state0.aspect > 1.0
                label = np.asarray(state0.camera)

                # Jaw: the End key moves the slider to its maximum.
                page.locator(f'[id="{_input_id(page, "Jaw opening")}"] [role="slider"]') \
                    .press("End")
                state1, frame1 = _wait(lambda: (app.last_frame if app.last_frame[0].jaw == JAW_MAX
                                                and _page_shows(page, app.last_frame[1].image)
                                                else None), 30, "the jaw render on the page")
                assert state1 == state0.replace(jaw=JAW_MAX)
                np.testing.assert_array_equal(frame1.image, renderer.render(state1).image)
                mouth, forehead = face_regions(
                    renderer.model, [renderer.flame(state0), renderer.flame(state1)], label,
                    renderer.resolution)
                mouth_change = region_change(frame0.image, frame1.image, mouth)
                forehead_change = region_change(frame0.image, frame1.image, forehead)
                assert mouth_change > 2.0, (mouth_change, mouth)
                assert mouth_change > 10 * forehead_change + 0.5, (mouth_change, forehead_change)

                # Seed: type a new one.
                seed_box = page.locator(f'[id="{_input_id(page, "Seed")}"]')
                seed_box.fill("7")
                seed_box.press("Enter")
                state2, frame2 = _wait(lambda: (app.last_frame if app.last_frame[0].seed == 7
                                                and _page_shows(page, app.last_frame[1].image)
                                                else None), 30, "the new seed on the page")
                assert state2 == state1.replace(seed=7)
                np.testing.assert_array_equal(frame2.image, renderer.render(state2).image)
                assert region_change(frame1.image, frame2.image, forehead) > 10.0
                assert region_change(frame1.image, frame2.image, mouth) > 10.0
                assert region_change(frame1.image, frame2.image, (0, 64, 0, 64)) > 10.0

                # Orbit: a drag on the canvas turns the camera around its look-at point.
                page.mouse.move(400, 400)
                page.mouse.down()
                page.mouse.move(480, 400, steps=8)
                page.mouse.up()
                state3, frame3 = _wait(
                    lambda: (app.last_frame if app.last_frame[0].camera != state2.camera
                             and _page_shows(page, app.last_frame[1].image) else None),
                    30, "a render from the orbited camera")
                position = np.asarray(state3.camera[:16]).reshape(4, 4)[:3, 3]
                assert np.linalg.norm(position - viewer.FRONTAL_LOOK_AT) == pytest.approx(2.5,
                                                                                         abs=1e-3)
                assert abs(position[0]) > 0.1
                assert region_change(frame2.image, frame3.image, (0, 64, 0, 64)) > 5.0

                # Download: the FLAME parameters of the current state.
                with page.expect_download(timeout=30_000) as download:
                    page.get_by_text("Save FLAME parameters (.npz)").click()
                path = tmp_path / "flame.npz"
                download.value.save_as(path)
                loaded, _ = sequences.load_flame_sequence(path, renderer.model.num_expression)
                np.testing.assert_allclose(loaded["jaw_pose"], [[JAW_MAX, 0, 0]], atol=1e-6)
            finally:
                browser.close()
    finally:
        app.stop()
    errors = [entry for entry in console if entry[0] in ("error", "pageerror")]
    assert not errors, errors
    assert not app.errors, app.errors

    def leaked():
        return [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    deadline = time.monotonic() + 10.0
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leaked(), leaked()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the viewer's port is still open"


# ------------------------------------------------------------------------------------------
# The renderer's other paths, and the script
# ------------------------------------------------------------------------------------------

def test_renderer_gd_toggle_ply_and_benchmark(demo_renderer, model):
    renderer = demo_renderer
    state = ViewerState(seed=3, jaw=0.2)
    on, off = renderer.render(state), renderer.render(state.replace(use_dynamic=False))
    assert off.frame_ms > 0 and on.image.shape == (64, 64, 3)
    # G_d's output convolutions start at 0 (ΔF = 0): both functions draw the same picture.
    np.testing.assert_array_equal(on.image, off.image)
    assert renderer.frame_fns[True] is not renderer.frame_fns[False]

    from reta3d import ply
    gaussians = renderer.gaussians(state)
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".ply") as f:
        f.write(viewer.ply_bytes(gaussians))
        f.flush()
        loaded = ply.read_ply(f.name)
    assert loaded.means.shape == (renderer.num_gaussians, 3)
    np.testing.assert_allclose(loaded.means, gaussians.means, atol=1e-6)

    result = viewer.benchmark(renderer, num_frames=3)
    assert result["frames"] == 3 and result["fps"] > 0 and result["resolution"] == 64


def test_script_help_lists_its_flags():
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "experiments" / "viewer.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr          # absl's --help exits with 1
    import re
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", out.stdout, flags=re.M))
    expected = {"workdir", "config", "random_init", "init_seed", "psi", "resolution", "backend",
                "capacity", "host", "port", "seed", "flame_sequence", "warmup",
                "benchmark_frames"}
    assert expected <= listed, (expected - listed, out.stdout)


def test_sequence_player_and_file_loading(demo_renderer, tmp_path):
    """The player and the file field, driven through viser's server-side GUI handles (what
    the page's widgets set), without a browser."""
    pytest.importorskip("viser")
    app = viewer.Viewer(demo_renderer, port=_free_port()).start()
    try:
        c = app.controls
        c["sequence"].value = "builtin:nod"
        assert app.state.sequence == "builtin:nod" and app.state.frame == 0
        assert c["frame"].max == sequences.DEFAULT_BUILTIN_FRAMES - 1 and not c["frame"].disabled
        c["play"].value = True                                    # a click: play
        assert c["play"].label == "Pause"
        _wait(lambda: app.state.frame >= 5, 20, "the player to advance")
        c["play"].value = True                                    # pause
        paused = app.state.frame
        time.sleep(0.3)
        assert app.state.frame == paused and c["frame"].value == paused
        assert app.render_loop.wait_idle(60) and app.last_frame[0] == app.state

        path = tmp_path / "tracked.npz"
        np.savez(path, jaw_pose=np.linspace(0, 0.3, 7)[:, None] * [1, 0, 0], fps=10.0)
        c["path"].value = str(path)
        c["load"].value = True
        assert app.state.sequence == str(path) and c["frame"].max == 6
        assert "7 frames at 10 fps" in c["sequence_status"].content
        c["frame"].value = 6
        np.testing.assert_allclose(demo_renderer.flame(app.state)["jaw_pose"], [[0.3, 0, 0]],
                                   atol=1e-6)

        c["path"].value = str(tmp_path / "missing.npz")
        c["load"].value = True
        assert "not found" in c["sequence_status"].content
        assert app.state.sequence == str(path)                   # unchanged
        c["sequence"].value = viewer.NO_SEQUENCE
        assert app.state.sequence is None and c["frame"].disabled
        assert app.render_loop.wait_idle(60) and not app.errors
    finally:
        app.stop()


def test_renderer_shows_an_inverted_identity(tmp_path):
    """--identity: the identity file's static maps and FLAME shape are shown whatever the seed,
    exactly as rendering those maps directly (what animate.py --identity does)."""
    from reta3d import inference, inversion
    config = demo.get_config()
    generator = train.build_generator(config)
    g_vars = init_like(generator, seed=3)
    z = inference.latents_for_seeds([7], config.model.z_dim)
    from reta3d import cameras
    static = inference.generate_static_maps(generator, g_vars, z,
                                            cameras.conditioning_labels(config, 1))
    shape = np.zeros((1, generator.flame_model.num_shape), np.float32)
    shape[0, 0] = 1.5
    flame = {k: np.zeros((1, w), np.float32) for k, w in (
        ("shape", generator.flame_model.num_shape), ("expression", generator.flame_model.num_expression),
        ("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6))}
    flame["shape"] = shape
    path = inversion.write_identity(
        tmp_path / "identity.npz", ws=np.asarray(static.ws), w=np.asarray(static.ws),
        space="w+", static=static, flame=flame, camera=look_at_eg3d_label(0.0, 0.0),
        fingerprint=inversion.generator_fingerprint(g_vars))
    renderer = viewer.Renderer(config, generator, g_vars, identity=str(path))
    a = renderer.render(ViewerState(seed=0)).image
    b = renderer.render(ViewerState(seed=11)).image
    np.testing.assert_array_equal(a, b)
    plain = viewer.Renderer(config, generator, g_vars)
    assert np.abs(a.astype(int) - plain.render(ViewerState(seed=0)).image).mean() > 1.0
    # The same picture as the identity's maps rendered directly with its shape.
    state = ViewerState(seed=0)
    direct = plain.frame_fns[True](
        g_vars, static, {k: jnp.asarray(v) for k, v in
                         inversion.with_identity_shape(plain.flame(state), shape).items()},
        jnp.asarray(0, jnp.int32), jnp.asarray(plain.label(state)[None]))[0]
    np.testing.assert_array_equal(a, np.asarray(direct[0]))
