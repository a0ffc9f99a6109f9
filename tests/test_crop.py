"""EG3D-style face crops (reta3d/fitting/crop.py): least squares fit, affine helpers, resampling."""
import numpy as np
import pytest

from reta3d.fitting import crop


def _random_points(n=5, seed=0):
    return np.random.default_rng(seed).uniform(50, 400, (n, 2))


def test_five_points_follow_the_eg3d_order():
    lm = np.zeros((68, 2))
    lm[36:42] = (10, 20)
    lm[36] = (4, 20)            # eye centre is the mean of six contour points
    lm[42:48] = (30, 21)
    lm[30] = (20, 30)
    lm[48], lm[54] = (12, 40), (28, 41)
    expected = [[9, 20], [30, 21], [20, 30], [12, 40], [28, 41]]
    np.testing.assert_allclose(crop.five_points(lm), expected)
    np.testing.assert_allclose(crop.five_points(np.stack([lm, lm + 1])),
                               [expected, np.add(expected, 1)])
    with pytest.raises(ValueError, match="68, 2"):
        crop.five_points(np.zeros((5, 2)))


def test_known_scale_and_translation_are_recovered_exactly():
    source = _random_points()
    scale, translation = 0.37, np.array([-12.5, 88.25])
    fitted_scale, fitted_translation = crop.similarity_no_rotation(source,
                                                                   scale * source + translation)
    assert fitted_scale == pytest.approx(scale, rel=1e-12)
    np.testing.assert_allclose(fitted_translation, translation, atol=1e-10)


def test_rotated_points_give_the_least_squares_answer():
    source = _random_points(7, seed=1)
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = 1.7 * source @ rotation.T + (5.0, -3.0)
    target += np.random.default_rng(2).normal(0, 2, target.shape)
    scale, translation = crop.similarity_no_rotation(source, target)
    # Unknowns (s, tx, ty): rows s·x + tx = x', s·y + ty = y'.
    design = np.zeros((2 * len(source), 3))
    design[0::2, 0], design[0::2, 1] = source[:, 0], 1
    design[1::2, 0], design[1::2, 2] = source[:, 1], 1
    solution = np.linalg.lstsq(design, target.reshape(-1), rcond=None)[0]
    assert scale == pytest.approx(solution[0], rel=1e-10)
    np.testing.assert_allclose(translation, solution[1:], rtol=1e-10, atol=1e-9)
    # ... and is a minimum: nudging any parameter raises the squared error.
    def cost(s, t):
        return np.sum((s * source + t - target) ** 2)
    best = cost(scale, translation)
    for ds, dt in [(1e-3, 0), (-1e-3, 0), (0, (0.1, 0)), (0, (0, -0.1))]:
        assert cost(scale + ds, translation + np.array(dt)) > best


def test_crop_transform_maps_landmarks_onto_the_reference():
    reference = np.array([[0.38, 0.47], [0.62, 0.47], [0.5, 0.6], [0.41, 0.72], [0.59, 0.72]])
    size = 512
    # A photo whose five points are the reference, scaled by 1/0.8 and shifted.
    photo_points = (reference * size - 30.0) / 0.8
    affine = crop.crop_transform(photo_points, reference, size)
    np.testing.assert_allclose(affine, [[0.8, 0, 30], [0, 0.8, 30]], atol=1e-9)
    np.testing.assert_allclose(crop.transform_points(photo_points, affine), reference * size,
                               atol=1e-9)
    np.testing.assert_allclose(
        crop.transform_points(crop.transform_points(photo_points, affine),
                              crop.invert_affine(affine)), photo_points, atol=1e-9)
    # 68-point inputs are reduced to the same five points.
    lm68 = np.random.default_rng(3).uniform(0, 100, (68, 2))
    ref68 = lm68 / 200 + 0.2
    np.testing.assert_allclose(crop.crop_transform(lm68, ref68, 100),
                               crop.crop_transform(crop.five_points(lm68),
                                                   crop.five_points(ref68), 100))
    with pytest.raises(ValueError, match="reference layout"):
        crop.crop_transform(photo_points, 1 - reference, size)   # face upside down


def test_crop_puts_a_marker_where_the_affine_says():
    height, width = 300, 400
    ys, xs = np.mgrid[0:height, 0:width] + 0.5    # pixel centres
    marker = np.array([123.3, 77.8])
    for scale, size in [(0.37, 128), (2.3, 256), (1.0, 100)]:
        sigma = max(3.0, 2.0 / scale)                 # a few crop pixels wide
        blob = 255 * np.exp(-((xs - marker[0]) ** 2 + (ys - marker[1]) ** 2) / (2 * sigma ** 2))
        image = np.repeat(np.round(blob).astype(np.uint8)[..., None], 3, axis=-1)
        affine = np.array([[scale, 0, size * 0.4 - marker[0] * scale],
                           [0, scale, size * 0.55 - marker[1] * scale]])
        out, _ = crop.crop_image(image, affine, size, pad_mode="constant")
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        weight = np.where(out[..., 0] > 20, out[..., 0], 0).astype(np.float64)
        cy, cx = np.mgrid[0:size, 0:size] + 0.5
        centroid = np.array([(weight * cx).sum(), (weight * cy).sum()]) / weight.sum()
        np.testing.assert_allclose(centroid, crop.transform_points(marker, affine), atol=0.25)


def test_identity_crop_is_exact_and_grey_images_work():
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    affine = np.array([[1.0, 0, -5], [0, 1.0, -7]])
    out, outside = crop.crop_image(image, affine, 20)
    np.testing.assert_array_equal(out, image[7:27, 5:25])
    assert outside == 0.0
    grey, _ = crop.crop_image(image[..., 0], affine, 20)
    np.testing.assert_array_equal(grey, image[7:27, 5:25, 0])


def test_shrinking_does_not_alias():
    # A 1-px checkerboard shrunk 7.3x must come out flat grey; point-sampling it would not.
    checker = (np.indices((730, 730)).sum(0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=-1)
    out, _ = crop.crop_image(image, np.array([[1 / 7.3, 0, 0], [0, 1 / 7.3, 0]]), 100)
    assert abs(out.astype(np.float64).mean() - 127.5) < 2
    assert out.astype(np.float64).std() < 3


def test_outside_fraction_and_padding():
    image = np.full((100, 100, 3), 200, np.uint8)
    image[:, :10] = 50                                       # a dark band at the left edge
    inside, outside = crop.crop_image(image, np.array([[1.0, 0, -20], [0, 1.0, -20]]), 50)
    assert outside == 0.0
    # Crop shifted half out of the photo to the left: half its columns lie outside.
    half_out = np.array([[1.0, 0, 25], [0, 1.0, -20]])       # photo x = crop x - 25
    mask = crop.outside_mask(image.shape, half_out, 50)
    assert mask[:, :25].all() and not mask[:, 25:].any()
    for mode, expected_left in [("constant", 0), ("edge", 50), ("reflect", 200)]:
        out, outside = crop.crop_image(image, half_out, 50, pad_mode=mode)
        assert outside == pytest.approx(0.5)
        assert abs(int(out[10, 10, 0]) - expected_left) <= 1, mode   # photo pixel -15 (→ 15)
    # Reflect mirrors the band: photo x = -15 reflects to x = 15 (bright); x = -5 to 5 (dark).
    out, _ = crop.crop_image(image, half_out, 50, pad_mode="reflect")
    assert out[10, 25 - 15, 0] > 190 and out[10, 25 - 5, 0] < 60
    # Scaled crop a quarter out in x and a quarter in y: 1 - (3/4)^2 outside.
    quarter = np.array([[0.5, 0, 10], [0, 0.5, 10]])        # crop 80 px = photo [-20, 140)
    _, outside = crop.crop_image(image, quarter, 80)
    assert outside == pytest.approx(1 - (100 / 160) ** 2, abs=0.02)


def test_bad_inputs_raise():
    image = np.zeros((10, 10, 3), np.uint8)
    good = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    with pytest.raises(ValueError, match="uint8"):
        crop.crop_image(image.astype(np.float32), good, 8)
    with pytest.raises(ValueError, match="uint8"):
        crop.crop_image(np.zeros((10, 10, 4), np.uint8), good, 8)
    with pytest.raises(ValueError, match="rotation"):
        crop.crop_image(image, [[1.0, 0.1, 0], [0, 1.0, 0]], 8)
    with pytest.raises(ValueError, match="rotation"):
        crop.crop_image(image, [[-1.0, 0, 0], [0, 1.0, 0]], 8)
    with pytest.raises(ValueError, match="finite"):
        crop.crop_image(image, np.full((2, 3), np.nan), 8)
    with pytest.raises(ValueError, match="output_size"):
        crop.crop_image(image, good, 0)
    with pytest.raises(ValueError, match="output_size"):
        crop.crop_image(image, good, 8.5)
    with pytest.raises(ValueError, match="pad_mode"):
        crop.crop_image(image, good, 8, pad_mode="wrap")
    with pytest.raises(ValueError, match="coincide"):
        crop.similarity_no_rotation(np.ones((5, 2)), _random_points())
    with pytest.raises(ValueError, match="differ"):
        crop.similarity_no_rotation(_random_points(5), _random_points(4))
    with pytest.raises(ValueError, match="non-finite"):
        crop.similarity_no_rotation(np.full((5, 2), np.inf), _random_points())
    with pytest.raises(ValueError, match=r"\(68, 2\) or \(5, 2\)"):
        crop.crop_transform(np.zeros((4, 2)), np.zeros((5, 2)), 10)
    with pytest.raises(ValueError, match="singular"):
        crop.invert_affine(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        crop.transform_points(np.zeros((3, 3)), good)
