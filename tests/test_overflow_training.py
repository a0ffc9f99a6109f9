"""Rasterizer overflow during training is measured, logged, warned about and fixed."""
import json

import pytest

from reta3d import train
from test_launch import micro_config


def test_grown_capacity_buckets():
    assert train.grown_capacity(1024, 100, 10_000, 64) == 2048          # 1.25 * 1124 -> 2048
    assert train.grown_capacity(4096, 4000, 10_000, 64) == 16384        # 1.25 * 8096 -> 16384
    assert train.grown_capacity(4096, 10**6, 100, 64) == 100 * 16       # N * tiles at most


@pytest.mark.slow
def test_overflowing_run_logs_warns_and_grows_the_capacity(tmp_path, capsys):
    config = micro_config(tmp_path)
    config.render.capacity = 64        # far below what 32² renders of the head need
    config.train.total_kimg = 0.012    # 3 steps of 4
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert "warning: rasterizer overflow at step 1" in out
    assert "capacity 64 ->" in out
    # Step 2 was dispatched before step 1's overflow was read: it still ran with capacity 64,
    # and its overflow is measured against that, without a second recompilation.
    second = [line for line in out.splitlines() if "overflow at step 2" in line]
    assert len(second) == 1 and "over capacity 64)" in second[0], out
    assert "recompiling" not in second[0] and "already" in second[0], second
    assert out.count("recompiling") == 1, out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if r.get("step") == 1 and "g_total" in r][0]
    assert 0.0 < first["render_dropped_fraction"] < 1.0
    assert first["render_overflow_max"] > 0
    grown = [r for r in records if "render_capacity" in r]
    assert grown and grown[0]["render_capacity"] > 64
    # After growing, the later steps render everything.
    last = [r for r in records if r.get("step") == 3 and "g_total" in r][0]
    assert last["render_dropped_fraction"] == 0.0 and last["render_overflow_max"] == 0
    assert config.render.capacity == grown[-1]["render_capacity"]


def test_step_overflow_and_the_capacity_training_would_grow_to():
    import numpy as np
    from test_launch import tiny_config
    config = tiny_config()
    config.render.capacity = 1024
    metrics = {"render_overflow_max": np.array([100, 100]),
               "render_dropped_fraction": np.array([0.05, 0.05], np.float32),
               "render_intersections_max": np.array([1124, 1124])}
    overflow = train.step_overflow(metrics)
    assert overflow == {"render_overflow_max": 100, "render_dropped_fraction": pytest.approx(0.05),
                        "render_intersections_max": 1124}
    assert train.capacity_after(config, 10_000, overflow) == 2048
    assert train.capacity_after(config, 10_000, dict(overflow, render_overflow_max=0)) is None
    assert train.capacity_after(config, 10_000, overflow, limit=1500) == 1500
    assert train.capacity_after(config, 10_000, overflow, limit=1024) is None   # at the limit
    config.render.capacity = 64 * 16        # every Gaussian in every tile: nothing to grow
    assert train.capacity_after(config, 64, overflow) is None


@pytest.mark.slow
def test_benchmark_warm_up_grows_the_capacity_before_timing():
    """experiments/benchmark_train.py (and the GPU suite) time what training runs: a warm-up
    whose renders overflow grows the capacity, and the step after it renders everything."""
    import jax
    import numpy as np
    from test_launch import tiny_config
    config = tiny_config()
    config.render.capacity = 64        # far below what the head needs
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    state = train.replicate(train.create_train_state(config, generator, discriminator,
                                                     jax.random.PRNGKey(0)))
    n = jax.local_device_count()
    batch = train.random_batch(config, n, config.train.batch_size // n,
                               np.random.default_rng(0))
    steps, state, overflow = train.warm_up_steps(config, generator, discriminator, None, state,
                                                 batch, warmup=1)
    assert config.render.capacity > 64 and overflow["render_overflow_max"] == 0
    _, metrics = steps["g_step"](state, *train.phase_args(batch, n)["g_step"])
    assert train.step_overflow(metrics)["render_overflow_max"] == 0


def test_shrunk_capacity_keeps_a_margin_and_the_floor():
    # needed 300 -> bucket 512 (>= 1.25 * 300); shrinks only to a quarter or less.
    assert train.shrunk_capacity(4096, 300, 64, 10_000, 64) == 512
    assert train.shrunk_capacity(2048, 300, 64, 10_000, 64) == 512      # 4 * 512 <= 2048
    assert train.shrunk_capacity(1024, 300, 64, 10_000, 64) is None
    assert train.shrunk_capacity(1 << 20, 300, 4096, 10_000, 64) == 4096  # never below the floor
    assert train.capacity_bucket(300, 10_000, 64) == 512 == train.grown_capacity(100, 200, 10_000, 64)


@pytest.mark.slow
def test_a_grown_capacity_shrinks_when_the_renders_need_far_less(tmp_path, capsys, monkeypatch):
    """A capacity grown far past what the renders need (the paper config's random-init first
    steps grow it to N·tiles, 128 times the default; here the growth is made 8 times N·tiles)
    comes back down once a window of steps needed far less, and nothing is dropped after it."""
    config = micro_config(tmp_path)
    config.render.capacity = 64
    config.train.total_kimg = 0.016    # 4 steps of 4
    monkeypatch.setattr(train, "SHRINK_WINDOW_STEPS", 1)
    monkeypatch.setattr(train, "grown_capacity", lambda c, o, n, r: 8 * n * 4)  # 4 tiles at 32²
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    grown = [line for line in out.splitlines() if "capacity 64 ->" in line]
    shrunk = [line for line in out.splitlines() if line.startswith("rasterizer capacity ")]
    assert grown and shrunk, out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    capacities = [r["render_capacity"] for r in records if "render_capacity" in r]
    assert capacities[0] > capacities[-1] >= 64, capacities
    needed = max(r["render_intersections_max"] for r in records if "render_intersections_max" in r)
    assert capacities[-1] >= needed     # what it shrank to holds every image seen
    last = [r for r in records if r.get("step") == 4 and "g_total" in r][0]
    assert last["render_overflow_max"] == 0
