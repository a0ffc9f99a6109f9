"""Tests for experiments/alpha_coverage.py's silhouette (the measure of issue 15)."""
import importlib.util
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module():
    # Loaded once per process: the script defines absl flags at import.
    if "alpha_coverage" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "alpha_coverage", REPO / "experiments" / "alpha_coverage.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["alpha_coverage"] = module
    return sys.modules["alpha_coverage"]


def test_own_silhouette_keeps_holes_inside_and_the_frame_is_no_outline():
    """A head-like disc cut by the bottom of the frame, with a see-through hole (alpha 0.2,
    5×5) in its middle and a 1-pixel crack (alpha 0) from the hole out through the outline:
    the silhouette is the whole disc, hole and crack included, down to the last row, but for
    the crack's last 2 pixels, where the 2-pixel closing leaves a notch in the outline; 2 px
    in, it is that silhouette eroded by hand. Far from it, an opaque speck is its own."""
    own_silhouette = _module().own_silhouette
    h = w = 40
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 30) ** 2 + (xx - 20) ** 2 <= 12 ** 2      # rows 18..39: cut by the frame
    alpha = disc.astype(np.float32)
    alpha[28:33, 18:23] = 0.2                              # the see-through hole
    alpha[30, 23:33] = 0.0                                 # a crack out to the outline
    alpha[2:4, 2:4] = 1.0                                  # a floater, 2×2

    sil = own_silhouette(alpha[None])[0]
    assert sil.dtype == bool and sil.shape == (h, w)
    expected = disc.copy()
    expected[30, 31:33] = False                            # the crack's mouth: a notch
    np.testing.assert_array_equal(sil[10:], expected[10:])  # hole, crack, last rows: inside
    assert sil[2:4, 2:4].all()
    # The mean alpha inside the silhouette counts the hole and 8 of the crack's pixels:
    by_hand = (expected.sum() - 25 * 0.8 - 8) / expected.sum()
    np.testing.assert_allclose(alpha[10:][sil[10:]].mean(), by_hand, rtol=1e-6)

    # 2 px in: a pixel stays when its 4-neighbourhood diamond of radius 2 is inside the
    # silhouette; the frame counts as outside for the erosion (scipy's border_value=0).
    inner = own_silhouette(alpha[None], erode=2)[0]
    padded = np.pad(sil, 2)
    by_hand = np.ones_like(sil)
    for dy in range(-2, 3):
        for dx in range(-2 + abs(dy), 3 - abs(dy)):
            by_hand &= padded[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
    np.testing.assert_array_equal(inner, by_hand)
    assert inner[30, 20] and not inner[39, 20] and not inner[2:4, 2:4].any()


def test_a_notch_wider_than_the_closing_stays_outside():
    own_silhouette = _module().own_silhouette
    alpha = np.zeros((1, 30, 30), np.float32)
    alpha[0, 5:25, 5:25] = 1.0
    alpha[0, 5:15, 12:18] = 0.0                            # a 6-pixel notch from the top edge
    sil = own_silhouette(alpha)[0]
    assert not sil[5:13, 13:17].any() and sil[20, 15]


def test_overlay_marks_see_through_red_and_missed_outline_blue():
    """Data: an opaque 16×16 square. Model: the same square 4 px narrower on the right, with a
    see-through 4×4 patch (alpha 0.6) in its middle. Row 2 shows the patch in red and the 4 px
    strip the model misses in blue; rows 1 and 3 are the data's alpha and the colour."""
    overlay = _module().overlay
    data = np.zeros((1, 24, 24), np.float32)
    data[0, 4:20, 4:20] = 1.0
    model = data.copy()
    model[0, 4:20, 16:20] = 0.0                      # narrower: the outline it misses
    model[0, 10:14, 8:12] = 0.6                      # see-through inside
    color = np.full((1, 24, 24, 3), 0.25, np.float32)
    picture = overlay(data, model, color, scale=1)
    assert picture.shape == (72, 24, 3) and picture.dtype == np.uint8
    row1, row2, row3 = picture[:24], picture[24:48], picture[48:]
    np.testing.assert_array_equal(row1[..., 0], np.round(data[0] * 255))
    red = (row2 == (255, 0, 0)).all(-1)
    blue = (row2 == (51, 102, 255)).all(-1)
    want_red = np.zeros((24, 24), bool)
    want_red[10:14, 8:12] = True
    want_blue = np.zeros((24, 24), bool)
    want_blue[4:20, 16:20] = True
    np.testing.assert_array_equal(red, want_red)
    np.testing.assert_array_equal(blue, want_blue)
    assert (row2[~(want_red | want_blue)] == np.round(model[0][~(want_red | want_blue)] * 255)[
        :, None]).all()
    assert (row3 == 64).all()
    assert overlay(data, model, color, scale=2).shape == (144, 48, 3)
