"""Export the Gaussians of one generated identity as a standard 3DGS `.ply`.

The head at neutral expression (static maps decoded on the neutral FLAME mesh, with G_d at
zero expression; an --identity at its photo's fitted expression, as invert.py's head.ply),
or at frame i of a FLAME sequence (its motion; the head keeps the
identity's own shape). Layout (reta3d/ply.py): binary
little-endian; x, y, z, nx, ny, nz, f_dc_0..2 (SH degree 0: (colour − 0.5)/C0), opacity
(logit), scale_0..2 (log), rot_0..3 (w, x, y, z) — what common 3DGS viewers read; the header
is the reference 3DGS `save_ply`'s (`element vertex N` on line 3, where SIBR reads it).

Frame: EG3D's world, in which the heads are generated and rendered: y up, the face looking
towards +z (the subject's left at +x), the head around the origin (nose tip near
(0, 0, 0.2)); the frontal camera sits on +z, 2.7 from the origin, looking along −z at
(0, 0, 0.2), image-up = +y, 13.4° field of view. A viewer that takes y as down shows the head
upside down (turn it 180° about x); one whose first camera is on −z shows the back of the head
(turn it 180° about y).

  python experiments/export_ply.py --workdir=runs/demo --seed=3 --out=out/seed3.ply
  python experiments/export_ply.py --workdir=runs/demo --flame_sequence=builtin:talk --frame=20
  python experiments/export_ply.py --config=configs/ffhq512.py --random_init --sh_degree=3
  # an inverted photo (experiments/invert.py), with its own fitted head shape
  python experiments/export_ply.py --workdir=runs/demo --identity=out/me/identity.npz \\
      --out=out/me.ply
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags(psi=True)
flags.DEFINE_integer("seed", 0, "Identity seed.")
flags.DEFINE_string("flame_sequence", None,
                    "builtin:talk|blink|nod|smile or a FLAME sequence .npz (default: neutral).")
flags.DEFINE_integer("frame", 0, "Frame of --flame_sequence to export.")
flags.DEFINE_string("expression", None, "Neutral export: leading expression coefficients.")
flags.DEFINE_float("jaw", 0.0, "Neutral export: jaw opening angle (radians).")
flags.DEFINE_bool("use_dynamic", True, "Apply G_d (False: the static maps only).")
flags.DEFINE_integer("sh_degree", 0, "SH degree of the file: 0, or 3 (zero f_rest, for SIBR).")
flags.DEFINE_string("out", "out/head.ply", "Output .ply.")
cli.define_identity_flag("--seed")


def main(argv):
    cli.start(argv)
    import jax
    import numpy as np

    from reta3d import cameras, inference, ply, sequences

    ply.check_output_suffix(FLAGS.out, "--out")   # before the model loads
    config, generator, g_vars = cli.load_generator_from_flags()
    model = generator.flame_model
    if FLAGS.flame_sequence is not None:
        if FLAGS.expression is not None or FLAGS.jaw != 0.0:
            raise app.UsageError("--expression/--jaw apply to the neutral export only, not with "
                                 "--flame_sequence")
        # A builtin keeps its default length (its envelopes depend on the length) unless the
        # frame lies beyond it.
        builtin = FLAGS.flame_sequence.startswith(sequences.BUILTIN_PREFIX)
        length = FLAGS.frame + 1 if builtin and FLAGS.frame >= sequences.DEFAULT_BUILTIN_FRAMES \
            else None
        sequence, _ = sequences.get_sequence(FLAGS.flame_sequence, model, length)
        length = sequence["expression"].shape[0]
        if not 0 <= FLAGS.frame < length:
            raise app.UsageError(f"--frame={FLAGS.frame} is outside the sequence's {length} frames")
        # The frame's motion; the head keeps the identity's own shape (as animate.py does).
        flame = {k: (np.zeros_like(v[:1]) if k == "shape" else v[FLAGS.frame:FLAGS.frame + 1])
                 for k, v in sequence.items()}
        what = f"{FLAGS.flame_sequence} frame {FLAGS.frame}"
    else:
        flame = sequences.neutral_flame(model, cli.parse_floats(FLAGS.expression, "--expression"),
                                        FLAGS.jaw)
        what = "neutral"
    if FLAGS.identity is not None:
        g_vars, static, identity = cli.load_identity_from_flags(
            generator, g_vars, FLAGS["seed"].present or FLAGS.psi != 1.0)
        # Neutral export: the head as reconstructed (the photo's fitted expression, jaw and
        # eyes) unless --expression / --jaw were given; a sequence frame keeps its own.
        photo_expression = (FLAGS.flame_sequence is None and FLAGS.expression is None
                            and not FLAGS["jaw"].present)
        if photo_expression:
            flame = identity.apply_photo_expression(flame)
            what = "the photo's fitted expression"
        else:
            flame = identity.apply_shape(flame)
    else:
        z = inference.latents_for_seeds([FLAGS.seed], config.model.z_dim)
        static = inference.generate_static_maps(generator, g_vars, z,
                                                cameras.conditioning_labels(config, 1), FLAGS.psi)
    if not FLAGS.use_dynamic and not generator.config.dynamic_module:
        raise app.UsageError(f"--nouse_dynamic: this generator ({generator.config.ablation_row}, "
                             "Tab. 1(c)) has no G_d; its Gaussians come from G itself")
    gaussians, _ = generator.jit_animate(g_vars, static, flame, use_dynamic=FLAGS.use_dynamic)
    gaussians = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), gaussians)
    path = ply.write_ply(FLAGS.out, gaussians, sh_degree=FLAGS.sh_degree)
    cli.print_json({"ply": str(path), "seed": None if FLAGS.identity else FLAGS.seed,
                    "identity": FLAGS.identity, "pose": what,
                    "num_gaussians": int(gaussians.means.shape[0]),
                    "sh_degree": FLAGS.sh_degree, "bytes": path.stat().st_size,
                    "frame": "EG3D world: y up, face towards +z, frontal camera at (0, 0, 2.7)"})


if __name__ == "__main__":
    cli.run(main)
