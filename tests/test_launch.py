"""The main job end to end: data → train → metrics/samples/checkpoints → resume, on a run small
enough for CI that still demonstrably learns (SWD falls to at most 0.7× its start).

`learning_config`: the demo's networks (configs/demo.py: z 64, 2 mapping layers, channel_max 32,
D channel_max 64) over a 32² UV map and a 16² mouth patch, rendering 32² images, batch 8,
40 steps on 64 embedded synthetic images. Measured on the 2-core development machine
(2026-11-25, three seeds): SWD (64 images, ×1e3) fell from 494..542 at step 0 to 0.17..0.23 of
that at step 40 (to 0.17..0.18 at step 160). The networks of `test_train.tiny_config`
(channel_max 8) do not learn in that budget: their SWD ratio after 160 steps was 0.53, 1.00
and 0.99 for three seeds (0.70 and 0.72 with 4× the learning rates).
"""
import json
import math
import subprocess
import sys

import pytest

from reta3d import train
from test_train import tiny_config

LEARNING_STEPS = 40
SWD_RATIO_MAX = 0.7


def micro_config(tmp_path):
    """A 2-step run of the tiny networks (other tests build on it: it trains in seconds)."""
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


def learning_config(tmp_path, seed=0):
    """The demo's networks at 32², 40 steps of 8 on 64 synthetic images (see the module
    docstring for what it measured)."""
    c = tiny_config()
    c.seed = seed
    c.data.path = str(tmp_path / "data")
    c.data.synthetic = True
    c.data.synthetic_num_images = 64
    c.data.synthetic_uv_resolution = 32
    m = c.model
    m.z_dim = m.w_dim = 64
    m.mapping_layers = 2
    m.uv_resolution, m.mouth_resolution = 32, 16
    m.channel_base, m.channel_max = 512, 32
    m.mouth_channel_base, m.mouth_channel_max = 256, 32
    m.gd_channels = 8
    c.disc.channel_base, c.disc.channel_max = 1024, 64
    c.optim.eps = 1e-8               # the paper's (tiny_config's 1e-2 serves its pmap checks)
    c.train.batch_size = 8
    c.train.total_kimg = LEARNING_STEPS * 8 / 1000
    c.train.log_every = 10
    c.train.checkpoint_every = LEARNING_STEPS // 2
    c.train.sample_every = LEARNING_STEPS
    c.train.swd_every = 10**9        # at the start and at the end only
    c.train.swd_num_images = 64
    return c


@pytest.mark.slow
def test_train_learns_then_resume_does_nothing(tmp_path, capsys):
    config = learning_config(tmp_path)
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(config, str(workdir))
    assert result["step"] == LEARNING_STEPS
    # It learned: the generated images moved towards the data, not merely ran.
    assert 0 < result["swd_end"] <= SWD_RATIO_MAX * result["swd_start"], result
    assert result["swd_ratio"] == pytest.approx(result["swd_end"] / result["swd_start"])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    swd = {r["step"]: r["swd"] for r in records if "swd" in r}
    assert sorted(swd) == [0, LEARNING_STEPS]
    assert swd[0] == pytest.approx(result["swd_start"]) and swd[LEARNING_STEPS] == pytest.approx(
        result["swd_end"])
    logged = [r for r in records if "g_total" in r]
    assert [r["step"] for r in logged] == [1, 10, 20, 30, 40]
    for r in logged:
        assert all(math.isfinite(r[k]) for k in ("g_total", "g_adversarial", "d_loss")), r
    assert (workdir / "samples_0000000.png").is_file()
    assert (workdir / f"samples_{LEARNING_STEPS:07d}.png").is_file()
    assert (workdir / "config.json").is_file()
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [LEARNING_STEPS // 2, LEARNING_STEPS]
    capsys.readouterr()
    events = sorted((workdir / "tensorboard").iterdir())
    assert events
    again = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "already finished" in out
    assert again == pytest.approx(result)          # step, SWD at both ends, and their ratio
    assert sorted((workdir / "tensorboard").iterdir()) == events   # no empty events file
    # Nothing was trained again: no new metrics lines.
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_launch_help():
    proc = subprocess.run([sys.executable, "launch.py", "--help"], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode in (0, 1)
    assert "--workdir" in proc.stdout + proc.stderr
