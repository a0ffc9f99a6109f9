"""Converts the FID Inception-v3 weights (.pth) to the `.npz` that reta3d.evaluation.inception loads.

Get the weights yourself (nothing is downloaded at run time), either of the two PyTorch ports of
the TF graph "inception-2015-12-05" that every FID implementation uses:
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, from
  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
Then, from the repository root:

    python experiments/convert_inception.py --input=pt_inception-2015-12-05-6726825d.pth \\
        --output=inception.npz

Needs torch (CPU is enough). The key layout (torchvision's Inception3 names, used by both
files, or a saved pytorch-fid `InceptionV3` module's `blocks.*`) is detected from the names.
The `.npz` holds the 470 BatchNorm / conv tensors of the pool3 trunk, plus the 1008-way `fc`
when present, in torchvision's names and layouts, float32 (`num_batches_tracked` dropped).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from reta3d.evaluation import inception  # noqa: E402
from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program: importing this file for its functions (tests)
    must not register flags in absl's global registry, where another script may hold the
    same names."""
    flags.DEFINE_string("input", None, f"FID Inception state dict, e.g. {inception.FID_WEIGHTS_FILE}")
    flags.DEFINE_string("output", "inception.npz", "where to write the converted .npz")


def convert(input_path: str, output_path: str) -> dict:
    """Reads an FID Inception-v3 state dict (.pth) and writes its tensors as .npz.

    Returns the written {torchvision name: float32 array}. Raises FileNotFoundError (with
    where to get the weights) for a missing input, ImportError without torch, and ValueError
    naming the file for an unreadable file or a state dict that is not the FID Inception-v3.
    Nothing is written unless the tensors validate; the .npz is written to a temporary name
    and renamed, so an interrupted run leaves no truncated file.
    """
    state_dict = inception.read_state_dict(input_path)
    arrays = inception.canonical_state_dict(state_dict, source=str(input_path))
    output = pathlib.Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    with open(partial, "wb") as file:  # a file object keeps np.savez from appending ".npz"
        np.savez(file, **arrays)
    partial.replace(output)
    return arrays


def main(argv):
    del argv
    if not FLAGS.input:
        raise app.UsageError(f"--input is required (pytorch-fid's {inception.FID_WEIGHTS_FILE} "
                             f"or torch-fidelity's {inception.TORCH_FIDELITY_WEIGHTS_FILE})")
    if not FLAGS.output.endswith(".npz"):
        raise app.UsageError(f"--output must end in .npz (the loader picks the reader by suffix), "
                             f"got {FLAGS.output}")
    arrays = convert(FLAGS.input, FLAGS.output)
    count = sum(array.size for array in arrays.values())
    print(f"wrote {FLAGS.output}: {len(arrays)} tensors, {count} parameters")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
