"""Tests of reta3d.data: folder format, validation, TFDS builder, grain loader, flip."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from rasterizer.types import look_at_eg3d_label
from reta3d.data import flip as flip_lib
from reta3d.data import folder as folder_format
from reta3d.data import loader as loader_lib
from reta3d.data import tfds_builder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES = 6
SIDE = 32


def _sample_arrays(count=NUM_IMAGES, side=SIDE, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    labels = np.stack([look_at_eg3d_label(0.3 * rng.standard_normal(), 0.1 * rng.standard_normal())
                       for _ in range(count)])
    flame = {
        "shape": rng.standard_normal((count, 120)),        # longer than NUM_SHAPE: truncated
        "expression": rng.standard_normal((count, 20)),    # shorter than NUM_EXPRESSION: padded
        "global_pose": 0.1 * rng.standard_normal((count, 3)),
        "jaw_pose": 0.1 * rng.standard_normal((count, 3)),
        "eye_pose": 0.1 * rng.standard_normal((count, 6)),
        # neck_pose left out: zeros.
    }
    return images, labels, flame


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A written folder and the arrays it was made from."""
    images, labels, flame = _sample_arrays()
    path = folder_format.write_folder(tmp_path_factory.mktemp("data") / "faces", images, labels,
                                      flame)
    return path, images, labels, flame


@pytest.fixture(scope="module")
def source(dataset, tmp_path_factory):
    path = dataset[0]
    return tfds_builder.load_data_source(path, SIDE, data_dir=tmp_path_factory.mktemp("tfds"))


# ---------------------------------------------------------------------------------------------
# Folder format


def test_write_folder_writes_the_documented_layout(dataset):
    path, images, labels, flame = dataset
    names = [f"images/{i:05d}.png" for i in range(NUM_IMAGES)]
    assert folder_format.list_images(path) == names
    label_json = json.loads((path / "dataset.json").read_text())
    assert [entry[0] for entry in label_json["labels"]] == names
    np.testing.assert_array_equal(np.array([entry[1] for entry in label_json["labels"]]),
                                  labels.astype(np.float64))
    flame_json = json.loads((path / "flame.json").read_text())
    assert flame_json["flame"][2][0] == names[2]
    assert set(flame_json["flame"][2][1]) == {"shape", "expression", "global_pose", "jaw_pose",
                                              "eye_pose"}
    for i, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(path / name)), images[i])
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_read_folder_pads_and_truncates_flame(dataset):
    path, _, labels, flame = dataset
    contents = folder_format.read_folder(path)
    np.testing.assert_array_equal(contents.cameras, labels.astype(np.float32))
    assert contents.flame["shape"].shape == (NUM_IMAGES, folder_format.NUM_SHAPE)
    np.testing.assert_array_equal(contents.flame["shape"],
                                  flame["shape"][:, :folder_format.NUM_SHAPE].astype(np.float32))
    assert contents.flame["expression"].shape == (NUM_IMAGES, folder_format.NUM_EXPRESSION)
    np.testing.assert_array_equal(contents.flame["expression"][:, :20],
                                  flame["expression"].astype(np.float32))
    assert not contents.flame["expression"][:, 20:].any()
    assert not contents.flame["neck_pose"].any()
    np.testing.assert_array_equal(contents.flame["eye_pose"], flame["eye_pose"].astype(np.float32))
    summary = folder_format.validate_folder(path, resolution=64)
    assert summary.num_images == NUM_IMAGES and summary.image_sizes == {SIDE: NUM_IMAGES}
    assert (summary.max_shape, summary.max_expression) == (120, 20)
    assert summary.num_smaller_than_resolution == NUM_IMAGES


def test_write_folder_refuses_bad_input_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    images, labels, flame = _sample_arrays(count=3)
    target = tmp_path / "faces"
    with pytest.raises(ValueError, match="non-finite"):
        folder_format.write_folder(target, images, np.where(labels == labels[0, 3], np.nan,
                                                            labels), flame)
    with pytest.raises(ValueError, match="eye_pose"):
        folder_format.write_folder(target, images, labels, {"eye_pose": flame["eye_pose"][:, :3]})
    with pytest.raises(ValueError, match="images/"):
        folder_format.write_folder(target, images, labels, flame, names=["a.png", "b.png", "c.png"])

    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original_save(self, *args, **kwargs)

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        folder_format.write_folder(target, images, labels, flame)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy

    folder_format.write_folder(target, images, labels, flame)
    with pytest.raises(FileExistsError):
        folder_format.write_folder(target, images, labels, flame)
    folder_format.write_folder(target, images[:, ::-1], labels, flame, overwrite=True)
    np.testing.assert_array_equal(folder_format.load_image(target / "images/00001.png"),
                                  images[1, ::-1])
    assert [p.name for p in tmp_path.iterdir()] == ["faces"]


# ---------------------------------------------------------------------------------------------
# Validation: every bad case names the file and the problem.


def _rewrite_json(path, file, edit):
    content = json.loads((path / file).read_text())
    edit(content)
    (path / file).write_text(json.dumps(content))


def _set_label(index, value):
    return lambda c: c["labels"][index].__setitem__(1, value)


def _set_flame(index, key, value):
    return lambda c: c["flame"][index][1].__setitem__(key, value)


def _bad_json(file):
    return lambda p: (p / file).write_text('{"labels": [["images/00000.png", [1, 2,')


def _save_image(name, array):
    return lambda p: Image.fromarray(array).save(p / name)


def _not_rigid(c):
    c["labels"][4][1][0] = 3.0


BAD_CASES = {
    "missing dataset.json": (lambda p: (p / "dataset.json").unlink(),
                             "dataset.json", "missing"),
    "missing flame.json": (lambda p: (p / "flame.json").unlink(), "flame.json", "missing"),
    "unparsable dataset.json": (_bad_json("dataset.json"), "dataset.json", "not valid JSON"),
    "unparsable flame.json": (_bad_json("flame.json"), "flame.json", "not valid JSON"),
    "wrong structure": (lambda p: (p / "dataset.json").write_text('{"labels": 3}'),
                        "dataset.json", 'list under "labels"'),
    "missing image": (lambda p: (p / "images/00002.png").unlink(), "images/00002.png",
                      "does not exist"),
    "image without label": (lambda p: shutil.copy(p / "images/00000.png",
                                                  p / "images/00099.png"),
                            "images/00099.png", "has no label"),
    "label count != image count": (lambda p: (p / "images/00002.png").unlink(), "dataset.json",
                                   "has 6 labels but images/ holds 5 images"),
    "duplicate label": (lambda p: _rewrite_json(p, "dataset.json",
                                                lambda c: c["labels"].append(c["labels"][0])),
                        "dataset.json", "images/00000.png is labelled more than once"),
    "label of 24 numbers": (lambda p: _rewrite_json(p, "dataset.json",
                                                    _set_label(1, [0.0] * 24)),
                            "dataset.json", "label of images/00001.png has 24 numbers"),
    "non-finite label": (lambda p: _rewrite_json(p, "dataset.json",
                                                 _set_label(0, [float("nan")] * 25)),
                         "dataset.json", "label of images/00000.png has non-finite values"),
    "label not a camera": (lambda p: _rewrite_json(p, "dataset.json", _not_rigid),
                           "dataset.json", "images/00004.png: the first 16 numbers are not"),
    "FLAME pose of wrong length": (lambda p: _rewrite_json(p, "flame.json",
                                                           _set_flame(1, "jaw_pose", [0.1, 0.2])),
                                   "flame.json", "jaw_pose of images/00001.png has 2 numbers"),
    "too many shape coefficients": (lambda p: _rewrite_json(
        p, "flame.json", _set_flame(3, "shape", [0.0] * 301)),
        "flame.json", "shape of images/00003.png has 301 numbers, FLAME has at most 300"),
    "non-finite FLAME": (lambda p: _rewrite_json(p, "flame.json",
                                                 _set_flame(0, "expression", [1e400])),
                         "flame.json", "expression of images/00000.png has non-finite"),
    "unknown FLAME key": (lambda p: _rewrite_json(p, "flame.json", _set_flame(0, "exp", [0.0])),
                          "flame.json", "unknown key 'exp'"),
    "image without FLAME entry": (lambda p: _rewrite_json(p, "flame.json",
                                                          lambda c: c["flame"].pop(5)),
                                  "images/00005.png", "has no FLAME entry"),
    "corrupt image": (lambda p: (p / "images/00003.png").write_bytes(
        (p / "images/00003.png").read_bytes()[:60]), "images/00003.png", "cannot be decoded"),
    "non-square image": (_save_image("images/00001.png", np.zeros((32, 30, 3), np.uint8)),
                         "images/00001.png", "is not square (30x32)"),
    "grayscale image": (_save_image("images/00001.png", np.zeros((32, 32), np.uint8)),
                        "images/00001.png", "mode L, expected RGB"),
}


def test_a_matted_rgba_image_is_composited_over_white(dataset, tmp_path):
    """RGBA images (a matte in alpha, as rembg or MODNet write) are accepted and composited over
    white, in the folder reader and in the TFDS copy the loader reads."""
    path = tmp_path / "faces"
    shutil.copytree(dataset[0], path, ignore=shutil.ignore_patterns("tfds"))
    rgb = dataset[1][1]
    alpha = np.zeros((SIDE, SIDE), np.uint8)
    alpha[:, SIDE // 2:] = 255                 # left half background, right half foreground
    alpha[0, :] = 128
    Image.fromarray(np.dstack([rgb, alpha])).save(path / "images/00001.png")
    folder_format.validate_folder(path)
    expected = rgb.astype(np.float64)
    expected[:, :SIDE // 2] = 255.0
    expected[0] = rgb[0] * (128 / 255) + 255.0 * (127 / 255)
    image_png, mask_png = tfds_builder._encoded_pngs(path / "images/00001.png", SIDE)
    for image in (folder_format.load_image(path / "images/00001.png"),
                  np.asarray(Image.open(io.BytesIO(image_png)))):
        assert image.shape == (SIDE, SIDE, 3)
        assert np.abs(image - expected).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask_png))), alpha)
    assert folder_format.images_without_alpha(path) == [
        f"images/{i:05d}.png" for i in range(NUM_IMAGES) if i != 1]

    # The matte reaches the loader's batches ("alpha", flipped with its image); images
    # without one are opaque.
    source = tfds_builder.load_data_source(path, SIDE, data_dir=tmp_path / "tfds")
    seen = set()
    for batch in _take(loader_lib.make_loader(source, 2, 1, seed=1), 12):
        for b in range(2):
            i, flipped = int(batch["index"][0, b]), bool(batch["flipped"][0, b])
            got = batch["alpha"][0, b, ..., 0]
            assert batch["alpha"].dtype == np.float32
            want = alpha / 255.0 if i == 1 else np.ones((SIDE, SIDE))
            np.testing.assert_allclose(got, want[:, ::-1] if flipped else want, atol=1e-6)
            seen.add((i, flipped))
    assert (1, True) in seen and (1, False) in seen

    # For an RGB discriminator the masks stay encoded (bytes) in the source and out of the
    # batches; the stream (records, flips, images) is the same, and so is its saved state.
    rgb_only = tfds_builder.load_data_source(path, SIDE, data_dir=tmp_path / "tfds", masks=False)
    assert isinstance(rgb_only[1]["mask"], bytes) and rgb_only[1]["mask"] == mask_png
    with_alpha = loader_lib.make_loader(source, 2, 1, seed=1)
    without = loader_lib.make_loader(rgb_only, 2, 1, seed=1, alpha=False)
    for a, b in zip(_take(with_alpha, 6), _take(without, 6)):
        assert set(a) - set(b) == {"alpha"} and "alpha" not in b
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])
    assert with_alpha.get_state() == without.get_state()
    # An undecoded mask is not a mask: the loader that wants one says so.
    with pytest.raises(ValueError, match=r"images/00000.png\): mask must be \(H, W, 1\) uint8"):
        next(loader_lib.make_loader(rgb_only, 2, 1, seed=1, shuffle=False))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validate_folder_names_file_and_problem(case, dataset, tmp_path):
    corrupt, file, phrase = BAD_CASES[case]
    path = tmp_path / "faces"
    shutil.copytree(dataset[0], path, ignore=shutil.ignore_patterns("tfds"))
    corrupt(path)
    with pytest.raises(folder_format.DatasetError) as caught:
        folder_format.validate_folder(path)
    matching = [(f, m) for f, m in caught.value.problems if f.endswith(file) and phrase in m]
    assert matching, f"no problem ({file!r}, {phrase!r}) in:\n{caught.value}"
    assert str(path / file) in str(caught.value) or file in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_validate_folder_counts_and_caps_problems(dataset, tmp_path):
    path = tmp_path / "faces"
    shutil.copytree(dataset[0], path)
    for i in range(NUM_IMAGES):
        (path / f"images/{i:05d}.png").write_bytes(b"not a png")
    _rewrite_json(path, "dataset.json", _set_label(0, [0.0] * 3))
    with pytest.raises(folder_format.DatasetError) as caught:
        folder_format.validate_folder(path)
    assert len(caught.value.problems) == NUM_IMAGES + 1
    assert f"{NUM_IMAGES + 1} problem(s)" in str(caught.value)
    # The builder validates before writing anything.
    with pytest.raises(folder_format.DatasetError, match="cannot be decoded"):
        tfds_builder.prepare_dataset(path, SIDE, data_dir=tmp_path / "tfds")
    assert not list((tmp_path / "tfds").glob("reta3d_faces/*/1.0.0/*.array_record*"))


def test_missing_folder_says_what_is_expected(tmp_path):
    missing = tmp_path / "ffhq"
    for call in (lambda: folder_format.validate_folder(missing),
                 lambda: tfds_builder.load_data_source(missing, 64)):
        with pytest.raises(folder_format.DatasetError) as caught:
            call()
        message = str(caught.value)
        for needed in (str(missing), "does not exist", "dataset.json", "flame.json", "EG3D",
                       "DECA", "README"):
            assert needed in message


def test_the_layout_hint_comes_once_and_points_at_a_preprocess_report(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(folder_format.DatasetError) as caught:
        folder_format.validate_folder(folder)
    message = str(caught.value)
    assert message.count("Expected layout") == 1 and message.endswith(folder_format.HOW_TO_GET)
    assert len(caught.value.problems) == 3       # dataset.json, flame.json, images/
    (folder / "preprocess_report.json").write_text("{}")
    with pytest.raises(folder_format.DatasetError) as caught:
        folder_format.validate_folder(folder)
    assert "Expected layout" not in str(caught.value)
    assert str(caught.value).endswith(
        f"{folder / 'preprocess_report.json'} is here: experiments/preprocess.py ran on this "
        "folder but wrote no photo; its 'skipped' entries give each photo's reason.")


def test_images_smaller_than_the_resolution_are_reported(dataset, tmp_path):
    said = []
    tfds_builder.prepare_dataset(dataset[0], 2 * SIDE, data_dir=tmp_path, warn=said.append)
    assert said == [f"Warning: {NUM_IMAGES} of the {NUM_IMAGES} images of {dataset[0]} are "
                    f"smaller than {2 * SIDE} px and will be upsampled (blurred)"]
    tfds_builder.prepare_dataset(dataset[0], SIDE, data_dir=tmp_path / "b", warn=said.append)
    assert len(said) == 1


# ---------------------------------------------------------------------------------------------
# TFDS builder


def test_builder_round_trips_images_and_labels(dataset, source):
    path, images, labels, _ = dataset
    contents = folder_format.read_folder(path)
    assert len(source) == NUM_IMAGES
    for i in range(NUM_IMAGES):
        record = source[i]
        assert record["filename"] == f"images/{i:05d}.png".encode()
        assert record["image"].dtype == np.uint8
        np.testing.assert_array_equal(record["image"], images[i])
        assert record["camera"].dtype == np.float32
        np.testing.assert_array_equal(record["camera"], labels[i].astype(np.float32))
        for key in folder_format.FLAME_KEYS:
            np.testing.assert_array_equal(record[key], contents.flame[key][i])


def test_builder_resizes_to_the_config_resolution(dataset, tmp_path):
    path, images, _, _ = dataset
    small = tfds_builder.load_data_source(path, 16, data_dir=tmp_path)
    expected = np.asarray(Image.fromarray(images[4]).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(small[4]["image"], expected)


def test_builder_reuses_copy_and_rebuilds_when_folder_changes(tmp_path, capsys):
    images, labels, flame = _sample_arrays(count=3)
    path = folder_format.write_folder(tmp_path / "faces", images, labels, flame)
    first = tfds_builder.prepare_dataset(path)  # default data_dir <folder>/tfds, native size
    printed = capsys.readouterr().out     # what happens, not TFDS's "Downloading ..." line
    assert f"Writing the array_record copy of {path} at {SIDE}px" in printed
    assert "nothing is downloaded" in printed and "Downloading" not in printed
    assert pathlib.Path(first.data_dir).is_relative_to(path / "tfds")
    assert first.builder_config.resolution == SIDE
    record_file = next(pathlib.Path(first.data_dir).glob("*.array_record*"))
    stamp = record_file.stat().st_mtime_ns
    again = tfds_builder.prepare_dataset(path)
    assert again.data_dir == first.data_dir and record_file.stat().st_mtime_ns == stamp

    flame["jaw_pose"] = flame["jaw_pose"] + 1.0
    folder_format.write_folder(path, images, labels, flame, overwrite=True)
    changed = tfds_builder.prepare_dataset(path)
    assert changed.data_dir != first.data_dir
    assert not pathlib.Path(first.data_dir).exists()  # the stale copy is gone
    np.testing.assert_allclose(changed.as_data_source("train")[2]["jaw_pose"],
                               flame["jaw_pose"][2], rtol=1e-6)


def test_reading_does_not_import_tensorflow(dataset, source):
    path = dataset[0]
    data_dir = pathlib.Path(source.dataset_info.data_dir).parents[2]
    # The finder makes every import of TensorFlow fail and records it, even where TensorFlow
    # is installed: this checks that reading never tries, not merely that it is absent here.
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, json, sys
        attempts = []
        class Refuse(importlib.abc.Loader):
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                attempts.append(module.__name__)
                raise ImportError("TensorFlow is refused in this test")
        class RefuseTensorflow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    return importlib.machinery.ModuleSpec(name, Refuse())
                return None
        sys.meta_path.insert(0, RefuseTensorflow())
        from reta3d.data import loader, tfds_builder
        builder = tfds_builder.make_builder({str(path)!r}, {SIDE}, data_dir={str(data_dir)!r})
        assert builder.is_prepared()
        source = builder.as_data_source(split="train")
        record = source[3]
        batch = next(loader.make_loader(source, 2, 1, seed=0))
        loaded = sorted(name for name, module in sys.modules.items() if module is not None
                        and (name == "tensorflow" or name.startswith("tensorflow.")))
        print(json.dumps({{"tf_modules": loaded, "attempts": attempts, "shape": list(batch["image"].shape),
                          "filename": record["filename"].decode()}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tf_modules": [], "attempts": [], "shape": [1, 2, SIDE, SIDE, 3],
                      "filename": "images/00003.png"}


# ---------------------------------------------------------------------------------------------
# Loader


def _memory_source(count, side=8, seed=1):
    """A plain list of records in the data source's format, with recognisable contents."""
    images, labels, flame = _sample_arrays(count, side, seed)
    contents_flame = {key: np.zeros((count, size), np.float32) for key, size in
                      {"shape": 4, "expression": 3, **folder_format.POSE_SIZES}.items()}
    contents_flame["shape"][:, 0] = np.arange(count)
    for key in ("global_pose", "jaw_pose", "eye_pose"):
        contents_flame[key] = flame[key].astype(np.float32)
    return [{"image": images[i], "camera": labels[i], "filename": f"{i}".encode(),
             **{key: values[i] for key, values in contents_flame.items()}}
            for i in range(count)]


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def test_loader_yields_per_device_batches_with_the_right_values(source, dataset):
    _, images, labels, _ = dataset
    contents = folder_format.read_folder(dataset[0])
    loader = loader_lib.make_loader(source, global_batch_size=4, num_devices=2, seed=3)
    flipped_seen = set()
    for batch in _take(loader, 4):
        assert set(batch) == set(loader_lib.BATCH_KEYS)
        assert batch["image"].shape == (2, 2, SIDE, SIDE, 3)
        assert batch["image"].dtype == np.float32
        assert batch["camera"].shape == (2, 2, 25) and batch["shape"].shape == (2, 2, 100)
        assert batch["eye_pose"].shape == (2, 2, 6) and batch["index"].dtype == np.int32
        for d in range(2):
            for b in range(2):
                i, flipped = int(batch["index"][d, b]), bool(batch["flipped"][d, b])
                flipped_seen.add(flipped)
                expected = images[i][:, ::-1] if flipped else images[i]
                np.testing.assert_allclose(batch["image"][d, b], expected / 127.5 - 1.0,
                                           atol=1e-6)
                camera = labels[i].astype(np.float32)
                camera = flip_lib.flip_camera(camera) if flipped else camera
                np.testing.assert_array_equal(batch["camera"][d, b], camera)
                flame = {k: v[i] for k, v in contents.flame.items()}
                flame = flip_lib.flip_flame(flame) if flipped else flame
                for key in folder_format.FLAME_KEYS:
                    np.testing.assert_array_equal(batch[key][d, b], flame[key])
    assert flipped_seen == {False, True}
    assert np.all(batch["image"] >= -1.0) and np.all(batch["image"] <= 1.0)


def test_loader_is_deterministic_for_a_seed():
    records = _memory_source(10)
    make = lambda seed, flip=True: loader_lib.make_loader(records, 4, 2, seed=seed, flip=flip)
    first, second = _take(make(7), 6), _take(make(7), 6)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = _take(make(8), 6)
    assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(first, other))
    # Over many draws the flip is a fair coin, and it never fires when disabled.
    flips = np.concatenate([b["flipped"].ravel() for b in _take(make(7), 50)])
    assert 0.35 < flips.mean() < 0.65
    assert not any(b["flipped"].any() for b in _take(make(7, flip=False), 5))


def test_loader_shards_disjointly_and_covers_each_epoch():
    records = _memory_source(11)
    hosts = []
    for shard_index in range(2):
        loader = loader_lib.make_loader(records, 4, 1, seed=5, shard_index=shard_index,
                                        shard_count=2, num_epochs=2, flip=False)
        assert loader.batches_per_epoch == 2        # 11 // 4 global batches per epoch
        batches = [b["index"][0] for b in loader]   # (2,) per host batch
        assert len(batches) == 4                    # 2 epochs x 2 batches, then it ends
        hosts.append(batches)
    for epoch in range(2):
        seen = [np.concatenate(hosts[h][2 * epoch:2 * epoch + 2]) for h in range(2)]
        assert not set(seen[0]) & set(seen[1])      # the hosts read disjoint records
        assert len(set(seen[0]) | set(seen[1])) == 8  # 8 distinct of 11: 3 left out per epoch
    first = np.concatenate([np.concatenate([hosts[0][t], hosts[1][t]]) for t in range(2)])
    second = np.concatenate([np.concatenate([hosts[0][t], hosts[1][t]]) for t in range(2, 4)])
    assert not np.array_equal(first, second)        # reshuffled every epoch


def test_hosts_read_slices_of_the_single_host_global_batch():
    """S hosts x D devices see, device by device, the batch one host with S*D devices sees
    (records, order and flips), so a multi-host step equals the single-host one."""
    records = _memory_source(13)
    single = _take(loader_lib.make_loader(records, 4, 4, seed=9), 7)
    for shard_count, num_devices in ((2, 2), (4, 1)):
        per_host = [_take(loader_lib.make_loader(records, 4, num_devices, seed=9,
                                                 shard_index=k, shard_count=shard_count), 7)
                    for k in range(shard_count)]
        for step in range(7):
            for key in single[step]:
                joined = np.concatenate([per_host[k][step][key] for k in range(shard_count)])
                np.testing.assert_array_equal(joined, single[step][key], err_msg=f"{key} {step}")
    assert any(b["flipped"].any() for b in single) and not all(b["flipped"].all() for b in single)


def test_loader_resumes_from_saved_state():
    records = _memory_source(9)
    loader = loader_lib.make_loader(records, 4, 2, seed=11)
    _take(loader, 3)
    state = json.loads(json.dumps(loader.get_state()))  # as a checkpoint would store it
    expected = _take(loader, 3)
    resumed = loader_lib.make_loader(records, 4, 2, seed=11)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 3)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="seed"):
        loader_lib.make_loader(records, 4, 2, seed=12).set_state(state)


def test_loader_resizes_and_rejects_bad_arguments():
    records = _memory_source(4, side=8)
    batch = next(loader_lib.make_loader(records, 2, 1, seed=0, resolution=4, flip=False))
    i = int(batch["index"][0, 0])
    expected = np.asarray(Image.fromarray(records[i]["image"]).resize(
        (4, 4), Image.Resampling.LANCZOS)) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of"):
        loader_lib.make_loader(records, 3, 2, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader_lib.make_loader(records, 8, 1, seed=0)
    bad = [dict(r, image=r["image"][..., :2]) for r in records]
    with pytest.raises(ValueError, match="image must be"):
        next(loader_lib.make_loader(bad, 2, 1, seed=0))


# ---------------------------------------------------------------------------------------------
# Flip


def _random_camera(rng):
    label = look_at_eg3d_label(rng.uniform(-0.8, 0.8), rng.uniform(-0.3, 0.3),
                               radius=rng.uniform(2.2, 3.0))
    label[16 + 2] = rng.uniform(0.4, 0.6)   # cx off-centre, to test cx -> 1 - cx
    label[16 + 5] = rng.uniform(0.4, 0.6)
    return label.astype(np.float64)


def _project(label, points, width, height):
    """Pixel coordinates (u, v) of world points, written independently of flip.py."""
    cam2world = label[:16].reshape(4, 4)
    k = label[16:].reshape(3, 3) * np.array([[width, 0, width], [0, height, height], [0, 0, 1]])
    camera = (np.linalg.inv(cam2world) @ np.c_[points, np.ones(len(points))].T)[:3]
    pixels = k @ camera
    return (pixels[:2] / pixels[2]).T


def test_mirrored_camera_sees_the_mirrored_point_at_the_mirrored_pixel():
    rng = np.random.default_rng(0)
    width = height = 64
    for _ in range(5):
        label = _random_camera(rng)
        points = rng.uniform(-0.3, 0.3, (20, 3)) + np.array([0.0, 0.0, 0.2])
        mirrored_label = flip_lib.flip_camera(label)
        mirrored_points = points * np.array([-1.0, 1.0, 1.0])
        uv = _project(label, points, width, height)
        uv_mirrored = _project(mirrored_label, mirrored_points, width, height)
        np.testing.assert_allclose(uv_mirrored[:, 0], width - uv[:, 0], atol=1e-9)
        np.testing.assert_allclose(uv_mirrored[:, 1], uv[:, 1], atol=1e-9)
        # The mirrored label is still a rigid camera (det +1), so validation accepts it.
        rotation = mirrored_label[:16].reshape(4, 4)[:3, :3]
        assert np.isclose(np.linalg.det(rotation), 1.0)

        # Same check on pixels: mark each point's pixel, flip the image, compare.
        image = np.zeros((height, width, 3), np.uint8)
        inside = np.all((uv > 0) & (uv < width), axis=1)
        assert inside.sum() >= 10
        columns, rows = np.floor(uv[inside]).astype(int).T
        image[rows, columns] = 255
        flipped_image, _, _ = flip_lib.flip_sample(image, label, {})
        columns_m, rows_m = np.floor(uv_mirrored[inside]).astype(int).T
        assert np.all(flipped_image[rows_m, columns_m] == 255)


def test_mirrored_flame_pose_is_the_reflected_rotation():
    rng = np.random.default_rng(1)
    reflect = np.diag([-1.0, 1.0, 1.0])
    flame = {"global_pose": rng.normal(size=3), "neck_pose": rng.normal(size=3),
             "jaw_pose": rng.normal(size=3), "eye_pose": rng.normal(size=6),
             "shape": rng.normal(size=10), "expression": rng.normal(size=5)}
    mirrored = flip_lib.flip_flame(flame)
    matrix = lambda r: Rotation.from_rotvec(r).as_matrix()
    for key in ("global_pose", "neck_pose", "jaw_pose"):
        np.testing.assert_allclose(matrix(mirrored[key]), reflect @ matrix(flame[key]) @ reflect,
                                   atol=1e-12)
    # Left and right eyes swap sides, each reflected.
    np.testing.assert_allclose(matrix(mirrored["eye_pose"][:3]),
                               reflect @ matrix(flame["eye_pose"][3:]) @ reflect, atol=1e-12)
    np.testing.assert_allclose(matrix(mirrored["eye_pose"][3:]),
                               reflect @ matrix(flame["eye_pose"][:3]) @ reflect, atol=1e-12)
    np.testing.assert_array_equal(mirrored["shape"], flame["shape"])
    np.testing.assert_array_equal(mirrored["expression"], flame["expression"])


def test_flipping_twice_is_the_identity():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # a batch: leading dims work
    cameras = np.stack([_random_camera(rng) for _ in range(3)]).astype(np.float32)
    flame = {"shape": rng.normal(size=(3, 4)), "jaw_pose": rng.normal(size=(3, 3)),
             "eye_pose": rng.normal(size=(3, 6)), "global_pose": rng.normal(size=(3, 3))}
    once = flip_lib.flip_sample(image, cameras, flame)
    assert not np.array_equal(once[0], image) and not np.allclose(once[1], cameras)
    twice = flip_lib.flip_sample(*once)
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_allclose(twice[1], cameras, atol=1e-6)
    assert twice[1].dtype == np.float32
    for key in flame:
        np.testing.assert_allclose(twice[2][key], flame[key], atol=1e-15)


def test_loader_worker_processes_give_the_same_batches(source):
    """worker_count > 0 (grain mp_prefetch) pickles the TFDS source into a worker process."""
    in_process = _take(loader_lib.make_loader(source, 2, 2, seed=4), 3)
    workers = loader_lib.make_loader(source, 2, 2, seed=4, worker_count=1)
    try:
        from_workers = _take(workers, 2)
        state = workers.get_state()
        from_workers.append(next(workers))
    finally:
        workers.close()
    for a, b in zip(in_process, from_workers):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    resumed = loader_lib.make_loader(source, 2, 2, seed=4, worker_count=1)
    try:
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], in_process[2]["image"])
    finally:
        resumed.close()
