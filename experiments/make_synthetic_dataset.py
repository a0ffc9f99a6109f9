"""Render the embedded synthetic dataset: procedurally textured template heads.

  python experiments/make_synthetic_dataset.py --out=data/synthetic64 --num_images=512 --resolution=64

Writes the FFHQ-style folder layout (images/, dataset.json with EG3D camera labels, flame.json),
so the same TFDS builder and loader serve it and real FFHQ. See reta3d/synthetic.py.
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from reta3d import cli  # noqa: E402

flags.DEFINE_string("out", "data/synthetic64",
                    "Output dataset folder (an earlier synthetic dataset there is replaced; any "
                    "other folder is an error).")
flags.DEFINE_integer("num_images", 512, "Number of images.")
flags.DEFINE_integer("resolution", 64, "Image size in pixels (square).")
flags.DEFINE_integer("seed", 0, "Random seed (identities, expressions, cameras).")
flags.DEFINE_float("background", 1.0, "Background grey level in [0, 1]. 1 (white): RGBA "
                   "images whose matte a discriminator that sees alpha can use; any other: "
                   "RGB images over that grey, without a matte.")
flags.DEFINE_string("flame_model", None, "Optional FLAME model (.pkl/.npz); default: template.")
flags.DEFINE_string("flame_uv", None, "UV layout for --flame_model (head_template.obj or .npz).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from reta3d import flame, synthetic
    model = flame.load(FLAGS.flame_model, FLAGS.flame_uv)
    start = time.time()
    path = synthetic.make_synthetic_dataset(FLAGS.out, FLAGS.num_images, FLAGS.resolution,
                                            seed=FLAGS.seed, background=FLAGS.background,
                                            flame_model=model)
    print(f"wrote {FLAGS.num_images} images to {path} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    cli.run(main)
