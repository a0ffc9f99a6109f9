"""The paper's evaluation (Table 1a) for a trained model: FID, KID, ID, AED, APD (and SWD).

  python experiments/evaluate.py --workdir=runs/demo --metrics=fid,kid,id,aed,apd,swd \\
      --num_images=50000 --inception=pt_inception-2015-12-05-6726825d.pth --arcface=backbone.pth

Writes OUT/metrics.json and OUT/metrics.md (Table 1(a)'s layout with the paper's rows beside
this run's; default OUT = WORKDIR/eval). A later call on the same checkpoint adds its metrics to
them; one on another checkpoint keeps the earlier metrics.json as metrics.WEIGHTS.json. Protocols: reta3d/evaluation/protocol.py (EG3D's
fid50k_full for FID/KID; 500 identities x 2 sets for ID; 500 x 20 for AED/APD, re-estimated by
this project's landmark fitter, with the estimator's own error on known-parameter renders
beside it). A metric whose weights are missing is skipped with a message saying which file to
bring and how to convert it; the others still run. Generated features are cached under
OUT/cache, so an interrupted evaluation resumes.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli, errors  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags()
flags.DEFINE_list("metrics", ["fid", "kid", "id", "aed", "apd", "swd"], "Metrics to compute.")
flags.DEFINE_integer("num_images", 50000, "Generated images for FID/KID (EG3D: 50,000); SWD "
                     "uses as many, up to the dataset's size.")
flags.DEFINE_integer("num_identities", 500, "Identities for ID and AED/APD (paper: 500).")
flags.DEFINE_integer("sets_per_identity", 20, "FLAME sets per identity for AED/APD (paper: 20).")
flags.DEFINE_string("inception", None, "FID Inception weights (.pth of pytorch-fid, or .npz).")
flags.DEFINE_string("arcface", None, "ArcFace backbone.pth (arcface_torch) or its .npz.")
flags.DEFINE_integer("face_resolution", 256, "Render size of the images the face metrics read.")
flags.DEFINE_integer("batch", 16, "Images rendered per call.")
flags.DEFINE_enum("id_alignment", "detected", ["detected", "model"],
                  "ID: align the faces dlib finds, or the head model's own projected landmarks.")
flags.DEFINE_integer("seed", 0, "Seed of latents and conditions.")
flags.DEFINE_string("aed_export", None,
                    "AED/APD: write the images and driving parameters to this folder for another "
                    "estimator (e.g. DECA) instead of estimating.")
flags.DEFINE_string("aed_estimates", None,
                    "AED/APD: that estimator's results (.npz: expression (N, E), pose (N, 6), "
                    "optional found (N,)), compared instead of this project's fitter.")
cli.define_landmark_flags()
flags.DEFINE_string("name", None, "Row name in the table (default: the workdir).")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval).")


def main(argv):
    cli.start(argv)
    from reta3d import train
    from reta3d.evaluation import evaluate
    unknown = sorted(set(FLAGS.metrics) - set(evaluate.METRICS))
    if unknown:   # before the model loads
        raise app.UsageError(f"--metrics: unknown {', '.join(unknown)}; choose from "
                             f"{','.join(evaluate.METRICS)}")
    if set(FLAGS.metrics) <= {"fid", "kid"} and FLAGS.inception is None:
        raise errors.InputError(f"nothing to measure: {evaluate.INCEPTION_HINT}")
    config, generator, g_vars = cli.load_generator_from_flags()
    out = FLAGS.out or (pathlib.Path(FLAGS.workdir) / "eval" if FLAGS.workdir else None)
    if out is None:
        raise app.UsageError("--out is required with --random_init")
    source = train.prepare_data(config)
    embedding = None
    if FLAGS.landmark_embedding:
        _, embedding = cli.load_head_and_landmarks(model=generator.flame_model)
    report = evaluate.evaluate(
        config, generator, g_vars, source, out, metrics=FLAGS.metrics,
        num_images=FLAGS.num_images, num_identities=FLAGS.num_identities,
        sets_per_identity=FLAGS.sets_per_identity, inception=FLAGS.inception,
        arcface=FLAGS.arcface, face_resolution=FLAGS.face_resolution, batch=FLAGS.batch,
        seed=FLAGS.seed, id_alignment=FLAGS.id_alignment, landmark_embedding=embedding,
        aed_export=FLAGS.aed_export, aed_estimates=FLAGS.aed_estimates, model_name=FLAGS.name or str(FLAGS.workdir or "random init"))
    print(evaluate.markdown_table(report))
    cli.print_json(report["metrics"])


if __name__ == "__main__":
    cli.run(main)
