"""Reading photos and videos (reta3d/fitting/media.py); inputs are written by the tests or
shipped inside installed packages."""
import numpy as np
import pytest
from PIL import Image

from reta3d import video
from reta3d.fitting import media


def _photo() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


def test_real_photo_round_trips(tmp_path):
    photo = _photo()
    Image.fromarray(photo).save(tmp_path / "a.png")
    loaded = media.load_image(tmp_path / "a.png")
    assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, photo)
    Image.fromarray(photo).save(tmp_path / "a.jpg", quality=95)
    assert np.abs(media.load_image(str(tmp_path / "a.jpg")).astype(int) - photo).mean() < 3


def test_packaged_jpeg_loads():
    cbook = pytest.importorskip("matplotlib.cbook")
    image = media.load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    assert image.shape == (600, 512, 3) and image.dtype == np.uint8


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = np.zeros((60, 90, 3), np.uint8)     # landscape as the sensor stored it
    stored[:20, :20] = 255                       # bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                             # Orientation 6: display rotated 90° clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = media.load_image(tmp_path / "phone.jpg")
    assert upright.shape == (90, 60, 3)
    assert upright[:15, -15:].mean() > 200       # top-left went to the top-right
    assert upright[-30:, :30].mean() < 20


def test_modes_are_converted_to_rgb(tmp_path):
    photo = _photo()[:64, :48]
    grey = photo[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(media.load_image(tmp_path / "grey.png"),
                                  np.repeat(grey[..., None], 3, -1))
    # A matted photo: composited over white, the background the generator renders on.
    alpha = np.broadcast_to(np.linspace(0, 255, photo.shape[1]).round().astype(np.uint8),
                            photo.shape[:2])
    Image.fromarray(np.dstack([photo, alpha])).save(tmp_path / "rgba.png")
    flat = media.load_image(tmp_path / "rgba.png").astype(np.float64)
    a = alpha[..., None] / 255.0
    assert np.abs(flat - (photo * a + 255.0 * (1 - a))).max() <= 1.0
    np.testing.assert_array_equal(flat[:, 0], 255)                 # alpha 0: white
    np.testing.assert_array_equal(flat[:, -1], photo[:, -1])      # alpha 255: the photo
    Image.fromarray(photo).quantize(16).save(tmp_path / "palette.png")
    assert media.load_image(tmp_path / "palette.png").shape == photo.shape
    deep = grey.astype(np.uint16) * 257                        # 16-bit greyscale PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(media.load_image(tmp_path / "deep.png"),
                                  np.repeat(grey[..., None], 3, -1))


def test_unreadable_files_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        media.load_image(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        media.load_image(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        media.load_image(tmp_path / "text.png")
    Image.fromarray(_photo()).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.jpg"):
        media.load_image(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match="not a file"):
        media.load_image(tmp_path)


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    pixel = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    for name in ["b.PNG", "a.jpg", "sub/c.JpEg", "sub/deeper/d.webp", "e.bmp", "notes.txt",
                 ".hidden.png", "._a.jpg", ".cache/x.png"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("x")
        else:
            pixel.save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP",
                                     "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()])
    found = [p.relative_to(tmp_path).as_posix() for p in media.list_images(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "e.bmp", "sub/c.JpEg", "sub/deeper/d.webp"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none"):
        media.list_images(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        media.list_images(tmp_path / "nowhere")


def test_video_reads_back_with_frame_count_and_fps(tmp_path):
    frames = np.zeros((23, 48, 64, 3), np.uint8)
    frames[:, :, :, 0] = np.linspace(0, 250, 23, dtype=np.uint8)[:, None, None]   # red ramp
    video.write_video(tmp_path / "clip.mp4", frames, fps=12.5)
    iterator, fps, count = media.read_video(tmp_path / "clip.mp4")
    assert fps == pytest.approx(12.5) and count == 23
    read = list(iterator)
    assert len(read) == 23
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in read)
    np.testing.assert_allclose([f[..., 0].mean() for f in read], frames[:, 0, 0, 0], atol=4)
    # GIFs go through ffmpeg too; an iterator closed early stops cleanly.
    video.write_video(tmp_path / "clip.gif", frames[:5], fps=10)
    iterator, fps, count = media.read_video(tmp_path / "clip.gif")
    assert fps == pytest.approx(10) and count == 5
    assert next(iterator).shape == (48, 64, 3)
    iterator.close()


def test_unreadable_video_raises_naming_the_file(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="junk.mp4"):
        media.read_video(tmp_path / "junk.mp4")
    video.write_video(tmp_path / "clip.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=5)
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.mp4"):
        media.read_video(tmp_path / "cut.mp4")
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        media.read_video(tmp_path / "gone.mp4")


def test_rotated_phone_video_is_read_upright(tmp_path):
    import subprocess
    import imageio_ffmpeg
    frames = np.zeros((3, 48, 64, 3), np.uint8)
    frames[:, :16, :16] = 255                     # bright block at the stored top-left
    video.write_video(tmp_path / "flat.mp4", frames, fps=3)
    # Rotation as phones store it: a display matrix in the container, pixels untouched.
    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-display_rotation", "90",
                           "-i", str(tmp_path / "flat.mp4"), "-c", "copy",
                           str(tmp_path / "rotated.mp4")], capture_output=True)
    if done.returncode != 0:
        pytest.skip("this ffmpeg has no -display_rotation (ffmpeg < 7)")
    iterator, _, count = media.read_video(tmp_path / "rotated.mp4")
    first = next(iterator)
    iterator.close()
    assert count == 3 and first.shape == (64, 48, 3)
    assert first[-12:, :12].mean() > 200          # 90° counter-clockwise: top-left → bottom-left
    assert first[:12, :12].mean() < 30


def test_ffmpeg_starts_without_python_in_the_forked_child(tmp_path, monkeypatch):
    """With JAX's backends up, writing and reading videos runs no at-fork hooks: ffmpeg is
    started without imageio-ffmpeg's preexec_fn, so JAX's fork warning (a real deadlock risk
    in a multithreaded process) never fires."""
    import os
    import warnings

    import jax
    jax.devices()                                   # installs JAX's at-fork warning
    monkeypatch.delenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", raising=False)
    forks = []
    os.register_at_fork(before=lambda: forks.append(os.getpid()))  # runs only with a preexec_fn
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for name in ("clip.mp4", "clip.gif"):
            video.write_video(tmp_path / name, frames, fps=5)
            assert video.read_video(tmp_path / name).shape[0] == 3
            iterator, _, count = media.read_video(tmp_path / name)
            assert count == 3 and len(list(iterator)) == 3
    assert forks == [], f"{len(forks)} fork hooks ran in this process"
