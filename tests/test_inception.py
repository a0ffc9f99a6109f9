"""The FID Inception-v3 port (reta3d/evaluation/inception.py) and experiments/convert_inception.py
against the reference PyTorch code itself: torch-fidelity's `FeatureExtractorInceptionV3` (the
TF graph's input handling: TF1 resize, (x - 128) / 128) and pytorch-fid's `fid_inception_v3` /
`InceptionV3` (its FIDInceptionA/C/E blocks and strict state-dict loading).

No real weights in CI: the network gets seeded random weights (He-scaled convs, random BatchNorm
statistics; pool3 features stay O(1..10)), saved as a .pth in the real files' key layout,
converted by the script, and compared on real photos shipped inside scikit-image and matplotlib
(nothing is downloaded). Both reference packages declare torchvision, whose PyPI wheel does not
load with the CPU torch build used here, so their modules are imported without their package
`__init__` and with a minimal torchvision stand-in (`_reference_modules`): only torch-fidelity's
own network classes and pytorch-fid's own FID blocks and wrapper run.
"""
import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")
if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("pytorch_fid") is None:
    pytest.skip("pip install --no-deps -r requirements-metrics.txt", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from reta3d.evaluation import inception  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 2  # one compiled network shape for every call below


def import_isolated(package: str, modules, stubs=()):
    """Imports `package.module` for each module without running `package/__init__.py` (which
    pulls in torchvision), with `stubs` ({name: module}) standing in during the import. Leaves
    sys.modules as it was; the returned modules keep working (their globals hold what they
    imported). Returns {module: module object}."""
    spec = importlib.util.find_spec(package)
    before = dict(sys.modules)
    try:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
        shell = types.ModuleType(package)
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = shell
        sys.modules.update(dict(stubs))
        return {name: importlib.import_module(f"{package}.{name}") for name in modules}
    finally:
        # Only the package's and the stand-ins' entries go: other modules imported on the way
        # (torch.hub, tqdm) are ordinary imports and stay.
        ours = lambda n: n == package or n.startswith(package + ".") or n in dict(stubs)  # noqa: E731
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update({n: m for n, m in before.items() if ours(n)})


def torchvision_stand_in(tfi, inception3_factory):
    """The few torchvision names pytorch_fid.inception touches: the base classes of its FID
    blocks (torchvision's InceptionA/C/E build the same submodules as torch-fidelity's, whose
    forwards the FID blocks replace) and `models.inception_v3`, the trunk. No
    `torchvision.models.utils`, so pytorch-fid falls back to torch's own load_url."""
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.28.0"
    models = types.ModuleType("torchvision.models")
    models.inception_v3 = inception3_factory
    inception_module = types.ModuleType("torchvision.models.inception")
    inception_module.InceptionA = tfi.InceptionA
    inception_module.InceptionC = tfi.InceptionC
    inception_module.InceptionE = tfi.InceptionE_1
    models.inception = inception_module
    torchvision.models = models
    transforms = types.ModuleType("torchvision.transforms")
    torchvision.transforms = transforms
    return {"torchvision": torchvision, "torchvision.models": models,
            "torchvision.models.inception": inception_module, "torchvision.transforms": transforms}


def random_state_dict(seed: int = 0) -> dict:
    """The real weight files' layout: torchvision Inception3 names, num_batches_tracked, a
    1008-way fc."""
    rng = np.random.default_rng(seed + 1)
    state = {name: torch.from_numpy(value) for name, value in inception.random_inception_variables(seed).items()}
    for name in list(state):
        if name.endswith("bn.running_var"):
            state[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.from_numpy((rng.standard_normal((1008, 2048)) * 0.02).astype(np.float32))
    state["fc.bias"] = torch.zeros(1008)
    return state


def _grace_hopper() -> np.ndarray:
    from PIL import Image
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inception")
    state = random_state_dict(0)
    pth = tmp / inception.FID_WEIGHTS_FILE
    torch.save(state, pth)

    tf = import_isolated("torch_fidelity", ["feature_extractor_inceptionv3", "interpolate_compat_tensorflow"])
    tfi = tf["feature_extractor_inceptionv3"]
    # torch-fidelity's own extractor, loading the .pth from disk as it loads its download.
    fidelity = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(pth))

    # pytorch-fid: torchvision's Inception3(num_classes=1008, aux_logits=False) has the same
    # parameter names as torch-fidelity's extractor, which stands in for it as the trunk;
    # fid_inception_v3 then swaps in its FID blocks and strictly loads "the download".
    stubs = torchvision_stand_in(tfi, lambda **kwargs: tfi.FeatureExtractorInceptionV3(
        "trunk", ["2048"], feature_extractor_weights_path=str(pth)))
    pf = import_isolated("pytorch_fid", ["inception"], stubs)["inception"]
    pf.load_state_dict_from_url = lambda url, progress=True: state
    pytorch_fid_net = pf.InceptionV3([3], resize_input=False, normalize_input=False).eval()

    spec = importlib.util.spec_from_file_location("convert_inception",
                                                  REPO / "experiments" / "convert_inception.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    npz = tmp / "inception.npz"
    arrays = converter.convert(str(pth), str(npz))

    astronaut, hopper = skimage_data.astronaut(), _grace_hopper()[:512, :512]
    images = {
        299: np.stack([astronaut[100:399, 120:419], hopper[60:359, 100:399]]),
        512: np.stack([astronaut, hopper]),
    }
    return types.SimpleNamespace(
        tmp=tmp, pth=pth, npz=npz, arrays=arrays, state=state, fidelity=fidelity,
        resize=tf["interpolate_compat_tensorflow"].interpolate_bilinear_2d_like_tensorflow1x,
        pytorch_fid_net=pytorch_fid_net,
        feature_fn=inception.inception_feature_fn(npz, batch_size=BATCH), images=images)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("in_hw,out_hw", [((512, 512), (299, 299)), ((600, 512), (299, 299)),
                                          ((64, 48), (299, 299)), ((7, 5), (299, 299)),
                                          ((299, 299), (299, 299)), ((300, 1000), (299, 123))])
def test_resize_matches_torch_fidelity(setup, in_hw, out_hw):
    x = np.random.default_rng(0).uniform(0, 255, (2, *in_hw, 3)).astype(np.float32)
    reference = setup.resize(_nchw(x), size=out_hw, align_corners=False).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(x), out_hw))
    assert ours.shape == (2, *out_hw, 3)
    error = float(np.max(np.abs(ours - reference)))
    print(f"TF1 resize {in_hw} -> {out_hw}: max abs error {error:.2e} (0..255 scale)")
    assert error <= 1e-4


@pytest.mark.parametrize("size", [299, 512])
def test_features_match_torch_fidelity(setup, size):
    images = setup.images[size]
    with torch.no_grad():
        (reference,) = setup.fidelity(_nchw(images))
    ours = setup.feature_fn(images)
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    error = _relative_error(ours, reference.numpy())
    print(f"pool3 {size}²: max |ours - torch-fidelity| / max |ref| = {error:.2e} "
          f"(feature max {float(reference.abs().max()):.2f}, mean {float(reference.mean()):.3f})")
    assert error <= 1e-4
    # The error is also tiny against what tells two photos apart (random-weight features share
    # a large common part, so the scale alone would flatter the comparison).
    spread = float(np.max(np.abs(reference[0] - reference[1]).numpy()))
    assert np.max(np.abs(ours - reference.numpy())) <= 1e-3 * spread


def test_matches_pytorch_fid_blocks_and_its_input_path_is_not_tf(setup):
    images = setup.images[512]
    net_input = np.asarray(inception.preprocess(jnp.asarray(images)))  # TF1 resize, (x-128)/128
    net = setup.pytorch_fid_net
    with torch.no_grad():
        (reference,) = net(_nchw(net_input))
        try:  # pytorch-fid's default InceptionV3(): F.interpolate to 299, then 2x - 1
            net.resize_input = net.normalize_input = True
            (default,) = net(_nchw(images.astype(np.float32) / 255.0))
        finally:
            net.resize_input = net.normalize_input = False
    reference = reference[:, :, 0, 0].numpy()
    ours = setup.feature_fn(images)
    error = _relative_error(ours, reference)
    print(f"pool3 vs pytorch-fid's FID blocks on the same input: {error:.2e}")
    assert error <= 1e-4
    # pytorch-fid's default input path (half-pixel bilinear, 2x - 1) is another function of
    # the image; documented, not followed.
    gap = _relative_error(default[:, :, 0, 0].numpy(), reference)
    print(f"pytorch-fid default input path vs TF path: {gap:.2e}")
    assert gap > 10 * error


def test_converter_and_both_layouts_load_the_same(setup, tmp_path):
    arrays = setup.arrays
    assert len(arrays) == 470 + 2 and "fc.weight" in arrays
    assert not any(name.endswith("num_batches_tracked") for name in arrays)
    assert all(a.dtype == np.float32 for a in arrays.values())
    from_npz = inception.load_inception_params(setup.npz)
    from_pth = inception.load_inception_params(setup.pth)
    # A saved pytorch-fid InceptionV3 module: its blocks.i.j names.
    wrapper_pth = tmp_path / "pytorch_fid_module.pth"
    torch.save(setup.pytorch_fid_net.state_dict(), wrapper_pth)
    assert inception.detect_layout(torch.load(wrapper_pth)) == inception.LAYOUT_PYTORCH_FID_MODULE
    from_wrapper = inception.load_inception_params(wrapper_pth)
    for other in (from_pth, from_wrapper):
        for collection in ("params", "batch_stats"):
            leaves_a = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(from_npz[collection])])
            leaves_b = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(other[collection])])
            assert bool(jnp.array_equal(leaves_a, leaves_b))
    kernel = from_npz["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    assert kernel.shape == (1, 7, 128, 128)  # HWIO from torch's (128, 128, 1, 7)
    np.testing.assert_array_equal(np.asarray(kernel),
                                  setup.state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))


def test_chunking_and_input_checks(setup):
    images = np.concatenate([setup.images[299], setup.images[299][:1]])  # 3 images, batch 2
    features = setup.feature_fn(images)
    np.testing.assert_array_equal(features[2], features[0])  # zero padding does not leak
    np.testing.assert_allclose(features[:2], setup.feature_fn(setup.images[299]), rtol=0, atol=1e-5)
    assert setup.feature_fn(images[:0]).shape == (0, 2048)
    with pytest.raises(TypeError, match="uint8"):
        setup.feature_fn(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        setup.feature_fn(images[..., :1])


def test_weight_errors(setup, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="convert_inception.py.*--output") as info:
        inception.inception_feature_fn(missing)
    assert inception.FID_WEIGHTS_URL in str(info.value)
    # torchvision's ImageNet Inception-v3 has the same names but other weights (1000 classes).
    imagenet = dict(setup.state)
    imagenet["fc.weight"] = torch.zeros(1000, 2048)
    imagenet["fc.bias"] = torch.zeros(1000)
    torch.save(imagenet, tmp_path / "inception_v3_google.pth")
    with pytest.raises(ValueError, match="ImageNet Inception-v3"):
        inception.load_inception_params(tmp_path / "inception_v3_google.pth")
    broken = dict(setup.arrays)
    broken["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight has shape"):
        inception.canonical_state_dict(broken, "x.npz")
    del broken["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="missing 1 tensor"):
        inception.canonical_state_dict(broken, "x.npz")
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        inception.canonical_state_dict({"features.0.weight": np.zeros(3)}, "vgg.pth")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        inception.load_inception_params(tmp_path / "junk.npz")
