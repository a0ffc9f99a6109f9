"""PyTorch state dict <-> Flax conversion: key/shape coverage of the paper-size listings,
round trips, error reporting, the convert_pytorch.py CLI and the compare_pytorch backend."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from reta3d.networks import convert
from reta3d.networks import stylegan2 as sg

REPO = pathlib.Path(__file__).resolve().parents[1]
REF_DIR = REPO / ".." / "shared" / "pytorch"
PROG = "compare_pytorch.py stylegan2"  # argv[0] as experiments/compare_pytorch.py passes it


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _reference(name):
    path = REF_DIR / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not present")
    return path


def _parse_listing(path):
    """{torch name: shape} from a g_uv256.txt-style listing."""
    shapes = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split()
        shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def small_g_state():
    state, config = convert.load_state_dict_file(str(_reference("sg2_small_G.npz")))
    return state, config


# --------------------------------------------------------------------------------------------
# Paper-size listings: every key converts, nothing missing, shapes right


@pytest.mark.parametrize("listing,module", [
    ("g_uv256.txt", sg.Generator()),
    ("g_mouth64.txt", sg.Generator(c_dim=0, img_resolution=64)),
    ("d512.txt", sg.Discriminator()),
])
def test_listing_converts_without_missing_or_unknown_keys(listing, module):
    shapes = _parse_listing(_reference(listing))
    filt = convert.setup_filter_np((1, 3, 3, 1))
    # Zeros (zero-stride, no memory) for every tensor; the FIR buffers hold their fixed filter,
    # which the converter checks.
    fake = {name: filt if name.endswith("resample_filter")
            else np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    target = convert.abstract_variables(module)
    variables = convert.torch_to_flax(fake, target, source=listing)
    for ours, want in zip(*(jax_leaves(t) for t in (variables, target))):
        assert ours.shape == want.shape
    back = convert.flax_to_torch(variables)
    assert {k: v.shape for k, v in back.items()} == shapes


def jax_leaves(tree):
    import jax  # noqa: PLC0415
    return jax.tree.leaves(tree)


def test_sub_network_conversion_with_prefix(small_g_state):
    state, config = small_g_state
    g = convert.build_module("generator", config)
    full = convert.torch_to_flax(state, g)
    synthesis = sg.SynthesisNetwork(w_dim=64, img_resolution=32, img_channels=14,
                                    channel_base=512, channel_max=64)
    part = convert.torch_to_flax(state, synthesis, prefix="synthesis.")
    for a, b in zip(jax_leaves(part["params"]), jax_leaves(full["params"]["synthesis"])):
        np.testing.assert_array_equal(a, b)
    mapping = convert.build_module("mapping", dict(z_dim=64, c_dim=25, w_dim=64, num_ws=8,
                                                   num_layers=2))
    part = convert.torch_to_flax(state, mapping, prefix="mapping.")
    np.testing.assert_array_equal(part["mapping_state"]["w_avg"], state["mapping.w_avg"])


# --------------------------------------------------------------------------------------------
# Round trip and layouts


def test_round_trip_is_exact(small_g_state):
    state, config = small_g_state
    variables = convert.torch_to_flax(state, convert.build_module("generator", config))
    back = convert.flax_to_torch(variables)
    assert set(back) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_layouts_by_hand(small_g_state):
    state, config = small_g_state
    v = convert.torch_to_flax(state, convert.build_module("generator", config))
    torch_conv = state["synthesis.b8.conv0.weight"]  # (out, in, kh, kw)
    ours = v["params"]["synthesis"]["b8"]["conv0"]["kernel"]  # (kh, kw, in, out)
    assert ours[2, 1, 5, 7] == torch_conv[7, 5, 2, 1]
    ours_fc = v["params"]["mapping"]["fc1"]["kernel"]  # (in, out)
    assert ours_fc[3, 9] == state["mapping.fc1.weight"][9, 3]
    const = v["params"]["synthesis"]["b4"]["const"]  # (4, 4, C)
    assert const[1, 2, 30] == state["synthesis.b4.const"][30, 1, 2]


# --------------------------------------------------------------------------------------------
# Errors


def test_mismatches_are_all_listed(small_g_state):
    state, config = small_g_state
    module = convert.build_module("generator", config)
    bad = dict(state)
    bad["synthesis.b8.conv9.weight"] = np.zeros((1,), np.float32)
    del bad["mapping.fc1.bias"]
    del bad["synthesis.b16.resample_filter"]
    bad["synthesis.b8.conv1.weight"] = np.zeros((3, 3), np.float32)
    bad["synthesis.b4.conv1.resample_filter"] = np.ones((4, 4), np.float32)
    bad["synthesis.b4.torgb.bias"] = np.full((14,), np.nan, np.float32)
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.torch_to_flax(bad, module, source="G.pt")
    message = str(info.value)
    for expected in ("G.pt", "unknown key(s): synthesis.b8.conv9.weight",
                     "missing key(s)", "mapping.fc1.bias [64]",
                     "synthesis.b16.resample_filter", "shape mismatch",
                     "synthesis.b8.conv1.weight: got [3, 3], expected [64, 64, 3, 3]",
                     "wrong resample_filter", "synthesis.b4.conv1.resample_filter",
                     "NaN/Inf: synthesis.b4.torgb.bias"):
        assert expected in message, (expected, message)


def test_bad_files_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        convert.load_state_dict_file(str(tmp_path / "nope.npz"))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.npz"):
        convert.load_state_dict_file(str(corrupt))
    not_state = tmp_path / "list.pt"
    import torch  # noqa: PLC0415 - test-only dependency
    torch.save([1, 2, 3], not_state)
    with pytest.raises(ValueError, match="state dict"):
        convert.load_state_dict_file(str(not_state))
    with pytest.raises(ValueError, match="unknown field"):
        convert.build_module("generator", {"img_resolutoin": 64})
    with pytest.raises(ValueError, match="architecture"):
        convert.build_module("discriminator", {"architecture": "skip"})
    with pytest.raises(ValueError, match="channels"):
        convert.build_module("generator", {"channel_base": 512, "channel_max": 64,
                                           "img_resolution": 32, "channels": {"4": 32}})


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_converts_pt_and_npz(tmp_path, small_g_state):
    import torch  # noqa: PLC0415
    cli = _load_script("convert_pytorch")
    state, config = small_g_state
    pt = tmp_path / "G.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, pt)
    cfg = {k: config[k] for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels",
                                  "channel_base", "channel_max", "mapping_layers")}
    cli.convert_file(str(pt), "generator", str(tmp_path / "from_pt"), config=cfg)
    module, restored = convert.load_converted(str(tmp_path / "from_pt"))
    assert isinstance(module, sg.Generator) and module.img_resolution == 32
    expected = convert.torch_to_flax(state, convert.build_module("generator", config))
    for a, b in zip(jax_leaves(restored), jax_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # An .npz with a config needs no constructor arguments; a sub-network can be taken out.
    cli.convert_file(str(_reference("sg2_small_G.npz")), "synthesis", str(tmp_path / "syn"))
    module, restored = convert.load_converted(str(tmp_path / "syn"))
    assert isinstance(module, sg.SynthesisNetwork)
    np.testing.assert_array_equal(
        np.asarray(restored["buffers"]["b16"]["conv0"]["noise_const"]),
        state["synthesis.b16.conv0.noise_const"])
    with pytest.raises(ValueError, match="not a discriminator"):
        cli.convert_file(str(_reference("sg2_small_G.npz")), "discriminator",
                         str(tmp_path / "x"))
    with pytest.raises(convert.StateDictMismatchError, match="missing key"):
        cli.convert_file(str(pt), "generator", str(tmp_path / "y"),
                         config={**cfg, "mapping_layers": 3})


def test_cli_help_runs():
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "convert_pytorch.py"),
                             "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    # absl's --help prints the flags and exits with status 1 by design.
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr
    assert "--input" in result.stdout and "--kind" in result.stdout


# --------------------------------------------------------------------------------------------
# compare_pytorch.py stylegan2 backend


def test_compare_main_ops_pass_and_tolerance_flag():
    compare = _load_script("_compare_stylegan2")
    assert compare.main([PROG, "--reference", str(_reference("sg2_ops.npz"))]) == 0
    # A tolerance far below float32 rounding must fail.
    assert compare.main([PROG, "--reference", str(_reference("sg2_ops.npz")),
                         "--tolerance_scale", "1e-6"]) == 1


def test_compare_main_detects_wrong_outputs_and_bad_files(tmp_path, capsys):
    compare = _load_script("_compare_stylegan2")
    src = _reference("sg2_small_D.npz")
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["logits"] = arrays["logits"] + 1e-2  # a wrong reference output must be caught
    tampered = tmp_path / "renamed_anything.npz"
    np.savez(tampered, **arrays)
    assert compare.main([PROG, "--reference", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "logits" in out and "FAIL" in out and "dbg_b8_x" in out
    assert compare.main([PROG, "--reference", str(tmp_path / "missing.npz")]) == 2
    broken = dict(arrays)
    del broken["b4.fc.weight"]
    np.savez(tmp_path / "broken.npz", **broken)
    assert compare.main([PROG, "--reference", str(tmp_path / "broken.npz")]) == 2
    assert "b4.fc.weight" in capsys.readouterr().err
    assert compare.main([PROG, "--reference", str(src), "--tolerance_scale", "0"]) == 2
