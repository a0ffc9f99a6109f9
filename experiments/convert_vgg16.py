"""Converts torchvision's ImageNet VGG16 weights to the `.npz` that reta3d.vgg loads.

Get the weights yourself (nothing is downloaded at run time): torchvision's
`VGG16_Weights.IMAGENET1K_V1` file `vgg16-397923af.pth`, from
https://download.pytorch.org/models/vgg16-397923af.pth. Then, from the repository root:

    python experiments/convert_vgg16.py --input=vgg16-397923af.pth --output=vgg16.npz

Needs torch (CPU is enough; it is in requirements-dev.txt). The `.npz` holds the 26
`features.*` tensors verbatim (torch names and layout, float32); the classifier is dropped.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from reta3d import vgg  # noqa: E402
from reta3d import cli, errors  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program: importing this file for its functions (tests)
    must not register flags in absl's global registry, where another script may hold the
    same names."""
    flags.DEFINE_string("input", None, f"torchvision VGG16 state dict, e.g. {vgg.VGG16_WEIGHTS_FILE}")
    flags.DEFINE_string("output", "vgg16.npz", "where to write the converted .npz")


def convert(input_path: str, output_path: str) -> dict:
    """Reads a torchvision VGG16 state dict (.pth) and writes the features as .npz.

    Returns the converted {name: float32 array} (torch layout). Raises FileNotFoundError
    for a missing input and ValueError (naming the file) for an unreadable file or a state
    dict that is not VGG16's.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError("convert_vgg16 needs torch (pip install torch, CPU build is enough)") from error
    if not pathlib.Path(input_path).is_file():
        raise errors.MissingInputError(
            f"{input_path!r} not found. Download {vgg.VGG16_WEIGHTS_FILE} from {vgg.VGG16_WEIGHTS_URL}"
        )
    try:
        state_dict = torch.load(input_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{input_path}: cannot be read by torch.load ({type(error).__name__}: {error})") from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{input_path}: expected a state dict, got {type(state_dict).__name__}")
    arrays = {
        name: state_dict[name].detach().to(torch.float32).numpy()
        for name in vgg.torch_key_names()
        if name in state_dict and isinstance(state_dict[name], torch.Tensor)
    }
    # Validates names, shapes and finiteness before anything is written.
    vgg.vgg16_params_from_state_dict(arrays, source=input_path)
    output = pathlib.Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as file:  # a file object keeps np.savez from appending ".npz"
        np.savez(file, **arrays)
    return arrays


def main(argv):
    del argv
    if not FLAGS.input:
        raise app.UsageError(f"--input is required (the torchvision file {vgg.VGG16_WEIGHTS_FILE})")
    arrays = convert(FLAGS.input, FLAGS.output)
    count = sum(array.size for array in arrays.values())
    print(f"wrote {FLAGS.output}: {len(arrays)} tensors, {count} parameters")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
