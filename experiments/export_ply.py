"""Export the Gaussians of one generated identity as a standard 3DGS `.ply`.

The head at neutral expression (static maps decoded on the neutral FLAME mesh, with G_d at
zero expression), or at frame i of a FLAME sequence. Layout (reta3d/ply.py): binary
little-endian; x, y, z, nx, ny, nz, f_dc_0..2 (SH degree 0: (colour − 0.5)/C0), opacity
(logit), scale_0..2 (log), rot_0..3 (w, x, y, z) — what common 3DGS viewers read. Positions
are in the EG3D world (the head around the origin, camera radius 2.7).

  python experiments/export_ply.py --workdir=runs/demo --seed=3 --out=out/seed3.ply
  python experiments/export_ply.py --workdir=runs/demo --flame_sequence=builtin:talk --frame=20
  python experiments/export_ply.py --config=configs/ffhq512.py --random_init --sh_degree=3
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints: G_ema).")
config_flags.DEFINE_config_file("config", None, "Config file (with --random_init).",
                                lock_config=True)
flags.DEFINE_bool("random_init", False, "Random weights from --config (no trained model).")
flags.DEFINE_integer("init_seed", 0, "PRNG seed of --random_init weights.")
flags.DEFINE_integer("seed", 0, "Identity seed.")
flags.DEFINE_float("psi", 1.0, "Truncation psi (1 = none).")
flags.DEFINE_string("flame_sequence", None,
                    "builtin:talk|blink|nod|smile or a FLAME sequence .npz (default: neutral).")
flags.DEFINE_integer("frame", 0, "Frame of --flame_sequence to export.")
flags.DEFINE_string("expression", None, "Neutral export: leading expression coefficients.")
flags.DEFINE_float("jaw", 0.0, "Neutral export: jaw opening angle (radians).")
flags.DEFINE_bool("use_dynamic", True, "Apply G_d (False: the static maps only).")
flags.DEFINE_integer("sh_degree", 0, "SH degree of the file: 0, or 3 (zero f_rest, for SIBR).")
flags.DEFINE_string("out", "out/head.ply", "Output .ply.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from reta3d import inference, ply

    config, generator, g_vars = inference.load_generator(
        workdir=FLAGS.workdir, config=FLAGS.config, random_init=FLAGS.random_init,
        seed=FLAGS.init_seed)
    model = generator.flame_model
    if FLAGS.flame_sequence is not None:
        if FLAGS.expression is not None or FLAGS.jaw != 0.0:
            raise app.UsageError("--expression/--jaw apply to the neutral export only, not with "
                                 "--flame_sequence")
        # A builtin keeps its default length (its envelopes depend on the length) unless the
        # frame lies beyond it.
        builtin = FLAGS.flame_sequence.startswith(inference.BUILTIN_PREFIX)
        length = FLAGS.frame + 1 if builtin and FLAGS.frame >= inference.DEFAULT_BUILTIN_FRAMES \
            else None
        sequence, _ = inference.get_sequence(FLAGS.flame_sequence, model, length)
        length = sequence["expression"].shape[0]
        if not 0 <= FLAGS.frame < length:
            raise app.UsageError(f"--frame={FLAGS.frame} is outside the sequence's {length} frames")
        flame = {k: v[FLAGS.frame:FLAGS.frame + 1] for k, v in sequence.items()}
        what = f"{FLAGS.flame_sequence} frame {FLAGS.frame}"
    else:
        flame = inference.neutral_flame(model, inference.parse_floats(FLAGS.expression,
                                                                      "--expression"), FLAGS.jaw)
        what = "neutral"
    z = inference.latents_for_seeds([FLAGS.seed], config.model.z_dim)
    static = inference.generate_static_maps(generator, g_vars, z,
                                            inference.conditioning_labels(config, 1), FLAGS.psi)
    gaussians, _ = generator.jit_animate(g_vars, static, flame, use_dynamic=FLAGS.use_dynamic)
    gaussians = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), gaussians)
    path = ply.write_ply(FLAGS.out, gaussians, sh_degree=FLAGS.sh_degree)
    print(json.dumps({"ply": str(path), "seed": FLAGS.seed, "pose": what,
                      "num_gaussians": int(gaussians.means.shape[0]),
                      "sh_degree": FLAGS.sh_degree, "bytes": path.stat().st_size}, indent=2))


if __name__ == "__main__":
    app.run(main)
