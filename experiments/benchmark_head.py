"""Benchmark the per-frame head binding: FLAME forward + local frames + decoding.

Times `reta3d.binding.head_gaussians` (jit-compiled) at paper sizes (face map 256²,
mouth patch 64², 14 channels) and prints one JSON object: device, sizes, Gaussian counts,
and per batch size the median (and min / max) of repeated runs after warm-up, each ended
with `block_until_ready`.

  python experiments/benchmark_head.py [--batch_sizes=1,32] [--repeats=20] [--kind=consecutive]
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli  # noqa: E402

cli.define_flame_model_flags()
cli.define_timing_flags(repeats=20, warmup=3)
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes (heads per call) to time.")
flags.DEFINE_enum("kind", "consecutive", ["consecutive", "naive", "global"], "Frame kind.")
flags.DEFINE_integer("face_resolution", 256, "Face UV map resolution R.")
flags.DEFINE_integer("mouth_resolution", 64, "Mouth patch resolution.")
flags.DEFINE_integer("seed", 0, "Seed of the random features and FLAME parameters.")
FLAGS = flags.FLAGS


def _random_inputs(model, batch, face_resolution, mouth_resolution, seed):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    face = 0.3 * jax.random.normal(keys[0], (batch, face_resolution, face_resolution, 14))
    mouth = 0.3 * jax.random.normal(keys[1], (batch, mouth_resolution, mouth_resolution, 14))
    params = {
        "shape": jax.random.normal(keys[2], (batch, model.num_shape)),
        "expression": jax.random.normal(keys[3], (batch, model.num_expression)),
        "global_pose": 0.2 * jax.random.normal(keys[4], (batch, 3)),
        "neck_pose": 0.1 * jax.random.normal(keys[5], (batch, 3)),
        "jaw_pose": jnp.abs(0.1 * jax.random.normal(keys[6], (batch, 3))),
        "eye_pose": 0.1 * jax.random.normal(keys[7], (batch, 6)),
    }
    return face, mouth, params


def main(argv):
    del argv
    import jax
    import numpy as np

    from reta3d import binding, flame, inference

    model = flame.load(FLAGS.flame_model, FLAGS.flame_uv)
    start = time.perf_counter()
    head_binding = binding.HeadBinding.from_model(model, FLAGS.face_resolution,
                                                  FLAGS.mouth_resolution)
    binding_seconds = time.perf_counter() - start

    @jax.jit
    def step(face, mouth, params):
        gaussians, _ = binding.head_gaussians(model, head_binding, face, mouth, params,
                                              kind=FLAGS.kind)
        return gaussians

    results = []
    for batch in (int(b) for b in FLAGS.batch_sizes):
        inputs = _random_inputs(model, batch, FLAGS.face_resolution, FLAGS.mouth_resolution,
                                FLAGS.seed)
        start = time.perf_counter()
        jax.block_until_ready(step(*inputs))
        compile_seconds = time.perf_counter() - start
        for _ in range(FLAGS.warmup):
            jax.block_until_ready(step(*inputs))
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs))
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        results.append({
            "batch_size": batch,
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * float(np.min(times)),
            "max_ms": 1e3 * float(np.max(times)),
            "per_head_ms": 1e3 * median / batch,
            "heads_per_second": batch / median,
            "first_call_s (compile + run)": compile_seconds,
        })

    cli.print_json({
        "benchmark": "head_gaussians (FLAME forward + to_world + normals + frames + decode)",
        **inference.device_description(),
        "kind": FLAGS.kind,
        "flame_model": FLAGS.flame_model or "template",
        "face_resolution": FLAGS.face_resolution,
        "mouth_resolution": FLAGS.mouth_resolution,
        "num_gaussians": {"face": head_binding.num_face, "mouth": head_binding.num_mouth,
                          "total": head_binding.num_gaussians},
        "host_binding_build_s": binding_seconds,
        "repeats": FLAGS.repeats,
        "warmup": FLAGS.warmup,
        "results": results,
    })


if __name__ == "__main__":
    cli.run(main)
