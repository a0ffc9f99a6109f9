"""Train RETA3D (or resume): the project's main job.

  python launch.py --config=configs/demo.py --workdir=runs/demo
  python launch.py --config=configs/ffhq512.py --workdir=runs/ffhq512 --config.train.batch_size=32

The workdir holds orbax checkpoints (resumed automatically), metrics.jsonl, TensorBoard events
and sample grids. Any config field can be overridden with --config.a.b=value.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from reta3d import compilation_cache, train
    logging.set_verbosity(logging.WARNING)
    cache = compilation_cache.enable()
    print(f"JAX compilation cache: {cache or 'off'} (RETA3D_COMPILATION_CACHE=off disables it)",
          flush=True)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
