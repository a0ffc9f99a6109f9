"""The README's quick-start test command is what CI runs, verbatim."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.+?)\n\s*```", section, flags=re.S)


def test_quick_start_has_two_commands():
    commands = [c.strip() for c in quick_start_commands()]
    assert len(commands) == 2, commands
    assert "launch.py --config=configs/demo.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = quick_start_commands()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def python_section_code():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using RETA3D from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert len(blocks) == 1, "the section has one Python example"
    return blocks[0]


def test_the_python_example_runs(tmp_path, monkeypatch):
    """The README's "Using RETA3D from Python" example, verbatim but for the model it loads (a
    random-init tiny generator in place of runs/demo) and the folder it writes to."""
    import numpy as np
    from test_launch import tiny_config
    code = python_section_code()
    trained = 'inference.load_generator(workdir="runs/demo")'
    assert code.count(trained) == 1
    code = code.replace(trained, "inference.load_generator(config=CONFIG, random_init=True)")
    monkeypatch.setenv("RETA3D_COMPILATION_CACHE", "off")   # keep the suite's own cache
    monkeypatch.chdir(tmp_path)
    namespace = {"CONFIG": tiny_config()}
    exec(compile(code, "README.md (Using RETA3D from Python)", "exec"), namespace)
    from PIL import Image
    heads = np.asarray(Image.open(tmp_path / "out" / "heads.png"))
    res = namespace["res"]
    assert heads.shape == (res, 3 * res, 3)
    out = namespace["out"]
    color, alpha = np.asarray(out.color), np.asarray(out.alpha)
    np.testing.assert_array_equal(heads, np.uint8(np.concatenate(list(color), axis=1) * 255 + 0.5))
    # Composited over the training background, white: color = premultiplied + (1 - alpha).
    # (The tiny random-init heads cover the whole image, so that is all a check can see here.)
    assert np.asarray(namespace["background"]).tolist() == [1.0, 1.0, 1.0]
    assert (color >= (1 - alpha)[..., None] - 1e-5).all()
    # The gradients reach every input of the whole path.
    for name in ("d_z", "d_expression", "d_jaw"):
        assert float(np.abs(np.asarray(namespace[name])).max()) > 0, name
