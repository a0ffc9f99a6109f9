"""reta3d.atomic_files: the new content replaces the old whole, or not at all."""
import numpy as np
import pytest
from PIL import Image

from reta3d import atomic_files


def test_writes_replace_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "a.txt"
    atomic_files.write_text(target, "old")
    atomic_files.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    arrays = {"x": np.arange(6).reshape(2, 3), "y": np.float32([1.5])}
    npz = atomic_files.save_npz(tmp_path / "b.npz", arrays)
    with np.load(npz) as data:
        assert sorted(data.files) == ["x", "y"]
        np.testing.assert_array_equal(data["x"], arrays["x"])
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = atomic_files.save_png(tmp_path / "c.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.npz", "c.png"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.npz"
    atomic_files.save_npz(target, {"x": np.ones(3)})
    class Broken:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("interrupted while writing")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_files.save_npz(target, {"x": np.zeros(3), "y": Broken()})
    with np.load(target) as data:
        np.testing.assert_array_equal(data["x"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]


def test_write_via_keeps_the_suffix_and_the_old_file_on_a_partial_write(tmp_path):
    target = atomic_files.write_text(tmp_path / "clip.mp4", "old")
    names = []

    def partial(tmp):
        names.append(tmp)
        tmp.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_files.write_via(target, partial)
    assert names[0].parent == tmp_path and names[0].suffix == ".mp4" and names[0] != target
    assert names[0].name.startswith(".")      # hidden while being written
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
