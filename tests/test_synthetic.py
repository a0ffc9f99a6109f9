"""The embedded synthetic dataset: a valid folder of distinct, deterministic head images."""
import json

import numpy as np
import pytest
from PIL import Image

from reta3d import errors, synthetic
from reta3d.data import folder


def _render(path, seed):
    return synthetic.make_synthetic_dataset(path, 4, 32, seed=seed, uv_resolution=32,
                                            mouth_resolution=16, batch=4)


def test_synthetic_dataset_is_a_valid_folder_of_heads(tmp_path):
    path = _render(tmp_path / "a", seed=3)
    summary = folder.validate_folder(path)
    assert summary.num_images == 4
    contents = folder.read_folder(path)
    images = np.stack([folder.load_image(path / name) for name in contents.filenames])
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


def _write_recipe(path, value):
    (path / synthetic.RECIPE_FILE).write_text(json.dumps(value))


def test_rebuild_reason_follows_the_recipe(tmp_path):
    from reta3d.data import folder as folder_lib
    wanted = synthetic.recipe(8, 32, seed=0, uv_resolution=32)
    assert synthetic.rebuild_reason(tmp_path, wanted) == "missing"
    _write_recipe(tmp_path, dict(wanted, version=1))
    (tmp_path / folder_lib.LABELS_FILE).write_text("{}")
    assert synthetic.rebuild_reason(tmp_path, wanted) == \
        f"recipe version 1 -> {synthetic.RECIPE_VERSION}"
    _write_recipe(tmp_path, dict(wanted, resolution=64))
    assert synthetic.rebuild_reason(tmp_path, wanted) == "settings changed: resolution"
    _write_recipe(tmp_path, dict(wanted, head_model="generic_model"))
    assert synthetic.rebuild_reason(tmp_path, wanted) == "settings changed: head_model"
    _write_recipe(tmp_path, wanted)
    assert synthetic.rebuild_reason(tmp_path, wanted) is None
    (tmp_path / synthetic.RECIPE_FILE).write_text("{")
    assert synthetic.rebuild_reason(tmp_path, wanted) == f"unreadable {synthetic.RECIPE_FILE}"


def test_building_never_replaces_a_folder_it_did_not_write(tmp_path):
    """A user's dataset or photo folder under the synthetic data's path is an error naming it,
    and stays whole; an earlier synthetic dataset (its recipe written with the images) is
    replaced."""
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "00000.png").write_bytes(b"my photo")
    (mine / "dataset.json").write_text("{}")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    wanted = synthetic.recipe(4, 32, seed=0, uv_resolution=32, mouth_resolution=16)
    for attempt in (lambda: synthetic.rebuild_reason(mine, wanted), lambda: _render(mine, 0)):
        with pytest.raises(errors.InputError, match=f"{mine} holds files that "
                           "make_synthetic_dataset did not write .no synthetic.json"):
            attempt()
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    assert (mine / "images" / "00000.png").read_bytes() == b"my photo"
    built = _render(tmp_path / "synthetic", seed=1)
    assert json.loads((built / synthetic.RECIPE_FILE).read_text()) == dict(wanted, seed=1)
    assert synthetic.rebuild_reason(built, dict(wanted, seed=1)) is None
    first = (built / "dataset.json").read_text()
    _render(built, seed=2)   # its own earlier output: replaced
    assert (built / "dataset.json").read_text() != first
    assert synthetic.rebuild_reason(built, dict(wanted, seed=2)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthetic.rebuild_reason(empty, wanted) == "missing"


def test_render_heads_reproduces_the_dataset_images(tmp_path):
    """render_heads draws the dataset's heads anywhere: the same identities, FLAME parameters
    and cameras as the dataset's own draws give the dataset's images (PNG round trip: ±1).
    The images are RGBA with straight alpha: composited over white they are the white render,
    and their alpha is the heads' rendered alpha (`reference_alpha`)."""
    from reta3d import binding as binding_lib
    from reta3d import flame as flame_lib
    path = _render(tmp_path / "a", seed=3)
    contents = folder.read_folder(path)
    read = [folder.load_image_and_alpha(path / name) for name in contents.filenames]
    stored = np.stack([rgb for rgb, _ in read])
    stored_alpha = np.stack([alpha for _, alpha in read])
    assert all(Image.open(path / name).mode == "RGBA" for name in contents.filenames)
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
    alpha = synthetic.reference_alpha(flame, cameras, 32, uv_resolution=32, mouth_resolution=16,
                                      flame_model=model)
    assert np.abs(alpha * 255 - stored_alpha).max() <= 0.51
    assert (stored_alpha == 0).mean() > 0.2 and (stored_alpha == 255).mean() > 0.2
    # Another identity under the same conditions is another image.
    other = synthetic.render_heads(colours[::-1].copy(), flame, cameras, 32, uv_resolution=32,
                                   mouth_resolution=16, flame_model=model)
    assert np.abs(other.astype(float) - images).mean() > 3
