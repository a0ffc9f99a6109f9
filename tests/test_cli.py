"""The scripts' shared command-line plumbing (reta3d/cli.py) and every script's --help."""
import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from reta3d import cli, errors, inference

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_parse_seeds_and_lists():
    assert cli.parse_seeds("0-3,7,2,10-11") == [0, 1, 2, 3, 7, 10, 11]
    for bad in ("", "a", "3-1", "-2"):
        with pytest.raises(ValueError):
            cli.parse_seeds(bad)
    assert cli.parse_floats("0.5, -1,2", "x") == [0.5, -1.0, 2.0]
    assert cli.parse_floats(None, "x") == [] and cli.parse_floats(" ", "x") == []
    with pytest.raises(ValueError, match="--expression"):
        cli.parse_floats("1,nan", "--expression")
    assert cli.parse_expression_components("smile=1, blink=7") == {"smile": 1, "blink": 7}
    with pytest.raises(ValueError, match="expected name=index"):
        cli.parse_expression_components("smile:1")
    z = inference.latents_for_seeds([4, 4, 5], 8)
    np.testing.assert_array_equal(z[0], z[1])
    np.testing.assert_array_equal(z[0], np.random.RandomState(4).randn(8).astype(np.float32))


def test_print_json_prints_before_writing_so_a_bad_path_loses_nothing(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.InputError, match="cannot write .*the JSON above is the result"):
        cli.print_json({"fps": 1.5}, out=tmp_path / "file" / "result.json")
    assert json.loads(capsys.readouterr().out) == {"fps": 1.5}


def test_unreadable_weights_file_is_an_input_error(tmp_path):
    from reta3d.networks import convert
    (tmp_path / "weights.pth").write_text("not a pickle")
    with pytest.raises(errors.InputError, match="weights.pth: not a PyTorch state dict") as info:
        convert.load_state_dict_file(tmp_path / "weights.pth")
    assert "weights_only=False" not in str(info.value)   # torch's unsafe advice is not passed on


def test_overflow_report_and_warning_line():
    # Two frames of three images; capacity 1000: image (1, 2) needed 1000 + 250 slots.
    report = inference.overflow_report(np.array([[0, 10, 0], [0, 0, 250]]), 1000)
    assert report == {"capacity": 1000, "images": 6, "images_with_overflow": 2,
                      "dropped_tile_intersections": 260, "max_dropped_fraction": 250 / 1250,
                      "capacity_needed": 1250}
    stream = io.StringIO()
    line = cli.warn_overflow(report, "dri", file=stream)
    assert stream.getvalue() == line + "\n" and "\n" not in line
    assert line.startswith("warning: rasterizer capacity overflow in dri: 260 tile "
                           "intersections dropped in 2 of 6 images")
    assert "20.00%" in line and "--capacity=1250" in line and "(now 1000)" in line
    clean = inference.overflow_report(np.zeros((4,), np.int32), 64)
    assert clean["dropped_tile_intersections"] == 0 and clean["max_dropped_fraction"] == 0.0
    assert cli.warn_overflow(clean, file=stream) is None
    assert stream.getvalue().count("\n") == 1


# Each script's own flags and the shared ones (reta3d/cli.py) that its --help must list.
SCRIPT_FLAGS = {
    "sample": ("workdir", "config", "random_init", "init_seed", "psi", "resolution", "backend",
               "capacity", "out", "seeds", "orbit_frames", "expression", "jaw"),
    "animate": ("workdir", "config", "random_init", "psi", "capacity", "out",
                "flame_sequence", "frames", "camera", "realtime", "seeds"),
    "export_ply": ("workdir", "config", "random_init", "psi", "out", "frame", "sh_degree",
                   "flame_sequence"),
    "benchmark": ("workdir", "config", "random_init", "capacity", "repeats", "warmup", "out",
                  "identities", "frames", "throughput", "batch"),
    "benchmark_head": ("flame_model", "flame_uv", "repeats", "warmup", "batch_sizes"),
    "benchmark_networks": ("flame_model", "flame_uv", "repeats", "warmup", "dtypes"),
    "benchmark_rasterizer": ("repeats", "warmup", "capacity", "num_gaussians"),
    "benchmark_train": ("repeats", "warmup", "configs"),
    "render_head": ("flame_model", "flame_uv", "out", "image_size"),
    "alpha_coverage": ("workdir", "config", "random_init", "num", "seed", "overlay",
                       "overlay_scale"),
}


def test_every_script_lists_its_flags_in_help():
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "experiments" / f"{name}.py"),
                                     "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
             for name in SCRIPT_FLAGS}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=180)
        text = out.decode()
        assert proc.returncode in (0, 1), text
        # The flag listing (not the docstring's examples): "  --name: help" or "--[no]name".
        listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", text, flags=re.M))
        missing = [f for f in SCRIPT_FLAGS[name] if f not in listed]
        assert not missing, f"{name}.py --help does not list {missing}:\n{text}"


@pytest.mark.parametrize("script, flags, message", [
    ("animate.py", ["--workdir={tmp}", "--flame_sequence=my_sequence.npz"],
     "usage error: --flame_sequence: FLAME sequence file not found: my_sequence.npz. A sequence "
     ".npz comes from"),
    ("evaluate.py", ["--workdir={tmp}", "--metrics=swd,SWD,foo"],
     "--metrics: unknown SWD, foo; choose from"),
    ("evaluate.py", ["--workdir={tmp}", "--metrics=fid,kid"],
     "error: nothing to measure: FID/KID need the FID Inception-v3 weights"),
    ("track_video.py", ["--video=README.md", "--out={tmp}/a.npz", "--overlay={tmp}/a.avi"],
     "error: --overlay must end in .mp4 or .gif, got {tmp}/a.avi"),
    ("reenact.py", ["--workdir={tmp}", "--video=README.md", "--out={tmp}/r.avi"],
     "error: --out must end in .mp4 or .gif, got {tmp}/r.avi"),
    ("reenact.py", ["--workdir={tmp}", "--video=README.md", "--seeds=3-1"],
     "error: --seeds=3-1: the range '3-1' ends before it starts (write 1-3)"),
    ("sample.py", ["--workdir={tmp}"],
     "error: {tmp}/config.json not found: {tmp} is not a training workdir"),
    ("sample.py", [],
     "usage error: pass --workdir=RUN (a trained model) or --config=FILE --random_init (random "
     "weights), got neither"),
    ("alpha_coverage.py", ["--config=configs/demo.py"],
     "usage error: --config alone has no trained weights: add --random_init"),
    ("alpha_coverage.py", ["--workdir={tmp}", "--overlay={tmp}"],
     "error: --overlay {tmp} is a folder: give a file name"),
    ("alpha_coverage.py", ["--workdir={tmp}", "--num=0"],
     "usage error: flag --num=0: 0 is not a positive integer"),
    ("preprocess.py", ["--images={tmp}/photos", "--out={tmp}/data"],
     "usage error: --images: no such folder: {tmp}/photos"),
    ("../launch.py", ["--config=configs/demo.py", "--workdir={tmp}/run",
                      "--config.train.batch_sise=8"],
     "usage error: unknown --config field 'batch_sise' Did you mean \"batch_size\""),
    ("export_ply.py", ["--workdir={tmp}", "--seed=0.5"],
     "usage error: flag --seed=0.5: invalid literal for int()"),
    ("invert.py", ["--workdir={tmp}", "--image={tmp}/grey.png", "--out={tmp}/inverted"],
     "error: no face: {tmp}/grey.png: dlib's face detector found no face in it"),
])
def test_bad_flags_are_one_line_errors_before_the_model_loads(tmp_path, script, flags, message):
    """Usage and input errors (reta3d.cli.run): the message last, on one line, without the
    script's docstring or a traceback, before anything slow (the workdir has no checkpoint: had
    the model been loaded first, that would be the error)."""
    from PIL import Image
    Image.new("RGB", (256, 256), (128, 128, 128)).save(tmp_path / "grey.png")   # no face
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / script)]
        + [f.format(tmp=tmp_path) for f in flags], capture_output=True, text=True, cwd=REPO,
        timeout=120)
    lines = result.stderr.strip().splitlines()
    said = [line for line in lines if line.startswith(("usage error: ", "error: "))]
    assert result.returncode == 1 and said and message.format(tmp=tmp_path) in said[-1], \
        result.stderr[-2000:]
    assert "Traceback (most recent call last)" not in result.stderr
    assert "Try --helpfull" not in result.stderr and "flags:" not in result.stderr
    assert lines.index(said[-1]) >= len(lines) - 2   # last, or before the --help pointer
