"""The embedded synthetic dataset: a valid folder of distinct, deterministic head images."""
import numpy as np
from PIL import Image

from reta3d import synthetic
from reta3d.data import folder


def _render(path, seed):
    return synthetic.make_synthetic_dataset(path, 4, 32, seed=seed, uv_resolution=32,
                                            mouth_resolution=16, batch=4)


def test_synthetic_dataset_is_a_valid_folder_of_heads(tmp_path):
    path = _render(tmp_path / "a", seed=3)
    summary = folder.validate_folder(path)
    assert summary.num_images == 4
    contents = folder.read_folder(path)
    images = np.stack([np.asarray(Image.open(path / name)) for name in contents.filenames])
    assert images.shape == (4, 32, 32, 3)
    # A head in the middle on a white background: the centre is covered, the corners are not.
    centre = images[:, 12:20, 12:20].astype(float)
    corner = images[:, :3, :3].astype(float)
    assert np.all(corner.min(axis=(1, 2, 3)) >= 250)
    assert np.all(centre.mean(axis=(1, 2, 3)) < 230)
    # Different identities/conditions, and labels that match what was rendered.
    assert np.abs(images[0].astype(float) - images[1]).mean() > 3
    assert contents.cameras.shape == (4, 25)
    assert np.allclose(contents.cameras[:, 16:], [4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], atol=1e-4)
    assert np.any(contents.flame["jaw_pose"][:, 0] > 0)
    assert contents.flame["shape"].shape == (4, folder.NUM_SHAPE)


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = _render(tmp_path / "a", seed=5)
    b = _render(tmp_path / "b", seed=5)
    for name in sorted(p.name for p in (a / "images").iterdir()):
        assert np.array_equal(np.asarray(Image.open(a / "images" / name)),
                              np.asarray(Image.open(b / "images" / name)))
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()


def test_rebuild_reason_follows_the_recipe(tmp_path):
    from reta3d.data import folder as folder_lib
    wanted = synthetic.recipe(8, 32, seed=0, uv_resolution=32)
    assert synthetic.rebuild_reason(tmp_path, wanted) == "missing"
    (tmp_path / folder_lib.LABELS_FILE).write_text("{}")
    assert "older version" in synthetic.rebuild_reason(tmp_path, wanted)
    synthetic._write_recipe(tmp_path, dict(wanted, version=1))
    assert synthetic.rebuild_reason(tmp_path, wanted) == \
        f"recipe version 1 -> {synthetic.RECIPE_VERSION}"
    synthetic._write_recipe(tmp_path, dict(wanted, resolution=64))
    assert synthetic.rebuild_reason(tmp_path, wanted) == "settings changed: resolution"
    synthetic._write_recipe(tmp_path, wanted)
    assert synthetic.rebuild_reason(tmp_path, wanted) is None


def test_render_heads_reproduces_the_dataset_images(tmp_path):
    """render_heads draws the dataset's heads anywhere: the same identities, FLAME parameters
    and cameras as the dataset's own draws give the dataset's images (PNG round trip: ±1)."""
    from reta3d import binding as binding_lib
    from reta3d import flame as flame_lib
    path = _render(tmp_path / "a", seed=3)
    contents = folder.read_folder(path)
    stored = np.stack([np.asarray(Image.open(path / name)) for name in contents.filenames])
    model = flame_lib.load()
    hb = binding_lib.HeadBinding.from_model(model, 32, 16)
    rng = np.random.default_rng(3)   # the dataset's draws, in its order
    colours = synthetic.random_textures(rng, synthetic.texel_geometry(model, hb), model, 4)
    flame = synthetic.random_flame(rng, model, 4)
    cameras = synthetic.random_cameras(rng, 4)
    images = synthetic.render_heads(colours, flame, cameras, 32, uv_resolution=32,
                                    mouth_resolution=16, flame_model=model)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - stored).max() <= 1
    # Another identity under the same conditions is another image.
    other = synthetic.render_heads(colours[::-1].copy(), flame, cameras, 32, uv_resolution=32,
                                   mouth_resolution=16, flame_model=model)
    assert np.abs(other.astype(float) - images).mean() > 3
