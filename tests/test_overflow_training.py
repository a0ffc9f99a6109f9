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
               "render_dropped_fraction": np.array([0.05, 0.05], np.float32)}
    overflow = train.step_overflow(metrics)
    assert overflow == {"render_overflow_max": 100, "render_dropped_fraction": pytest.approx(0.05)}
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
