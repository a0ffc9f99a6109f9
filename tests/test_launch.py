"""The main job end to end on a micro config: data → train → metrics/samples/checkpoint → resume."""
import json
import subprocess
import sys

import pytest

from reta3d import train
from test_train import tiny_config


def micro_config(tmp_path):
    c = tiny_config()
    c.data.path = str(tmp_path / "data")
    c.data.synthetic = True
    c.data.synthetic_num_images = 8
    c.data.synthetic_uv_resolution = 32
    c.train.total_kimg = 0.008       # 2 steps of 4
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.train.sample_every = 2
    c.train.swd_num_images = 8
    return c


def test_train_and_evaluate_then_resume_does_nothing(tmp_path, capsys):
    config = micro_config(tmp_path)
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(config, str(workdir))
    assert result["step"] == 2
    assert result["swd_start"] > 0 and result["swd_end"] > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "swd" in r] == [0, 2]
    assert {1, 2} <= {r["step"] for r in records if "g_total" in r}
    assert (workdir / "samples_0000000.png").is_file() and (workdir / "samples_0000002.png").is_file()
    assert (workdir / "config.json").is_file()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "2"
    capsys.readouterr()
    again = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "already finished" in out
    assert again["swd_end"] == pytest.approx(result["swd_end"])
    # Nothing was trained again: no new metrics lines.
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_launch_help():
    proc = subprocess.run([sys.executable, "launch.py", "--help"], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode in (0, 1)
    assert "--workdir" in proc.stdout + proc.stderr
