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


def test_the_closing_is_2_pixels_a_notch_wider_than_4_stays_outside():
    """Notches 10 px deep into the top edge of a square: 3 px wide, the 2-pixel closing fills
    it below its mouth (a 1-pixel closing would not); 6 px wide, it stays open."""
    own_silhouette = _module().own_silhouette
    alpha = np.zeros((2, 30, 30), np.float32)
    alpha[:, 5:25, 5:25] = 1.0
    alpha[0, 5:15, 14:17] = 0.0                            # 3 px wide
    alpha[1, 5:15, 12:18] = 0.0                            # 6 px wide
    narrow, wide = own_silhouette(alpha)
    assert narrow[8:15, 14:17].all() and not narrow[5, 15]
    assert not wide[5:13, 13:17].any() and wide[20, 15]


def _square_heads():
    """Head 0: the data an opaque 16×16 square; the model the same square 4 px narrower on the
    right, with a hole (alpha 0.3, 4×4) in its middle and a faint patch (alpha 0.7, 2×2) 1 px
    inside its new right edge, deep inside the data's square. Head 1: the data the same
    square, the model empty."""
    data = np.zeros((2, 24, 24), np.float32)
    data[:, 4:20, 4:20] = 1.0
    model = data.copy()
    model[0, 4:20, 16:20] = 0.0                      # narrower: the outline it misses
    model[0, 10:14, 8:12] = 0.3                      # see-through inside
    model[0, 6:8, 14:16] = 0.7                       # faint, but at the model's own rim
    model[1] = 0.0
    return data, model


def test_overlay_marks_see_through_red_and_missed_outline_blue():
    """Row 2 marks the hole red (it is inside the model's own silhouette, holes filled) and
    the 4 px strip the model misses blue, not the faint patch at its own rim (2 px inside the
    data's silhouette but not the model's); head 1, whose model is empty, is all blue. Rows 1
    and 3 are the data's alpha and the colour; one column per head."""
    overlay = _module().overlay
    data, model = _square_heads()
    color = np.stack([np.full((24, 24, 3), 0.25), np.full((24, 24, 3), 0.75)]).astype(np.float32)
    picture = overlay(data, model, color, scale=1)
    assert picture.shape == (72, 48, 3) and picture.dtype == np.uint8
    for head in range(2):
        tile = picture[:, 24 * head:24 * (head + 1)]
        row1, row2, row3 = tile[:24], tile[24:48], tile[48:]
        np.testing.assert_array_equal(row1[..., 0], np.round(data[head] * 255))
        red = (row2 == (255, 0, 0)).all(-1)
        blue = (row2 == (51, 102, 255)).all(-1)
        want_red = np.zeros((24, 24), bool)
        want_blue = np.zeros((24, 24), bool)
        if head == 0:
            want_red[10:14, 8:12] = True
            want_blue[4:20, 16:20] = True
        else:
            want_blue[4:20, 4:20] = True
        np.testing.assert_array_equal(red, want_red)
        np.testing.assert_array_equal(blue, want_blue)
        grey = ~(want_red | want_blue)
        assert (row2[grey] == np.round(model[head][grey] * 255)[:, None]).all()
        assert (row3 == (64 if head == 0 else 191)).all()
    assert overlay(data, model, color, scale=2).shape == (144, 96, 3)


def test_coverage_report_by_hand():
    """The report's numbers for the square heads, each worked out from the pixel counts."""
    report = _module().coverage_report
    data, model = _square_heads()
    got = report(data, model)
    square = 16 * 16
    # The data: opaque inside its silhouette; its interior (2 px in) is 12×12, minus the
    # frame rule (none: the square is away from the frame).
    for key in ("data_alpha_in_silhouette", "data_alpha_in_interior",
                "data_alpha_in_own_silhouette", "data_alpha_in_own_interior"):
        assert got[key] == 1.0
    # The model inside the data's square: head 0 is 12×16 = 192 px of 1 less the hole
    # (16 px at 0.3) and the patch (4 px at 0.7); head 1 is 0.
    in_square = 192 - 16 * 0.7 - 4 * 0.3
    np.testing.assert_allclose(got["model_alpha_in_silhouette"], in_square / (2 * square))
    # 2 px in: rows 6..17, columns 6..17 (144 px per head); head 0 has 12×10 of them opaque
    # but for the hole (16 px) and the patch's pixels at columns 14..15 rows 6..7 (4 px).
    np.testing.assert_allclose(got["model_alpha_in_interior"],
                               (120 - 16 * 0.7 - 4 * 0.3) / (2 * 144))
    np.testing.assert_allclose(got["model_interior_fraction_below_0.9"],
                               (24 + 16 + 4 + 144) / (2 * 144))
    # Own silhouette: head 0's is its 16×12 rectangle (hole filled); head 1 has none.
    np.testing.assert_allclose(got["model_alpha_in_own_silhouette"], in_square / 192)
    # Its interior: rows 6..17, columns 6..13 (96 px), holding the whole hole, not the patch.
    np.testing.assert_allclose(got["model_alpha_in_own_interior"], (96 - 16 * 0.7) / 96)
    np.testing.assert_allclose(got["model_own_interior_fraction_below_0.9"], 16 / 96)
    assert got["model_alpha_outside_silhouette"] == 0.0
    # The model's alpha > 0.5 (the hole at 0.3 is out) over the data's silhouette.
    np.testing.assert_allclose(got["silhouette_iou"], (192 - 16) / (2 * square))
    # A model that is the data scores as the data.
    same = report(data, data)
    assert same["model_alpha_in_own_interior"] == same["data_alpha_in_own_interior"] == 1.0
    assert same["silhouette_iou"] == 1.0 and same["model_alpha_outside_silhouette"] == 0.0
