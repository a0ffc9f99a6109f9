"""Sample identities: a multi-view grid PNG (one row per seed) and an orbit video per seed.

The static generator runs once per seed (mapping → G → G_m → blending); every view and every
orbit frame reuses those maps (one `animate` at the chosen expression, then the rasterizer).
The mapping network is conditioned on the frontal camera, as EG3D samples.

  # a trained model (G_ema of the workdir's latest checkpoint)
  python experiments/sample.py --workdir=runs/demo --seeds=0-7 --out=out/samples
  # random weights, for speed work without a trained model
  python experiments/sample.py --config=configs/demo.py --random_init --seeds=0-3 --orbit_frames=0
  # overrides: expression coefficients and jaw opening (radians)
  python experiments/sample.py --workdir=runs/demo --expression=1.5,0,-1 --jaw=0.2
  # an inverted photo (experiments/invert.py) instead of seeds
  python experiments/sample.py --workdir=runs/demo --identity=out/me/identity.npz --out=out/me_views

Writes OUT/grid.png (rows = seeds; columns = the yaw sweep at pitch 0, then the pitch sweep
at yaw 0) and OUT/seedNNNN_orbit.mp4 (or .gif with --video_format=gif; with --identity: one
row and OUT/identity_orbit.mp4, rendered with the identity's fitted FLAME shape, and its
fitted expression, jaw and eyes unless --expression / --jaw are given), and prints
JSON with
"rasterizer_overflow" (tile intersections dropped beyond --capacity over every grid and orbit
image; a warning line goes to stderr when any were).
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import atomic_files, cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags(psi=True)
cli.define_render_flags()
flags.DEFINE_string("seeds", "0-7", "Identity seeds: ranges and lists, e.g. 0-7 or 1,4,10-12.")
flags.DEFINE_integer("truncation_cutoff", None, "Truncate only the first ws (None = all).")
flags.DEFINE_list("yaws", ["-0.6", "-0.3", "0", "0.3", "0.6"], "Grid: yaw sweep (radians).")
flags.DEFINE_list("pitches", ["-0.25", "0.25"], "Grid: pitch sweep at yaw 0 (radians).")
flags.DEFINE_integer("orbit_frames", 60, "Frames of the orbit video per seed (0 = no video).")
flags.DEFINE_float("fps", 30.0, "Orbit video frame rate.")
flags.DEFINE_enum("video_format", "mp4", ["mp4", "gif"], "Orbit video container.")
flags.DEFINE_string("expression", None, "Comma list of leading FLAME expression coefficients.")
flags.DEFINE_float("jaw", 0.0, "Jaw opening angle (radians, rotation about x).")
flags.DEFINE_integer("chunk", 8, "Cameras rendered per call.")
flags.DEFINE_string("out", "out/samples", "Output directory.")
cli.define_identity_flag("--seeds")


def main(argv):
    cli.start(argv)
    import numpy as np

    from reta3d import cameras, inference, sequences, video

    seeds = cli.parse_seeds(FLAGS.seeds)
    yaws = cli.parse_floats(",".join(FLAGS.yaws), "--yaws")
    pitches = cli.parse_floats(",".join(FLAGS.pitches), "--pitches")
    expression = cli.parse_floats(FLAGS.expression, "--expression")
    if FLAGS.orbit_frames < 0:
        raise app.UsageError("--orbit_frames must be >= 0")

    config, generator, g_vars = cli.load_generator_from_flags()
    flame = sequences.neutral_flame(generator.flame_model, expression, FLAGS.jaw)
    identity_static, photo_expression = None, False
    if FLAGS.identity is not None:
        g_vars, identity_static, identity = cli.load_identity_from_flags(
            generator, g_vars, FLAGS["seeds"].present or FLAGS.psi != 1.0
            or FLAGS.truncation_cutoff is not None)
        # The head as reconstructed (novel_views.png), unless an expression was asked for.
        photo_expression = FLAGS.expression is None and not FLAGS["jaw"].present
        flame = (identity.apply_photo_expression(flame) if photo_expression
                 else identity.apply_shape(flame))
        seeds = [None]
    out_dir = pathlib.Path(FLAGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    view_fn = inference.make_view_fn(config, generator, **cli.render_options())
    grid_labels = cameras.view_grid_labels(yaws, pitches)
    orbit_labels = cameras.orbit_labels(FLAGS.orbit_frames) if FLAGS.orbit_frames else None
    z_all = None if identity_static is not None else inference.latents_for_seeds(
        seeds, config.model.z_dim)

    rows, videos, timings, overflow = [], [], [], []
    for row, seed in enumerate(seeds):
        start = time.perf_counter()
        if identity_static is not None:
            static = identity_static
        else:
            static = inference.generate_static_maps(
                generator, g_vars, z_all[row:row + 1], cameras.conditioning_labels(config, 1),
                FLAGS.psi, FLAGS.truncation_cutoff)
        images, counts = inference.render_views(view_fn, g_vars, static, flame, grid_labels,
                                                FLAGS.chunk)
        rows.append(images)
        overflow.append(counts)
        if orbit_labels is not None:
            frames, counts = inference.render_views(view_fn, g_vars, static, flame,
                                                    orbit_labels, FLAGS.chunk)
            overflow.append(counts)
            name = "identity" if seed is None else f"seed{seed:04d}"
            path = out_dir / f"{name}_orbit.{FLAGS.video_format}"
            video.write_video(path, frames, FLAGS.fps)
            videos.append(str(path))
        timings.append(time.perf_counter() - start)
        print(f"{'identity' if seed is None else f'seed {seed}'}: {timings[-1]:.2f}s", flush=True)

    grid = video.image_grid(np.stack(rows))
    grid_path = out_dir / "grid.png"
    atomic_files.save_png(grid_path, grid)
    report = inference.overflow_report(np.concatenate(overflow), view_fn.capacity)
    cli.print_json({
        "grid": str(grid_path), "videos": videos,
        "seeds": [] if identity_static is not None else seeds, "identity": FLAGS.identity,
        "psi": FLAGS.psi,
        "expression": ("the photo's (fitted)" if photo_expression
                       else FLAGS.expression or "neutral"),
        "jaw": "the photo's (fitted)" if photo_expression else FLAGS.jaw,
        "views": grid_labels.shape[0], "resolution": int(rows[0].shape[1]),
        "num_gaussians": generator.num_gaussians,
        "seconds_per_seed (first includes compilation)": timings,
        "rasterizer_overflow": report,
        **inference.device_description()})
    cli.warn_overflow(report)


if __name__ == "__main__":
    cli.run(main)
