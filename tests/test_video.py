"""Video I/O and image tiling (reta3d/video.py)."""
import numpy as np
import pytest

from reta3d import video


def test_gif_keeps_identical_frames(tmp_path):
    frames = np.zeros((5, 10, 14, 3), np.uint8)
    frames[3:] = (200, 30, 10)
    video.write_video(tmp_path / "still.gif", frames, fps=10)
    back = video.read_video(tmp_path / "still.gif")
    assert back.shape == (5, 10, 14, 3)          # Pillow alone would merge frames 0-2 and 3-4
    np.testing.assert_array_equal(back, frames)  # two colours: the palette is exact
    video.write_video(tmp_path / "odd.mp4", np.repeat(frames, 2, 0)[:, :9, :13], fps=10)
    assert video.read_video(tmp_path / "odd.mp4").shape[0] == 10
    with pytest.raises(ValueError, match="must end in"):
        video.write_video(tmp_path / "x.avi", frames)


def test_side_by_side_and_grid_layout():
    frames = np.arange(2 * 3 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 3, 4, 5, 3)
    tiled = video.side_by_side(frames)
    assert tiled.shape == (2, 4, 15, 3)
    np.testing.assert_array_equal(tiled[1, :, 5:10], frames[1, 1])
    grid = video.image_grid(frames)
    assert grid.shape == (8, 15, 3)
    np.testing.assert_array_equal(grid[4:8, 10:15], frames[1, 2])


def test_timing_path_sits_beside_the_video(tmp_path):
    assert video.timing_path(tmp_path / "talk.mp4") == tmp_path / "talk_timing.json"
    assert video.timing_path(tmp_path / "talk.gif") == tmp_path / "talk_gif_timing.json"


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_interrupted_video_write_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    """ffmpeg writes into a hidden temporary with the video's suffix (so it picks the format
    from it) that replaces the target only once ffmpeg has finished: a failure after some
    frames were already encoded leaves the previous video whole and no temporary behind."""
    import imageio_ffmpeg
    old = np.zeros((3, 8, 8, 3), np.uint8)
    old[1], old[2] = 120, 255
    target = video.write_video(tmp_path / f"clip{suffix}", old, fps=10)
    before = target.read_bytes()
    real = imageio_ffmpeg.write_frames
    seen = []

    def failing_after_two_frames(path, *args, **kwargs):
        seen.append(path)
        writer = real(path, *args, **kwargs)

        def forward():
            writer.send((yield))
            for _ in range(2):
                writer.send((yield))
            writer.close()      # ffmpeg has written a valid, shorter file at `path` by now
            raise KeyboardInterrupt("stopped while writing")
        gen = forward()
        next(gen)
        return gen

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing_after_two_frames)
    with pytest.raises(KeyboardInterrupt):
        video.write_video(target, np.full((6, 8, 8, 3), 60, np.uint8), fps=10)
    assert seen and seen[0] != str(target) and seen[0].endswith(suffix)
    assert target.read_bytes() == before
    assert video.read_video(target).shape[0] == 3
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
