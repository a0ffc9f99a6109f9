"""Where a training step spends its time: each piece of the G, D and R1 steps timed alone.

    python experiments/profile_train.py --config=configs/demo.py [--repeats=5]

Every piece is jitted on its own and timed forward and forward+backward (median of `repeats`
after one warm-up, `block_until_ready`), on the config's per-device batch and with the
config's random-init networks: the mapping + G + G_m + blending ("static"), FLAME + frames +
decode + G_d ("animate"), the rasterizer split into projection, binning and compositing, D on
the rendered images, VGG16 for L_ID, and R1. Then the three compiled train phases as
`train.make_steps` builds them, so the pieces can be compared with the whole. Prints one JSON
object (milliseconds). Pieces overlap a little (XLA fuses across them inside a step), so their
sum is not exactly the step.
"""
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from reta3d import cli  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.")
flags.DEFINE_integer("repeats", 5, "Timed runs per piece (median).")
flags.DEFINE_string("only", None, "Comma-separated: static,animate,render,D,vgg,r1,steps.")
FLAGS = flags.FLAGS


def _time(fn, *args, repeats):
    import jax
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def profile(config, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rasterizer
    from rasterizer import binning, projection
    from reta3d import losses, train
    from reta3d.train import random_batch

    num_devices = jax.local_device_count()
    batch_size = config.train.batch_size // num_devices
    generator = train.build_generator(config)
    discriminator = train.build_discriminator(config)
    state = train.create_train_state(config, generator, discriminator, jax.random.PRNGKey(0))
    g_vars, d_vars = state.g_vars, state.d_vars
    batch = {k: v[0] for k, v in random_batch(config, num_devices, batch_size,
                                              np.random.default_rng(0)).items()}
    flame = train.fit_flame({k: batch[k] for k in train.FLAME_KEYS}, generator.flame_model)
    cameras = jnp.asarray(batch["camera"])
    z = jax.random.normal(jax.random.PRNGKey(1), (batch_size, config.model.z_dim))
    res = config.render.resolution
    out = {"config": config.data.path, "device": jax.devices()[0].device_kind,
           "num_devices": num_devices, "per_device_batch": batch_size,
           "render_resolution": res, "num_gaussians": generator.num_gaussians,
           "backend": train.resolve_backend(config.render.backend), "ms": {}}
    ms = out["ms"]

    def fwd_bwd(name, f, *args):
        """f(params, *args) → array; times f and grad of sum(f) w.r.t. params."""
        ms[f"{name}_fwd"] = _time(jax.jit(f), *args, repeats=repeats)
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32))))
        ms[f"{name}_fwd_bwd"] = _time(grad, *args, repeats=repeats)

    def static(params):
        v = dict(g_vars, params=params)
        ws = generator.map_latents(v, z, cameras)
        s = generator.synthesize(v, ws, noise_mode="const")
        return jnp.concatenate([s.face.reshape(batch_size, -1), s.mouth.reshape(batch_size, -1)], 1)

    fwd_bwd("static_mapping_G_Gm_blend", static, g_vars["params"])
    maps = generator.jit_generate_static(g_vars, z, cameras)

    def animate(params, maps):
        gaussians, _ = generator.animate(dict(g_vars, params=params), maps, flame)
        return gaussians.means + gaussians.scales

    fwd_bwd("animate_flame_Gd_decode", animate, g_vars["params"], maps)
    gaussians, _ = generator.jit_animate(g_vars, maps, flame)
    camera = rasterizer.Camera.from_eg3d(cameras, res)
    background = jnp.full((3,), config.render.background, jnp.float32)

    def render(g):
        return rasterizer.render(g, camera, background=background,
                                 backend=config.render.backend).color

    fwd_bwd("render_total", render, gaussians)

    def project(g):
        p = projection.project(g.means, g.scales, g.quats, camera.world_to_camera,
                               camera.intrinsics, res, res)
        return p.means2d.sum() + p.conics.sum() + p.depths.sum()

    fwd_bwd("render_projection", project, gaussians)
    proj = jax.jit(lambda g: projection.project(g.means, g.scales, g.quats,
                                                camera.world_to_camera, camera.intrinsics,
                                                res, res))(gaussians)
    capacity = binning.default_capacity(generator.num_gaussians, res, res)
    bin_fn = jax.jit(lambda p: binning.bin_gaussians(p.means2d, p.depths, p.radii, res, res,
                                                     capacity, conics=p.conics,
                                                     opacities=gaussians.opacities))
    ms["render_binning_sort"] = _time(bin_fn, proj, repeats=repeats)
    bins = bin_fn(proj)
    out["intersections_per_image"] = float(np.mean(
        np.asarray(bins.tile_ranges)[..., 1].max(-1)))
    out["capacity"] = capacity
    from rasterizer.render import _compositor
    composite = _compositor(train.resolve_backend(config.render.backend))

    def comp(opacities, colors):
        return composite(proj.means2d, proj.conics, opacities, colors, proj.depths,
                         jnp.broadcast_to(background, (batch_size, 3)),
                         bins.gaussian_ids, bins.tile_ranges, res, res)[0]

    fwd_bwd("render_compositing", comp, gaussians.opacities, gaussians.colors)
    images = render(gaussians) * 2 - 1
    fwd_bwd("D", lambda p, x: discriminator.apply({"params": p}, x, cameras),
            d_vars["params"], images)
    ms["D_input_grad"] = _time(jax.jit(jax.grad(
        lambda x: jnp.sum(discriminator.apply({"params": d_vars["params"]}, x, cameras)))),
        images, repeats=repeats)
    if config.loss.lambda_id > 0:
        vgg_features, _ = train.build_vgg_features(config)
        ms["vgg_L_ID_fwd_bwd"] = _time(jax.jit(jax.grad(
            lambda x: losses.identity_loss(vgg_features, x, images * 0.9))), images,
            repeats=repeats)

    def r1(p):
        return losses.r1_penalty(lambda x, c: discriminator.apply({"params": p}, x, c),
                                 jnp.asarray(batch["image"]), cameras)[0]

    ms["R1_fwd_bwd"] = _time(jax.jit(jax.grad(r1)), d_vars["params"], repeats=repeats)

    vgg = train.build_vgg_features(config)[0] if config.loss.lambda_id > 0 else None
    steps = train.make_steps(config, generator, discriminator, vgg)
    rstate = train.replicate(state)
    full = random_batch(config, num_devices, batch_size, np.random.default_rng(0))
    decay = np.full((num_devices,), 0.999, np.float32)
    for phase, args in (("g_step", (full, decay)), ("d_step", (full,)),
                        ("d_reg_step", (full,))):
        def run(s, *a, _phase=phase):
            return steps[_phase](s, *a)
        rstate, metrics = run(rstate, *args)  # compile
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rstate, metrics = run(rstate, *args)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        ms[f"step_{phase}"] = round(statistics.median(times) * 1e3, 2)
    it = ms["step_g_step"] + ms["step_d_step"] + ms["step_d_reg_step"] / config.loss.r1_interval
    out["ms_per_iteration"] = round(it, 2)
    out["images_per_s"] = round(config.train.batch_size / it * 1e3, 2)
    return out


def main(argv):
    del argv
    print(json.dumps(profile(FLAGS.config, FLAGS.repeats), indent=1), flush=True)


if __name__ == "__main__":
    cli.run(main)
