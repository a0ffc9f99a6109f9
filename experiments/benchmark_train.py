"""Training throughput: images/s per device for the compiled train step (issue 5 §9).

  python experiments/benchmark_train.py --configs=demo            # quick, CPU
  python experiments/benchmark_train.py --configs=demo,ffhq512    # paper size (GPU)

One iteration = G step + D step + (1/r1_interval of) the R1 step, on random in-memory batches
shaped like the dataset's, after warm-up; median over repeats, with block_until_ready. Prints
one JSON object per config. As in training, a warm-up whose renders drop tile intersections
grows the rasterizer's capacity (and recompiles) before timing: `render_capacity_start` ->
`render_capacity`, at most `render_capacity_limit` (train.BENCHMARK_CAPACITY_GROWTH times the
start); `render_dropped_fraction` / `render_overflow_max` are the timed G steps' worst (0 when
the timed step rendered everything).
"""
import importlib
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli  # noqa: E402

cli.define_timing_flags(repeats=5, warmup=2)
flags.DEFINE_list("configs", ["demo"], "Config modules under configs/ (demo, ffhq256, ffhq512).")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
flags.DEFINE_string("backend", None, "Rasterizer backend override (jax | triton | auto).")
FLAGS = flags.FLAGS


def measure(name, repeats=5, warmup=2, batch_size=None, backend=None):
    """The JSON object of configs/NAME.py."""
    import jax
    import numpy as np
    from reta3d import train
    config = importlib.import_module(f"configs.{name}").get_config()
    if batch_size:
        config.train.batch_size = batch_size
    if backend:
        config.render.backend = backend
    if config.loss.lambda_id > 0 and config.loss.vgg16 != "random" and \
            not pathlib.Path(config.loss.vgg16).is_file():
        config.loss.vgg16 = "random"  # same cost as the pretrained weights
    num_devices = jax.local_device_count()
    per_device = config.train.batch_size // num_devices
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    vgg_features = train.build_vgg_features(config)[0] if config.loss.lambda_id > 0 else None
    t0 = time.time()
    state = train.create_train_state(config, generator, discriminator, jax.random.PRNGKey(0))
    state = train.replicate(state)
    batch = train.random_batch(config, num_devices, per_device, np.random.default_rng(0))
    # Times the step training would run: a warm-up whose renders drop tile intersections
    # grows the capacity first, as train_and_evaluate does.
    capacity_start = train.render_capacity(config, generator.num_gaussians)
    limit = train.BENCHMARK_CAPACITY_GROWTH * capacity_start
    steps, state, _ = train.warm_up_steps(config, generator, discriminator, vgg_features, state,
                                          batch, warmup, capacity_limit=limit)
    warm = time.time() - t0
    times, overflow = {}, []
    for phase, args in train.phase_args(batch, num_devices).items():
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = steps[phase](state, *args)
            jax.block_until_ready(metrics)
            samples.append(time.perf_counter() - start)
            if phase == "g_step":
                overflow.append(train.step_overflow(metrics))
        times[phase] = statistics.median(samples)
    iteration = times["g_step"] + times["d_step"] + times["d_reg_step"] / config.loss.r1_interval
    return {
        "config": name, "device": jax.devices()[0].device_kind, "num_devices": num_devices,
        "global_batch": config.train.batch_size, "render_resolution": config.render.resolution,
        "uv_resolution": config.model.uv_resolution, "num_gaussians": generator.num_gaussians,
        "backend": train.resolve_backend(config.render.backend),
        "ms_per_phase": {k: round(v * 1e3, 2) for k, v in times.items()},
        "ms_per_iteration": round(iteration * 1e3, 2),
        "images_per_s": round(config.train.batch_size / iteration, 2),
        "images_per_s_per_device": round(config.train.batch_size / iteration / num_devices, 2),
        "render_capacity": train.render_capacity(config, generator.num_gaussians),
        "render_capacity_start": capacity_start,
        "render_capacity_limit": limit,
        "render_overflow_max": max(o["render_overflow_max"] for o in overflow),
        "render_dropped_fraction": max(o["render_dropped_fraction"] for o in overflow),
        "warmup_s": round(warm, 1), "repeats": repeats,
        "paper_reference": "about 12 images/s per RTX A6000 (25M images in 6 days on 4 GPUs)",
    }


def main(argv):
    del argv
    for name in FLAGS.configs:
        print(json.dumps(measure(name, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                                 batch_size=FLAGS.batch_size, backend=FLAGS.backend)),
              flush=True)


if __name__ == "__main__":
    cli.run(main)
