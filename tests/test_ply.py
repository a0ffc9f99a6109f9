""".ply export (reta3d/ply.py): the 3DGS layout, the header that SIBR-style loaders parse at
fixed line positions, and the world frame the exporter documents."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rasterizer.types import Camera, Gaussians, look_at_eg3d_label
from reta3d import errors, flame, ply

SH_C0 = 0.28209479177387814   # Y_0^0 = 1 / (2 sqrt(pi))


def _random_gaussians(n, seed=0):
    rng = np.random.default_rng(seed)
    return Gaussians(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        scales=np.exp(rng.normal(-5, 1, size=(n, 3))).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        opacities=rng.uniform(0.01, 0.99, size=n).astype(np.float32),
        colors=rng.uniform(0, 1, size=(n, 3)).astype(np.float32))


def sibr_load_ply(path, sh_degree):
    """The reference viewer's loader, line for line: SIBR `loadPly<D>`
    (src/projects/gaussianviewer/renderer/GaussianView.cpp), which many viewers copied:

        std::getline(infile, buff); std::getline(infile, buff);      // 'ply', the format
        std::getline(infile, buff); std::stringstream ss(buff);      // line 3
        ss >> dummy >> dummy >> count;                               // "element vertex N"
        while (std::getline(infile, buff)) if (buff.compare("end_header") == 0) break;
        infile.read((char*)points.data(), count * sizeof(RichPoint<D>));

    RichPoint<D> = float pos[3], n[3], shs[3 (D+1)^2], opacity, scale[3], rot[4]. A token that
    is not an integer fails `>> count` and leaves 0 (C++11). → (count, (count, floats) float32).
    """
    with open(path, "rb") as f:
        f.readline()
        f.readline()
        tokens = f.readline().decode("ascii", "replace").split()
        match = re.match(r"[+-]?\d+", tokens[2]) if len(tokens) > 2 else None
        count = int(match.group()) if match else 0
        while True:
            line = f.readline()
            if not line or line[:-1] == b"end_header":   # getline strips only '\n'
                break
        floats = 3 + 3 + 3 * (sh_degree + 1) ** 2 + 1 + 3 + 4
        data = f.read(count * floats * 4)
    return count, np.frombuffer(data, "<f4").reshape(-1, floats)


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_sibr_loader_reads_every_gaussian(tmp_path, sh_degree):
    gaussians = _random_gaussians(37, seed=sh_degree)
    path = ply.write_ply(tmp_path / "head.ply", gaussians, sh_degree=sh_degree)
    count, points = sibr_load_ply(path, sh_degree)
    assert count == 37 and points.shape[0] == 37
    sh = 3 * (sh_degree + 1) ** 2
    np.testing.assert_array_equal(points[:, 0:3], gaussians.means)
    np.testing.assert_array_equal(points[:, 3:6], 0.0)                      # normals
    np.testing.assert_allclose(points[:, 6:9], (gaussians.colors - 0.5) / SH_C0, rtol=1e-5,
                               atol=1e-6)                                   # f_dc
    np.testing.assert_array_equal(points[:, 9:6 + sh], 0.0)                 # f_rest
    o = gaussians.opacities.astype(np.float64)
    np.testing.assert_allclose(points[:, 6 + sh], np.log(o / (1 - o)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(points[:, 7 + sh:10 + sh], np.log(gaussians.scales), rtol=1e-6)
    np.testing.assert_array_equal(points[:, 10 + sh:14 + sh], gaussians.quats)


def test_sibr_loader_emulation_sees_a_comment_on_line_3_as_zero_gaussians(tmp_path):
    # The header this project wrote before: the loader reads "comment RETA3D Gaussians" as
    # the count line and loads nothing. Guards the emulation above against being lenient.
    good = ply.write_ply(tmp_path / "good.ply", _random_gaussians(5)).read_bytes()
    lines = good.split(b"\n")
    lines[2], lines[3] = lines[3], lines[2]
    (tmp_path / "old.ply").write_bytes(b"\n".join(lines))
    assert sibr_load_ply(tmp_path / "old.ply", 0)[0] == 0
    assert ply.read_ply(tmp_path / "old.ply").means.shape == (5, 3)   # a full parser copes


def test_header_is_the_reference_save_ply_header(tmp_path):
    path = ply.write_ply(tmp_path / "head.ply", _random_gaussians(3))
    header = path.read_bytes().split(b"end_header\n")[0].decode("ascii")
    lines = header.splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 3"]
    assert lines[3].startswith("comment ") and "EG3D world" in lines[3]
    assert all(line.startswith("property float ") for line in lines[4:])
    assert b"\r" not in header.encode()
    assert ply.header_lines(3) == lines + ["end_header"]


def test_ply_roundtrip_and_3dgs_layout(tmp_path):
    gaussians = _random_gaussians(50)
    path = ply.write_ply(tmp_path / "head.ply", gaussians)
    back = ply.read_ply(path)
    for name in ("means", "quats"):
        np.testing.assert_array_equal(getattr(back, name), getattr(gaussians, name))
    for name in ("scales", "opacities", "colors"):
        np.testing.assert_allclose(getattr(back, name), getattr(gaussians, name), rtol=2e-6, atol=1e-6)

    # Independent parse: the header text and the raw stored (pre-activation) values.
    data = path.read_bytes()
    header, body = data.split(b"end_header\n")
    lines = header.decode().splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 50"]
    names = [line.split()[2] for line in lines if line.startswith("property float")]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    raw = np.frombuffer(body, dtype=np.dtype([(n, "<f4") for n in names]))
    assert raw.shape == (50,)
    o = gaussians.opacities.astype(np.float64)
    np.testing.assert_allclose(raw["opacity"], np.log(o / (1 - o)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw["scale_1"], np.log(gaussians.scales[:, 1]), rtol=1e-6)
    np.testing.assert_allclose(raw["f_dc_2"], (gaussians.colors[:, 2] - 0.5) / SH_C0,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(raw["rot_0"], gaussians.quats[:, 0])    # w first
    np.testing.assert_array_equal(raw["nx"], 0.0)


def test_ply_sh_degree_3_and_batch_of_one(tmp_path):
    gaussians = _random_gaussians(5)
    batched = jax.tree_util.tree_map(lambda x: x[None], gaussians)
    path = ply.write_ply(tmp_path / "sh3.ply", batched, sh_degree=3)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert header.count("property float f_rest_") == 45
    np.testing.assert_array_equal(ply.read_ply(path).means, gaussians.means)


def test_ply_errors(tmp_path):
    gaussians = _random_gaussians(4)
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        ply.read_ply(tmp_path / "nope.ply")
    with pytest.raises(errors.InputError, match="must end in .ply, got .*head.obj"):
        ply.write_ply(tmp_path / "head.obj", gaussians)
    assert not (tmp_path / "head.obj").exists()
    path = ply.write_ply(tmp_path / "ok.ply", gaussians)
    (tmp_path / "cut.ply").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(errors.InputError, match="cut.ply: truncated"):
        ply.read_ply(tmp_path / "cut.ply")
    (tmp_path / "ascii.ply").write_bytes(path.read_bytes().replace(b"binary_little_endian", b"ascii"))
    with pytest.raises(ValueError, match="ascii.ply: PLY format 'ascii'"):
        ply.read_ply(tmp_path / "ascii.ply")
    renamed = path.read_bytes().replace(b"property float opacity", b"property float alpha")
    (tmp_path / "noop.ply").write_bytes(renamed)
    with pytest.raises(errors.InputError, match=r"missing 3DGS properties \['opacity'\]"):
        ply.read_ply(tmp_path / "noop.ply")
    two = jax.tree_util.tree_map(lambda x: np.stack([x, x]), gaussians)
    with pytest.raises(ValueError, match="batch of 2"):
        ply.write_ply(tmp_path / "two.ply", two)
    bad = Gaussians(gaussians.means.copy(), gaussians.scales, gaussians.quats,
                    gaussians.opacities, gaussians.colors)
    bad.means[0, 0] = np.nan
    with pytest.raises(ValueError, match="means has non-finite"):
        ply.write_ply(tmp_path / "nan.ply", bad)


def test_documented_export_frame():
    """The frame reta3d/ply.py documents: EG3D world, y up, the face towards +z, the subject's
    left at +x, the frontal camera on +z looking along −z with image-up = +y."""
    label = look_at_eg3d_label(0.0, 0.0)
    cam2world = label[:16].reshape(4, 4).astype(np.float64)
    np.testing.assert_allclose(cam2world[:2, 3], 0.0, atol=1e-6)        # on the z axis,
    assert 2.5 < cam2world[2, 3] < 3.0                                   # at +2.7 (±0.2)
    np.testing.assert_allclose(cam2world[:3, 2], [0, 0, -1], atol=1e-6)  # looking along −z
    np.testing.assert_allclose(cam2world[:3, 1], [0, -1, 0], atol=1e-6)  # image down = −y
    np.testing.assert_allclose(cam2world[:3, 0], [1, 0, 0], atol=1e-6)   # image right = +x

    camera = Camera.from_eg3d(jnp.asarray(label), 256)

    def pixel(point):
        cam = np.asarray(camera.world_to_camera, np.float64) @ np.append(point, 1.0)
        uvw = np.asarray(camera.intrinsics, np.float64) @ cam[:3]
        return uvw[:2] / uvw[2]                                          # (column, row)

    assert pixel([0, 0.1, 0.2])[1] < pixel([0, -0.1, 0.2])[1]           # +y is up in the image
    assert pixel([0.1, 0, 0.2])[0] > pixel([-0.1, 0, 0.2])[0]           # +x is right
    np.testing.assert_allclose(pixel([0, 0, 0.2]), [128, 128], atol=1e-3)   # look-at: centre
    fov = 2 * np.degrees(np.arctan(0.5 / label[16]))
    assert abs(fov - 13.4) < 0.05

    model = flame.load()
    zeros = {"shape": np.zeros((1, 1), np.float32)}
    vertices, joints = model.forward(**zeros, return_joints=True)
    world = np.asarray(model.to_world(vertices))[0]
    joints = np.asarray(model.to_world(joints))[0]
    nose = world[np.argmax(world[:, 2])]                 # the frontmost point: the nose tip
    assert abs(nose[0]) < 0.01 and abs(nose[2] - 0.2) < 0.05, nose
    assert abs(nose[1]) < 0.05, nose                     # near the frontal view's centre
    left_eye, right_eye = joints[3], joints[4]
    assert left_eye[0] > 0.05 and right_eye[0] < -0.05   # the subject's left at +x
    assert left_eye[2] > joints[1][2]                    # eyes in front of the neck joint
    assert left_eye[1] > joints[1][1] and left_eye[1] > joints[2][1]   # above neck and jaw: y up
