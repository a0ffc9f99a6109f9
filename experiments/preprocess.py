"""Portrait photos → a training dataset folder: EG3D-style crops, camera labels, FLAME fits.

  python experiments/preprocess.py --images=photos/ --out=data/mine --resolution=512
  python experiments/preprocess.py --images=photos/ --out=data/mine --overlays \\
      --flame_model=FLAME2020/generic_model.pkl --landmark_embedding=DECA/data/landmark_embedding.npy

Needs the face extras (`pip install -r requirements-faces.txt`: dlib and its 68-point model).
Writes OUT/images/*.png, OUT/dataset.json, OUT/flame.json (what launch.py reads) and
OUT/preprocess_report.json (one entry per input: written, or skipped with the reason); with
--overlays, OUT/overlays/*.jpg (detected landmarks green, fitted red, the fitted mesh). An
interrupted run resumes where it stopped when started again with the same flags. The pipeline
is reta3d/fitting/preprocess.py (module docstring); the summary is printed as JSON, the photos
skipped are named on stderr, and the exit status is 1 when no photo could be used.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "Folder of portrait photos (searched recursively).")
flags.DEFINE_string("out", None, "Dataset folder to write (resumed if it exists).")
flags.DEFINE_integer("resolution", 512, "Crop size in pixels.", lower_bound=16)
flags.DEFINE_integer("batch_size", 8, "Photos fitted per compiled call.", lower_bound=1)
flags.DEFINE_integer("num_steps", 300, "L-BFGS steps per fit.", lower_bound=1)
flags.DEFINE_float("max_upscale", 4.0, "Skip faces whose crop magnifies the photo more than this.")
flags.DEFINE_float("min_score", 0.5, "Ignore dlib detections scoring lower.")
flags.DEFINE_integer("limit", None, "Only the first N photos (sorted by path).")
flags.DEFINE_bool("overlays", False, "Also write OUT/overlays/*.jpg.")
flags.DEFINE_enum("overlay_background", "photo", ["photo", "grey"],
                  "Draw the overlays on the crop or on plain grey (points and mesh only).")
cli.define_flame_model_flags()
cli.define_landmark_flags()
flags.mark_flags_as_required(["images", "out"])


def main(argv):
    cli.start(argv)
    from reta3d.fitting import media, preprocess
    if not pathlib.Path(FLAGS.images).is_dir():
        raise app.UsageError(f"--images: no such folder: {FLAGS.images} (a folder of photos)")
    media.list_images(FLAGS.images)   # a folder without photos: an error before any loading
    model, embedding = cli.load_head_and_landmarks()
    summary = preprocess.preprocess_folder(
        FLAGS.images, FLAGS.out, FLAGS.resolution, model=model, embedding=embedding,
        batch_size=FLAGS.batch_size, max_upscale=FLAGS.max_upscale, min_score=FLAGS.min_score,
        overlays=FLAGS.overlays, overlay_background=FLAGS.overlay_background,
        num_steps=FLAGS.num_steps, limit=FLAGS.limit)
    cli.print_json(summary)
    preprocess.require_a_dataset(summary, FLAGS.images)   # exit status 1 when nothing was written


if __name__ == "__main__":
    cli.run(main)
