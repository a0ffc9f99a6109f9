"""Benchmark the RETA3D generator's inference split: generate_static (once per identity) and
animate (per frame: FLAME + decode + G_d + decode), plus G_d alone.

Prints one JSON object: device, sizes, parameter counts, and for every (function, dtype, batch)
the median (min / max) of repeated runs after warm-up, each ended with `block_until_ready`,
with XLA's FLOP count of the compiled function and the analytic count of its networks.
Random-initialised weights (timing does not depend on their values).

  python experiments/benchmark_networks.py [--batch_sizes=1,32] [--dtypes=float32,bfloat16]
                                           [--repeats=20] [--small]
"""
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

cli.define_flame_model_flags()
cli.define_timing_flags(repeats=20, warmup=3)
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes (identities / frames per call).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Convolution compute dtypes to time.")
flags.DEFINE_list("functions", ["generate_static", "animate", "animate_static_only", "dynamic_module"],
                  "Functions to time: generate_static, animate (with G_d), animate_static_only "
                  "(use_dynamic=False, the I_s path), dynamic_module (G_d alone).")
flags.DEFINE_bool("small", False, "Tiny configuration (GeneratorConfig.small()) for a quick CPU run.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, latents and FLAME parameters.")
FLAGS = flags.FLAGS

_FUNCTIONS = ("generate_static", "animate", "animate_static_only", "dynamic_module")


def _xla_flops(jitted, *args):
    """FLOPs of the compiled function from XLA's cost analysis (None if unavailable)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _time(fn, args, warmup, repeats):
    import jax
    import numpy as np

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * float(np.min(times)),
            "max_ms": 1e3 * float(np.max(times)), "first_call_s (compile + run)": first}


def _inputs(config, model, batch, seed):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed + 1), 8)
    z = jax.random.normal(keys[0], (batch, config.z_dim))
    c = jax.random.normal(keys[1], (batch, config.c_dim)) if config.c_dim else None
    flame_params = {  # as many coefficients as the head model holds (the template has fewer)
        "shape": jax.random.normal(keys[2], (batch, min(100, model.num_shape))),
        "expression": jax.random.normal(keys[3], (batch, min(50, model.num_expression))),
        "global_pose": 0.2 * jax.random.normal(keys[4], (batch, 3)),
        "neck_pose": 0.1 * jax.random.normal(keys[5], (batch, 3)),
        "jaw_pose": jnp.abs(0.1 * jax.random.normal(keys[6], (batch, 3))),
        "eye_pose": 0.1 * jax.random.normal(keys[7], (batch, 6)),
    }
    return z, c, flame_params


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from reta3d import flame, inference
    from reta3d.networks import generator as g

    unknown = sorted(set(FLAGS.functions) - set(_FUNCTIONS))
    if unknown:
        raise app.UsageError(f"--functions: unknown {unknown}; choose from {_FUNCTIONS}")
    base = g.GeneratorConfig.small() if FLAGS.small else g.GeneratorConfig()
    model = flame.load(FLAGS.flame_model, FLAGS.flame_uv)
    start = time.perf_counter()
    gen32 = g.RETA3DGenerator.create(base, model)
    binding_seconds = time.perf_counter() - start
    variables = jax.jit(gen32.init)(jax.random.key(FLAGS.seed))
    param_counts = {k: g.count_parameters(v) for k, v in variables["params"].items()}

    results = []
    for dtype in FLAGS.dtypes:
        gen = g.RETA3DGenerator(base.replace(dtype=dtype), gen32.flame_model, gen32.head_binding)
        animate_static_only = jax.jit(lambda v, s, f, gen=gen: gen.animate(v, s, f, use_dynamic=False))

        def dynamic_module(v, s, fxyz, mxyz, cond, gen=gen):
            return gen.dynamic_residual(v, s, fxyz, mxyz, cond)

        dynamic_module = jax.jit(dynamic_module)
        for batch in (int(b) for b in FLAGS.batch_sizes):
            z, c, flame_params = _inputs(base, model, batch, FLAGS.seed)
            start = time.perf_counter()
            static = jax.block_until_ready(gen.jit_generate_static(variables, z, c))
            static_first_call = time.perf_counter() - start
            r, rm = base.uv_resolution, base.mouth_resolution
            xyz = (jnp.zeros((batch, r, r, 3)), jnp.zeros((batch, rm, rm, 3)),
                   g.expression_condition(flame_params, base, batch))
            calls = {
                "generate_static": (gen.jit_generate_static, (variables, z, c),
                                    g.static_generator_flops(base)),
                "animate": (gen.jit_animate, (variables, static, flame_params),
                            g.dynamic_module_flops(base)),
                "animate_static_only": (animate_static_only, (variables, static, flame_params), 0),
                "dynamic_module": (dynamic_module, (variables, static) + xyz, g.dynamic_module_flops(base)),
            }
            for name in FLAGS.functions:
                fn, args, analytic = calls[name]
                entry = {"function": name, "dtype": dtype, "batch_size": batch}
                entry.update(_time(fn, args, FLAGS.warmup, FLAGS.repeats))
                if name == "generate_static":  # it was compiled above to produce `static`
                    entry["first_call_s (compile + run)"] = static_first_call
                entry["per_item_ms"] = entry["median_ms"] / batch
                entry["items_per_second"] = 1e3 * batch / entry["median_ms"]
                entry["xla_gflops"] = (lambda f: None if f is None else f / 1e9)(_xla_flops(fn, *args))
                entry["analytic_network_gflops (convolutions only)"] = analytic * batch / 1e9
                results.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)

    cli.print_json({
        "benchmark": "RETA3D generator: generate_static / animate",
        **inference.device_description(),
        "config": "small" if FLAGS.small else "paper",
        "uv_resolution": base.uv_resolution,
        "mouth_resolution": base.mouth_resolution,
        "flame_model": FLAGS.flame_model or "template",
        "num_gaussians": gen32.num_gaussians,
        "parameters": param_counts,
        "analytic_gflops_batch1": {
            "G": g.synthesis_flops(base.uv_resolution, base.channel_base, base.channel_max) / 1e9,
            "static (G + G_m + blend)": g.static_generator_flops(base) / 1e9,
            "G_d": g.dynamic_module_flops(base) / 1e9,
        },
        "host_binding_build_s": binding_seconds,
        "repeats": FLAGS.repeats,
        "warmup": FLAGS.warmup,
        "results": results,
    })


if __name__ == "__main__":
    cli.run(main)
