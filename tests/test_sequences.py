"""FLAME sequences (reta3d/sequences.py): the .npz layout and its validation, the builtins."""
import re

import numpy as np
import pytest

from reta3d import cli, errors, flame, sequences, template_head


@pytest.fixture(scope="module")
def model():
    """The embedded template head (what the configs without FLAME files use)."""
    return flame.load()



def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_sequence_file_layout_and_padding(tmp_path, model):
    path = _write_npz(tmp_path / "seq.npz", expression=np.ones((7, 50)), jaw_pose=np.full((7, 3), 0.1),
                      shape=np.ones(3), fps=np.array(25.0))
    sequence, fps = sequences.get_sequence(str(path), model, num_frames=5)
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
    with pytest.raises(errors.InputError, match=message) as info:
        sequences.load_flame_sequence(path, num_expression=16)
    assert "bad.npz" in str(info.value)


def test_missing_corrupt_and_unknown_sequences(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        sequences.get_sequence(str(tmp_path / "missing.npz"), model)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(errors.InputError, match="broken.npz: cannot read"):
        sequences.get_sequence(str(tmp_path / "broken.npz"), model)
    with pytest.raises(ValueError, match="unknown builtin sequence 'builtin:dance'"):
        sequences.get_sequence("builtin:dance", model)


def test_check_spec_says_where_sequences_come_from(tmp_path):
    """animate.py's check before the model loads: unknown builtins, missing files and videos
    (a common mix-up) each name the way out."""
    from reta3d import errors
    sequences.check_spec("builtin:talk")
    with pytest.raises(ValueError, match="'builtin:dance' .choose from builtin:talk"):
        sequences.check_spec("builtin:dance")
    with pytest.raises(errors.MissingInputError, match="comes from experiments/track_video.py"):
        sequences.check_spec(str(tmp_path / "nope.npz"))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video")
    with pytest.raises(ValueError, match=re.escape(
            f"{clip} is not a FLAME sequence (.npz). For a video of a face, track it first "
            "(experiments/track_video.py")):
        sequences.check_spec(str(clip))
    good = tmp_path / "s.npz"
    np.savez(good, expression=np.zeros((2, 3), np.float32))
    sequences.check_spec(str(good))


def test_builtin_sequences_on_the_template_head():
    index = {n: i for i, n in enumerate(template_head.EXPRESSION_NAMES)}
    num = len(index)
    blink = sequences.builtin_sequence("blink", 90, num, index)
    lids = blink["expression"][:, index["blink"]]
    assert lids.max() > 0.99 and lids.min() == 0.0 and (lids > 0.5).mean() < 0.3
    assert np.abs(blink["jaw_pose"]).max() == 0.0
    smile = sequences.builtin_sequence("smile", 60, num, index)
    assert 1.9 < smile["expression"][:, index["smile"]].max() <= 2.0
    assert smile["expression"][0, index["smile"]] == 0.0
    talk = sequences.builtin_sequence("talk", 60, num, index)
    jaw = talk["jaw_pose"][:, 0]
    assert jaw.min() >= 0.0 and jaw.max() > 0.08 and np.sum(np.diff(np.sign(np.diff(jaw))) != 0) > 6
    nod = sequences.builtin_sequence("nod", 60, num, index)
    assert np.abs(nod["neck_pose"][:, 0]).max() > 0.15 and np.abs(nod["neck_pose"][[0, -1], 0]).max() < 1e-6
    for seq in (blink, smile, talk, nod):
        assert {k: v.shape[1] for k, v in seq.items()} == {
            "expression": num, "jaw_pose": 3, "neck_pose": 3, "global_pose": 3, "eye_pose": 6,
            "shape": 1}


def test_builtin_sequences_for_a_real_flame_layout_use_pose(caplog):
    blink = sequences.builtin_sequence("blink", 90, 100, {})
    assert np.abs(blink["expression"]).max() == 0.0
    assert blink["eye_pose"][:, 0].max() > 0.3            # downward glance at blink times
    np.testing.assert_array_equal(blink["eye_pose"][:, 0], blink["eye_pose"][:, 3])
    with caplog.at_level("WARNING"):
        smile = sequences.builtin_sequence("smile", 60, 100, {})
    assert "no named 'smile'" in caplog.text
    assert smile["jaw_pose"][:, 0].max() > 0.04 and np.abs(smile["expression"]).max() == 0.0
    named = sequences.builtin_sequence("smile", 60, 100, cli.parse_expression_components("smile=3"))
    assert named["expression"][:, 3].max() > 1.9
    with pytest.raises(ValueError, match="outside the model"):
        sequences.builtin_sequence("smile", 10, 100, {"smile": 100})


def test_neutral_flame(model):
    params = sequences.neutral_flame(model, expression=[1.5, -2.0], jaw=0.2)
    assert {k: v.shape for k, v in params.items()} == {
        "shape": (1, model.num_shape), "expression": (1, model.num_expression),
        "global_pose": (1, 3), "neck_pose": (1, 3), "jaw_pose": (1, 3), "eye_pose": (1, 6)}
    np.testing.assert_array_equal(params["expression"][0, :3], [1.5, -2.0, 0.0])
    np.testing.assert_array_equal(params["jaw_pose"][0], np.float32([0.2, 0.0, 0.0]))
    with pytest.raises(ValueError, match="expression coefficients given"):
        sequences.neutral_flame(model, expression=np.ones(model.num_expression + 1))


def test_tracking_extras_are_validated_and_read(tmp_path):
    """track_video.py's extras (camera_labels (T, 25), face_found (T,)) ride along in the
    sequence file: animate.py still reads it, `load_tracking` returns them, and a wrong shape
    is an error naming the array."""
    from reta3d import flame as flame_lib
    model = flame_lib.load()
    labels = np.tile(np.arange(25, dtype=np.float32), (4, 1))
    path = tmp_path / "tracked.npz"
    np.savez(path, expression=np.zeros((4, 3)), camera_labels=labels,
             face_found=np.array([1, 0, 1, 1]))
    sequence, _ = sequences.get_sequence(str(path), model)
    assert sequence["expression"].shape == (4, model.num_expression)
    extras = sequences.load_tracking(path)
    np.testing.assert_array_equal(extras["camera_labels"], labels)
    np.testing.assert_array_equal(extras["face_found"], [True, False, True, True])
    bad = tmp_path / "bad.npz"
    np.savez(bad, expression=np.zeros((4, 3)), camera_labels=labels[:3])
    with pytest.raises(ValueError, match="camera_labels"):
        sequences.get_sequence(str(bad), model)
