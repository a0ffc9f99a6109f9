"""The ID metric's face embeddings (reta3d/evaluation/arcface.py, face_embedding.py) and
experiments/convert_arcface.py.

No real ArcFace weights exist in CI: a PyTorch IResNet written here from arcface_torch's
published architecture (insightface recognition/arcface_torch/backbones/iresnet.py, same module
structure and state-dict key names) gets seeded random weights, BatchNorm running statistics
included, is saved as a .pth, converted by the script, and compared with the Flax port on
ArcFace crops of real photos shipped inside scikit-image and matplotlib (nothing downloaded).
"""
import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-faces.txt")
skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from reta3d.evaluation import arcface, face_embedding  # noqa: E402
from reta3d.fitting import crop, landmarks  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- arcface_torch's IResNet

class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], 2)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks, stride):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def random_iresnet(layers, seed=0) -> IResNet:
    """Seeded random weights (convs ~ N(0, 1/fan_in)) and random BatchNorm affine parameters and
    running statistics, so that inference-mode BN matters; features.weight stays 1.0."""
    torch.manual_seed(seed)
    model = IResNet(layers).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=gen)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
                module.running_mean.normal_(0.0, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.0, 0.5, generator=gen)
        model.features.weight.fill_(1.0)
    return model


def torch_embed(model, aligned: np.ndarray) -> np.ndarray:
    """arcface_torch's inference: RGB, (x / 255 - 0.5) / 0.5, NCHW, then L2 normalisation."""
    with torch.no_grad():
        x = torch.from_numpy(aligned).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        return torch.nn.functional.normalize(model(x)).numpy()


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_arcface",
                                                  REPO / "experiments" / "convert_arcface.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- photos

def _grace_hopper() -> np.ndarray:
    from PIL import Image
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def photos():
    """{name: (image, five points)} for the two packaged portraits."""
    out = {}
    for name, image in (("astronaut", skimage_data.astronaut()), ("grace_hopper", _grace_hopper())):
        face, _ = landmarks.find_face(image)
        assert face is not None, name
        out[name] = (image, crop.five_points(face.landmarks))
    return out


@pytest.fixture(scope="module")
def aligned(photos):
    images = [photos[n][0] for n in sorted(photos)]
    points = np.stack([photos[n][1] for n in sorted(photos)])
    return arcface.align_faces(images, points)


# ----------------------------------------------------------------- alignment

def test_umeyama_and_warp_match_skimage(photos):
    transform = pytest.importorskip("skimage.transform")
    for name, (image, points) in photos.items():
        ours = arcface.umeyama_similarity(points - 0.5, arcface.ARCFACE_TEMPLATE_112)
        if hasattr(transform.SimilarityTransform, "from_estimate"):   # skimage >= 0.26
            reference = transform.SimilarityTransform.from_estimate(
                points - 0.5, arcface.ARCFACE_TEMPLATE_112)
        else:
            reference = transform.SimilarityTransform()
            reference.estimate(points - 0.5, arcface.ARCFACE_TEMPLATE_112)
        np.testing.assert_allclose(ours, reference.params, atol=1e-9, err_msg=name)
        # skimage.warp samples at pixel-index coordinates, as cv2.warpAffine: identical crops.
        expected = transform.warp(image, reference.inverse, output_shape=(112, 112), order=1,
                                  mode="constant", cval=0.0, preserve_range=True)
        crop112 = arcface.align_faces(image[None], points[None])[0]
        assert crop112.shape == (112, 112, 3) and crop112.dtype == np.uint8
        assert np.abs(np.rint(expected) - crop112).max() <= 1, name


def test_photo_points_land_on_the_template(photos, aligned):
    """The fitted similarity is the least squares one (points' centroid on the template's); the
    warp is consistent with it: the 5 points found again in the 112 px crop (upsampled 4x for
    the detector) sit where the transform puts the photo's points."""
    from PIL import Image
    template = arcface.ARCFACE_TEMPLATE_112 + 0.5   # our pixel-centre convention
    for k, name in enumerate(sorted(photos)):
        _, points = photos[name]
        matrix = arcface.alignment_matrices(points)
        moved = points @ matrix[:, :2].T + matrix[:, 2]
        np.testing.assert_allclose(moved.mean(0), template.mean(0), atol=1e-9)
        # Real faces differ from the template's proportions (the astronaut's wide smile puts
        # her mouth corners ~7 px outside it); the eyes land within 4 px.
        assert np.linalg.norm(moved - template, axis=1)[:2].max() < 4.0, name
        up = np.asarray(Image.fromarray(aligned[k]).resize((448, 448), Image.BICUBIC))
        face, _ = landmarks.find_face(up, min_score=0.0)
        assert face is not None, name
        again = crop.five_points(face.landmarks) / 4
        error = np.linalg.norm(again - moved, axis=1)
        assert error.mean() < 1.0 and error.max() < 1.5, (name, error)


def test_known_similarity_is_undone():
    """A smooth 112 px pattern placed in a photo by a known similarity (rotation 25°, scale 2.2)
    is recovered by align_faces from the template points carried along."""
    yy, xx = np.mgrid[0:112, 0:112] + 0.5
    pattern = np.stack([127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
                        127 + 100 * np.cos((xx + yy) / 15.0),
                        40 + 1.5 * yy], -1)
    pattern = np.clip(np.rint(pattern), 0, 255).astype(np.uint8)
    angle, scale, shift = np.deg2rad(25.0), 2.2, np.array([160.0, 40.0])
    forward = np.zeros((2, 3))
    forward[:, :2] = scale * np.array([[np.cos(angle), -np.sin(angle)],
                                       [np.sin(angle), np.cos(angle)]])
    forward[:, 2] = shift
    photo = arcface.warp_affine(pattern, forward, size=400)
    points = (arcface.ARCFACE_TEMPLATE_112 + 0.5) @ forward[:, :2].T + forward[:, 2]
    matrix = arcface.alignment_matrices(points)
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(matrix, inverse, atol=1e-9)
    back = arcface.align_faces(photo[None], points[None])[0].astype(np.float64)
    inner = (slice(4, 108), slice(4, 108))
    difference = np.abs(back[inner] - pattern[inner])
    assert difference.mean() < 1.0 and difference.max() <= 6, (difference.mean(), difference.max())


# ----------------------------------------------------------------- IResNet parity

@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """(torch model, .pth path, converted .npz path, embedding fn of the .npz) for a random r50."""
    model = random_iresnet(arcface.ARCHITECTURES["r50"], seed=0)
    folder = tmp_path_factory.mktemp("arcface")
    pth, npz = folder / "backbone.pth", folder / "arcface.npz"
    torch.save(model.state_dict(), pth)
    name, arrays = _convert_module().convert(str(pth), str(npz))
    assert name == "r50"
    assert "fc.weight" in arrays and not any("num_batches_tracked" in k for k in arrays)
    return model, pth, npz, arcface.arcface_embedding_fn(npz)


def test_r50_matches_pytorch(r50, aligned):
    model, pth, npz, fn = r50
    expected = torch_embed(model, aligned)
    got = fn(aligned)
    assert got.shape == (2, 512) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    error = np.abs(got - expected).max()
    print(f"r50 max abs error of normalised embeddings: {error:.2e}")
    assert error <= 1e-4
    # The random network still tells the two photos apart (parity is not of a constant).
    assert float(expected[0] @ expected[1]) < 0.95
    # Single image (another padded chunk size) gives the same row.
    np.testing.assert_allclose(fn(aligned[1:]), got[1:], atol=1e-5)
    # The .pth itself loads to the same parameters as the converted .npz.
    from_pth = arcface.load_arcface_params(pth)
    from_npz = arcface.load_arcface_params(npz)
    assert arcface.layers_of(from_npz) == (3, 4, 14, 3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_npz)


def test_embed_images_and_similarity(r50, photos):
    fn = r50[3]
    astronaut = photos["astronaut"][0]
    embeddings, found = arcface.embed_images(fn, [astronaut, skimage_data.coffee(), astronaut[:, ::-1]])
    assert found.tolist() == [True, False, True]
    assert np.all(np.isnan(embeddings[1])) and np.all(np.isfinite(embeddings[[0, 2]]))
    same = arcface.identity_similarity(embeddings[[0, 0]], embeddings[[0, 1]])
    np.testing.assert_allclose(same[0], 1.0, atol=1e-5)
    assert np.isnan(same[1])


def test_r100_structure():
    """r100 is not run (too slow for the CPU suite): its key set, shapes and parameter count
    match the Flax module's."""
    model = IResNet(arcface.ARCHITECTURES["r100"])
    state = model.state_dict()
    assert arcface.detect_architecture(state) == ("r100", (3, 13, 30, 3))
    float_keys = {k for k in state if not k.endswith("num_batches_tracked")}
    shapes = arcface.torch_key_shapes((3, 13, 30, 3))
    assert set(shapes) == float_keys
    assert all(tuple(state[k].shape) == s for k, s in shapes.items())
    variables = arcface.params_from_state_dict(state)
    assert arcface.layers_of(variables) == (3, 13, 30, 3)
    abstract = jax.eval_shape(lambda: arcface.IResNet(layers=(3, 13, 30, 3)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3))))
    got = jax.tree_util.tree_map(lambda a: a.shape, variables)
    want = jax.tree_util.tree_map(lambda a: a.shape, dict(abstract))
    assert got == want
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables))
    assert count == sum(state[k].numel() for k in float_keys)   # 65.2M values


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_arcface.*--output"):
        arcface.load_arcface_params(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="arcface_torch"):
        _convert_module().convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.npz"))
    state = {k: np.zeros(s, np.float32) for k, s in arcface.torch_key_shapes((2, 2, 2, 2)).items()}
    prefixed = {"module." + k: v for k, v in state.items()}
    assert arcface.layers_of(arcface.params_from_state_dict(prefixed)) == (2, 2, 2, 2)
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match="missing.*layer3.1.bn2.running_var"):
        arcface.params_from_state_dict(state)
    with pytest.raises(ValueError, match="not an arcface_torch IResNet"):
        arcface.params_from_state_dict({"features.0.weight": np.zeros((64, 3, 3, 3))})
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        arcface.load_arcface_params(bad)


# ----------------------------------------------------------------- dlib substitute

def test_dlib_descriptor_substitute(photos):
    from PIL import Image
    astronaut, grace = photos["astronaut"][0], photos["grace_hopper"][0]
    smaller = np.asarray(Image.fromarray(astronaut).resize((410, 410), Image.BILINEAR))
    fn = face_embedding.dlib_descriptor_fn()
    descriptors, found = fn([astronaut, astronaut[:, ::-1], smaller, grace, skimage_data.coffee()])
    assert descriptors.shape == (5, 128) and descriptors.dtype == np.float32
    assert found.tolist() == [True, True, True, True, False]
    assert np.all(np.isnan(descriptors[4]))
    distance = face_embedding.descriptor_distance(descriptors[[0, 0, 0, 0]], descriptors[[1, 2, 3, 4]])
    print(f"dlib descriptor distances: mirrored {distance[0]:.3f}, scaled {distance[1]:.3f}, "
          f"astronaut vs grace_hopper {distance[2]:.3f}")
    threshold = face_embedding.SAME_PERSON_THRESHOLD
    assert distance[0] < threshold and distance[1] < threshold
    assert distance[2] > threshold
    assert np.isnan(distance[3])
    assert "ArcFace" not in face_embedding.METRIC_NAME
