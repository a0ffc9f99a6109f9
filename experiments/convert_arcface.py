"""Converts an arcface_torch IResNet `backbone.pth` to the `.npz` that reta3d.evaluation.arcface loads.

Get the weights yourself (nothing is downloaded at run time): a `backbone.pth` from the
arcface_torch model zoo, https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch
(e.g. ms1mv3_arcface_r50_fp16 or ms1mv3_arcface_r100_fp16). Then, from the repository root:

    python experiments/convert_arcface.py --input=backbone.pth --output=arcface.npz

Needs torch (CPU is enough; it is in requirements-dev.txt). The depth (r18/r34/r50/r100/r200) is
read from the keys. The `.npz` holds the state dict's float tensors verbatim (torch names and
layouts, float32; a "module." prefix and BatchNorm's num_batches_tracked are dropped), and is
validated by building the Flax parameters from it before it is written.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from reta3d.evaluation import arcface  # noqa: E402
from reta3d import cli, errors  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program (importing this file for `convert` registers nothing)."""
    flags.DEFINE_string("input", None, "arcface_torch IResNet state dict, e.g. backbone.pth")
    flags.DEFINE_string("output", "arcface.npz", "where to write the converted .npz")


def convert(input_path: str, output_path: str) -> tuple[str, dict]:
    """Reads an arcface_torch backbone.pth and writes its tensors as .npz.

    Returns (architecture name, {name: float32 array} as written, torch layout). Raises
    FileNotFoundError (with where to get the weights) for a missing input, ValueError naming
    the file for an unreadable file or a state dict that is not an arcface_torch IResNet.
    """
    if not pathlib.Path(input_path).is_file():
        raise errors.MissingInputError(f"{input_path!r} not found. {arcface.WEIGHTS_HINT}")
    arrays = arcface.read_torch_state_dict(input_path)
    name, _ = arcface.detect_architecture(arrays)
    arcface.params_from_state_dict(arrays, source=input_path)  # validates keys, shapes, values
    output = pathlib.Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as file:  # a file object keeps np.savez from appending ".npz"
        np.savez(file, **arrays)
    return name, arrays


def main(argv):
    del argv
    if not FLAGS.input:
        raise app.UsageError("--input is required (an arcface_torch backbone.pth)")
    name, arrays = convert(FLAGS.input, FLAGS.output)
    count = sum(array.size for array in arrays.values())
    print(f"wrote {FLAGS.output}: IResNet {name}, {len(arrays)} tensors, {count} values")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
